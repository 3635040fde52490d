"""Beyond AugLocal (issue 24): auxiliary copies that follow their source blocks, and auxiliary
layers that stop training (docs/method.md, "Beyond AugLocal").

**Following** (``aux_follow=m``, after MAN, Su et al., ECCV 2024). AugLocal's auxiliary network
of block ``j`` copies later blocks once and then trains the copies on their own, so they drift
away from the blocks they stand for. Here every copied parameter is ``W = E + delta``: ``E`` an
exponential moving average of the source parameter, ``E <- m E + (1 - m) S`` after every
optimizer step (read under ``no_grad``: no gradient reaches the source), and ``delta`` a
per-parameter correction, zero at the start, that the local loss trains. ``W`` is the copy's own
``nn.Parameter`` (the optimizer's gradient of ``W`` is that of ``delta``), and moving ``E`` moves
``W`` by the same amount, so ``delta = W - E`` is kept exactly. A per-parameter delta rather
than MAN's per-channel bias: it fits any layer type (convolutions, norms, linear layers) and
gives the local loss the freedom the plain copies had, while weight decay still pulls the copy
towards its source's average.

Which parameters follow: those of a block or head copy whose name the source has (the copy is
the source's traced graph, so names match) and that the adaptation did not add (``auglocal_*``
projections and norms keep their own weights). A parameter whose shape the adaptation changed
(a convolution re-fitted to fewer input channels) keeps its own weights with
``aux_follow_adapted="own"``, or follows the leading slice of the source with ``"slice"``
(``S[:c_out, :c_in, ...]``). Buffers (BatchNorm running statistics) stay the copy's own: the copy
sees other features than the source does. Copies of the same source slice share one ``E``.

**Freezing** (``aux_freeze=f``): the paper's conclusion names update locking inside the
auxiliary networks as future work. Auxiliary layers (an auxiliary network's block copies and head
copy) stop training top first: of ``n`` layers, the ``i``-th from the top (``i = 1 .. n``) is
frozen once ``i / n`` of the first ``f`` of the run has passed. A frozen layer's parameters get
``requires_grad=False``, so autograd computes no weight gradient for them and the optimizer skips
them; the gradient still flows through the layer to the block below, which always trains.
"""

from __future__ import annotations

import math
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import fx, nn

from .errors import AugLocalError
from .synthesis import AuxNet

__all__ = ["FOLLOW_ADAPTED", "Following", "Freezing", "copied_parameters", "validate_follow", "validate_freeze"]

FOLLOW_ADAPTED = ("own", "slice")

_Index = Tuple[slice, ...]


def validate_follow(momentum: Optional[float], adapted: str) -> None:
    """Raises AugLocalError for a momentum outside ``[0, 1)`` or an unknown ``adapted``."""
    if momentum is not None and (isinstance(momentum, bool) or not isinstance(momentum, (int, float))
                                 or not 0.0 <= momentum < 1.0):
        raise AugLocalError(f"aux_follow must be an EMA momentum in [0, 1) (e.g. 0.9), or None for "
                            f"copies that do not follow, got {momentum!r}")
    if adapted not in FOLLOW_ADAPTED:
        raise AugLocalError(f"unknown aux_follow_adapted {adapted!r}: choose own (re-fitted layers keep "
                            "their weights) or slice (they follow the matching slice of the source)")


def validate_freeze(until: Optional[float]) -> None:
    """Raises AugLocalError for a freezing fraction outside ``(0, 1]``."""
    if until is not None and (isinstance(until, bool) or not isinstance(until, (int, float))
                              or not 0.0 < until <= 1.0):
        raise AugLocalError(f"aux_freeze must be the fraction of the run in (0, 1] by which every "
                            f"auxiliary layer is frozen (e.g. 0.5), or None, got {until!r}")


def _aux_net(aux: nn.Module) -> Optional[AuxNet]:
    """The AugLocal auxiliary network inside ``aux`` (itself, or a rule's classifier)."""
    return next((m for m in aux.modules() if isinstance(m, AuxNet)), None)


def _leading_slice(copy: torch.Size, source: torch.Size) -> Optional[_Index]:
    """``S[:a, :b, ...]`` of the copy's shape where every size fits in the source's, else None."""
    if len(copy) != len(source) or any(c > s for c, s in zip(copy, source)):
        return None
    return tuple(slice(0, c) for c in copy)


def copied_parameters(aux: Sequence[nn.Module], blocks: Sequence[nn.Module], head: nn.Module
                      ) -> Iterator[Tuple[fx.GraphModule, str, nn.Parameter, nn.Module, nn.Parameter]]:
    """``(copy layer, name, copy parameter, source graph, source parameter)`` for every parameter
    of an AugLocal block or head copy whose source has one of that name (shapes may differ:
    re-fitted layers).

    The copy is the source's traced graph, so names match; parameters the adaptation added
    (``auglocal_*``) and slim heads (not a copy of the network's head) have no source.
    """
    for net in filter(None, map(_aux_net, aux)):
        sources = [blocks[k] for k in net.plan.selected] + [head]
        for copy_module, source in zip(net.children(), sources):
            if not isinstance(copy_module, fx.GraphModule):
                continue  # a slim head is not a copy of the network's head
            graph = getattr(source, "eval_graph", source)
            own = dict(graph.named_parameters())
            for name, param in copy_module.named_parameters():
                twin = own.get(name)
                if twin is not None and not name.startswith("auglocal_"):
                    yield copy_module, name, param, graph, twin


def _pairs(aux: Sequence[nn.Module], blocks: Sequence[nn.Module], head: nn.Module,
           adapted: str) -> List[Tuple[nn.Parameter, nn.Parameter, _Index]]:
    """``(copy parameter, source parameter, source index)`` for every followed parameter."""
    pairs = []
    for _, _, param, _, twin in copied_parameters(aux, blocks, head):
        index = tuple(slice(None) for _ in twin.shape) if param.shape == twin.shape else (
            _leading_slice(param.shape, twin.shape) if adapted == "slice" else None)
        if index is not None:
            pairs.append((param, twin, index))
    return pairs


class Following(nn.Module):
    """The moving averages ``E`` of the source parameters the auxiliary copies follow.

    Building it starts every followed copy at its source (``delta = 0``). :meth:`step` runs
    after each optimizer step. The averages are buffers (saved with the network); the sources
    and copies are referenced, not registered, so no parameter appears twice.

    Args:
        aux: the auxiliary networks.
        blocks: the primary blocks.
        head: the primary head.
        momentum: ``m`` in ``E <- m E + (1 - m) S``.
        adapted: ``"own"`` or ``"slice"`` (see the module docstring).
    """

    def __init__(self, aux: Sequence[nn.Module], blocks: Sequence[nn.Module], head: nn.Module,
                 momentum: float, adapted: str = "own"):
        super().__init__()
        validate_follow(momentum, adapted)
        self.momentum = float(momentum)
        self._sources: List[Tuple[nn.Parameter, _Index]] = []
        self._copies: List[Tuple[nn.Parameter, int]] = []
        keys: Dict[Tuple[int, Tuple[Tuple[int, int], ...]], int] = {}
        with torch.no_grad():
            for param, source, index in _pairs(aux, blocks, head, adapted):
                key = (id(source), tuple((s.start or 0, -1 if s.stop is None else s.stop) for s in index))
                if key not in keys:
                    keys[key] = len(self._sources)
                    self.register_buffer(f"ema{keys[key]}", source[index].detach().clone())
                    self._sources.append((source, index))
                self._copies.append((param, keys[key]))
                param.copy_(source[index])

    def __len__(self) -> int:
        """The number of copy parameters that follow a source."""
        return len(self._copies)

    @torch.no_grad()
    def step(self) -> None:
        """Move every average towards its source and every copy with its average."""
        moves = []
        for i, (source, index) in enumerate(self._sources):
            ema = getattr(self, f"ema{i}")
            move = (source[index] - ema).mul_(1.0 - self.momentum)
            ema.add_(move)
            moves.append(move)
        for param, i in self._copies:
            param.add_(moves[i])  # W = E + delta: E moved, delta stays

    def extra_repr(self) -> str:
        return f"momentum={self.momentum}, followed={len(self._copies)}, averages={len(self._sources)}"


class Freezing(nn.Module):
    """Freezes auxiliary layers top first over the first ``until`` of the run.

    The run's progress is a buffer, so a resumed run (``load_state_dict``) freezes the same
    layers again.

    Args:
        aux: the auxiliary networks.
        until: the fraction of the run in ``(0, 1]`` by which every auxiliary layer is frozen.
    """

    def __init__(self, aux: Sequence[nn.Module], until: float):
        super().__init__()
        validate_freeze(until)
        self.until = float(until)
        self._layers = [list(net.children())[::-1] for net in filter(None, map(_aux_net, aux))]
        self.register_buffer("progress", torch.zeros((), dtype=torch.float64))
        self.register_load_state_dict_post_hook(lambda module, keys: module.apply_schedule())

    def frozen(self, position: int, count: int) -> bool:
        """Whether the ``position``-th layer from the top (0-based) of ``count`` is frozen now."""
        return float(self.progress) >= self.until * (position + 1) / count - 1e-12

    def set_progress(self, progress: float) -> None:
        """Record how far the run is (``step / total_steps``) and freeze what is due."""
        if not math.isfinite(progress):
            raise AugLocalError(f"training progress must be a finite fraction, got {progress!r}")
        self.progress.fill_(float(progress))
        self.apply_schedule()

    def apply_schedule(self) -> None:
        """Set ``requires_grad`` of every auxiliary layer from the recorded progress."""
        for layers in self._layers:
            for position, layer in enumerate(layers):
                trains = not self.frozen(position, len(layers))
                for param in layer.parameters():
                    param.requires_grad_(trains)

    def frozen_fraction(self) -> float:
        """The fraction of auxiliary parameters frozen now."""
        total = frozen = 0
        for layers in self._layers:
            for layer in layers:
                for param in layer.parameters():
                    total += param.numel()
                    frozen += 0 if param.requires_grad else param.numel()
        return frozen / total if total else 0.0

    def extra_repr(self) -> str:
        return f"until={self.until}, progress={float(self.progress):.3f}"
