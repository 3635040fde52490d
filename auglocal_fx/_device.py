"""Devices: the one place where a user's device name becomes a ``torch.device``, waiting for
one before a clock is read, and the seeded random inputs that counting and timing run on."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from .errors import AugLocalError


def resolve_device(name: Union[str, torch.device]) -> torch.device:
    """``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda[:N]"`` as a device.

    Raises:
        AugLocalError: an unknown or unsupported device, or CUDA on a machine without it.
    """
    if str(name) == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise AugLocalError(f"unknown device {str(name)!r}; use auto, cpu or cuda[:N]") from None
    if device.type not in ("cpu", "cuda"):
        raise AugLocalError(f"device {device} is not supported; use cpu or cuda[:N]")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AugLocalError("CUDA is not available on this machine; use the cpu device (--device cpu)")
    return device


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued work (CUDA runs asynchronously) so that a clock reads its end."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_input(shape: Sequence[int], batch: int = 1, device: Union[str, torch.device] = "cpu",
                 dtype: torch.dtype = torch.float32, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A ``(batch, *shape)`` standard-normal input, drawn on the CPU so that every device sees the
    same numbers; from ``generator`` (to draw labels after it), else a fresh one seeded 0."""
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    return torch.randn((batch,) + tuple(shape), generator=generator).to(device=device, dtype=dtype)
