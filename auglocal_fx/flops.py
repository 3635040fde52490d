"""Forward FLOPs of a ``LocalNet``, counted with fvcore.

Convention (fvcore's, and the paper's Table 7): **one fused multiply-add counts as one FLOP**;
the figures are the forward pass of **one** example (batch 1) at the network's input size.
Operators fvcore has no formula for (elementwise ``aten::add`` of residual connections, for
instance) are not counted, as in the paper, but they are listed by
``LocalFlops.unsupported_ops``, never silently dropped.

The analysis object is thin, lazy and cached, like fvcore's ``FlopCountAnalysis``: nothing runs
until the first query, and every primary block, the head and every auxiliary network is counted
once, on a batch-1 input of the shape it sees in the network (each block's input shape is the
output shape of the previous block's count: nothing runs besides fvcore's traces). Counts are
kept per (module architecture, input shape) in a :class:`FlopCache` the analysis owns, so
identical blocks and auxiliary networks (common in ResNets) are traced once; analyses of one
model can share one (``auglocal_fx.budget.solve_budget`` sweeping ``d`` and ``tau`` never
recounts a primary block). Formatting lives apart, in ``auglocal_fx.tables``.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, List, Optional, Set, Tuple

from torch import nn

# Counting one module lives in ``_module_flops``; ``LocalFlops`` calls ``_count_module`` through
# this module's namespace (the laziness test watches it here).
from ._module_flops import FlopCache, Shape, _count_module, _one_tensor, _quiet, count_module_flops
from .errors import AugLocalError

__all__ = [
    "BlockCost",
    "AuxCost",
    "FlopCache",
    "LocalFlops",
    "count_flops",
    "count_module_flops",
]

@dataclass(frozen=True)
class BlockCost:
    """Forward cost of one primary block (or of the head, ``index == -1``).

    Attributes:
        index: block index ``j`` (``-1`` for the classifier head).
        names: module names the block is made of.
        input_shape: ``(C, H, W)`` of its input.
        output_shape: shape of its output without the batch dimension.
        flops: forward FLOPs of one example (one multiply-add = one FLOP).
        params: number of parameters; one shared with an earlier block is counted there only, so
            the blocks' and the head's counts add up to the primary network's.
    """

    index: int
    names: Tuple[str, ...]
    input_shape: Shape
    output_shape: Shape
    flops: int
    params: int


@dataclass(frozen=True)
class AuxCost:
    """Forward cost of the auxiliary network attached to primary block ``block``.

    Attributes:
        block: index ``j`` of the primary block it is attached to.
        selected: primary blocks whose architectures it copies, in order.
        strides: the plan's stride (1 or 2) of each copy.
        depth: the paper's ``d`` of this auxiliary network (copies + classifier).
        flops: forward FLOPs of one example (one multiply-add = one FLOP).
        params: number of parameters.
        reductions: the factor by which each copy, as built, divides the height of its input
            (pooling and strides; ``AuxNet.reductions``): what the tables and plots show.
    """

    block: int
    selected: Tuple[int, ...]
    strides: Tuple[int, ...]
    depth: int
    flops: int
    params: int
    reductions: Tuple[int, ...] = ()


def _num_params(modules: Iterable[nn.Module], seen: Optional[Set[int]] = None) -> int:
    """Values of the parameters of ``modules`` not in ``seen`` (ids; updated), each counted once."""
    seen = set() if seen is None else seen
    total = 0
    for module in modules:
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


class LocalFlops:
    """Lazy, cached forward FLOPs and parameter counts of a ``LocalNet``.

    One fused multiply-add counts as one FLOP (fvcore's convention); all figures are for one
    example at ``local.input_size``. Nothing is traced until the first query.

    Example:
        >>> flops = LocalFlops(to_local("paper:resnet32", d=2))
        >>> flops.total, flops.primary, flops.aux_total        # doctest: +SKIP

    Args:
        local: the converted network.
        cache: counts shared with other analyses of the same model (see :class:`FlopCache`);
            ``None``: this analysis keeps its own.
    """

    def __init__(self, local: nn.Module, cache: Optional[FlopCache] = None):
        self.local = local
        self._cache = cache if cache is not None else FlopCache()
        self._unsupported: Counter = Counter()

    # -- counting (each runs on its first query, then is cached) -----------------------------
    @functools.cached_property
    def _primary_costs(self) -> Tuple[List[BlockCost], BlockCost]:
        local = self.local
        names = list(getattr(local, "block_names", [[] for _ in local.blocks]))
        shape: Optional[Shape] = tuple(int(v) for v in local.input_size)
        blocks = []
        counted: Set[int] = set()  # a shared parameter counts with its first user
        with _quiet():  # once for every block
            # Each block's input shape is the previous block's output shape, taken from its
            # count (fvcore's trace): the primary network is not run besides.
            for j, block in enumerate(local.blocks):
                count = _count_module(block, _one_tensor(shape, f"block {j - 1}"), self._cache)
                self._unsupported.update(dict(count.unsupported))
                blocks.append(BlockCost(j, tuple(names[j]) if j < len(names) else (), shape,
                                        _one_tensor(count.output_shape, f"block {j}"),
                                        count.flops, _num_params([block], counted)))
                shape = count.output_shape
            head_in = _one_tensor(shape, f"block {len(blocks) - 1}")
            count = _count_module(local.head, head_in, self._cache)
        self._unsupported.update(dict(count.unsupported))
        return blocks, BlockCost(-1, ("head",), head_in, _one_tensor(count.output_shape, "the head"),
                                 count.flops, _num_params([local.head], counted))

    @functools.cached_property
    def aux(self) -> List[AuxCost]:
        """Per auxiliary network (blocks ``0 .. K-2``): forward FLOPs and parameters."""
        blocks = self.blocks
        aux = []
        with _quiet():  # once for every auxiliary network
            for plan, net in zip(self.local.plan, self.local.aux):
                j = plan.block
                count = _count_module(net, blocks[j].output_shape, self._cache)
                self._unsupported.update(dict(count.unsupported))
                # A rule's own auxiliary network that records no reductions: the plan's strides.
                reductions = getattr(net, "reductions", None)
                aux.append(AuxCost(j, tuple(plan.selected), tuple(plan.strides),
                                   len(plan.selected) + 1, count.flops, _num_params([net]),
                                   tuple(plan.strides if reductions is None else reductions)))
        return aux

    # -- queries ----------------------------------------------------------------------------
    @property
    def blocks(self) -> List[BlockCost]:
        """Per primary block: shapes, forward FLOPs and parameters."""
        return self._primary_costs[0]

    @property
    def head(self) -> BlockCost:
        """The classifier head's cost (``index == -1``)."""
        return self._primary_costs[1]

    @property
    def primary(self) -> int:
        """Forward FLOPs of the primary network (= the original model, what BP runs)."""
        return sum(b.flops for b in self.blocks) + self.head.flops

    @property
    def aux_total(self) -> int:
        """Forward FLOPs of all auxiliary networks together."""
        return sum(a.flops for a in self.aux)

    @property
    def total(self) -> int:
        """Forward FLOPs of an AugLocal training step's forward: primary plus all auxiliaries."""
        return self.primary + self.aux_total

    @property
    def ratio(self) -> float:
        """``total / primary``: AugLocal's forward FLOPs as a multiple of BP's."""
        return self.total / self.primary if self.primary else math.nan

    @property
    def params_primary(self) -> int:
        """Parameters of the primary network (blocks and head)."""
        return _num_params(list(self.local.blocks) + [self.local.head])

    @property
    def params_aux(self) -> int:
        """Parameters of all auxiliary networks (thrown away after training)."""
        return _num_params(self.local.aux)

    def unsupported_ops(self) -> Counter:
        """Operators fvcore did not count (name -> occurrences over every counted module).

        Runs the counts if no query has yet (fvcore's ``unsupported_ops()`` is only valid after
        ``total()``; this one always is).
        """
        self.aux  # noqa: B018 - counts the primary blocks, then the auxiliary networks, once
        return Counter(self._unsupported)

    def as_dict(self) -> dict:
        """A JSON-ready summary; FLOPs are integers (one multiply-add = one FLOP, batch 1)."""
        local = self.local
        return {
            "model": getattr(local, "spec", None),
            "input_size": list(local.input_size),
            "num_classes": getattr(local, "num_classes", None),
            "options": dict(getattr(local, "options", {}) or {}),
            "flops_convention": "fvcore: one fused multiply-add = one FLOP, one example",
            "blocks": [
                {"index": b.index, "names": list(b.names), "input_shape": list(b.input_shape),
                 "output_shape": list(b.output_shape), "flops": b.flops, "params": b.params}
                for b in self.blocks
            ],
            "head": {"flops": self.head.flops, "params": self.head.params,
                     "input_shape": list(self.head.input_shape)},
            "num_local": getattr(local, "num_local", None),
            "aux_nets": [
                {"block": a.block, "selected": list(a.selected), "strides": list(a.strides),
                 "reductions": list(a.reductions), "depth": a.depth, "flops": a.flops, "params": a.params}
                for a in self.aux
            ],
            "flops": {"primary": self.primary, "aux": self.aux_total, "total": self.total,
                      "ratio": round(self.ratio, 4)},
            "params": {"primary": self.params_primary, "aux": self.params_aux},
            "unsupported_ops": dict(sorted(self.unsupported_ops().items())),
        }


def count_flops(local: nn.Module, cache: Optional[FlopCache] = None) -> LocalFlops:
    """Forward FLOPs and parameters of a ``LocalNet``, per block and per auxiliary network.

    One fused multiply-add counts as one FLOP (fvcore's convention, as in the paper's Table 7),
    for one example at ``local.input_size``. The returned object is lazy: counting runs on the
    first query and is cached.

    Args:
        local: a network returned by ``auglocal_fx.to_local``.
        cache: counts shared with other analyses of the same model (see :class:`FlopCache`);
            ``None``: the analysis keeps its own.

    Returns:
        A ``LocalFlops`` analysis.

    Raises:
        AugLocalError: if ``local`` is not a converted network.
    """
    for attr in ("blocks", "head", "aux", "plan", "input_size"):
        if not hasattr(local, attr):
            raise AugLocalError(
                f"count_flops needs a network from auglocal_fx.to_local (no {attr!r} attribute "
                f"on {type(local).__name__}); convert the model first"
            )
    return LocalFlops(local, cache)
