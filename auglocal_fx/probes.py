"""Linear probes of a network's blocks, the paper's section 4.3.

``linear_probe``: the network frozen in eval mode; each block's output is
global-average-pooled (``NCHW``/``NHWC``: mean over the grid; tokens: mean over tokens), the
features are standardised with the training features' mean and standard deviation, and a
multinomial logistic regression (a linear layer with bias, zero-initialised) is fit on the
whole training set by full-batch L-BFGS (strong-Wolfe line search, ``max_iter`` iterations,
L2 penalty ``weight_decay * ||W||²``). It reports the top-1 accuracy on the test set, per
block. Nothing in it is random: the same features give the same accuracies; the subsets that
``analysis_data`` draws follow its ``seed``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ._analysis_inputs import DataLike, Frozen, NetLike, as_local, batches, block_names, input_size_of, loader_of
from ._device import resolve_device
from .errors import AugLocalError
from .graph_blocks import as_tuple
from .layouts import FLAT, NCHW, NHWC, TOKENS, layout_of
from .local import LocalNet

__all__ = ["Probe", "linear_probe"]


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
    for x, y in batches(loader, device, desc, progress):
        for j, h in enumerate(local.block_outputs(x)):
            # a boundary carrying a tuple: its newest stream, the one block_shapes describes
            feats[j].append(_pool(as_tuple(h)[-1], layouts[j]).float())
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
        model: ``LocalNet``, a plain model, or a path ``load_trained`` reads.
        train_data: a ``Dataset`` or ``DataLoader`` of ``(image, label)`` pairs (no
            augmentation; a DataLoader is read as it iterates).
        test_data: the same kind as ``train_data``.
        batch_size: images per forward pass when the features are computed from a dataset.
        device: ``"cpu"``, ``"cuda[:N]"`` or ``"auto"``; the network returns where it was.
        max_iter: L-BFGS iterations.
        weight_decay: the L2 penalty on the classifier's weights.
        progress: tqdm bars while the features are computed.

    Returns:
        A ``Probe`` with the top-1 test accuracy (percent) per block.
    """
    if isinstance(train_data, torch.Tensor) or isinstance(test_data, torch.Tensor):
        raise AugLocalError("the linear probe needs labels: pass Datasets or DataLoaders of (image, label) pairs")
    train_loader, test_loader = loader_of(train_data, batch_size), loader_of(test_data, batch_size)
    size = input_size_of(train_loader)
    if size is None:
        raise AugLocalError("the linear probe needs at least 2 training and 1 test examples")
    local = as_local(model, size)
    device = resolve_device(device)
    with Frozen([local], device), torch.no_grad():
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
    return Probe(accuracy=accuracy, names=block_names(local), features=[int(f.shape[1]) for f in train_x],
                 train_examples=len(train_y), test_examples=len(test_y))
