"""One measured training step: the whole count (parameters, optimizer state, saved bytes and
``.grad`` tensors at their joint peak) and the lower bound of local learning.

See ``auglocal_fx.memory`` for the report these make up.
"""

from __future__ import annotations

import copy
import gc
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ._saved_bytes import SavedBytesCounter, storage_bytes
from .errors import AugLocalError
from .graph_blocks import as_tuple
from .local import LocalNet, to_local
from .local_net import step_groups

__all__ = ["OPTIMIZERS", "OptimizerFactory", "build_local", "random_batch", "run_method_step",
           "optimizer_name", "measure_in_process", "lower_bound"]

OptimizerFactory = Callable[[List[nn.Parameter]], torch.optim.Optimizer]
OPTIMIZERS = ("sgd", "adamw")


def build_local(model_or_spec, d: int, kwargs: Dict[str, Any]):
    if isinstance(model_or_spec, LocalNet):
        return model_or_spec
    if isinstance(model_or_spec, nn.Module):
        model_or_spec = copy.deepcopy(model_or_spec)  # to_local shares weights with the model it gets
    return to_local(model_or_spec, d=d, **kwargs)


def random_batch(local, batch_size: int, device: torch.device, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((batch_size,) + tuple(local.input_size), generator=g).to(device)
    y = torch.randint(0, local.num_classes, (batch_size,), generator=g).to(device)
    return x, y


def run_method_step(local, method: str, x: torch.Tensor, y: torch.Tensor, step_each_module: bool = False,
                    drop: Optional[Callable[[List[nn.Parameter]], None]] = None) -> None:
    """One training step of ``method`` (``bp``, ``checkpoint`` or ``auglocal``), no update.

    With ``step_each_module`` (``auglocal``), each local module's gradients are dropped as soon as
    its loss is back-propagated, where the trainer steps the module and drops them: ``drop(params)``
    (default: set each ``.grad`` to ``None``).
    """
    if method == "auglocal":
        if not step_each_module:
            local.train_step(x, y)
            return
        # The trainer steps a shared parameter with its last user (its gradient is a sum till then).
        groups = step_groups(local.module_parameters())
        for j, loss in enumerate(local.local_losses(x, y)):
            loss.backward()
            del loss
            (drop or _drop_grads)(groups[j])
        return
    if method == "checkpoint":
        h = x.detach().requires_grad_(True)  # so block 0's checkpoint has an input needing grad
        for block in local.blocks:
            h = checkpoint(block, *as_tuple(h), use_reentrant=True)  # a tuple: one argument each
        logits = local.head(h)
    else:
        logits = local.primary_forward(x)
    F.cross_entropy(logits, y).backward()


def _drop_grads(params: List[nn.Parameter]) -> None:
    for p in params:
        p.grad = None


def optimizer_name(optimizer: Union[str, OptimizerFactory]) -> str:
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


def _optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    return storage_bytes(v for state in opt.state.values() for v in state.values())


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

    def drop(self, params: List[nn.Parameter]) -> None:
        """The module's gradients go (after its step, in the trainer)."""
        for p in params:
            if p.grad is not None:
                self.grads -= self._grads.pop(SavedBytesCounter._key(p.grad), 0)
                p.grad = None

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def measure_in_process(local, method: str, batch_size: int, device: torch.device, seed: int,
                       optimizer: Union[str, OptimizerFactory] = "sgd", step_each_module: bool = False) -> Dict[str, int]:
    """The figures of one measured step: the fields of a ``auglocal_fx.memory.MemoryRow``."""
    local.to(device).train()
    state = {k: v.detach().clone() for k, v in local.state_dict().items()}
    trained = _trained_parameters(local, method)
    opt = _make_optimizer(optimizer, trained)
    try:
        run_method_step(local, method, *random_batch(local, 2, device, seed))  # warm-up: inits kernels
        opt.step()  # creates the optimizer state
        local.zero_grad(set_to_none=True)  # as the trainer does before every step
        x, y = random_batch(local, batch_size, device, seed)
        gc.collect()
        cuda_base = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            cuda_base = torch.cuda.memory_allocated(device)
        whole = _SavedAndGrads(list(local.parameters()))
        try:
            with whole.counter:
                run_method_step(local, method, x, y, step_each_module, drop=whole.drop)
        finally:
            whole.close()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        param_bytes, opt_bytes = storage_bytes(trained), _optimizer_state_bytes(opt)
        row = dict(saved_peak=whole.counter.peak, param_bytes=param_bytes, grad_bytes=whole.grads_at_peak,
                   optimizer_bytes=opt_bytes, whole_peak=param_bytes + opt_bytes + whole.peak)
        if cuda_base is not None:
            row["cuda_max_allocated"] = torch.cuda.max_memory_allocated(device)
            row["cuda_peak"] = row["cuda_max_allocated"] - cuda_base
    finally:
        del opt
        local.zero_grad(set_to_none=True)
        local.load_state_dict(state)
    return row


def lower_bound(local, batch_size: int, device: torch.device, seed: int) -> Tuple[int, str]:
    """The largest saved-bytes peak of one local module's forward and backward, run on its own (with
    ``aux_checkpoint`` the peak may be in backward, where a block is recomputed)."""
    x, y = random_batch(local, batch_size, device, seed)
    state = {k: v.detach().clone() for k, v in local.state_dict().items()}
    params = list(local.parameters())
    best, where = 0, ""
    last = len(local.aux)  # blocks last .. L-1 and the head form the output module
    losses = local.local_losses(x, y)
    for j in range(last + 1):
        with SavedBytesCounter(exclude=params) as counter:
            loss = next(losses)  # runs local module j alone (on a detached input)
            loss.backward()
        if counter.peak > best:
            best = counter.peak
            where = (f"block {j} + aux {j}" if j < last else
                     f"output module (blocks {last}..{len(local.blocks) - 1} + head)")
        del loss, counter
    local.zero_grad(set_to_none=True)
    local.load_state_dict(state)
    return best, where

