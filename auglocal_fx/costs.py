"""The paper's Table 7 for any model: FLOPs, parameters, memory and step time per method.

Rows: end-to-end backpropagation (BP), gradient checkpointing (GC: every block wrapped in
``torch.utils.checkpoint.checkpoint``, as ``auglocal_fx.memory`` measures it), and AugLocal
at each requested depth. FLOPs are fvcore's (one fused multiply-add = one FLOP, forward of one
example; GC's forward is BP's, its recomputation during backward is not a forward FLOP). Memory
comes from ``auglocal_fx.memory.measure_memory``; if that is unavailable or fails, the memory
columns are left out, never estimated. Time per step is measured here, without the memory hooks
(wall clock, median of a few steps after one warm-up step, gradients computed, no optimizer
update).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ._device import random_input, resolve_device, synchronize
from ._module_flops import shape_elements
from .errors import AugLocalError, first_line
from .flops import FlopCache, count_flops
from .local import to_local
from . import memory as _memory  # looked up at call time: a test replaces measure_memory
from .memory import aux_checkpoint_flags, run_method_step
from .options import ConversionOptions, conversion_options
from .rules import get_rule, rule_names
from .specs import resolve_model

__all__ = ["CostRow", "CostReport", "cost_report", "report_rules", "BASELINES"]

# The rows that are not local rules: end-to-end backprop and gradient checkpointing.
BASELINES = {"bp": "BP", "gc": "GC"}


@dataclass
class CostRow:
    """One method's costs.

    Attributes:
        method: ``"BP"``, ``"GC"``, ``"AugLocal d=D"``, ``"DGL"``, ``"PredSim"``, ...
        d: the auxiliary depth (``None`` for BP and GC).
        flops: forward FLOPs of one example (one multiply-add = one FLOP).
        params: parameters trained (AugLocal: primary plus auxiliary networks).
        memory: measured bytes: the CUDA peak on a GPU, else the peak of bytes saved for
            backward (``None`` when not measured).
        whole: the whole count at the step's peak: parameters + optimizer state + saved bytes
            and ``.grad`` tensors (see ``auglocal_fx.memory``; ``None`` when not measured).
        aux_checkpoint: whether the primary blocks are recomputed in backward.
        step_each_module: whether each local module's gradients go as soon as its loss is
            back-propagated (the trainer's ``step_each_module``: it steps the module then).
        rss: growth of the process's peak RSS over one step (CPU, ``rss=True`` only).
        step_time: seconds per training step at the report's batch size (``None`` if not timed).
        second_loss: the rule has a loss beyond cross-entropy (its decoder's FLOPs not counted).
    """

    method: str
    d: Optional[int]
    flops: int
    params: int
    memory: Optional[int] = None
    rss: Optional[int] = None
    step_time: Optional[float] = None
    rule: Optional[str] = None
    whole: Optional[int] = None
    aux_checkpoint: bool = False
    second_loss: bool = False
    step_each_module: bool = False

    def as_dict(self) -> dict:
        """A JSON-ready row."""
        return {"method": self.method, "rule": self.rule, "d": self.d, "flops": int(self.flops),
                "params": int(self.params), "memory": self.memory, "whole": self.whole,
                "aux_checkpoint": self.aux_checkpoint, "step_each_module": self.step_each_module, "rss": self.rss,
                "step_time": None if self.step_time is None else round(self.step_time, 6)}


@dataclass
class CostReport:
    """The rows of ``cost_report`` and the per-block profile of the primary network.

    Attributes:
        model: the spec string (or class name).
        input_size: ``(C, H, W)``.
        batch_size: batch size of the memory and time measurements.
        device: where they ran.
        rows: BP, GC, then AugLocal per depth.
        profile: per primary block: ``index``, ``flops`` (one example) and
            ``activation_bytes`` (its output at ``batch_size``, float32).
        memory_how: how memory was measured, one sentence per figure (empty when it was not).
        memory_note: why memory is absent (empty when it was measured).
        time_how: how time was measured (empty when it was not).
        unsupported_ops: operators fvcore did not count, over all networks.
    """

    model: str
    input_size: Tuple[int, ...]
    batch_size: int
    device: str
    rows: List[CostRow]
    profile: List[dict]
    memory_how: List[str] = field(default_factory=list)
    memory_note: str = ""
    time_how: str = ""
    unsupported_ops: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        """A JSON-ready summary; FLOPs as integers."""
        return {
            "model": self.model, "input_size": list(self.input_size),
            "batch_size": self.batch_size, "device": self.device,
            "flops_convention": "fvcore: one fused multiply-add = one FLOP, one example",
            "rows": [r.as_dict() for r in self.rows], "profile": self.profile,
            "memory_how": self.memory_how, "memory_note": self.memory_note,
            "time_how": self.time_how, "unsupported_ops": self.unsupported_ops,
        }


def _time(step: Callable[[], None], device: torch.device, repeats: int) -> float:
    step()  # warm-up
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _train_step(local, method: str, x: torch.Tensor, y: torch.Tensor,
                step_each_module: bool = False) -> Callable[[], None]:
    """One training step as ``auglocal_fx.memory`` runs it (gradients, no update)."""
    def step():
        local.zero_grad(set_to_none=True)
        run_method_step(local, method, x, y, step_each_module)
    return step


def cost_report(
    model_or_spec,
    depths: Sequence[int] = (2, 3, 4, 5, 6),
    *,
    batch_size: int = 128,
    device: str = "cpu",
    tau: Optional[float] = None,
    pyramid: Optional[bool] = None,
    selection: Optional[str] = None,
    input_size: Optional[Sequence[int]] = None,
    num_classes: Optional[int] = None,
    aux_head: Optional[str] = None,
    model_kwargs: Optional[Dict[str, Any]] = None,
    rules: Sequence[str] = ("bp", "gc", "auglocal"),
    memory: bool = True,
    rss: bool = False,
    timing: bool = True,
    repeats: int = 2,
    threads: Optional[int] = None,
    aux_checkpoint: Union[bool, Sequence[bool]] = False,
    optimizer: str = "sgd",
    options: Optional[ConversionOptions] = None,
    step_each_module: Union[bool, Sequence[bool]] = False,
) -> CostReport:
    """Forward FLOPs, parameters, measured memory and step time for BP, GC and AugLocal.

    FLOPs: one fused multiply-add = one FLOP, forward of one example (fvcore's convention and
    the paper's Table 7). Memory is only ever measured (see the module docstring).

    Args:
        model_or_spec: a spec string (``"paper:resnet110"``) or an ``nn.Module``.
        depths: AugLocal depths ``d`` to report.
        batch_size: batch size for memory and time.
        device: ``"cpu"`` or ``"cuda"``.
        tau: pyramid decay.
        pyramid: ``False`` for constant depth.
        selection: block selection strategy.
        input_size: ``(C, H, W)``; default: the spec's.
        num_classes: classifier width; default: the spec's.
        aux_head: ``"auto"``, ``"copy"`` or ``"slim"`` (see ``auglocal_fx.to_local``).
        model_kwargs: for a spec string, keyword arguments for its builder (see
            ``auglocal_fx.resolve_model``).
        rules: the rows: ``"bp"``, ``"gc"`` (gradient checkpointing), and local rules
            (``"auglocal"``, ``"dgl"``, ``"predsim"``, ``"infopro"``, ``"auglocal+infopro"``);
            a rule with a depth gets one row per ``d`` in ``depths``.
        memory: measure memory with ``auglocal_fx.memory.measure_memory``.
        rss: on CPU, also measure peak RSS (one fresh subprocess per method: slow).
        timing: measure time per step.
        repeats: timed steps per method (after one warm-up step).
        threads: CPU threads for the timed steps (default: PyTorch's setting). On cores shared
            with other jobs, fewer threads are often faster and much less noisy.
        aux_checkpoint: recompute the primary blocks in backward; ``(False, True)`` gives
            each local row both ways (the ``+recompute`` rows).
        optimizer: whose state the whole count holds (``"sgd"``, the paper's, or ``"adamw"``).
        options: the ``ConversionOptions`` of every local row (``tau`` ...
            above override its fields; ``d``, ``rule`` and ``aux_checkpoint`` are the rows').
        step_each_module: drop each local module's gradients as soon as its loss is
            back-propagated (the trainer's ``step_each_module``); ``(False, True)`` gives each
            local row both ways (the ``+step each`` rows).

    Returns:
        A ``CostReport``.

    Raises:
        AugLocalError: bad options, an unavailable device, or any conversion error.
    """
    depths = tuple(depths)
    if not depths:
        raise AugLocalError("no depth given: pass at least one d, e.g. --d 2 3 4 5 6")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise AugLocalError(f"batch size {batch_size!r} is invalid: give a positive integer")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                or threads < 1):
        raise AugLocalError(f"threads={threads!r} is invalid: give a positive integer")
    dev = resolve_device(device)
    opts = conversion_options(options, tau=tau, pyramid=pyramid, selection=selection,
                              aux_head=aux_head, input_size=input_size)
    # The classes and builder arguments go to the spec; the rows convert the model it builds.
    num_classes = opts.num_classes if num_classes is None else num_classes
    model_kwargs = opts.model_kwargs if model_kwargs is None else model_kwargs
    input_size = opts.input_size
    opts = opts.replace(num_classes=None, model_kwargs=None)

    if isinstance(model_or_spec, str):
        spec = resolve_model(model_or_spec, num_classes=num_classes, input_size=input_size,
                             model_kwargs=model_kwargs)
        model, name = spec.model, spec.spec
        input_size, num_classes = spec.input_size, spec.num_classes
    elif model_kwargs:
        raise AugLocalError("model_kwargs apply to spec strings only: create the model object with "
                            "them yourself, or pass a spec like 'timm:resnet18'")
    else:
        model, name = model_or_spec, type(model_or_spec).__name__
    if input_size is not None:
        opts = opts.replace(input_size=tuple(input_size))

    flags = aux_checkpoint_flags(aux_checkpoint)
    entries = _rule_entries(rules, depths, flags, aux_checkpoint_flags(step_each_module, "step_each_module"))
    nets = {}  # (rule, d, aux_checkpoint) -> LocalNet; the model has its classes
    for label, rule, d, flag, _ in entries:
        if rule not in BASELINES and (rule, d, flag) not in nets:
            nets[rule, d, flag] = to_local(model, d=d if d is not None else min(depths), rule=rule,
                                           aux_checkpoint=flag, options=opts)
    base = next(iter(nets.values())) if nets else to_local(model, d=2, rule="auglocal", options=opts)
    counts = FlopCache()  # the rows convert one model: its primary blocks are traced once
    first = count_flops(base, counts)
    bp_flops, bp_params = first.primary, first.params_primary
    by_label = {label: nets[rule, d, flag] for label, rule, d, flag, _ in entries if rule not in BASELINES}
    flops_of = {key: count_flops(local, counts) for key, local in nets.items()}
    rows = []
    for label, rule, d, flag, each in entries:
        if rule in BASELINES:
            rows.append(CostRow(label, None, bp_flops, bp_params))
        else:
            f = flops_of[rule, d, flag]
            rows.append(CostRow(label, d, f.total, f.params_primary + f.params_aux, rule=rule,
                                aux_checkpoint=flag, second_loss=get_rule(rule).second_loss,
                                step_each_module=each))

    size = tuple(base.input_size)
    profile = [{"index": b.index, "flops": b.flops,
                "activation_bytes": shape_elements(b.output_shape) * 4 * batch_size}
               for b in first.blocks]
    report = CostReport(model=name, input_size=size, batch_size=batch_size, device=str(dev),
                        rows=rows, profile=profile,
                        unsupported_ops=dict(sorted(first.unsupported_ops().items())))

    if memory:
        _add_memory(report, model_or_spec, entries, dev, rss, opts, num_classes, optimizer)
    else:
        report.memory_note = "not measured (FLOPs only)" if not timing else "not measured"
    if timing:
        gen = torch.Generator().manual_seed(0)
        x = random_input(size, batch_size, dev, generator=gen)
        y = torch.randint(0, int(base.num_classes), (batch_size,), generator=gen).to(dev)
        runs = [(base, {"bp": "bp", "gc": "checkpoint"}[rule], False) if rule in BASELINES
                else (by_label[label], "auglocal", each) for label, rule, _, _, each in entries]
        default_threads = torch.get_num_threads()
        used = threads or default_threads
        torch.set_num_threads(used)
        try:
            for row, (local, method, each) in zip(rows, runs):
                state = {k: v.detach().clone() for k, v in local.state_dict().items()}
                local.to(dev).train()
                row.step_time = _time(_train_step(local, method, x, y, each), dev, repeats)
                local.zero_grad(set_to_none=True)
                local.load_state_dict(state)  # BatchNorm running statistics as they were
        finally:
            torch.set_num_threads(default_threads)
        where = f"{dev}, {used} CPU thread{'s' if used > 1 else ''}" if dev.type == "cpu" else dev
        report.time_how = (f"wall clock, median of {repeats} steps after 1 warm-up, batch "
                           f"{batch_size} on {where}, forward+backward, no optimizer update")
    return report


def report_rules() -> Tuple[str, ...]:
    """The report's row kinds: the baselines, then every registered local rule."""
    return (*BASELINES, *rule_names())


def _rule_entries(rules: Sequence[str], depths: Sequence[int], flags: Sequence[bool] = (False,),
                  each_flags: Sequence[bool] = (False,)) -> List[Tuple[str, str, Optional[int], bool, bool]]:
    """``(row label, rule, d, aux_checkpoint, step_each_module)`` per report row: a rule with depths
    gets one row per ``d``, and every local rule one row per ``aux_checkpoint`` and
    ``step_each_module`` flag."""
    entries = []
    for rule in rules:
        if rule not in report_rules():
            raise AugLocalError(
                f"unknown rule {rule!r} for the report: choose from {', '.join(report_rules())} "
                "(gc = gradient checkpointing)")
        if rule in BASELINES:
            entries.append((BASELINES[rule], rule, None, False, False))
            continue
        local_rule = get_rule(rule)
        for d in (depths if local_rule.uses_depth else (None,)):
            label = local_rule.label + ("" if d is None else f" d={d}")
            entries += [(label + (" +recompute" if flag else "") + (" +step each" if each else ""), rule, d, flag, each)
                        for flag in flags for each in each_flags]
    return entries


# What can stop a measurement on a given machine (no memory left, no /proc, a device error
# reported as ours); anything else is a bug and propagates.
_MEASUREMENT_FAILURES = (AugLocalError, MemoryError, torch.OutOfMemoryError, OSError)


def _add_memory(report: CostReport, model_or_spec, entries, device, rss: bool,
                options: ConversionOptions, num_classes: Optional[int], optimizer: str = "sgd") -> None:
    """Fill the memory columns from ``auglocal_fx.memory.measure_memory``, or say why not."""
    common = dict(batch_size=report.batch_size, device=device, input_size=options.input_size,
                  num_classes=num_classes, rss=rss and device.type == "cpu",
                  optimizer=optimizer)
    found = []
    notes: List[str] = []
    try:
        baseline = None
        for _, rule, d, flag, each in entries:
            if rule in BASELINES:
                if baseline is None:
                    baseline = _memory.measure_memory(model_or_spec, methods=("bp", "checkpoint"), d=2,
                                              options=options.replace(rule="auglocal"), **common)
                    notes = baseline.notes
                found.append(baseline.row("bp" if rule == "bp" else "checkpoint"))
            else:
                measured = _memory.measure_memory(model_or_spec, methods=("auglocal",),
                                          d=d if d is not None else 2,
                                          options=options.replace(rule=rule),
                                          aux_checkpoint=flag, step_each_module=each, **common)
                notes = notes or measured.notes
                found.append(measured.rows[0])
    except _MEASUREMENT_FAILURES as exc:  # never make numbers up: drop the columns and say why
        first = first_line(exc)
        report.memory_note = f"not measured: measure_memory failed ({type(exc).__name__}: {first})"
        return
    for row, m in zip(report.rows, found):
        row.memory = m.cuda_peak if device.type == "cuda" else m.saved_peak
        row.whole = m.whole_peak
        row.rss = m.rss_peak
    # The memory module's notes on the figures shown here (not on its other columns), under
    # the names of our columns.
    names = {"CUDA MiB:": "CUDA peak:"} if device.type == "cuda" else {
        "saved MiB:": "saved for backward:"}
    if rss and device.type == "cpu":
        names["RSS MiB:"] = "peak RSS:"
    names["whole MiB:"] = "whole peak:"
    names["checkpoint:"] = "GC:"
    report.memory_how = [new + note[len(old):] for note in notes
                         for old, new in names.items() if note.startswith(old)]
