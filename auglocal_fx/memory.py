"""Measure the training memory of end-to-end backprop, gradient checkpointing and AugLocal.

All methods run one training step (forward + backward, no optimizer step) of the same
network on the same batch and device:

* ``bp``: the primary network (``local.blocks`` then ``local.head``), one cross-entropy
  loss, one ``backward()``.
* ``checkpoint``: the same, with every block wrapped in ``torch.utils.checkpoint``
  (reentrant variant, so the activations recomputed during backward are counted too; the
  input is marked ``requires_grad`` so that block 0 is checkpointed as well).
* ``auglocal``: ``local.train_step(x, y)``, the simultaneous local step; with
  ``aux_checkpoint``, each primary block is recomputed in backward on its own.

What is measured (nothing here is an estimate):

* *saved bytes* (any device): the peak of bytes held for backward, counted with
  ``torch.autograd.graph.saved_tensors_hooks``. Each storage counts once however many
  tensors view it; a storage stops counting when autograd releases the last saved tensor
  that refers to it (after that node's backward ran). Parameter storages are excluded. What a
  checkpoint recomputes in backward is counted too, in both variants (the non-reentrant one of
  ``aux_checkpoint`` recomputes under its own hooks; the counter reaches in to see it).
* *whole count* (any device): what the step holds at its peak: parameters + optimizer state
  (measured on a real optimizer after a real step) + the peak over the step of (saved bytes
  live + ``.grad`` bytes existing). The gradients are set to ``None`` before the step and each
  appears when its backward accumulates it, and all stay until the one optimizer step after the
  step (as the trainer does), so ``grad_bytes`` is what existed at the moment of that peak.
  Transient tensors (outputs nobody saves, gradients flowing between layers) are not counted;
  on CUDA, ``max_memory_allocated`` counts them, and is given beside it.
* *RSS peak* (CPU): growth of the process's peak resident set size (``VmHWM``) over one
  step, in a fresh Python subprocess per method; the peak is reset just before the step by
  writing ``5`` to ``/proc/self/clear_refs`` (after a warm-up step on a batch of 2), so the
  figure is the step's peak RSS minus the RSS before it.
* *CUDA peak* (CUDA): ``torch.cuda.max_memory_allocated`` during the step minus the bytes
  allocated before it.
* *lower bound*: the largest saved-bytes peak of a single local module run alone, forward and
  backward (block j with its auxiliary network, or the output module: the last blocks and the head). Local
  learning cannot hold less than that.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ._device import resolve_device
from ._memory_rss import rss_in_subprocess, rss_source
from ._memory_step import (OPTIMIZERS, OptimizerFactory, build_local, lower_bound, measure_in_process,
                           optimizer_name, run_method_step)
from ._saved_bytes import SavedBytesCounter, StepMemory, measure_step
from .errors import AugLocalError
from .local import LocalNet
from .options import ConversionOptions

__all__ = ["METHODS", "OPTIMIZERS", "MemoryReport", "MemoryRow", "SavedBytesCounter", "StepMemory", "measure_memory",
           "measure_step", "run_method_step", "aux_checkpoint_flags"]

METHODS = ("bp", "checkpoint", "auglocal")
_MIB = float(2 ** 20)

@dataclass
class MemoryRow:
    """One measured method. Byte figures are ``None`` where not measured on this device.

    Attributes:
        method: ``"bp"``, ``"checkpoint"`` or ``"auglocal"``.
        d: the auxiliary depth (``auglocal`` only).
        saved_peak: peak of bytes held for backward.
        aux_checkpoint: whether the primary blocks were recomputed (``auglocal`` only).
        param_bytes: the trained parameters (BP and checkpointing: the primary network only).
        grad_bytes: the ``.grad`` tensors that existed at the moment of the whole-count peak.
        optimizer_bytes: the optimizer's state after a real step (SGD momentum: one buffer per
            parameter; AdamW: two, and a step count).
        whole_peak: ``param_bytes + optimizer_bytes + max over the step of (saved bytes live +
            .grad bytes existing)``: what the step holds at its peak, temporaries aside.
        rss_peak: growth of the process's peak RSS over the step (CPU, subprocess).
        cuda_peak: CUDA ``max_memory_allocated`` during the step minus the bytes allocated before.
        cuda_max_allocated: CUDA ``max_memory_allocated`` itself, beside ``whole_peak`` (only this
            network, its optimizer state and the batch are on the device).
        lower_bound: the largest saved-bytes peak of one local module alone.
        lower_bound_module: which module that is.
    """

    method: str
    d: Optional[int]
    saved_peak: int
    aux_checkpoint: Optional[bool] = None
    param_bytes: Optional[int] = None
    grad_bytes: Optional[int] = None
    optimizer_bytes: Optional[int] = None
    whole_peak: Optional[int] = None
    rss_peak: Optional[int] = None
    cuda_peak: Optional[int] = None
    cuda_max_allocated: Optional[int] = None
    lower_bound: Optional[int] = None
    lower_bound_module: Optional[str] = None
    step_each_module: Optional[bool] = None

    @property
    def label(self) -> str:
        """``"bp"``, ``"checkpoint"``, ``"auglocal d=2"``, ``"auglocal d=2 +recompute"``."""
        if self.method != "auglocal":
            return self.method
        return (f"auglocal d={self.d}" + (" +recompute" if self.aux_checkpoint else "")
                + (" +step each" if self.step_each_module else ""))


@dataclass
class MemoryReport:
    """The result of ``measure_memory``; ``str()`` gives the table and how it was measured."""

    model: str
    device: str
    batch_size: int
    input_size: Tuple[int, int, int]
    rows: List[MemoryRow]
    notes: List[str] = field(default_factory=list)
    optimizer: str = "sgd"

    def row(self, method: str, d: Optional[int] = None, aux_checkpoint: Optional[bool] = None,
            step_each_module: Optional[bool] = None) -> MemoryRow:
        """The row of ``method`` (and depth ``d``, ``aux_checkpoint`` and ``step_each_module`` for ``auglocal``)."""
        for r in self.rows:
            if r.method == method and (d is None or r.d == d) and \
                    (aux_checkpoint is None or bool(r.aux_checkpoint) == aux_checkpoint) and \
                    (step_each_module is None or bool(r.step_each_module) == step_each_module):
                return r
        raise AugLocalError(f"no {method} row (d={d}, aux_checkpoint={aux_checkpoint}) in this report; "
                            f"measure it with methods=({method!r},)")

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)

    def __str__(self) -> str:
        bp = next((r for r in self.rows if r.method == "bp"), None)
        gc_row = next((r for r in self.rows if r.method == "checkpoint"), None)
        show_rss = any(r.rss_peak is not None for r in self.rows)
        show_cuda = any(r.cuda_peak is not None for r in self.rows)
        cols = ["method", "saved MiB", "x BP", "params", "grads", "optim", "whole MiB", "x BP", "x GC"]
        if show_rss:
            cols += ["RSS MiB", "x BP"]
        if show_cuda:
            cols += ["CUDA step MiB", "CUDA max MiB"]
        cols += ["lower bd MiB", "x lower bd"]
        lines = []
        for r in self.rows:
            cells = [r.label, _mib(r.saved_peak), _ratio(r.saved_peak, bp and bp.saved_peak),
                     _mib(r.param_bytes), _mib(r.grad_bytes), _mib(r.optimizer_bytes), _mib(r.whole_peak),
                     _ratio(r.whole_peak, bp and bp.whole_peak), _ratio(r.whole_peak, gc_row and gc_row.whole_peak)]
            if show_rss:
                cells += [_mib(r.rss_peak), _ratio(r.rss_peak, bp and bp.rss_peak)]
            if show_cuda:
                cells += [_mib(r.cuda_peak), _mib(r.cuda_max_allocated)]
            cells += [_mib(r.lower_bound), _ratio(r.saved_peak, r.lower_bound) if r.lower_bound else "-"]
            lines.append(cells)
        widths = [max(len(c), *(len(l[i]) for l in lines)) for i, c in enumerate(cols)]
        fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                      for i, (c, w) in enumerate(zip(cells, widths)))
        out = [f"Training-step memory of {self.model}, batch {self.batch_size}, input "
               f"{tuple(self.input_size)}, device {self.device}, optimizer {self.optimizer}",
               fmt(cols), fmt(["-" * w for w in widths])]
        out += [fmt(l) for l in lines]
        out += ["How measured:"] + [f"  * {n}" for n in self.notes]
        return "\n".join(out)


def _mib(nbytes: Optional[int]) -> str:
    return "-" if nbytes is None else f"{nbytes / _MIB:.1f}"


def _ratio(a: Optional[int], b: Optional[int]) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}"


def measure_memory(model_or_spec: Union[str, nn.Module], methods: Sequence[str] = METHODS,
                   d: Union[int, Sequence[int]] = 2, batch_size: int = 128,
                   device: Union[str, torch.device] = "cpu", input_size: Optional[Tuple[int, int, int]] = None,
                   num_classes: Optional[int] = None, rss: bool = True, seed: int = 0,
                   to_local_kwargs: Optional[Dict[str, Any]] = None,
                   mmap_threshold: Optional[int] = None, optimizer: Union[str, OptimizerFactory] = "sgd",
                   aux_checkpoint: Union[bool, Sequence[bool]] = False,
                   options: Optional[ConversionOptions] = None,
                   step_each_module: Union[bool, Sequence[bool]] = False) -> MemoryReport:
    """Measure one training step of BP, gradient checkpointing and AugLocal side by side.

    Args:
        model_or_spec: a spec string (``"paper:resnet110"``), an ``nn.Module`` or a
            ``LocalNet`` (then ``d`` is the LocalNet's own).
        methods: any of ``"bp"``, ``"checkpoint"``, ``"auglocal"``.
        d: auxiliary-network depth, or several depths (one ``auglocal`` row each).
        batch_size: images per step.
        device: ``"cpu"`` or a CUDA device.
        input_size: ``(C, H, W)``; defaults to the spec's or ``(3, 32, 32)``.
        num_classes: classes of the random labels; defaults to the model's.
        rss: on CPU, also measure the peak RSS in a fresh subprocess per method (slower).
        seed: seed of the random batch.
        to_local_kwargs: further keyword arguments for ``auglocal_fx.to_local``
            (``tau``, ``pyramid``, ``selection``, ``leaf_modules`` ...).
        mmap_threshold: if set, the RSS subprocesses run with glibc's
            ``MALLOC_MMAP_THRESHOLD_`` fixed to this many bytes, so every larger block is
            mapped and unmapped on its own and the RSS follows the live allocations. By default
            glibc raises the threshold after frees, serves later tensors from its heap and keeps
            freed heap pages resident, which inflates (and adds noise to) the RSS of methods
            that allocate and free many activations, such as AugLocal.
        optimizer: whose state the whole count holds: ``"sgd"`` (the paper's: Nesterov
            momentum, one buffer per parameter), ``"adamw"`` (two buffers per parameter), or a
            function ``params -> torch.optim.Optimizer``. Its state is measured after a real step.
        aux_checkpoint: recompute the primary blocks in backward (see
            ``auglocal_fx.to_local``); ``(False, True)`` gives an ``auglocal`` row for each.
        options: the ``auglocal_fx.ConversionOptions`` of the networks (``d`` and
            ``aux_checkpoint`` above, and ``to_local_kwargs``, take precedence).
        step_each_module: drop each local module's gradients as soon as its loss is
            back-propagated, as the trainer's ``step_each_module`` does after stepping it (so
            the whole count holds one module's gradients at a time); ``(False, True)`` gives an
            ``auglocal`` row for each.

    Returns:
        A ``MemoryReport``; ``print(report)`` shows the table.

    Raises:
        AugLocalError: for an unknown method or device, or anything ``to_local`` rejects.
    """
    methods = tuple(methods)
    for m in methods:
        if m not in METHODS:
            raise AugLocalError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    depths = (d,) if isinstance(d, int) else tuple(d)
    if isinstance(model_or_spec, LocalNet):
        depths = (model_or_spec.conversion.d,)
    if not depths:
        raise AugLocalError("d must be an int or a non-empty sequence of ints, e.g. d=(2, 4)")
    flags = aux_checkpoint_flags(aux_checkpoint)
    each_flags = aux_checkpoint_flags(step_each_module, "step_each_module")
    optimizer_name(optimizer)  # an unknown name fails before anything is built
    device = resolve_device(device)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise AugLocalError(f"batch_size must be a positive int, got {batch_size!r}")
    kwargs = dict(to_local_kwargs or {})
    if options is not None:
        kwargs["options"] = options
    if input_size is not None:
        kwargs["input_size"] = tuple(input_size)
    if num_classes is not None and isinstance(model_or_spec, str):
        kwargs["num_classes"] = num_classes  # a model object has its own classifier

    locals_by_d = {}
    for depth in depths if "auglocal" in methods else depths[:1]:
        locals_by_d[depth] = build_local(model_or_spec, depth, kwargs)
    first = locals_by_d[depths[0]]
    name = model_or_spec if isinstance(model_or_spec, str) else (first.spec or type(model_or_spec).__name__)
    report = MemoryReport(str(name), str(device), batch_size, tuple(first.input_size), [],
                          _notes(device, rss, mmap_threshold), optimizer=optimizer_name(optimizer))
    source = rss_source(model_or_spec, first) if (rss and device.type == "cpu") else None
    if rss and device.type == "cpu" and source is None:
        report.notes.append("RSS not measured: the model is neither a spec string nor picklable; pass a spec")

    # BP and checkpointing are one module: stepping it after its one loss is the step at the end.
    runs = [(method, depth, flag, each) for method in methods
            for depth in (depths if method == "auglocal" else depths[:1])
            for flag in (flags if method == "auglocal" else (False,))
            for each in (each_flags if method == "auglocal" else (False,))]
    try:
        for method, depth, flag, each in runs:
            local = locals_by_d[depth]
            before = local.aux_checkpoint
            local.aux_checkpoint = flag
            try:
                row = MemoryRow(method, None, **measure_in_process(local, method, batch_size, device, seed,
                                                                   optimizer, each))
                if method == "auglocal":
                    row.d, row.aux_checkpoint, row.step_each_module = depth, flag, each
                    row.lower_bound, row.lower_bound_module = lower_bound(local, batch_size, device, seed)
            finally:
                local.aux_checkpoint = before
                if device.type == "cuda":
                    local.to("cpu")  # the next network's CUDA figures hold only its own tensors
            if source is not None:
                row.rss_peak = rss_in_subprocess(source, method, depth, batch_size, kwargs, seed,
                                                 mmap_threshold, flag, each)
            report.rows.append(row)
    finally:
        if source is not None and source.get("tmp"):
            os.unlink(source["path"])
    return report


def aux_checkpoint_flags(aux_checkpoint: Union[bool, Sequence[bool]], name: str = "aux_checkpoint") -> Tuple[bool, ...]:
    """``True`` -> ``(True,)``, ``(False, True)`` -> itself; anything else is an AugLocalError."""
    if isinstance(aux_checkpoint, bool):
        return (aux_checkpoint,)
    flags = tuple(aux_checkpoint) if isinstance(aux_checkpoint, (tuple, list)) else ()
    if not flags or not all(isinstance(f, bool) for f in flags):
        raise AugLocalError(f"{name} must be True, False or a sequence of them, got {aux_checkpoint!r}")
    return flags


def _notes(device: torch.device, rss: bool, mmap_threshold: Optional[int]) -> List[str]:
    notes = ["saved MiB: peak of bytes held for backward during one step (torch.autograd.graph."
             "saved_tensors_hooks; each storage once, released when autograd frees it; parameters excluded)",
             "whole MiB: parameters + optimizer state + the peak over the step of (saved bytes live + "
             ".grad tensors existing), all counted exactly from the tensors (each storage once); "
             "grads = the .grad bytes at that peak (gradients are set to None before the step and held "
             "until the single optimizer step after it, as the trainer's step_each_module=False does; "
             "+step each: each local module's gradients dropped as soon as its loss is back-propagated, "
             "as the trainer does after stepping the module); optim = the optimizer's "
             "state after a real step; bp/checkpoint train the primary network's parameters only; "
             "transient buffers (unsaved outputs, gradients flowing between layers) are not counted",
             "lower bd: the largest saved-bytes peak of one local module alone (block j + aux j, or the "
             "output module); x lower bd = saved MiB / lower bd"]
    if device.type == "cpu" and rss:
        notes.append("RSS MiB: growth of peak RSS (VmHWM, reset via /proc/self/clear_refs) over one step, "
                     "in a fresh subprocess per method, after a warm-up step on 2 images; glibc malloc "
                     + (f"with MALLOC_MMAP_THRESHOLD_={mmap_threshold}" if mmap_threshold else "defaults"))
    if device.type == "cuda":
        notes.append("CUDA step MiB: torch.cuda.max_memory_allocated during the step minus memory allocated "
                     "before it; CUDA max MiB: torch.cuda.max_memory_allocated itself (this network, its "
                     "optimizer state and the batch alone on the device): compare with whole MiB")
    notes.append("checkpoint: torch.utils.checkpoint (reentrant) around every block; bp: one backward; "
                 "auglocal: LocalNet.train_step (+recompute: aux_checkpoint=True, each primary block "
                 "recomputed in backward on its own); one step each, same batch, the optimizer step not counted")
    return notes

