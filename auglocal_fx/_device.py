"""The one place where a user's device name becomes a ``torch.device``."""

from __future__ import annotations

from typing import Union

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
