"""Bytes held for backward: counted with ``saved_tensors_hooks``, each storage once.

See ``auglocal_fx.memory`` for how the counts make up its report.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.utils.checkpoint

from ._device import resolve_device

__all__ = ["SavedBytesCounter", "StepMemory", "measure_step", "storage_bytes"]


class SavedBytesCounter:
    """Live and peak bytes of the storages autograd holds for backward.

    Use as a context manager around the forward *and* backward passes to be counted::

        with SavedBytesCounter() as counter:
            model(x).sum().backward()
        counter.peak  # bytes

    Args:
        exclude: tensors whose storages are not counted (typically the parameters).
        on_grow: called with no argument each time the live bytes grow (after the update).
    """

    def __init__(self, exclude: Sequence[torch.Tensor] = (), on_grow: Optional[Callable[[], None]] = None):
        self.live = 0
        self.peak = 0
        self._on_grow = on_grow
        self._entries: Dict[Tuple[str, int], List[int]] = {}  # key -> [references, nbytes]
        self._exclude = {self._key(t) for t in exclude}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    @staticmethod
    def _key(t: torch.Tensor) -> Tuple[str, int]:
        return (str(t.device), t.untyped_storage().data_ptr())

    def _pack(self, t: torch.Tensor):
        key = self._count(t)
        if key is None:
            return t
        # Hold a detached alias (same storage and version counter): holding ``t`` itself would,
        # for a node's own output, make node -> saved -> t -> node a cycle that only backward
        # breaks, so a graph dropped without backward would never be freed.
        return _Held(t.detach(), self, key)

    def _count(self, t: torch.Tensor) -> Optional[Tuple[str, int]]:
        """Count ``t``'s storage once more; its key, or ``None`` where it is not counted."""
        try:
            nbytes = t.untyped_storage().nbytes()
            key = self._key(t)
        except (RuntimeError, NotImplementedError):  # sparse, nested or other storage-less tensors
            return None
        if nbytes == 0 or key in self._exclude:
            return None
        entry = self._entries.get(key)
        if entry is None:
            self._entries[key] = [1, nbytes]
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            if self._on_grow is not None:
                self._on_grow()
        else:
            entry[0] += 1
        return key

    def _count_recomputed(self, frame_ref: Any, gid: Any, hook: Any) -> None:
        """Count what a non-reentrant checkpoint recomputes in backward (``aux_checkpoint``).

        Its recomputation runs under its own saved-tensor hooks, which hide it from ours, and
        keeps each recomputed tensor in ``frame.recomputed`` until backward unpacks and uses it;
        each is counted from its recomputation until backward lets it go.
        """
        pack = hook.pack_hook

        def counted_pack(x: torch.Tensor):
            frame = frame_ref()
            index = frame.recomp_counter[gid]
            try:
                return pack(x)
            finally:  # also when the last needed tensor stops the recomputation (an exception)
                ref = frame.weak_holders[index]() if index < len(frame.weak_holders) else None
                handle = ref.handles.get(gid) if ref is not None else None
                stored = frame.recomputed[gid].get(handle) if handle is not None else None
                key = self._count(stored) if stored is not None else None
                if key is not None:
                    # A fresh alias (same storage and version counter) lives exactly as long as the
                    # checkpoint holds it and backward uses it; the recomputed tensor itself may be
                    # a buffer (BatchNorm's running statistics) that outlives the step.
                    alias = frame.recomputed[gid][handle] = stored.detach()
                    weakref.finalize(alias, self._release, key)

        hook.pack_hook = counted_pack

    @staticmethod
    def _unpack(packed):
        return packed.tensor if isinstance(packed, _Held) else packed

    def _release(self, key: Tuple[str, int]) -> None:
        entry = self._entries[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self._entries[key]

    def __enter__(self) -> "SavedBytesCounter":
        self._patched = _CountRecomputation(self)
        self._patched.__enter__()  # first: if it cannot count recomputation, no hook is left pushed
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        self._patched.__exit__(*exc)


class _CountRecomputation:
    """While entered, the recomputations of ``torch.utils.checkpoint(use_reentrant=False)`` report
    to ``counter``: the reentrant variant recomputes under our hooks, this one under its own
    (``_recomputation_hook``, which it looks up at each backward, so swapping it here suffices)."""

    def __init__(self, counter: SavedBytesCounter):
        self.counter = counter
        self.original = getattr(torch.utils.checkpoint, "_recomputation_hook", None)

    def __enter__(self) -> None:
        if self.original is None:
            raise RuntimeError("this PyTorch has no torch.utils.checkpoint._recomputation_hook: "
                               "the saved-bytes counter cannot see non-reentrant recomputation")
        original, counter = self.original, self.counter

        class Counted(original):
            def __init__(self, target_frame_ref, gid):
                super().__init__(target_frame_ref, gid)
                counter._count_recomputed(target_frame_ref, gid, self)

        torch.utils.checkpoint._recomputation_hook = Counted

    def __exit__(self, *exc) -> None:
        torch.utils.checkpoint._recomputation_hook = self.original


class _Held:
    """A saved tensor as autograd stores it; tells the counter when autograd lets go of it."""

    __slots__ = ("tensor", "counter", "key")

    def __init__(self, tensor: torch.Tensor, counter: SavedBytesCounter, key: Tuple[str, int]):
        self.tensor = tensor
        self.counter = counter
        self.key = key

    def __del__(self):
        self.counter._release(self.key)


@dataclass(frozen=True)
class StepMemory:
    """What ``measure_step`` returns: the peak and how it was measured."""

    peak_bytes: int
    how: str


def measure_step(step: Callable[[], Any], device: Union[str, torch.device] = "cpu",
                 exclude: Sequence[torch.Tensor] = ()) -> StepMemory:
    """Measure one call of ``step`` (a zero-argument function running forward + backward).

    On CUDA: ``torch.cuda.max_memory_allocated`` during the call minus the bytes allocated
    before it. Elsewhere: the peak of bytes held for backward (see ``SavedBytesCounter``;
    pass the parameters as ``exclude``).
    """
    device = resolve_device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return StepMemory(torch.cuda.max_memory_allocated(device) - base,
                          "CUDA max_memory_allocated during the step minus allocated before it")
    with SavedBytesCounter(exclude=exclude) as counter:
        step()
    return StepMemory(counter.peak, "peak bytes held for backward (saved_tensors_hooks, each storage once)")



def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages of ``tensors`` (a storage viewed twice counts once)."""
    seen = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.numel():
            seen[SavedBytesCounter._key(t)] = t.untyped_storage().nbytes()
    return sum(seen.values())
