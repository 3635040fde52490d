"""Measure the training memory of end-to-end backprop, gradient checkpointing and AugLocal.

All methods run one training step (forward + backward, no optimizer step) of the same
network on the same batch and device:

* ``bp``: the primary network (``local.blocks`` then ``local.head``), one cross-entropy
  loss, one ``backward()``.
* ``checkpoint``: the same, with every block wrapped in ``torch.utils.checkpoint``
  (reentrant variant, so the activations recomputed during backward are counted too; the
  input is marked ``requires_grad`` so that block 0 is checkpointed as well).
* ``auglocal``: ``local.train_step(x, y)``, the simultaneous local step; with
  ``aux_checkpoint``, the auxiliary forwards are recomputed in backward.

What is measured (nothing here is an estimate):

* *saved bytes* (any device): the peak of bytes held for backward, counted with
  :class:`torch.autograd.graph.saved_tensors_hooks`. Each storage counts once however many
  tensors view it; a storage stops counting when autograd releases the last saved tensor
  that refers to it (after that node's backward ran). Parameter storages are excluded.
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
* *lower bound*: the largest saved-bytes peak of a single local module run alone (block j
  with its auxiliary network, or the output module: the last blocks and the head). Local
  learning cannot hold less than that.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ._device import resolve_device
from .errors import AugLocalError
from .local import LocalNet, to_local
from .options import ConversionOptions

__all__ = ["METHODS", "OPTIMIZERS", "MemoryReport", "MemoryRow", "SavedBytesCounter", "StepMemory", "measure_memory",
           "measure_step", "run_method_step"]

METHODS = ("bp", "checkpoint", "auglocal")
_MIB = float(2 ** 20)


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
    """What :func:`measure_step` returns: the peak and how it was measured."""

    peak_bytes: int
    how: str


def measure_step(step: Callable[[], Any], device: Union[str, torch.device] = "cpu",
                 exclude: Sequence[torch.Tensor] = ()) -> StepMemory:
    """Measure one call of ``step`` (a zero-argument function running forward + backward).

    On CUDA: ``torch.cuda.max_memory_allocated`` during the call minus the bytes allocated
    before it. Elsewhere: the peak of bytes held for backward (see :class:`SavedBytesCounter`;
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


@dataclass
class MemoryRow:
    """One measured method. Byte figures are ``None`` where not measured on this device.

    Attributes:
        method: ``"bp"``, ``"checkpoint"`` or ``"auglocal"``.
        d: the auxiliary depth (``auglocal`` only).
        saved_peak: peak of bytes held for backward.
        aux_checkpoint: whether auxiliary forwards were recomputed (``auglocal`` only).
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

    @property
    def label(self) -> str:
        """``"bp"``, ``"checkpoint"``, ``"auglocal d=2"``, ``"auglocal d=2 +recompute"``."""
        if self.method != "auglocal":
            return self.method
        return f"auglocal d={self.d}" + (" +recompute" if self.aux_checkpoint else "")


@dataclass
class MemoryReport:
    """The result of :func:`measure_memory`; ``str()`` gives the table and how it was measured."""

    model: str
    device: str
    batch_size: int
    input_size: Tuple[int, int, int]
    rows: List[MemoryRow]
    notes: List[str] = field(default_factory=list)
    optimizer: str = "sgd"

    def row(self, method: str, d: Optional[int] = None, aux_checkpoint: Optional[bool] = None) -> MemoryRow:
        """The row of ``method`` (and depth ``d`` and ``aux_checkpoint`` for ``auglocal``)."""
        for r in self.rows:
            if r.method == method and (d is None or r.d == d) and \
                    (aux_checkpoint is None or bool(r.aux_checkpoint) == aux_checkpoint):
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
                   options: Optional[ConversionOptions] = None) -> MemoryReport:
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
        to_local_kwargs: further keyword arguments for :func:`auglocal_fx.to_local`
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
        aux_checkpoint: recompute the auxiliary forwards in backward (see
            :func:`auglocal_fx.to_local`); ``(False, True)`` gives an ``auglocal`` row for each.
        options: the :class:`~auglocal_fx.ConversionOptions` of the networks (``d`` and
            ``aux_checkpoint`` above, and ``to_local_kwargs``, take precedence).

    Returns:
        A :class:`MemoryReport`; ``print(report)`` shows the table.

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
    _optimizer_name(optimizer)  # an unknown name fails before anything is built
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
        locals_by_d[depth] = _build_local(model_or_spec, depth, kwargs)
    first = locals_by_d[depths[0]]
    name = model_or_spec if isinstance(model_or_spec, str) else (first.spec or type(model_or_spec).__name__)
    report = MemoryReport(str(name), str(device), batch_size, tuple(first.input_size), [],
                          _notes(device, rss, mmap_threshold), optimizer=_optimizer_name(optimizer))
    rss_source = _rss_source(model_or_spec, first) if (rss and device.type == "cpu") else None
    if rss and device.type == "cpu" and rss_source is None:
        report.notes.append("RSS not measured: the model is neither a spec string nor picklable; pass a spec")

    runs = [(method, depth, flag) for method in methods
            for depth in (depths if method == "auglocal" else depths[:1])
            for flag in (flags if method == "auglocal" else (False,))]
    try:
        for method, depth, flag in runs:
            local = locals_by_d[depth]
            before = local.aux_checkpoint
            local.aux_checkpoint = flag
            try:
                row = _measure_in_process(local, method, batch_size, device, seed, optimizer)
                if method == "auglocal":
                    row.d, row.aux_checkpoint = depth, flag
                    row.lower_bound, row.lower_bound_module = _lower_bound(local, batch_size, device, seed)
            finally:
                local.aux_checkpoint = before
                if device.type == "cuda":
                    local.to("cpu")  # the next network's CUDA figures hold only its own tensors
            if rss_source is not None:
                row.rss_peak = _rss_in_subprocess(rss_source, method, depth, batch_size, kwargs, seed,
                                                  mmap_threshold, flag)
            report.rows.append(row)
    finally:
        if rss_source is not None and rss_source.get("tmp"):
            os.unlink(rss_source["path"])
    return report


def aux_checkpoint_flags(aux_checkpoint: Union[bool, Sequence[bool]]) -> Tuple[bool, ...]:
    """``True`` -> ``(True,)``, ``(False, True)`` -> itself; anything else is an AugLocalError."""
    if isinstance(aux_checkpoint, bool):
        return (aux_checkpoint,)
    flags = tuple(aux_checkpoint) if isinstance(aux_checkpoint, (tuple, list)) else ()
    if not flags or not all(isinstance(f, bool) for f in flags):
        raise AugLocalError(f"aux_checkpoint must be True, False or a sequence of them, got {aux_checkpoint!r}")
    return flags


def _notes(device: torch.device, rss: bool, mmap_threshold: Optional[int]) -> List[str]:
    notes = ["saved MiB: peak of bytes held for backward during one step (torch.autograd.graph."
             "saved_tensors_hooks; each storage once, released when autograd frees it; parameters excluded)",
             "whole MiB: parameters + optimizer state + the peak over the step of (saved bytes live + "
             ".grad tensors existing), all counted exactly from the tensors (each storage once); "
             "grads = the .grad bytes at that peak (gradients are set to None before the step and held "
             "until the single optimizer step after it, as the trainer does); optim = the optimizer's "
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
                 "auglocal: LocalNet.train_step (+recompute: aux_checkpoint=True, auxiliary forwards "
                 "recomputed in backward); one step each, same batch, the optimizer step not counted")
    return notes


def _build_local(model_or_spec, d: int, kwargs: Dict[str, Any]):
    if isinstance(model_or_spec, LocalNet):
        return model_or_spec
    if isinstance(model_or_spec, nn.Module):
        model_or_spec = copy.deepcopy(model_or_spec)  # to_local shares weights with the model it gets
    return to_local(model_or_spec, d=d, **kwargs)


def _batch(local, batch_size: int, device: torch.device, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((batch_size,) + tuple(local.input_size), generator=g).to(device)
    y = torch.randint(0, local.num_classes, (batch_size,), generator=g).to(device)
    return x, y


def run_method_step(local, method: str, x: torch.Tensor, y: torch.Tensor) -> None:
    """One training step of ``method`` (``bp``, ``checkpoint`` or ``auglocal``), no update."""
    if method == "auglocal":
        local.train_step(x, y)
        return
    if method == "checkpoint":
        h = x.detach().requires_grad_(True)  # so block 0's checkpoint has an input needing grad
        for block in local.blocks:
            h = checkpoint(block, h, use_reentrant=True)
        logits = local.head(h)
    else:
        logits = local.primary_forward(x)
    F.cross_entropy(logits, y).backward()


OptimizerFactory = Callable[[List[nn.Parameter]], torch.optim.Optimizer]
OPTIMIZERS = ("sgd", "adamw")


def _optimizer_name(optimizer: Union[str, OptimizerFactory]) -> str:
    if callable(optimizer):
        return getattr(optimizer, "__name__", type(optimizer).__name__)
    if optimizer not in OPTIMIZERS:
        raise AugLocalError(f"unknown optimizer {optimizer!r}; choose from {', '.join(OPTIMIZERS)} "
                            "or pass a function params -> torch.optim.Optimizer")
    return optimizer


def _make_optimizer(optimizer: Union[str, OptimizerFactory], params: List[nn.Parameter]) -> torch.optim.Optimizer:
    if callable(optimizer):
        made = optimizer(params)
        if not isinstance(made, torch.optim.Optimizer):
            raise AugLocalError(f"the optimizer function returned {type(made).__name__}, not a torch.optim.Optimizer")
        return made
    if optimizer == "sgd":  # the paper's recipe
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages of ``tensors`` (a storage viewed twice counts once)."""
    seen = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.numel():
            seen[SavedBytesCounter._key(t)] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    return _storage_bytes(v for state in opt.state.values() for v in state.values())


def _trained_parameters(local, method: str) -> List[nn.Parameter]:
    if method == "auglocal":
        return list(local.parameters())
    return list(local.blocks.parameters()) + list(local.head.parameters())  # BP has no aux nets


class _SavedAndGrads:
    """Peak over one step of saved bytes live plus ``.grad`` bytes existing, as they appear."""

    def __init__(self, params: List[nn.Parameter]):
        self.peak = 0
        self.grads_at_peak = 0
        self._grads = {SavedBytesCounter._key(p.grad): p.grad.untyped_storage().nbytes()
                       for p in params if p.grad is not None}
        self.grads = sum(self._grads.values())
        self.counter = SavedBytesCounter(exclude=params, on_grow=self._check)
        self._handles = [p.register_post_accumulate_grad_hook(self._grad_ready) for p in params
                         if p.requires_grad]

    def _grad_ready(self, p: nn.Parameter) -> None:
        key = SavedBytesCounter._key(p.grad)
        if key not in self._grads:
            self._grads[key] = p.grad.untyped_storage().nbytes()
            self.grads += self._grads[key]
            self._check()

    def _check(self) -> None:
        if self.counter.live + self.grads > self.peak:
            self.peak = self.counter.live + self.grads
            self.grads_at_peak = self.grads

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def _measure_in_process(local, method: str, batch_size: int, device: torch.device, seed: int,
                        optimizer: Union[str, OptimizerFactory] = "sgd") -> MemoryRow:
    local.to(device).train()
    state = {k: v.detach().clone() for k, v in local.state_dict().items()}
    trained = _trained_parameters(local, method)
    opt = _make_optimizer(optimizer, trained)
    try:
        run_method_step(local, method, *_batch(local, 2, device, seed))  # warm-up: inits kernels
        opt.step()  # creates the optimizer state
        local.zero_grad(set_to_none=True)  # as the trainer does before every step
        x, y = _batch(local, batch_size, device, seed)
        gc.collect()
        cuda_base = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            cuda_base = torch.cuda.memory_allocated(device)
        whole = _SavedAndGrads(list(local.parameters()))
        try:
            with whole.counter:
                run_method_step(local, method, x, y)
        finally:
            whole.close()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        param_bytes, opt_bytes = _storage_bytes(trained), _optimizer_state_bytes(opt)
        row = MemoryRow(method, None, whole.counter.peak, param_bytes=param_bytes, grad_bytes=whole.grads_at_peak,
                        optimizer_bytes=opt_bytes, whole_peak=param_bytes + opt_bytes + whole.peak)
        if cuda_base is not None:
            row.cuda_max_allocated = torch.cuda.max_memory_allocated(device)
            row.cuda_peak = row.cuda_max_allocated - cuda_base
    finally:
        del opt
        local.zero_grad(set_to_none=True)
        local.load_state_dict(state)
    return row


def _lower_bound(local, batch_size: int, device: torch.device, seed: int) -> Tuple[int, str]:
    """The largest saved-bytes peak of one local module's forward, run on its own."""
    x, y = _batch(local, batch_size, device, seed)
    state = {k: v.detach().clone() for k, v in local.state_dict().items()}
    params = list(local.parameters())
    best, where = 0, ""
    last = len(local.aux)  # blocks last .. L-1 and the head form the output module
    losses = local.local_losses(x, y)
    for j in range(last + 1):
        with SavedBytesCounter(exclude=params) as counter:
            loss = next(losses)  # runs local module j alone (on a detached input)
        if counter.peak > best:
            best = counter.peak
            where = (f"block {j} + aux {j}" if j < last else
                     f"output module (blocks {last}..{len(local.blocks) - 1} + head)")
        del loss, counter  # free module j's graph before module j + 1 runs
    local.load_state_dict(state)
    return best, where


def _rss_source(model_or_spec, local) -> Optional[Dict[str, Any]]:
    if isinstance(model_or_spec, str):
        return {"spec": model_or_spec}
    target = model_or_spec
    if isinstance(model_or_spec, LocalNet):
        if local.spec:
            return {"spec": local.spec, "options": local.conversion.to_dict()}
        target = local
    fd, path = tempfile.mkstemp(suffix=".pt", prefix="auglocal-mem-")
    os.close(fd)
    try:
        torch.save(target, path)
    except Exception:  # noqa: BLE001 - anything unpicklable: local classes, lambdas, ...
        os.unlink(path)
        return None
    return {"path": path, "tmp": True, "is_local": isinstance(model_or_spec, LocalNet)}


def _rss_in_subprocess(source: Dict[str, Any], method: str, d: int, batch_size: int,
                       kwargs: Dict[str, Any], seed: int, mmap_threshold: Optional[int] = None,
                       aux_checkpoint: bool = False) -> Optional[int]:
    payload = {"source": {k: v for k, v in source.items() if k != "tmp"}, "method": method, "d": d,
               "batch_size": batch_size, "kwargs": _jsonable(kwargs), "seed": seed,
               "options": kwargs["options"].to_dict() if "options" in kwargs else None,
               "aux_checkpoint": aux_checkpoint}
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    if mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(int(mmap_threshold))
    code = "from auglocal_fx.memory import _rss_main; _rss_main()"
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(payload)], capture_output=True, text=True,
                          env=env)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise AugLocalError(f"RSS measurement subprocess for {method} failed ({last}); rerun with rss=False")
    return int(json.loads(proc.stdout.strip().splitlines()[-1])["rss_peak"])


def _jsonable(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    out = {}
    for k, v in kwargs.items():
        try:
            json.dumps(v)
        except TypeError:
            continue  # leaf_modules given as classes etc. travel only with a pickled model
        out[k] = v
    return out


def _read_status(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise AugLocalError(f"/proc/self/status has no {field_name}; RSS can only be measured on Linux")


def _rss_main() -> None:
    """Subprocess entry point: one step of one method, prints the RSS growth as JSON."""
    payload = json.loads(sys.argv[-1])
    source, kwargs = payload["source"], payload["kwargs"]
    if "input_size" in kwargs:
        kwargs["input_size"] = tuple(kwargs["input_size"])
    options = source.get("options") or payload.get("options")
    if options is not None:
        kwargs["options"] = ConversionOptions.from_dict(options)
    if "spec" in source:
        model_or_spec = source["spec"]
    else:
        model_or_spec = torch.load(source["path"], weights_only=False)
    local = _build_local(model_or_spec, payload["d"], kwargs)
    local.aux_checkpoint = bool(payload.get("aux_checkpoint", False))
    local.train()
    run_method_step(local, payload["method"], *_batch(local, 2, torch.device("cpu"), payload["seed"]))
    x, y = _batch(local, payload["batch_size"], torch.device("cpu"), payload["seed"])
    gc.collect()
    before = _read_status("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        before = _read_status("VmHWM")  # cannot reset: growth of the high-water mark instead
    run_method_step(local, payload["method"], x, y)
    peak = _read_status("VmHWM")
    print(json.dumps({"rss_peak": max(0, peak - before)}))
