"""How one process applies its gradients: one optimizer step at the end of the training step,
or each local module's step as soon as its loss is back-propagated.

No gradient crosses a block, so a parameter's gradient is final once the last local module
using it has back-propagated its loss: for an unshared parameter, its own module; for one shared
by several modules (``shared_parameters="sum"``: CoaT's position encodings), the last of them,
each user's loss having added its part. Each parameter is stepped, clipped and averaged with
that last user (``local_net.step_groups``), in both modes, so both give the same weights.
Stepping a module then and dropping its gradients (``set_to_none``) means that at most one
local module's gradients exist at a time (plus the partial sums of shared parameters); the
weights are bit-identical to one step at the end for any optimizer whose state is per
parameter and which leaves parameters without a gradient alone (PyTorch's own optimizers):
the one optimizer (its state, its param groups, the rates the schedule sets in them) is
stepped once per module, and only that module's final gradients are visible when it is (a
shared parameter's partial sum is set aside during the step, then put back).

Per module, in order: average over the data-parallel replicas, unscale (AMP), clip its norm,
step. With a ``GradScaler`` the inf/NaN check is per module, not per training step: a module
whose own gradients overflowed skips its step while the others take theirs (they are
independent problems; one step at the end would skip every module), and the scale is lowered
after the step if any module overflowed. Without an overflow the weights are those of one step
at the end. ``finish`` says whether every step was taken, so that what follows an optimizer step
(copies following their sources by an EMA) is skipped with it.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

from ._distributed import average_gradients
from .errors import AugLocalError
from .local_net import step_groups

__all__ = ["GradientUpdates", "steps_each_module_exactly"]


def steps_each_module_exactly(optimizer: torch.optim.Optimizer) -> bool:
    """Whether stepping ``optimizer`` once per local module gives the weights of one step at the end.

    PyTorch's own optimizers keep their state per parameter and skip parameters without a
    gradient, all but L-BFGS (one flat state over every parameter). Others may not: timm's LAMB
    counts steps per parameter group and clips by the norm of every gradient together, Lookahead
    counts steps per group.
    """
    return type(optimizer).__module__.startswith("torch.optim.") and not isinstance(optimizer, torch.optim.LBFGS)


class _ModuleOptimizer:
    """``optimizer`` as a ``GradScaler`` sees one local module's step.

    The scaler unscales and checks each optimizer object once per update, so every module needs
    its own object; stepping it steps the one optimizer, whose parameters have no gradient
    except this module's. ``stepped`` records whether the scaler let the step through (it
    calls ``step`` only when the gradients are finite).
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.stepped = False

    @property
    def param_groups(self) -> List[dict]:
        return self.optimizer.param_groups

    def step(self, *args: Any, **kwargs: Any) -> Any:
        self.stepped = True
        return self.optimizer.step(*args, **kwargs)


class GradientUpdates:
    """Average, unscale, clip and step: per local module (``each_module``) or once per step.

    Args:
        optimizer: the process's optimizer over every module's parameters.
        modules: each local module's parameters, in the order their losses are back-propagated;
            a parameter may be in several (shared); each is stepped and clipped with the last.
        each_module: step each module as soon as ``module_done`` is called for it.
        scaler: AMP's ``GradScaler`` (``None`` without gradient scaling).
        grad_clip: the largest gradient norm of a module (``None``: no clipping).
        dp_world: data-parallel replicas whose gradients are averaged.
        dp_group: their process group (``None``: the default group).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, modules: Sequence[Sequence[nn.Parameter]],
                 each_module: bool, scaler: Optional[Any] = None, grad_clip: Optional[float] = None,
                 dp_world: int = 1, dp_group: Optional[Any] = None):
        if each_module and not steps_each_module_exactly(optimizer):
            raise AugLocalError(f"{type(optimizer).__name__} keeps state across parameters, so stepping each "
                                "local module on its own would change the updates; use step_each_module=False "
                                "(--step-at-end)")
        self.optimizer = optimizer
        self.modules = step_groups(modules)  # each parameter once, with its last user
        # Shared parameters whose gradient is still a partial sum after module j's backward.
        first: Dict[int, int] = {}
        for j, group in enumerate(modules):
            for p in group:
                first.setdefault(id(p), j)
        spans = [(first[id(p)], j, p) for j, group in enumerate(self.modules) for p in group if first[id(p)] < j]
        self._pending = [[p for start, stop, p in spans if start <= j < stop] for j in range(len(self.modules))]
        self.each_module, self.scaler, self.grad_clip = each_module, scaler, grad_clip
        self.dp_world, self.dp_group = dp_world, dp_group
        self._views = [_ModuleOptimizer(optimizer) for _ in self.modules] if each_module else [
            _ModuleOptimizer(optimizer)]
        self._skipped = False

    def module_done(self, index: int) -> None:
        """Module ``index``'s loss is back-propagated: step it now and free its gradients (if ``each_module``)."""
        if not self.each_module:
            return
        params = self.modules[index]
        # A later user's loss still adds to these: the optimizer must not see them now.
        pending = [(p, p.grad) for p in self._pending[index] if p.grad is not None]
        for p, _ in pending:
            p.grad = None
        self._update(self._views[index], params, [params])
        for p in params:
            p.grad = None
        for p, grad in pending:
            p.grad = grad

    def finish(self) -> bool:
        """The training step's losses are all back-propagated: step (once per step), update the scale.

        Returns:
            Whether every step was taken: ``False`` when the scaler skipped one (inf/NaN gradients).
        """
        if not self.each_module:
            self._update(self._views[0], [p for m in self.modules for p in m], self.modules)
        if self.scaler is not None:
            self.scaler.update()
        taken, self._skipped = not self._skipped, False
        return taken

    def _update(self, optimizer: _ModuleOptimizer, params: List[nn.Parameter],
                clip_groups: Sequence[List[nn.Parameter]]) -> None:
        optimizer.stepped = False
        if self.dp_world > 1:
            average_gradients(params, self.dp_world, group=self.dp_group)
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        if self.grad_clip is not None:
            for group in clip_groups:
                nn.utils.clip_grad_norm_(group, self.grad_clip)
        if self.scaler is not None:
            self.scaler.step(optimizer)
        else:
            optimizer.step()
        self._skipped |= not optimizer.stepped
