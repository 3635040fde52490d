"""Representation analysis, the paper's section 4.3: per-block CKA and linear probes.

Two networks of the same architecture (say ``paper:resnet32`` trained by BP and by AugLocal)
are compared block by block at the partition's block outputs (:meth:`LocalNet.block_outputs`):
no forward hooks, no layer names.

**CKA** (:func:`block_cka`, :func:`linear_cka`): linear CKA (Kornblith et al. 2019) of the
flattened block outputs, one ``(n, C*H*W)`` matrix per block, as Kornblith et al. and the
paper use them. It is computed with the minibatch estimator of Nguyen et al. (2021, eq. 3),
so a whole test set fits in bounded memory (one ``(n, n)`` Gram matrix per block at a time)::

    CKA = mean_k HSIC_1(K_k, L_k) / sqrt(mean_k HSIC_1(K_k, K_k) * mean_k HSIC_1(L_k, L_k))

where ``K_k = X_k X_kᵀ`` and ``L_k = Y_k Y_kᵀ`` are the linear Gram matrices of minibatch ``k``
and ``HSIC_1`` is the unbiased estimator of Song et al. (2012), :func:`hsic_unbiased`.
Minibatches are consecutive slices of ``batch_size`` examples in dataset order; the last,
incomplete one is dropped so that every term has the same ``n`` (a set smaller than
``batch_size`` is one batch); ``n >= 4`` is required. Gram matrices and sums are float64.
``CKA(X, X) = 1`` exactly, and it is invariant to orthogonal transforms and isotropic scaling
of either feature matrix.

Why our own estimator: the registry's ``cka-pytorch`` 1.1.3, ``ckatorch`` 1.0.3 and
``pytorch-cka`` 1.1.3 all have a correct ``HSIC_1`` (ours agrees with ``ckatorch``'s to float64
precision), but they read models through forward hooks on named modules, which is what this
module exists to avoid; ``cka-pytorch`` and ``pytorch-cka`` build the Gram matrices in float32
and ``pytorch-cka`` clamps CKA into ``[0, 1]`` (hiding a wrong value); ``ckatorch``'s
feature-level ``cka_batch`` wants all minibatches stacked in memory at once; and they pull in
lightning/torchmetrics or seaborn/safetensors/pyyaml for twenty lines.

**Linear probe** (:func:`linear_probe`): the network frozen in eval mode; each block's output
is global-average-pooled (``NCHW``/``NHWC``: mean over the grid; tokens: mean over tokens), the
features are standardised with the training features' mean and standard deviation, and a
multinomial logistic regression (a linear layer with bias, zero-initialised) is fit on the
whole training set by full-batch L-BFGS (strong-Wolfe line search, ``max_iter`` iterations,
L2 penalty ``weight_decay * ||W||²``). It reports the top-1 accuracy on the test set, per
block. Nothing in it is random: the same features give the same accuracies; the subsets that
:func:`analysis_data` draws follow its ``seed``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from ._device import resolve_device
from ._train_state import CKPT_FORMAT, load_checkpoint
from .data import build_datasets, dataset_geometry
from .errors import AugLocalError, first_line
from .layouts import FLAT, NCHW, NHWC, TOKENS, layout_of
from .local import CHECKPOINT_FORMAT, LocalNet, load, to_local
from .options import ConversionOptions
from .tables import abbreviate_names
from .training import default_dataset

__all__ = ["BlockCKA", "Probe", "AnalysisData", "Comparison", "block_cka", "linear_cka", "hsic_unbiased",
           "linear_probe", "load_trained", "trained_config", "analysis_data", "compare", "describe"]

NetLike = Union[LocalNet, nn.Module, str, os.PathLike]
DataLike = Union[Dataset, DataLoader, torch.Tensor]


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True)
class BlockCKA:
    """Linear CKA between two networks, one value per block.

    Attributes:
        values: CKA of block ``j`` of network A with block ``j`` of network B.
        names: each block's modules, abbreviated (``"layer1.0"``).
        shapes: each block's output shape per example.
        examples: examples used (``batches * batch_size``).
        batch_size: examples per minibatch.
        batches: minibatches averaged.
    """

    values: List[float]
    names: List[str]
    shapes: List[Tuple[int, ...]]
    examples: int
    batch_size: int
    batches: int

    @property
    def mean(self) -> float:
        """The average over blocks (the paper's Figure 3)."""
        return float(sum(self.values) / len(self.values))


@dataclass(frozen=True)
class Probe:
    """Linear-probe test accuracy per block (percent).

    Attributes:
        accuracy: top-1 test accuracy of the linear classifier on block ``j``'s pooled output.
        names: each block's modules, abbreviated.
        features: the pooled feature width of each block.
        train_examples, test_examples: the sizes of the two sets.
    """

    accuracy: List[float]
    names: List[str]
    features: List[int]
    train_examples: int
    test_examples: int


@dataclass(frozen=True)
class AnalysisData:
    """The (un-augmented) sets :func:`analysis_data` builds: ``train`` for probes, ``test``."""

    train: Dataset
    test: Dataset
    num_classes: int
    input_size: Tuple[int, int, int]
    info: Dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- the estimator


def hsic_unbiased(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """The unbiased HSIC estimator of Song et al. (2012), ``HSIC_1`` in Nguyen et al. (2021).

    With ``K~``, ``L~`` the Gram matrices with zeroed diagonals and ``n`` examples::

        HSIC_1 = [tr(K~L~) + 1ᵀK~1 1ᵀL~1 / ((n-1)(n-2)) - 2/(n-2) 1ᵀK~L~1] / (n(n-3))

    Args:
        k, l: symmetric ``(n, n)`` Gram matrices, ``n >= 4``.

    Returns:
        A 0-dim tensor in the inputs' dtype.
    """
    n = k.shape[0]
    if n < 4:
        raise AugLocalError(f"the unbiased HSIC needs at least 4 examples per batch, got {n}; "
                            "use a larger batch size")
    k = k - torch.diag_embed(torch.diagonal(k))
    l = l - torch.diag_embed(torch.diagonal(l))
    k1, l1 = k.sum(dim=1), l.sum(dim=1)
    trace = (k * l).sum()  # tr(KL) for symmetric K, L
    middle = k1.sum() * l1.sum() / ((n - 1) * (n - 2))
    right = 2.0 / (n - 2) * (k1 @ l1)  # 1ᵀKL1 = (K1)ᵀ(L1)
    return (trace + middle - right) / (n * (n - 3))


class _CKASums:
    """Running sums of ``HSIC_1(K, L)``, ``HSIC_1(K, K)``, ``HSIC_1(L, L)`` over minibatches."""

    def __init__(self) -> None:
        self.xy = self.xx = self.yy = 0.0
        self.batches = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        same = x is y
        k = _gram(x)
        l = k if same else _gram(y)
        xx = float(hsic_unbiased(k, k))
        self.xx += xx
        self.yy += xx if same else float(hsic_unbiased(l, l))
        self.xy += xx if same else float(hsic_unbiased(k, l))
        self.batches += 1

    def value(self) -> float:
        """The CKA; NaN where a block's features are constant (``HSIC_1(K, K) = 0``)."""
        denominator = math.sqrt(self.xx * self.yy) if self.xx > 0 and self.yy > 0 else 0.0
        return self.xy / denominator if denominator > 0 else float("nan")


def _gram(x: torch.Tensor, chunk: int = 1 << 16) -> torch.Tensor:
    """``X Xᵀ`` in float64 of the flattened features, summed over column chunks so that a large
    feature map (256 x 56 x 56 per example) never exists in float64 all at once."""
    x = x.reshape(x.shape[0], -1)
    gram = torch.zeros(x.shape[0], x.shape[0], dtype=torch.float64, device=x.device)
    for i in range(0, x.shape[1], chunk):
        part = x[:, i:i + chunk].to(torch.float64)
        gram += part @ part.T
    return gram


def _batch_slices(n: int, batch_size: int) -> List[slice]:
    if n < 4:
        raise AugLocalError(f"CKA needs at least 4 examples, got {n}; pass a larger set")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 4:
        raise AugLocalError(f"batch_size must be an integer >= 4 (the unbiased HSIC needs 4 examples), "
                            f"got {batch_size!r}")
    size = min(batch_size, n)
    return [slice(i * size, (i + 1) * size) for i in range(n // size)]  # the incomplete tail is dropped


def linear_cka(x: torch.Tensor, y: torch.Tensor, batch_size: Optional[int] = None) -> float:
    """Minibatch linear CKA of two feature matrices (Nguyen et al. 2021).

    Args:
        x, y: features of the same ``N`` examples, ``(N, ...)``; flattened per example.
        batch_size: examples per minibatch; ``None``: all ``N`` as one batch (the unbiased
            full-set estimate). A last incomplete batch is dropped.

    Returns:
        The CKA in ``[-1, 1]`` (in practice ``[0, 1]``), or NaN for constant features.
    """
    if x.shape[0] != y.shape[0]:
        raise AugLocalError(f"x and y must hold the same examples, got {x.shape[0]} and {y.shape[0]} rows")
    sums = _CKASums()
    for part in _batch_slices(x.shape[0], batch_size or x.shape[0]):
        sums.add(x[part], y[part])
    return sums.value()


# ----------------------------------------------------------------------------- loading networks


def trained_config(path: Union[str, os.PathLike]) -> Optional[Dict[str, Any]]:
    """The training options of a ``train`` output (``OUT`` or ``OUT/model.pt``), from ``OUT/last.pt``.

    Returns ``None`` for a :meth:`LocalNet.save` checkpoint (it holds no training options).

    Raises:
        AugLocalError: a missing folder or file, or an unreadable ``last.pt``.
    """
    model_file = _model_file(path)
    if _payload_format(model_file) == CHECKPOINT_FORMAT:
        return None
    last = model_file.parent / "last.pt"
    if not last.is_file():
        raise AugLocalError(f"{model_file} has no last.pt beside it, so its model and options are unknown; "
                            "pass the OUT folder of an `auglocal-fx train` run")
    return dict(load_checkpoint(last)["config"])


def load_trained(path: Union[str, os.PathLike], map_location: Union[str, torch.device] = "cpu") -> LocalNet:
    """A trained network as a :class:`LocalNet` (blocks and head hold the trained weights).

    Args:
        path: an ``auglocal-fx train`` output folder ``OUT``, its ``OUT/model.pt`` (the spec and
            options are read from ``OUT/last.pt``), or a :meth:`LocalNet.save` checkpoint.
        map_location: where to load the tensors.

    Raises:
        AugLocalError: a missing or corrupt file, a run trained from a model object (no spec to
            rebuild it from), or weights that do not fit the architecture.
    """
    model_file = _model_file(path)
    if _payload_format(model_file) == CHECKPOINT_FORMAT:
        return load(model_file, map_location=map_location)
    config = trained_config(model_file)
    spec = config.get("model")
    if not isinstance(spec, str) or ":" not in spec:
        raise AugLocalError(f"{model_file} was trained from a model object ({spec}), not a spec: load "
                            "the weights into that model and pass it with to_local(model, input_size=...)")

    classes, size = dataset_geometry(config["dataset"], config.get("input_size"))
    # A BP run's local options were never used: the defaults only give it (unused) auxiliary nets.
    options = {} if config.get("method") == "bp" else {
        k: config[k] for k in ("d", "tau", "pyramid", "selection", "aux_head", "rule") if k in config}
    # Runs before model_kwargs existed have no such key: the builder's defaults.
    local = to_local(spec, input_size=size, num_classes=classes, model_kwargs=config.get("model_kwargs"),
                     **options)
    state = torch.load(model_file, map_location=map_location, weights_only=True)
    try:
        local.export().load_state_dict(state, strict=True)
    except Exception as exc:  # noqa: BLE001 - any mismatch is the user's file
        raise AugLocalError(f"the weights in {model_file} do not fit {spec} "
                            f"({first_line(exc, limit=160)}); is it the model.pt of that run?") from None
    return local.to(map_location)


def _model_file(path: Union[str, os.PathLike]) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
        if not path.is_file():
            raise AugLocalError(f"{path.parent} has no model.pt: pass the OUT folder of a finished "
                                "`auglocal-fx train` run")
    elif not path.is_file():
        raise AugLocalError(f"checkpoint {str(path)!r} does not exist")
    if path.name == "last.pt":
        raise AugLocalError(f"{path} is the training state; pass {path.parent}/model.pt or the folder {path.parent}")
    return path


def _payload_format(path: Path) -> Optional[str]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise AugLocalError(f"checkpoint {path} is corrupt or not a torch file ({type(exc).__name__}); "
                            "pass the model.pt of a finished `auglocal-fx train` run") from None
    if not isinstance(payload, dict):
        raise AugLocalError(f"{path} holds a {type(payload).__name__}, not a state_dict or LocalNet checkpoint")
    fmt = payload.get("format")
    if fmt == CKPT_FORMAT:
        raise AugLocalError(f"{path} is the training state; pass {path.parent}/model.pt or the folder {path.parent}")
    return fmt if isinstance(fmt, str) else None


def _as_local(net: NetLike, input_size: Optional[Sequence[int]] = None) -> LocalNet:
    if isinstance(net, LocalNet):
        return net
    if isinstance(net, (str, os.PathLike)):
        return load_trained(net)
    if isinstance(net, nn.Module):
        return to_local(net, input_size=input_size)
    raise AugLocalError(f"expected a LocalNet, an nn.Module or a checkpoint path, not {type(net).__name__}")


def _check_same_partition(a: LocalNet, b: LocalNet) -> None:
    if len(a.blocks) != len(b.blocks):
        raise AugLocalError(f"the networks have {len(a.blocks)} and {len(b.blocks)} blocks; CKA per block "
                            "needs two trainings of the same architecture")
    for j, (sa, sb) in enumerate(zip(a.block_shapes, b.block_shapes)):
        if tuple(sa) != tuple(sb):
            raise AugLocalError(f"block {j} outputs {tuple(sa)} in one network and {tuple(sb)} in the other; "
                                "compare two trainings of the same architecture at the same input size")


# ----------------------------------------------------------------------------- data


def analysis_data(dataset: str, input_size: Sequence[int], data_dir: Optional[str] = None,
                  test_subset: Optional[int] = None, probe_train_subset: Optional[int] = None,
                  seed: int = 0) -> AnalysisData:
    """Training and test sets without augmentation, optionally seeded random subsets.

    Args:
        dataset: a name :func:`auglocal_fx.data.build_datasets` accepts.
        input_size: ``(C, H, W)`` the networks were trained at (``LocalNet.input_size``).
        data_dir: the dataset folder, as for training.
        test_subset: keep this many test images (a seeded random subset, in a fixed order).
        probe_train_subset: keep this many training images for the probes.
        seed: seeds both subsets.
    """

    data = build_datasets(dataset, data_dir, tuple(input_size), augment=False)
    train = _subset(data.train, probe_train_subset, seed)
    test = _subset(data.test, test_subset, seed + 1)
    return AnalysisData(train, test, data.num_classes, data.input_size,
                        {"dataset": dataset, "train_examples": len(train), "test_examples": len(test),
                         "seed": seed})


def _subset(data: Dataset, n: Optional[int], seed: int) -> Dataset:
    if n is None or n >= len(data):
        return data
    generator = torch.Generator().manual_seed(seed)
    return Subset(data, torch.randperm(len(data), generator=generator)[:n].tolist())


def _loader(data: DataLike, batch_size: int) -> DataLoader:
    """The batches of ``data``: a DataLoader as given (its order, sampler and transforms); a
    dataset or a tensor of images ``(N, C, H, W)`` in order, ``batch_size`` at a time."""
    if isinstance(data, DataLoader):
        return data
    if isinstance(data, torch.Tensor):
        if data.dim() < 2:
            raise AugLocalError(f"a tensor of images must be (N, C, H, W), got shape {tuple(data.shape)}")
        data = TensorDataset(data, torch.zeros(len(data), dtype=torch.long))
    elif not isinstance(data, Dataset):
        raise AugLocalError(f"data must be a torch Dataset, a DataLoader or a tensor of images (N, C, H, W), "
                            f"got {type(data).__name__}")
    return DataLoader(data, batch_size=batch_size, shuffle=False)


def _batches(loader: DataLoader, device: torch.device, desc: str,
             progress: bool) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """``(images, labels)`` on ``device`` from each batch of ``loader``."""
    if progress:
        from tqdm.auto import tqdm

        loader = tqdm(loader, desc=desc, leave=False)
    for batch in loader:
        if not (isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[0], torch.Tensor)):
            raise AugLocalError(f"each batch must be (images, labels), got {type(batch).__name__}; pass a "
                                "Dataset or DataLoader of (image, label) pairs")
        yield batch[0].to(device), torch.as_tensor(batch[1]).to(device)


def _input_size(loader: DataLoader) -> Optional[Tuple[int, ...]]:
    """``(C, H, W)`` of the first batch's images (``None`` for no data)."""
    first = next(_batches(loader, torch.device("cpu"), "", False), None)
    return None if first is None else tuple(first[0].shape[1:])


def _equal_batches(images: Iterator[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    """Consecutive minibatches of exactly ``batch_size`` examples, the incomplete tail dropped; a
    set smaller than ``batch_size`` is one minibatch (the estimator's terms need equal ``n``)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 4:
        raise AugLocalError(f"batch_size must be an integer >= 4 (the unbiased HSIC needs 4 examples), "
                            f"got {batch_size!r}")
    pending: List[torch.Tensor] = []
    held, emitted = 0, False
    for x in images:
        pending.append(x)
        held += len(x)
        while held >= batch_size:
            joined = pending[0] if len(pending) == 1 else torch.cat(pending)
            yield joined[:batch_size]
            emitted = True
            rest = joined[batch_size:]
            pending, held = ([rest] if len(rest) else []), len(rest)
    if not emitted:
        if held < 4:
            raise AugLocalError(f"CKA needs at least 4 examples, got {held}; pass a larger set")
        yield torch.cat(pending)


class _Frozen:
    """Eval mode and ``device`` for the body; the mode and device are restored afterwards."""

    def __init__(self, nets: Sequence[LocalNet], device: torch.device):
        self.nets = list({id(n): n for n in nets}.values())
        self.device = device

    def __enter__(self):
        self.state = [(n.training, next((p.device for p in n.parameters()), self.device)) for n in self.nets]
        for n in self.nets:
            n.to(self.device).eval()
        return self

    def __exit__(self, *exc):
        for n, (mode, device) in zip(self.nets, self.state):
            n.to(device).train(mode)


# ----------------------------------------------------------------------------- CKA


def block_cka(model_a: NetLike, model_b: NetLike, data: DataLike, batch_size: int = 256,
              device: Union[str, torch.device] = "cpu", progress: bool = True) -> BlockCKA:
    """Linear CKA of every block of ``model_a`` with the same block of ``model_b``.

    The features are each block's output (:meth:`LocalNet.block_outputs`, eval mode, no
    gradients), flattened per example; the estimator is the minibatch unbiased one of the
    module docstring, in float64.

    Args:
        model_a: :class:`LocalNet`, a plain model (converted at the data's image size), or a
            path :func:`load_trained` reads.
        model_b: the same kinds as ``model_a``, with the same partition: block count and
            output shapes.
        data: a ``Dataset`` or ``DataLoader`` of ``(image, label)`` pairs, or a tensor of
            images ``(N, C, H, W)``. A DataLoader is read as it iterates (its order, sampler
            and transforms) and its batches are regrouped into minibatches of ``batch_size``.
        batch_size: examples per minibatch (>= 4); the incomplete last batch is dropped.
        device: ``"cpu"``, ``"cuda[:N]"`` or ``"auto"``; the networks return where they were.
        progress: a tqdm bar over the minibatches.

    Raises:
        AugLocalError: networks with different partitions, fewer than 4 examples, bad options.
    """
    loader = _loader(data, batch_size)
    a, b = _as_local(model_a, _input_size(loader)), _as_local(model_b, _input_size(loader))
    _check_same_partition(a, b)
    sums = [_CKASums() for _ in a.blocks]
    device = resolve_device(device)
    examples = 0
    with _Frozen([a, b], device), torch.no_grad():
        images = (x for x, _ in _batches(loader, device, "CKA", progress))
        for x in _equal_batches(images, batch_size):
            outs_a = list(a.block_outputs(x))
            outs_b = outs_a if b is a else list(b.block_outputs(x))
            for acc, fa, fb in zip(sums, outs_a, outs_b):
                acc.add(fa, fb)
            examples += len(x)
            step = len(x)
    return BlockCKA(values=[s.value() for s in sums], names=_names(a),
                    shapes=[tuple(int(v) for v in s) for s in a.block_shapes],
                    examples=examples, batch_size=step, batches=sums[0].batches)


def _names(local: LocalNet) -> List[str]:
    return [abbreviate_names(names) for names in local.block_names]


# ----------------------------------------------------------------------------- linear probe


def _pool(h: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == NCHW:
        return h.mean(dim=tuple(range(2, h.dim())))
    if layout == NHWC:
        return h.mean(dim=(1, 2))
    if layout == TOKENS:
        return h.mean(dim=1)
    return h.reshape(h.shape[0], -1) if layout == FLAT else h.flatten(1)


def _pooled_features(local: LocalNet, loader: DataLoader, device: torch.device, desc: str,
                     progress: bool) -> Tuple[List[torch.Tensor], torch.Tensor]:
    layouts = [layout_of(s) for s in local.block_shapes]
    feats: List[List[torch.Tensor]] = [[] for _ in local.blocks]
    labels = []
    for x, y in _batches(loader, device, desc, progress):
        for j, h in enumerate(local.block_outputs(x)):
            feats[j].append(_pool(h, layouts[j]).float())
        labels.append(y)
    if not labels:
        return [torch.empty(0, 0) for _ in feats], torch.empty(0, dtype=torch.long)
    return [torch.cat(f) for f in feats], torch.cat(labels)


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, classes: int, max_iter: int,
                  weight_decay: float) -> nn.Linear:
    clf = nn.Linear(x.shape[1], classes).to(x.device)
    nn.init.zeros_(clf.weight)
    nn.init.zeros_(clf.bias)
    optimizer = torch.optim.LBFGS(clf.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(clf(x), y) + weight_decay * clf.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return clf


def linear_probe(model: NetLike, train_data: DataLike, test_data: DataLike, batch_size: int = 256,
                 device: Union[str, torch.device] = "cpu", max_iter: int = 200,
                 weight_decay: float = 1e-4, progress: bool = True) -> Probe:
    """Test accuracy of a linear classifier on each block's frozen, pooled features.

    The protocol (module docstring): global-average-pooled block outputs, standardised with the
    training features' statistics, multinomial logistic regression from zero by full-batch
    L-BFGS with an L2 penalty. Deterministic: it draws no random numbers.

    Args:
        model: :class:`LocalNet`, a plain model, or a path :func:`load_trained` reads.
        train_data: a ``Dataset`` or ``DataLoader`` of ``(image, label)`` pairs (no
            augmentation; a DataLoader is read as it iterates).
        test_data: the same kind as ``train_data``.
        batch_size: images per forward pass when the features are computed from a dataset.
        device: ``"cpu"``, ``"cuda[:N]"`` or ``"auto"``; the network returns where it was.
        max_iter: L-BFGS iterations.
        weight_decay: the L2 penalty on the classifier's weights.
        progress: tqdm bars while the features are computed.

    Returns:
        A :class:`Probe` with the top-1 test accuracy (percent) per block.
    """
    if isinstance(train_data, torch.Tensor) or isinstance(test_data, torch.Tensor):
        raise AugLocalError("the linear probe needs labels: pass Datasets or DataLoaders of (image, label) pairs")
    train_loader, test_loader = _loader(train_data, batch_size), _loader(test_data, batch_size)
    size = _input_size(train_loader)
    if size is None:
        raise AugLocalError("the linear probe needs at least 2 training and 1 test examples")
    local = _as_local(model, size)
    device = resolve_device(device)
    with _Frozen([local], device), torch.no_grad():
        train_x, train_y = _pooled_features(local, train_loader, device, "probe features (train)", progress)
        test_x, test_y = _pooled_features(local, test_loader, device, "probe features (test)", progress)
    if len(train_y) < 2 or len(test_y) < 1:
        raise AugLocalError("the linear probe needs at least 2 training and 1 test examples")
    classes = max(int(local.num_classes), int(train_y.max()) + 1, int(test_y.max()) + 1)
    accuracy = []
    for xtr, xte in zip(train_x, test_x):
        mean, std = xtr.mean(dim=0), xtr.std(dim=0)
        std = torch.where(std > 1e-8, std, torch.ones_like(std))
        clf = _fit_logistic((xtr - mean) / std, train_y, classes, max_iter, weight_decay)
        with torch.no_grad():
            pred = clf((xte - mean) / std).argmax(dim=1)
        accuracy.append(100.0 * float((pred == test_y).double().mean()))
    return Probe(accuracy=accuracy, names=_names(local), features=[int(f.shape[1]) for f in train_x],
                 train_examples=len(train_y), test_examples=len(test_y))


# ----------------------------------------------------------------------------- both, for the CLI


@dataclass(frozen=True)
class Comparison:
    """What :func:`compare` returns: the CKA per block and, optionally, both networks' probes.

    Attributes:
        names: ``(A, B)`` as given (paths, or the LocalNets' specs).
        descriptions: ``(A, B)``: spec and training method of each.
        dataset: the dataset the features were computed on.
        input_size: ``(C, H, W)`` of the images.
        cka: :class:`BlockCKA` of A with B.
        probe_a, probe_b: :class:`Probe` of each network, or ``None`` without probes.
        seed: the seed of the data subsets.
    """

    names: Tuple[str, str]
    descriptions: Tuple[str, str]
    dataset: str
    input_size: Tuple[int, int, int]
    cka: BlockCKA
    probe_a: Optional[Probe]
    probe_b: Optional[Probe]
    seed: int

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON-ready values: one record per block, the average CKA, the protocol."""
        blocks = []
        for j, name in enumerate(self.cka.names):
            record = {"block": j, "modules": name, "shape": list(self.cka.shapes[j]), "cka": self.cka.values[j]}
            if self.probe_a is not None and self.probe_b is not None:
                record["probe_a"] = self.probe_a.accuracy[j]
                record["probe_b"] = self.probe_b.accuracy[j]
            blocks.append(record)
        out: Dict[str, Any] = {
            "a": self.names[0], "b": self.names[1], "a_model": self.descriptions[0],
            "b_model": self.descriptions[1], "dataset": self.dataset, "input_size": list(self.input_size),
            "mean_cka": self.cka.mean, "blocks": blocks,
            "cka_protocol": {"kernel": "linear", "features": "flattened block outputs",
                             "estimator": "minibatch unbiased HSIC (Nguyen et al. 2021)",
                             "examples": self.cka.examples, "batch_size": self.cka.batch_size,
                             "batches": self.cka.batches},
            "seed": self.seed,
        }
        if self.probe_a is not None:
            out["probe_protocol"] = {"features": "global-average-pooled block outputs, standardised",
                                     "classifier": "multinomial logistic regression, full-batch L-BFGS",
                                     "train_examples": self.probe_a.train_examples,
                                     "test_examples": self.probe_a.test_examples}
        return out


def describe(path: NetLike) -> str:
    """``"paper:resnet32, bp"`` / ``"paper:resnet32, auglocal d=2"`` for a checkpoint or LocalNet."""
    if isinstance(path, LocalNet):
        return f"{path.spec or 'model'}, {path.conversion.describe('brief')}"
    config = trained_config(path) if isinstance(path, (str, os.PathLike)) else None
    if config is None:
        local = load(_model_file(path)) if isinstance(path, (str, os.PathLike)) else None
        return describe(local) if local is not None else type(path).__name__
    if config.get("method") == "bp":
        return f"{config['model']}, bp"
    options = ConversionOptions(d=config.get("d", 2), rule=config.get("rule", "auglocal"))
    return f"{config['model']}, {options.describe('brief')}"


def compare(model_a: NetLike, model_b: NetLike, dataset: Optional[str] = None, data_dir: Optional[str] = None,
            batch_size: int = 256, test_subset: Optional[int] = None, probe: bool = False,
            probe_train_subset: Optional[int] = None, device: Union[str, torch.device] = "cpu",
            seed: int = 0, progress: bool = True, input_size: Optional[Sequence[int]] = None) -> Comparison:
    """:func:`block_cka` of two trained networks and, with ``probe``, :func:`linear_probe` of each.

    Args:
        model_a, model_b: ``train`` outputs (``OUT`` or ``OUT/model.pt``), LocalNet checkpoints,
            or :class:`LocalNet` objects; the same partition at the same input size.
        dataset: default: the dataset A was trained on (read from ``OUT/last.pt``), else
            :func:`auglocal_fx.training.default_dataset`.
        data_dir: the dataset folder.
        batch_size: CKA minibatch size (and the forward batch of the probes).
        test_subset: use a seeded random subset of this many test images.
        probe: also train the linear probes.
        probe_train_subset: train the probes on this many training images (default: all).
        device: ``"cpu"``, ``"cuda[:N]"`` or ``"auto"``.
        seed: seeds the subsets.
        progress: tqdm bars.
        input_size: ``(C, H, W)`` to convert plain ``nn.Module`` arguments at (default: the
            dataset's own size); trained networks keep the size they were trained at.

    Raises:
        AugLocalError: unreadable checkpoints, different architectures or input sizes, a
            missing dataset, bad options.
    """
    if dataset is None:
        config = trained_config(model_a) if isinstance(model_a, (str, os.PathLike)) else None
        if config is not None:
            dataset = config["dataset"]
        else:

            dataset = default_dataset()
    if input_size is None:

        input_size = dataset_geometry(dataset)[1]
    a, b = _as_local(model_a, input_size), _as_local(model_b, input_size)
    _check_same_partition(a, b)
    if tuple(a.input_size) != tuple(b.input_size):
        raise AugLocalError(f"the networks were trained at {tuple(a.input_size)} and {tuple(b.input_size)}; "
                            "compare two networks trained at the same input size")
    data = analysis_data(dataset, a.input_size, data_dir, test_subset,
                         probe_train_subset if probe else 1, seed)
    cka = block_cka(a, b, data.test, batch_size=batch_size, device=device, progress=progress)
    probe_a = probe_b = None
    if probe:
        probe_a = linear_probe(a, data.train, data.test, batch_size, device, progress=progress)
        probe_b = linear_probe(b, data.train, data.test, batch_size, device, progress=progress)
    names = tuple(str(m) if isinstance(m, (str, os.PathLike)) else (getattr(m, "spec", None) or type(m).__name__)
                  for m in (model_a, model_b))
    return Comparison(names, (describe(model_a if not isinstance(model_a, nn.Module) else a),
                              describe(model_b if not isinstance(model_b, nn.Module) else b)),
                      dataset, tuple(data.input_size), cka, probe_a, probe_b, seed)
