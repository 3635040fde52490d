"""Bytes held for backward: counted with ``saved_tensors_hooks``, each storage once.

See ``auglocal_fx.memory`` for how the counts make up its report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

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
        try:
            nbytes = t.untyped_storage().nbytes()
            key = self._key(t)
        except (RuntimeError, NotImplementedError):  # sparse, nested or other storage-less tensors
            return t
        if nbytes == 0 or key in self._exclude:
            return t
        entry = self._entries.get(key)
        if entry is None:
            self._entries[key] = [1, nbytes]
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            if self._on_grow is not None:
                self._on_grow()
        else:
            entry[0] += 1
        # Hold a detached alias (same storage and version counter): holding ``t`` itself would,
        # for a node's own output, make node -> saved -> t -> node a cycle that only backward
        # breaks, so a graph dropped without backward would never be freed.
        return _Held(t.detach(), self, key)

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
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


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
