"""Training with AugLocal (default) or end-to-end backprop: the options and the entry point.

The loop lives in ``_train_loop.py``, process groups in ``_distributed.py``, the checkpoint
format in ``_train_state.py``, the recipe in ``recipe.py``.

The recipe defaults follow the paper and the authors' code (:mod:`auglocal_fx.recipe`): SGD with
Nesterov momentum 0.9, weight decay 1e-4, a cosine learning-rate schedule set once per epoch
with a linear warmup from 0.01 over the first 10 epochs, batch 1024 and lr 0.8 for
CIFAR-10/SVHN, batch 128 and lr 0.1 for STL-10. Both settings are ``lr = 0.1 * batch / 128``;
other datasets default to batch 128 and that same linear rule applies when only the batch
size is overridden. The default dataset is Fashion-MNIST when its Debian package is installed
(digits otherwise, which every method learns to ~99%).

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
composes with data parallel (``K x nproc`` processes). See :mod:`auglocal_fx._pipeline`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any, Dict, List, Optional, Tuple, Union

from torch import nn

from ._distributed import launched_by_torchrun
from .data import DEFAULT_FASHION_MNIST_DIR
from .errors import AugLocalError
from .recipe import PAPER_WARMUP_EPOCHS, default_recipe

__all__ = ["METHODS", "AMP_MODES", "TrainConfig", "TrainResult", "default_dataset", "default_recipe",
           "train"]

METHODS = ("auglocal", "bp")
AMP_MODES = ("none", "bf16", "fp16")
@dataclass
class TrainConfig:
    """Everything a training run needs; ``None`` means "the recipe default".

    Attributes:
        model: a spec string (``"paper:resnet32"``, ``"timm:resnet18"``, ...) or an
            ``nn.Module`` (must be picklable when ``nproc > 1``).
        dataset: a name accepted by :func:`auglocal_fx.data.build_datasets`; default
            :func:`default_dataset` (Fashion-MNIST when installed).
        data_dir: dataset folder (cifar10, svhn, stl10, fashion-mnist).
        out: output folder.
        method: ``"auglocal"`` or ``"bp"``.
        epochs: passes over the training set.
        batch_size: global batch size (split over processes); default per dataset.
        lr: peak learning rate; default ``0.1 * batch_size / 128``.
        warmup_epochs: linear warmup from 0.01 into the per-epoch cosine schedule (the paper's
            10; 0 for none); see :func:`auglocal_fx.recipe.learning_rate`.
        momentum, nesterov, weight_decay: SGD settings.
        d, tau, pyramid, selection, aux_head: AugLocal options (see
            :func:`auglocal_fx.to_local`).
        rule: the local learning rule for ``method="auglocal"`` (``"auglocal"``, ``"dgl"``,
            ``"predsim"``, ``"infopro"``, ``"auglocal+infopro"``).
        aux_checkpoint: recompute the auxiliary forwards in backward instead of keeping their
            activations (``method="auglocal"``; same gradients, less memory, more time).
        seed: seeds the weights, the data order and the augmentations.
        device: ``"auto"`` (CUDA if available), ``"cpu"`` or ``"cuda[:N]"``.
        amp: ``"none"``, ``"bf16"`` (CPU or CUDA) or ``"fp16"`` (CUDA, with gradient scaling).
        grad_clip: clip the gradient norm of each local module (all parameters for BP).
        label_smoothing: cross-entropy label smoothing.
        channels_last: NHWC memory format; default on for CUDA.
        input_size: image side length or ``(3, H, H)``; default the dataset's native size.
        max_steps: stop after this many optimizer steps in total (smoke tests).
        train_subset, test_subset: use a fixed random subset of this many images.
        augment: the paper's data augmentation on the training set.
        num_workers: DataLoader worker processes.
        nproc: data-parallel replicas to spawn (ignored under ``torchrun``, whose process
            count is ``pipeline x`` replicas).
        pipeline: ``K`` pipeline workers, each owning a contiguous range of local modules
            (``method="auglocal"`` only); ``pipeline x nproc`` processes in all. See
            :mod:`auglocal_fx._pipeline`.
        pipeline_balance: how the ranges are chosen: ``"time"`` (each module's measured step
            time) or ``"flops"`` (forward FLOPs).
        threads: CPU threads per process (``torch.set_num_threads``); default all cores, shared
            equally by spawned processes.
        resume: continue from ``out/last.pt`` if it exists.
        progress: show tqdm progress bars and per-epoch lines (rank 0).
    """

    model: Union[str, nn.Module] = "paper:resnet32"
    dataset: Optional[str] = None
    data_dir: Optional[str] = None
    out: str = "runs/auglocal"
    method: str = "auglocal"
    epochs: int = 1
    batch_size: Optional[int] = None
    lr: Optional[float] = None
    warmup_epochs: int = PAPER_WARMUP_EPOCHS
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    d: int = 2
    tau: float = 0.5
    pyramid: bool = True
    selection: str = "uniform"
    aux_head: str = "auto"
    rule: str = "auglocal"
    aux_checkpoint: bool = False
    seed: int = 0
    device: str = "auto"
    amp: str = "none"
    grad_clip: Optional[float] = None
    label_smoothing: float = 0.0
    channels_last: Optional[bool] = None
    input_size: Union[None, int, Tuple[int, int, int]] = None
    max_steps: Optional[int] = None
    train_subset: Optional[int] = None
    test_subset: Optional[int] = None
    augment: bool = True
    num_workers: int = 0
    nproc: int = 1
    pipeline: int = 1
    pipeline_balance: str = "time"
    threads: Optional[int] = None
    resume: bool = False
    progress: bool = True


@dataclass
class TrainResult:
    """What :func:`train` returns (from rank 0).

    Attributes:
        out: the output folder.
        test_acc: final top-1 test accuracy of the primary network (percent).
        aux_acc: final test accuracy of each auxiliary network (percent; empty for BP).
        history: the per-epoch metrics (the lines of ``metrics.jsonl``).
        model_path: ``out/model.pt``, the primary weights for the original model.
    """

    out: str
    test_acc: float
    aux_acc: List[float]
    history: List[Dict[str, Any]]
    model_path: str


def default_dataset() -> str:
    """``"fashion-mnist"`` when its Debian package is installed, else ``"digits"``.

    Digits (1797 bundled images) saturate at ~99% for every method, so they cannot tell
    methods apart; Fashion-MNIST can.
    """
    return "fashion-mnist" if os.path.isdir(DEFAULT_FASHION_MNIST_DIR) else "digits"


def train(config: Optional[TrainConfig] = None, **overrides: Any) -> TrainResult:
    """Train a network with AugLocal or backprop; see :class:`TrainConfig` for the options.

    ``train(model="paper:resnet32", dataset="digits", epochs=2)`` is the same as
    ``train(TrainConfig(model=..., dataset=..., epochs=2))``.

    Returns:
        A :class:`TrainResult` (on every process under ``torchrun``; the files are written by
        rank 0).

    Raises:
        AugLocalError: for bad options, a missing dataset, or a ``last.pt`` that is corrupt or
            belongs to a different run.
    """
    from . import _train_loop  # it builds on the classes above

    cfg = _check_config(config, overrides)
    if launched_by_torchrun() or cfg.nproc * cfg.pipeline == 1:
        return _train_loop.run(cfg)
    return _train_loop.run_spawned(cfg)


# ----------------------------------------------------------------------------- configuration


def _check_config(config: Optional[TrainConfig], overrides: Dict[str, Any]) -> TrainConfig:
    cfg = TrainConfig() if config is None else config
    names = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise AugLocalError(f"unknown training option(s) {', '.join(unknown)}; see TrainConfig for the options")
    cfg = TrainConfig(**{**_asdict_shallow(cfg), **overrides})  # a copy: the caller's stays as given
    if cfg.dataset is None:
        cfg.dataset = default_dataset()
    if cfg.method not in METHODS:
        raise AugLocalError(f"unknown method {cfg.method!r}; choose from {', '.join(METHODS)}")
    if cfg.amp not in AMP_MODES:
        raise AugLocalError(f"unknown amp mode {cfg.amp!r}; choose from {', '.join(AMP_MODES)}")
    if isinstance(cfg.warmup_epochs, bool) or not isinstance(cfg.warmup_epochs, int) or cfg.warmup_epochs < 0:
        raise AugLocalError(f"warmup_epochs must be an integer >= 0, got {cfg.warmup_epochs!r}")
    for name in ("epochs", "nproc", "pipeline"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise AugLocalError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(cfg.input_size, (tuple, list)):
        cfg.input_size = tuple(int(v) for v in cfg.input_size)  # (C, H, W); build_datasets checks it
    if cfg.pipeline > 1 and cfg.method != "auglocal":
        raise AugLocalError("pipeline needs local learning (method 'auglocal'); backprop's blocks wait for each "
                            "other's gradients")
    if not isinstance(cfg.aux_checkpoint, bool):
        raise AugLocalError(f"aux_checkpoint must be True or False, got {cfg.aux_checkpoint!r}")
    if cfg.aux_checkpoint and cfg.method != "auglocal":
        raise AugLocalError("aux_checkpoint recomputes auxiliary networks: it needs method 'auglocal'")
    if cfg.pipeline_balance not in ("time", "flops"):
        raise AugLocalError(f"unknown pipeline_balance {cfg.pipeline_balance!r}; choose from time, flops")
    for name in ("batch_size", "max_steps", "train_subset", "test_subset", "threads") + (
            () if isinstance(cfg.input_size, tuple) else ("input_size",)):
        value = getattr(cfg, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise AugLocalError(f"{name} must be a positive integer, got {value!r}")
    if cfg.lr is not None and not cfg.lr > 0:
        raise AugLocalError(f"lr must be positive, got {cfg.lr!r}")
    if cfg.grad_clip is not None and not cfg.grad_clip > 0:
        raise AugLocalError(f"grad_clip must be positive, got {cfg.grad_clip!r}")
    if not 0.0 <= cfg.label_smoothing < 1.0:
        raise AugLocalError(f"label_smoothing must be in [0, 1), got {cfg.label_smoothing!r}")
    if cfg.num_workers < 0:
        raise AugLocalError(f"num_workers must be >= 0, got {cfg.num_workers!r}")
    return cfg


def _asdict_shallow(cfg: TrainConfig) -> Dict[str, Any]:
    """``dataclasses.asdict`` without deep-copying the model."""
    return {f.name: getattr(cfg, f.name) for f in fields(cfg)}
