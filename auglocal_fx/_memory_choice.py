"""``max_memory``: the fastest way to train this run's network whose measured whole peak fits.

The choices are the ones that change memory and time but not the weights: ``aux_checkpoint``
(recompute the primary blocks; exact gradients) and ``step_each_module`` (bit-identical
updates). Each is measured on this run's network, per-process batch and device with
``auglocal_fx.measure_memory`` (the whole count: parameters, optimizer state, gradients and
saved activations at the step's peak); the fastest that fits is timed, never guessed.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .errors import AugLocalError
from .memory import MemoryRow, measure_memory, run_method_step
from .units import format_bytes

__all__ = ["MemoryChoice", "choose_memory_options", "parse_memory"]


@dataclass(frozen=True)
class MemoryChoice:
    """What ``choose_memory_options`` picked, and why (``reason``, one line)."""

    aux_checkpoint: bool
    step_each_module: bool
    whole_peak: int
    reason: str


def choose_memory_options(net: nn.Module, method: str, limit: int, batch_size: int, device: torch.device,
                          optimizer: Callable[[List[nn.Parameter]], torch.optim.Optimizer],
                          each_module: Sequence[bool] = (False, True), repeats: int = 2,
                          input_size: Optional[Tuple[int, ...]] = None) -> MemoryChoice:
    """The fastest combination of ``aux_checkpoint`` and ``step_each_module`` whose whole peak fits ``limit``.

    Args:
        net: the run's network (a ``LocalNet``; BP measures its primary network only).
        method: ``"auglocal"`` or ``"bp"`` (BP has nothing to choose: it fits or not).
        limit: bytes the step may hold at its peak.
        batch_size: this process's batch.
        device: where the run trains.
        optimizer: builds the run's optimizer over a list of parameters (its state is counted).
        each_module: the ``step_each_module`` values allowed (``(False,)`` where it is not exact).
        repeats: timed steps per fitting combination, after one warm-up.
        input_size: ``(C, H, W)`` of a BP model (a ``LocalNet`` knows its own).

    Raises:
        AugLocalError: nothing fits; the message gives the smallest peak and what to change.
    """
    measured = "bp" if method == "bp" else "auglocal"
    flags = (False,) if method == "bp" else (False, True)
    report = measure_memory(net, methods=(measured,), batch_size=batch_size, device=device, rss=False,
                            input_size=input_size,
                            optimizer=optimizer, aux_checkpoint=flags,
                            step_each_module=tuple(each_module) if method != "bp" else False)
    rows = report.rows
    fits = [r for r in rows if r.whole_peak <= limit]
    if not fits:
        best = min(rows, key=lambda r: r.whole_peak)
        change = ("use --method auglocal or a smaller --batch-size" if method == "bp" else
                  "use a smaller --batch-size or --d (the activations and auxiliary networks shrink with them)")
        raise AugLocalError(f"no way to train within max_memory {format_bytes(limit)} at batch {batch_size}: the "
                            f"smallest whole peak is {format_bytes(best.whole_peak)} ({_label(best)}); {change}, "
                            "or raise --max-memory")
    times = _step_times(net, fits, batch_size, device, repeats) if len(fits) > 1 else [None]
    index = min(range(len(fits)), key=lambda i: (times[i] or 0.0, fits[i].whole_peak))
    pick = fits[index]
    timed = f", {times[index]:.3f} s/step, the fastest of {len(fits)} that fit" if times[index] else ""
    reason = (f"max_memory {format_bytes(limit)}: {_label(pick)} (whole peak {format_bytes(pick.whole_peak)} "
              f"measured at batch {batch_size}{timed}; {len(rows) - len(fits)} of {len(rows)} did not fit)")
    return MemoryChoice(bool(pick.aux_checkpoint), bool(pick.step_each_module), pick.whole_peak, reason)


def _label(row: MemoryRow) -> str:
    if row.method == "bp":
        return "BP"
    return (f"AugLocal d={row.d}" + (", aux_checkpoint" if row.aux_checkpoint else "")
            + (", step each module" if row.step_each_module else ", step at the end"))


def _step_times(net: nn.Module, rows: Sequence[MemoryRow], batch_size: int, device: torch.device,
                repeats: int) -> List[Optional[float]]:
    """Median seconds of forward + backward per row (no update), weights and buffers left as they were."""
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    before = net.aux_checkpoint
    g = torch.Generator().manual_seed(0)
    x = torch.randn((batch_size,) + tuple(net.input_size), generator=g).to(device)
    y = torch.randint(0, net.num_classes, (batch_size,), generator=g).to(device)
    net.to(device).train()
    times: List[Optional[float]] = []
    try:
        for row in rows:
            net.aux_checkpoint = bool(row.aux_checkpoint)
            samples: List[float] = []
            for i in range(repeats + 1):
                net.zero_grad(set_to_none=True)
                _sync(device)
                start = time.perf_counter()
                run_method_step(net, "auglocal", x, y, bool(row.step_each_module))
                _sync(device)
                if i:  # the first is a warm-up
                    samples.append(time.perf_counter() - start)
            times.append(statistics.median(samples))
    finally:
        net.aux_checkpoint = before
        net.zero_grad(set_to_none=True)
        net.load_state_dict(state)
    return times


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def parse_memory(value: object) -> int:
    """``8_000_000_000``, ``"8GB"``, ``"7.5GiB"``, ``"512MiB"`` -> bytes (GB = 1e9, GiB = 2**30)."""
    units = {"": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
             "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}
    if isinstance(value, int) and not isinstance(value, bool):
        number, unit = float(value), ""
    elif isinstance(value, str):
        text = value.strip().upper().replace(" ", "")
        digits = text.rstrip("KMGTIB")
        number, unit = _float(digits), text[len(digits):]
    else:
        number, unit = float("nan"), "?"
    if unit not in units or not number > 0:
        raise AugLocalError(f"max_memory {value!r} is not a size; give bytes or a number with a unit, "
                            "e.g. 8GB, 7.5GiB, 512MiB")
    return int(number * units[unit])


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return float("nan")
