"""Optimizers and learning-rate schedules: the paper's recipe, or timm's factories.

The paper's recipe (``opt="sgd"``, ``sched="paper"``, the defaults) is SGD with Nesterov
momentum and weight decay on every parameter, as the authors' ``train.py`` does, with the
per-epoch cosine and warmup of ``auglocal_fx.recipe.learning_rate``. Every other choice
goes through ``timm.optim.create_optimizer_v2`` and ``timm.scheduler.create_scheduler_v2``, and
like timm's own training script exempts norms and biases (1-D parameters) from weight decay.

Each process builds one optimizer over the modules it trains: the whole network, or a pipeline
worker's own blocks and auxiliary networks.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import timm.optim
import timm.scheduler
import torch
from torch import nn

from .errors import AugLocalError, first_line
from .recipe import PAPER_WARMUP_LR, learning_rate

__all__ = ["PAPER_SCHEDULE", "SCHEDULES", "TIMM_WARMUP_LR", "check_optimizer", "check_schedule",
           "is_paper_recipe", "build_optimizer", "no_weight_decay_parameters", "LearningRateSchedule"]

PAPER_SCHEDULE = "paper"
# timm's schedulers that need no validation metric ("plateau" does; we evaluate once per epoch only).
TIMM_SCHEDULES = ("cosine", "tanh", "step", "multistep", "poly", "wsd", "rsqrt", "constant")
SCHEDULES = (PAPER_SCHEDULE,) + TIMM_SCHEDULES
TIMM_WARMUP_LR = 1e-5  # timm's train.py default


def check_optimizer(opt: str) -> None:
    """Raise one line unless ``opt`` names a timm optimizer (``lookahead_`` prefix allowed)."""
    if not isinstance(opt, str) or opt.lower().split("_")[-1] not in timm.optim.list_optimizers():
        raise AugLocalError(f"unknown optimizer {opt!r}; use a timm name such as sgd, momentum, adamw, lamb, "
                            "lion, rmsproptf (timm.optim.list_optimizers() lists all)")


def check_schedule(cfg: Any) -> None:
    """Raise one line for an unknown schedule or an option the chosen schedule cannot honour."""
    if cfg.sched not in SCHEDULES:
        raise AugLocalError(f"unknown schedule {cfg.sched!r}; choose from {', '.join(SCHEDULES)}")
    if cfg.sched == PAPER_SCHEDULE:
        if cfg.sched_on_updates:
            raise AugLocalError("the paper's schedule sets the rate once per epoch; use a timm schedule "
                                "(--sched cosine) to step it per update")
        if cfg.min_lr:
            raise AugLocalError("the paper's cosine ends at 0; min_lr needs a timm schedule (--sched cosine)")
        if cfg.decay_epochs is not None:
            raise AugLocalError("decay_epochs needs a timm schedule (--sched step)")


def is_paper_recipe(cfg: Any) -> bool:
    """The paper's optimizer and schedule: weight decay then reaches every parameter."""
    return cfg.opt == "sgd" and cfg.sched == PAPER_SCHEDULE


def no_weight_decay_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The parameters ``model.no_weight_decay()`` names (a timm ViT's position embedding and class
    token), which timm's factory exempts from weight decay besides norms and biases."""
    names = set(model.no_weight_decay()) if callable(getattr(model, "no_weight_decay", None)) else set()
    return [p for name, p in model.named_parameters() if name in names]


def build_optimizer(cfg: Any, module: nn.Module, lr: float,
                    exempt: Sequence[nn.Parameter] = ()) -> torch.optim.Optimizer:
    """The optimizer of ``cfg`` over the trainable parameters of ``module``.

    Args:
        cfg: a checked ``TrainConfig`` (``opt``, ``momentum``, ``nesterov``, ``weight_decay``,
            ``opt_eps``, ``opt_betas``).
        module: what this process trains (a ``LocalNet``, a model, a worker's modules).
        lr: the peak learning rate.
        exempt: parameters without weight decay besides the 1-D ones (outside the paper's
            recipe), e.g. ``no_weight_decay_parameters`` of the original model.
    """
    kwargs: Dict[str, Any] = {}
    if cfg.opt_eps is not None:
        kwargs["eps"] = cfg.opt_eps
    if cfg.opt_betas is not None:
        kwargs["betas"] = tuple(cfg.opt_betas)
    if cfg.nesterov is not None and "nesterov" in (timm.optim.get_optimizer_info(cfg.opt.split("_")[-1]).defaults
                                                   or {}):
        kwargs["nesterov"] = cfg.nesterov
    if is_paper_recipe(cfg):
        params: Any = [p for p in module.parameters() if p.requires_grad]  # the authors decay everything
    else:
        # timm's factory would do this given the module; named here so a worker's modules are enough.
        exempt_ids = {id(p) for p in exempt}
        names = [name for name, p in module.named_parameters() if id(p) in exempt_ids]
        params = timm.optim.param_groups_weight_decay(module, cfg.weight_decay, no_weight_decay_list=names)
    try:
        return timm.optim.create_optimizer_v2(params, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay,
                                              momentum=cfg.momentum, **kwargs)
    except (ImportError, TypeError, ValueError) as err:
        reason = first_line(err, limit=160)
        raise AugLocalError(f"cannot build optimizer {cfg.opt!r} ({reason}); choose another --opt") from None


class LearningRateSchedule:
    """Sets the optimizer's learning rate as a pure function of the epoch and the update count,
    so a resumed run needs no scheduler state.

    Args:
        cfg: a checked ``TrainConfig`` (``sched``, ``epochs``, ``warmup_epochs``, ``warmup_lr``,
            ``min_lr``, ``sched_on_updates``, ``decay_epochs``, ``decay_rate``).
        optimizer: its groups' ``lr`` is the peak rate.
        base_lr: the peak learning rate.
        steps_per_epoch: optimizer updates per epoch.
    """

    def __init__(self, cfg: Any, optimizer: torch.optim.Optimizer, base_lr: float, steps_per_epoch: int):
        self.cfg, self.optimizer, self.base_lr = cfg, optimizer, base_lr
        self.timm: Optional[timm.scheduler.scheduler.Scheduler] = None
        if cfg.sched != PAPER_SCHEDULE:
            warmup_lr = TIMM_WARMUP_LR if cfg.warmup_lr is None else cfg.warmup_lr
            extra = {} if cfg.decay_epochs is None else {"decay_epochs": cfg.decay_epochs}
            self.timm, _ = timm.scheduler.create_scheduler_v2(
                optimizer, sched=cfg.sched, num_epochs=cfg.epochs, min_lr=cfg.min_lr, warmup_lr=warmup_lr,
                warmup_epochs=cfg.warmup_epochs, decay_rate=cfg.decay_rate,
                step_on_epochs=not cfg.sched_on_updates, updates_per_epoch=steps_per_epoch, **extra)

    def start_epoch(self, epoch: int) -> None:
        """Before epoch ``epoch`` (from 0) runs."""
        if self.timm is not None:
            self.timm.step(epoch)  # a no-op for per-update schedules
            return
        warmup_lr = PAPER_WARMUP_LR if self.cfg.warmup_lr is None else self.cfg.warmup_lr
        lr = learning_rate(epoch + 1, self.cfg.epochs, self.base_lr, self.cfg.warmup_epochs, warmup_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def before_update(self, update: int) -> None:
        """Before optimizer update ``update`` (from 0 over the whole run): timm's ``step_update``."""
        if self.timm is not None:
            self.timm.step_update(update)  # a no-op for per-epoch schedules
