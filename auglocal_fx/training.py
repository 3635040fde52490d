"""Training with AugLocal (default) or end-to-end backprop: the options and the entry point.

The options live in ``train_config.py`` (re-exported here), which process runs what in
``_launch.py``, the loop in ``_train_loop.py`` (the pipeline's in ``_pipeline.py``), process
groups in ``_distributed.py``, the checkpoint format in ``_train_state.py``, the recipe in
``recipe.py``.

The recipe defaults follow the paper and the authors' code (``auglocal_fx.recipe``): SGD with
Nesterov momentum 0.9, weight decay 1e-4 on every parameter, a cosine learning-rate schedule set
once per epoch with a linear warmup from 0.01 (the paper's 10 epochs of 400, scaled to the
run: ``auglocal_fx.recipe.default_warmup_epochs``), batch 1024 and lr 0.8 for
CIFAR-10/SVHN, batch 128 and lr 0.1 for STL-10. Both settings are ``lr = 0.1 * batch / 128``;
other datasets default to batch 128 and that same linear rule applies when only the batch
size is overridden. The default dataset is Fashion-MNIST when its Debian package is installed
(digits otherwise, which every method learns to ~99%).

Other optimizers and schedules come from timm's factories (``auglocal_fx.optimization``);
mixup / cutmix, label smoothing and an EMA of the primary weights from timm's tools
(``auglocal_fx.regularization``).

Outputs in ``out``: ``metrics.jsonl`` (one JSON line per epoch), ``curves.png`` (loss and
accuracy curves), ``last.pt`` (the full training state, written atomically every epoch, used
by ``resume=True``) and, at the end, ``model.pt``: the primary network's ``state_dict``, which
loads strictly into a fresh copy of the original model (``ModelSpec.create()``, e.g.
``timm.create_model(name, num_classes=...)``).

Reproducibility: the data order of each epoch is a seeded permutation, and the RNG states
(torch, CUDA, numpy, Python, per process), optimizer, schedule and gradient scaler are saved,
so a run killed at any moment and resumed from ``last.pt`` ends with the same weights as an
uninterrupted run (on CPU with the same seed, ``num_workers=0``, same number of threads).

Data parallel: under ``torchrun`` (or with ``nproc > 1``, which spawns the processes itself)
each process takes its slice of every global batch of ``batch_size`` images, runs the step,
and the gradients are averaged with bucketed ``all_reduce`` before the optimizer step (the
local step calls ``backward`` once per local module, so DDP's reducer does not fit).
gloo on CPU, NCCL on CUDA. Batch-norm statistics are local to each process during an epoch
and rank 0's are broadcast before evaluation, as DDP does at each forward.

Pipeline (``pipeline=K``): K worker processes, each owning a contiguous range of local modules,
pass detached block outputs forward; the weights after N steps equal the sequential run's. It
composes with data parallel (``K x nproc`` processes). See ``auglocal_fx._pipeline``.
"""

from __future__ import annotations

from typing import Any, Optional

from ._distributed import launched_by_torchrun
from ._launch import run, run_spawned
from .train_config import (AMP_MODES, DEFAULT_EPOCHS, METHODS, PIPELINE_BALANCES, TrainConfig, TrainResult,
                            _check_config, default_dataset, default_recipe)

__all__ = ["METHODS", "AMP_MODES", "PIPELINE_BALANCES", "DEFAULT_EPOCHS", "TrainConfig", "TrainResult", "default_dataset",
           "default_recipe", "train"]


def train(config: Optional[TrainConfig] = None, **overrides: Any) -> TrainResult:
    """Train a network with AugLocal or backprop; see ``TrainConfig`` for the options.

    ``train(model="paper:resnet32", dataset="digits", epochs=2)`` is the same as
    ``train(TrainConfig(model=..., dataset=..., epochs=2))``.

    Returns:
        A ``TrainResult`` (on every process under ``torchrun``; the files are written by
        rank 0).

    Raises:
        AugLocalError: for bad options, a missing dataset, or a ``last.pt`` that is corrupt or
            belongs to a different run.
    """
    cfg = _check_config(config, overrides)
    if launched_by_torchrun() or cfg.nproc * cfg.pipeline == 1:
        return run(cfg)
    return run_spawned(cfg)
