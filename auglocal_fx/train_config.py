"""The training options (``TrainConfig``), what a run returns, and the checks of both.

``auglocal_fx.training.train`` is the entry point and its module docstring the guide; the
names here are re-exported there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any, Dict, List, Optional, Tuple, Union

from torch import nn

from ._memory_choice import parse_memory
from .data import DEFAULT_FASHION_MNIST_DIR
from .errors import AugLocalError
from .options import ConversionOptions
from .optimization import check_optimizer, check_schedule
from .recipe import default_recipe, default_warmup_epochs

__all__ = ["METHODS", "AMP_MODES", "PIPELINE_BALANCES", "DEFAULT_EPOCHS", "TrainConfig", "TrainResult", "default_dataset",
           "default_recipe"]

METHODS = ("auglocal", "bp")
DEFAULT_EPOCHS = 10  # enough to learn Fashion-MNIST or digits; with no warmup (default_warmup_epochs)
AMP_MODES = ("none", "bf16", "fp16")
PIPELINE_BALANCES = ("time", "flops")
@dataclass
class TrainConfig:
    """Everything a training run needs; ``None`` means "the recipe default".

    Attributes:
        model: a spec string (``"paper:resnet32"``, ``"timm:resnet18"``, ...) or an
            ``nn.Module`` (must be picklable when ``nproc > 1``).
        dataset: a name accepted by ``auglocal_fx.data.build_datasets``; default
            ``default_dataset`` (Fashion-MNIST when installed).
        data_dir: dataset folder (cifar10, svhn, stl10, fashion-mnist).
        out: output folder.
        method: ``"auglocal"`` or ``"bp"``.
        epochs: passes over the training set.
        batch_size: global batch size (split over processes); default per dataset.
        lr: peak learning rate; default ``0.1 * batch_size / 128``.
        warmup_epochs: epochs of linear warmup; default the paper's 10 scaled to the run,
            ``min(10, epochs // 20)`` (none below 20 epochs); see
            ``auglocal_fx.recipe.default_warmup_epochs``.
        momentum: momentum of the optimizers that have one.
        weight_decay: on every parameter for the paper's recipe, on all but 1-D ones (norms,
            biases) otherwise, as timm does.

        The optimizer and schedule (``auglocal_fx.optimization``); the defaults: the paper's
            recipe, SGD with Nesterov momentum and the per-epoch cosine.

        opt: a timm optimizer name (``"sgd"`` is SGD with Nesterov momentum, ``"momentum"``
            without; ``"adamw"``, ``"lamb"``, ...).
        nesterov: override the optimizer's own Nesterov setting (SGD family only).
        opt_eps, opt_betas: the optimizer's ``eps`` and ``betas`` where it has them.
        sched: ``"paper"`` (the authors' per-epoch cosine with warmup from ``warmup_lr``, see
            ``auglocal_fx.recipe.learning_rate``) or a timm scheduler: ``"cosine"``,
            ``"step"``, ``"multistep"``, ``"poly"``, ``"tanh"``, ``"wsd"``, ``"rsqrt"``,
            ``"constant"``.
        warmup_lr: the rate warmup starts from; default 0.01 (paper) or timm's 1e-5.
        min_lr: the floor of a timm schedule.
        sched_on_updates: step a timm schedule after every update instead of every epoch.
        decay_epochs, decay_rate: a step schedule's interval (default timm's 90) and factor.

        Regularisation (``auglocal_fx.regularization``):

        mixup, cutmix: alphas of ``timm.data.Mixup`` (0 for off); its soft targets, with the
            label smoothing in them, reach every local loss and the output loss.
        mixup_prob: the chance a batch is mixed at all.
        mixup_switch_prob: the chance of cutmix instead of mixup when both are on.
        model_ema: keep an EMA of the primary weights (``timm.utils.ModelEmaV3``), evaluated
            each epoch (``test_acc_ema``), saved in ``last.pt`` and as ``model_ema.pt``; not
            with ``pipeline > 1``.
        model_ema_decay: its decay ``d``: ``ema = d * ema + (1 - d) * w`` after every update.
        d, tau, pyramid, selection, aux_head: AugLocal options (see
            ``auglocal_fx.to_local``).
        rule: the local learning rule for ``method="auglocal"`` (``"auglocal"``, ``"dgl"``,
            ``"predsim"``, ``"infopro"``, ``"auglocal+infopro"``).
        aux_checkpoint: recompute the primary blocks in backward, each on its own, so a local
            module holds one piece's activations at a time (``method="auglocal"``; same
            gradients, less memory, one more forward of the primary network per step).
        aux_follow, aux_follow_adapted, aux_freeze: AugLocal's copies follow their source
            blocks by an EMA; auxiliary layers freeze top first (see
            ``ConversionOptions``; not with ``pipeline > 1``).
        aux_tie: AugLocal's copies read their sources' kernels instead of storing their own
            (see ``auglocal_fx.tying``; not with ``aux_follow`` or ``pipeline > 1``).
        aux_resolution: ``"paper"`` or ``"source"``: the resolution AugLocal's copies run at
            (see ``ConversionOptions``).
        step_each_module: step each local module as soon as its loss is back-propagated and drop
            its gradients, so at most one module's gradients exist at a time (same weights as one
            step at the end; see ``auglocal_fx._updates``); ``False`` steps once at the end of
            the training step; default (``None``) on for the optimizers where it is exact
            (PyTorch's own: ``sgd``, ``momentum``, ``adamw``, ...), off for the others.
        max_memory: bytes (or ``"8GB"``, ``"512MiB"``) the training step may hold at its peak
            (the whole count of ``auglocal_fx.measure_memory``): the trainer measures each
            combination of method (BP, AugLocal) and ``aux_checkpoint`` on this run's batch and
            takes the fastest that fits, or says it cannot. ``None``: no limit, no measurement.
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
            ``auglocal_fx._pipeline``.
        pipeline_balance: how the ranges are chosen: ``"time"`` (each module's measured step
            time) or ``"flops"`` (forward FLOPs).
        threads: CPU threads per process (``torch.set_num_threads``); default all cores, shared
            equally by spawned processes.
        resume: continue from ``out/last.pt`` if it exists.
        progress: show tqdm progress bars and per-epoch lines (rank 0).
        model_kwargs: for a spec string, keyword arguments for its builder (e.g.
            ``{"depth": 6, "patch_size": 4}``; see ``auglocal_fx.resolve_model``).
        weights: for a spec string, a local weights file to start from (a ``state_dict`` or a
            timm / torchvision checkpoint; a classifier for another number of classes is left
            out with a warning): fine-tuning a pretrained network.
        aux_init: how AugLocal's auxiliary copies start: ``"init"`` (drawn afresh, the default)
            or ``"copy"`` (the source blocks' weights); see ``auglocal_fx.to_local``.
        conversion: the conversion options as one ``ConversionOptions``
            instead of the fields ``d`` ... ``aux_init`` (leave those at their defaults);
            ``train`` folds it into them. The dataset gives the classes and normalization.
    """

    model: Union[str, nn.Module] = "paper:resnet32"
    dataset: Optional[str] = None
    data_dir: Optional[str] = None
    out: str = "runs/auglocal"
    method: str = "auglocal"
    epochs: int = DEFAULT_EPOCHS
    batch_size: Optional[int] = None
    lr: Optional[float] = None
    warmup_epochs: Optional[int] = None
    momentum: float = 0.9
    weight_decay: float = 1e-4
    # -- optimizer and schedule
    opt: str = "sgd"
    nesterov: Optional[bool] = None
    opt_eps: Optional[float] = None
    opt_betas: Optional[Tuple[float, float]] = None
    sched: str = "paper"
    warmup_lr: Optional[float] = None
    min_lr: float = 0.0
    sched_on_updates: bool = False
    decay_epochs: Optional[float] = None
    decay_rate: float = 0.1
    # -- regularisation
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    model_ema: bool = False
    model_ema_decay: float = 0.9998
    # --
    d: int = 2
    tau: float = 0.5
    pyramid: bool = True
    selection: str = "uniform"
    aux_head: str = "auto"
    rule: str = "auglocal"
    aux_checkpoint: bool = False
    aux_follow: Optional[float] = None
    aux_follow_adapted: str = "own"
    aux_freeze: Optional[float] = None
    aux_tie: bool = False
    aux_resolution: str = "paper"
    step_each_module: Optional[bool] = None
    max_memory: Union[None, int, str] = None
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
    # -- model creation and starting weights
    model_kwargs: Optional[Dict[str, Any]] = None
    weights: Optional[str] = None
    aux_init: str = "init"
    conversion: Optional[ConversionOptions] = None

    def local_options(self) -> ConversionOptions:
        """The conversion options of the fields ``d`` ... ``aux_init`` (validated)."""
        return ConversionOptions(**{name: getattr(self, name) for name in _CONVERSION_FIELDS})


# The TrainConfig fields that are conversion options; ``conversion`` sets them.
_CONVERSION_FIELDS = ("d", "tau", "pyramid", "selection", "aux_head", "rule", "aux_init", "aux_checkpoint",
                      "aux_follow", "aux_follow_adapted", "aux_freeze", "aux_tie", "aux_resolution")


@dataclass
class TrainResult:
    """What ``train`` returns (from rank 0).

    Attributes:
        out: the output folder.
        test_acc: final top-1 test accuracy of the primary network (percent).
        aux_acc: final test accuracy of each auxiliary network (percent; empty for BP).
        history: the per-epoch metrics (the lines of ``metrics.jsonl``).
        model_path: ``out/model.pt``, the primary weights for the original model.
        test_acc_ema: final test accuracy of the EMA weights (``model_ema=True``; else ``None``).
    """

    out: str
    test_acc: float
    aux_acc: List[float]
    history: List[Dict[str, Any]]
    model_path: str
    test_acc_ema: Optional[float] = None


def default_dataset() -> str:
    """``"fashion-mnist"`` when its Debian package is installed, else ``"digits"``.

    Digits (1797 bundled images) saturate at ~99% for every method, so they cannot tell
    methods apart; Fashion-MNIST can.
    """
    return "fashion-mnist" if os.path.isdir(DEFAULT_FASHION_MNIST_DIR) else "digits"


# ----------------------------------------------------------------------------- configuration


def _check_config(config: Optional[TrainConfig], overrides: Dict[str, Any]) -> TrainConfig:
    cfg = TrainConfig() if config is None else config
    names = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise AugLocalError(f"unknown training option(s) {', '.join(unknown)}; see TrainConfig for the options")
    cfg = TrainConfig(**{**_asdict_shallow(cfg), **overrides})  # a copy: the caller's stays as given
    _fold_conversion(cfg)
    if cfg.dataset is None:
        cfg.dataset = default_dataset()
    if cfg.method not in METHODS:
        raise AugLocalError(f"unknown method {cfg.method!r}; choose from {', '.join(METHODS)}")
    if cfg.amp not in AMP_MODES:
        raise AugLocalError(f"unknown amp mode {cfg.amp!r}; choose from {', '.join(AMP_MODES)}")
    for name in ("epochs", "nproc", "pipeline"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise AugLocalError(f"{name} must be a positive integer, got {value!r}")
    if cfg.warmup_epochs is None:
        cfg.warmup_epochs = default_warmup_epochs(cfg.epochs)
    if isinstance(cfg.warmup_epochs, bool) or not isinstance(cfg.warmup_epochs, int) or cfg.warmup_epochs < 0:
        raise AugLocalError(f"warmup_epochs must be an integer >= 0, got {cfg.warmup_epochs!r}")
    _check_recipe(cfg)
    if isinstance(cfg.input_size, (tuple, list)):
        cfg.input_size = tuple(int(v) for v in cfg.input_size)  # (C, H, W); build_datasets checks it
    if cfg.pipeline > 1 and cfg.method != "auglocal":
        raise AugLocalError("pipeline needs local learning (method 'auglocal'); backprop's blocks wait for each "
                            "other's gradients")
    cfg.local_options()  # validated where to_local validates them
    if cfg.method != "auglocal" and (cfg.aux_follow is not None or cfg.aux_freeze is not None):
        raise AugLocalError("aux_follow and aux_freeze act on auxiliary networks: they need method 'auglocal'")
    if cfg.pipeline > 1 and (cfg.aux_follow is not None or cfg.aux_freeze is not None):
        raise AugLocalError("aux_follow and aux_freeze are not supported with pipeline > 1 (a copy's source and "
                            "the run's progress live on other workers); drop them or --pipeline")
    if cfg.method != "auglocal" and cfg.aux_tie:
        raise AugLocalError("aux_tie ties auxiliary copies to their sources: it needs method 'auglocal'")
    if cfg.pipeline > 1 and cfg.aux_tie:
        raise AugLocalError("aux_tie is not supported with pipeline > 1 (a copy's source may live on another "
                            "worker); drop aux_tie or --pipeline")
    if cfg.aux_checkpoint and cfg.method != "auglocal":
        raise AugLocalError("aux_checkpoint recomputes auxiliary networks: it needs method 'auglocal'")
    if cfg.step_each_module is not None and not isinstance(cfg.step_each_module, bool):
        raise AugLocalError(f"step_each_module must be True, False or None, got {cfg.step_each_module!r}")
    if cfg.max_memory is not None:
        cfg.max_memory = parse_memory(cfg.max_memory)
        if cfg.pipeline > 1:
            raise AugLocalError("max_memory chooses for one process holding the whole network; with --pipeline, "
                                "each worker holds part of it: drop one of them")
    if cfg.pipeline_balance not in PIPELINE_BALANCES:
        raise AugLocalError(f"unknown pipeline_balance {cfg.pipeline_balance!r}; choose from {', '.join(PIPELINE_BALANCES)}")
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
    _check_model_options(cfg)
    return cfg


def _check_recipe(cfg: TrainConfig) -> None:
    """The optimizer, schedule and regularisation options."""
    check_optimizer(cfg.opt)
    check_schedule(cfg)
    if cfg.opt_betas is not None:
        cfg.opt_betas = tuple(float(b) for b in cfg.opt_betas)
    for name in ("weight_decay", "min_lr", "mixup", "cutmix"):
        if not getattr(cfg, name) >= 0:
            raise AugLocalError(f"{name} must be >= 0, got {getattr(cfg, name)!r}")
    for name in ("warmup_lr", "opt_eps", "decay_epochs"):
        if getattr(cfg, name) is not None and not getattr(cfg, name) > 0:
            raise AugLocalError(f"{name} must be positive, got {getattr(cfg, name)!r}")
    for name in ("mixup_prob", "mixup_switch_prob"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise AugLocalError(f"{name} must be in [0, 1], got {getattr(cfg, name)!r}")
    if cfg.model_ema and not 0.0 < cfg.model_ema_decay < 1.0:
        raise AugLocalError(f"model_ema_decay must be in (0, 1), got {cfg.model_ema_decay!r}")
    if cfg.model_ema and cfg.pipeline > 1:
        raise AugLocalError("model_ema is not supported with pipeline > 1 (each worker holds part of the "
                            "weights); drop --model-ema or --pipeline")


def _fold_conversion(cfg: TrainConfig) -> None:
    """Move ``cfg.conversion`` into the fields it stands for (a checkpoint holds plain fields)."""
    conv, cfg.conversion = cfg.conversion, None
    if conv is None:
        return
    if not isinstance(conv, ConversionOptions):
        raise AugLocalError(f"conversion must be a ConversionOptions, not {type(conv).__name__}")
    defaults = TrainConfig()
    for name in _CONVERSION_FIELDS:
        given = getattr(cfg, name)
        if given != getattr(defaults, name) and given != getattr(conv, name):
            raise AugLocalError(f"{name} is given both as a field and in conversion: give it in one place")
        setattr(cfg, name, getattr(conv, name))
    unused = [n for n in ("num_classes", "normalization", "block_boundaries") if getattr(conv, n) is not None]
    if unused:
        raise AugLocalError(f"train takes {' and '.join(unused)} from the dataset and the automatic cut, not from "
                            "conversion: leave them unset")
    if conv.model_kwargs is not None:
        cfg.model_kwargs = cfg.model_kwargs or dict(conv.model_kwargs)
    if conv.input_size is not None:
        cfg.input_size = cfg.input_size or conv.input_size


def _check_model_options(cfg: TrainConfig) -> None:
    if not isinstance(cfg.model, str):
        given = [n for n in ("model_kwargs", "weights") if getattr(cfg, n) is not None]
        if given:
            raise AugLocalError(f"{' and '.join(given)} apply to spec strings only: create the model "
                                "object with them yourself, or pass a spec like 'timm:resnet18'")
    if cfg.weights is not None:
        cfg.weights = os.path.abspath(cfg.weights)  # spawned processes and resumed runs find it
        if not os.path.isfile(cfg.weights):
            raise AugLocalError(f"weights file {cfg.weights!r} does not exist")


def _asdict_shallow(cfg: TrainConfig) -> Dict[str, Any]:
    """``dataclasses.asdict`` without deep-copying the model."""
    return {f.name: getattr(cfg, f.name) for f in fields(cfg)}
