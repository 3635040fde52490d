"""Linear CKA of two networks, block by block: the paper's section 4.3, Figure 3.

The features are each block's output (``LocalNet.block_outputs``): no forward hooks, no layer
names. ``block_cka`` computes the linear CKA (Kornblith et al. 2019) of the flattened block
outputs, one ``(n, C*H*W)`` matrix per block, as Kornblith et al. and the paper use them. It is computed with the minibatch estimator of Nguyen et al. (2021, eq. 3),
so a whole test set fits in bounded memory (one ``(n, n)`` Gram matrix per block at a time)::

    CKA = mean_k HSIC_1(K_k, L_k) / sqrt(mean_k HSIC_1(K_k, K_k) * mean_k HSIC_1(L_k, L_k))

where ``K_k = X_k X_kᵀ`` and ``L_k = Y_k Y_kᵀ`` are the linear Gram matrices of minibatch ``k``
and ``HSIC_1`` is the unbiased estimator of Song et al. (2012), ``hsic_unbiased``.
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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple, Union

import torch

from ._analysis_inputs import DataLike, Frozen, NetLike, as_local, batches, block_names, check_same_partition, \
    input_size_of, loader_of
from ._device import resolve_device
from .errors import AugLocalError
from .graph_blocks import as_tuple

__all__ = ["BlockCKA", "block_cka", "linear_cka", "hsic_unbiased"]


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


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 4:
        raise AugLocalError(f"batch_size must be an integer >= 4 (the unbiased HSIC needs 4 examples), "
                            f"got {batch_size!r}")


def _batch_slices(n: int, batch_size: int) -> List[slice]:
    if n < 4:
        raise AugLocalError(f"CKA needs at least 4 examples, got {n}; pass a larger set")
    _check_batch_size(batch_size)
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


def _equal_batches(images: Iterator[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    """Consecutive minibatches of exactly ``batch_size`` examples, the incomplete tail dropped; a
    set smaller than ``batch_size`` is one minibatch (the estimator's terms need equal ``n``)."""
    _check_batch_size(batch_size)
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



def block_cka(model_a: NetLike, model_b: NetLike, data: DataLike, batch_size: int = 256,
              device: Union[str, torch.device] = "cpu", progress: bool = True) -> BlockCKA:
    """Linear CKA of every block of ``model_a`` with the same block of ``model_b``.

    The features are each block's output (``LocalNet.block_outputs``, eval mode, no
    gradients), flattened per example; the estimator is the minibatch unbiased one of the
    module docstring, in float64.

    Args:
        model_a: ``LocalNet``, a plain model (converted at the data's image size), or a
            path ``load_trained`` reads.
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
    loader = loader_of(data, batch_size)
    a, b = as_local(model_a, input_size_of(loader)), as_local(model_b, input_size_of(loader))
    check_same_partition(a, b)
    sums = [_CKASums() for _ in a.blocks]
    device = resolve_device(device)
    examples = 0
    with Frozen([a, b], device), torch.no_grad():
        images = (x for x, _ in batches(loader, device, "CKA", progress))
        for x in _equal_batches(images, batch_size):
            # a boundary carrying a tuple: its newest stream, the one block_shapes describes
            outs_a = [as_tuple(h)[-1] for h in a.block_outputs(x)]
            outs_b = outs_a if b is a else [as_tuple(h)[-1] for h in b.block_outputs(x)]
            for acc, fa, fb in zip(sums, outs_a, outs_b):
                acc.add(fa, fb)
            examples += len(x)
            step = len(x)
    return BlockCKA(values=[s.value() for s in sums], names=block_names(a),
                    shapes=[tuple(int(v) for v in s) for s in a.block_shapes],
                    examples=examples, batch_size=step, batches=sums[0].batches)

