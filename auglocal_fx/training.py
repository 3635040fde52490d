"""The training loop: AugLocal (default) or end-to-end backprop, on one or several processes.

The recipe defaults follow the paper (DESIGN.md): SGD with Nesterov momentum 0.9, weight
decay 1e-4, a cosine learning-rate schedule (per step, to zero), batch 1024 and lr 0.8 for
CIFAR-10/SVHN, batch 128 and lr 0.1 for STL-10. Both settings are ``lr = 0.1 * batch / 128``;
other datasets default to batch 128 and that same linear rule applies when only the batch
size is overridden.

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
"""

from __future__ import annotations

import json
import math
import os
import random
import socket
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from tqdm.auto import tqdm

from .data import build_datasets
from .errors import AugLocalError
from .local import atomic_save, to_local
from .specs import resolve_model

__all__ = ["METHODS", "AMP_MODES", "TrainConfig", "TrainResult", "default_recipe", "train"]

METHODS = ("auglocal", "bp")
AMP_MODES = ("none", "bf16", "fp16")
_CKPT_FORMAT = "auglocal-fx-train"
_CKPT_VERSION = 1
# Fields that must match for a run to be resumed from a checkpoint.
_RESUME_KEYS = ("model", "dataset", "method", "d", "tau", "pyramid", "selection", "batch_size",
                "epochs", "seed", "input_size", "train_subset", "augment")


@dataclass
class TrainConfig:
    """Everything a training run needs; ``None`` means "the recipe default".

    Attributes:
        model: a spec string (``"paper:resnet32"``, ``"timm:resnet18"``, ...) or an
            ``nn.Module`` (must be picklable when ``nproc > 1``).
        dataset: a name accepted by :func:`auglocal_fx.data.build_datasets`.
        data_dir: dataset folder (cifar10, svhn, stl10, fashion-mnist).
        out: output folder.
        method: ``"auglocal"`` or ``"bp"``.
        epochs: passes over the training set.
        batch_size: global batch size (split over processes); default per dataset.
        lr: peak learning rate; default ``0.1 * batch_size / 128``.
        momentum, nesterov, weight_decay: SGD settings.
        d, tau, pyramid, selection: AugLocal options (see :func:`auglocal_fx.to_local`).
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
        nproc: processes to spawn for data parallel (ignored under ``torchrun``).
        resume: continue from ``out/last.pt`` if it exists.
        progress: show tqdm progress bars and per-epoch lines (rank 0).
    """

    model: Union[str, nn.Module] = "paper:resnet32"
    dataset: str = "digits"
    data_dir: Optional[str] = None
    out: str = "runs/auglocal"
    method: str = "auglocal"
    epochs: int = 1
    batch_size: Optional[int] = None
    lr: Optional[float] = None
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    d: int = 2
    tau: float = 0.5
    pyramid: bool = True
    selection: str = "uniform"
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


def default_recipe(dataset: str, batch_size: Optional[int] = None, lr: Optional[float] = None) -> Tuple[int, float]:
    """The paper's batch size and learning rate for ``dataset``, with overrides applied.

    CIFAR-10/SVHN: 1024 and 0.8; STL-10: 128 and 0.1; other datasets: batch 128. A missing
    learning rate follows ``lr = 0.1 * batch_size / 128`` (which gives both paper settings).
    """
    if batch_size is None:
        batch_size = 1024 if dataset in ("cifar10", "svhn") else 128
    if lr is None:
        lr = 0.1 * batch_size / 128
    return batch_size, lr


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
    cfg = _check_config(config, overrides)
    if _launched_by_torchrun():
        return _run(cfg)
    if cfg.nproc > 1:
        return _spawn(cfg)
    return _run(cfg)


# ----------------------------------------------------------------------------- configuration


def _check_config(config: Optional[TrainConfig], overrides: Dict[str, Any]) -> TrainConfig:
    cfg = TrainConfig() if config is None else config
    names = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise AugLocalError(f"unknown training option(s) {', '.join(unknown)}; see TrainConfig for the options")
    cfg = TrainConfig(**{**_asdict_shallow(cfg), **overrides})  # a copy: the caller's stays as given
    if cfg.method not in METHODS:
        raise AugLocalError(f"unknown method {cfg.method!r}; choose from {', '.join(METHODS)}")
    if cfg.amp not in AMP_MODES:
        raise AugLocalError(f"unknown amp mode {cfg.amp!r}; choose from {', '.join(AMP_MODES)}")
    for name in ("epochs", "nproc"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise AugLocalError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(cfg.input_size, (tuple, list)):
        cfg.input_size = tuple(int(v) for v in cfg.input_size)  # (C, H, W); build_datasets checks it
    for name in ("batch_size", "max_steps", "train_subset", "test_subset") + (
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


def _resume_view(cfg: TrainConfig) -> Dict[str, Any]:
    view = {k: getattr(cfg, k) for k in _RESUME_KEYS}
    if not isinstance(view["model"], str):
        view["model"] = type(view["model"]).__qualname__
    return view


def _device(cfg: TrainConfig, local_rank: int) -> torch.device:
    name = cfg.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise AugLocalError(f"unknown device {cfg.device!r}; use auto, cpu or cuda[:N]") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise AugLocalError("CUDA is not available on this machine; use --device cpu")
        if dist.is_initialized():
            device = torch.device("cuda", local_rank)
    elif device.type != "cpu":
        raise AugLocalError(f"device {device} is not supported; use cpu or cuda[:N]")
    if cfg.amp == "fp16" and device.type != "cuda":
        raise AugLocalError("--amp fp16 needs CUDA (gradient scaling); use --amp bf16 on CPU")
    return device


# ----------------------------------------------------------------------------- processes


def _launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(cfg: TrainConfig) -> TrainResult:
    import torch.multiprocessing as mp

    port = _free_port()
    try:
        mp.spawn(_spawned_worker, args=(cfg, port), nprocs=cfg.nproc, join=True)
    except mp.ProcessRaisedException as err:
        text = str(err).strip().splitlines()
        last = text[-1] if text else "unknown error"
        if "AugLocalError:" in last:
            raise AugLocalError(last.split("AugLocalError:", 1)[1].strip()) from None
        raise
    return _result_from_disk(cfg)


def _spawned_worker(rank: int, cfg: TrainConfig, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(cfg.nproc), LOCAL_RANK=str(rank))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // cfg.nproc))
    _run(cfg)


def _init_distributed(cfg: TrainConfig) -> Tuple[int, int, int]:
    if "RANK" not in os.environ:
        return 0, 1, 0
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if world == 1:
        return 0, 1, 0
    wants_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    if wants_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if wants_cuda else "gloo", rank=rank, world_size=world)
    return rank, world, local_rank


def _average_gradients(params: Sequence[nn.Parameter], world: int, bucket_bytes: int = 25 * 2 ** 20) -> None:
    """All-reduce and average the gradients of ``params`` over the process group, in buckets."""
    grads = [p.grad for p in params if p.grad is not None]
    bucket: List[torch.Tensor] = []
    size = 0
    for g in grads + [None]:
        if g is not None and (not bucket or (g.dtype == bucket[0].dtype and size < bucket_bytes)):
            bucket.append(g)
            size += g.numel() * g.element_size()
            continue
        if bucket:
            flat = torch.cat([b.reshape(-1) for b in bucket])
            dist.all_reduce(flat)
            flat /= world
            offset = 0
            for b in bucket:
                b.copy_(flat[offset:offset + b.numel()].view_as(b))
                offset += b.numel()
        bucket, size = ([g], g.numel() * g.element_size()) if g is not None else ([], 0)


def _broadcast_buffers(module: nn.Module) -> None:
    for buf in module.buffers():
        dist.broadcast(buf, 0)


# ----------------------------------------------------------------------------- data


class _GlobalBatchSampler(Sampler[List[int]]):
    """This process's slice of each global batch of a seeded per-epoch permutation."""

    def __init__(self, size: int, batch_size: int, rank: int, world: int, seed: int):
        self.size, self.batch_size, self.rank, self.world, self.seed = size, batch_size, rank, world, seed
        self.epoch, self.start = 0, 0

    @property
    def steps(self) -> int:
        """Optimizer steps per epoch (an incomplete last batch is dropped if there is a full one)."""
        return max(1, self.size // self.batch_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.steps - self.start

    def __iter__(self) -> Iterator[List[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.size, generator=g).tolist()
        per_rank = self.batch_size // self.world
        for step in range(self.start, self.steps):
            batch = perm[step * self.batch_size:(step + 1) * self.batch_size]
            if len(batch) < self.batch_size:  # dataset smaller than one batch
                batch = (batch * (self.batch_size // max(1, len(batch)) + 1))[:self.batch_size]
            yield batch[self.rank * per_rank:(self.rank + 1) * per_rank]


def _subset(dataset: Dataset, n: Optional[int], seed: int) -> Dataset:
    if n is None or n >= len(dataset):
        return dataset
    g = torch.Generator().manual_seed(seed)
    return Subset(dataset, torch.randperm(len(dataset), generator=g)[:n].tolist())


# ----------------------------------------------------------------------------- state


def _rng_state() -> Dict[str, Any]:
    """This process's RNG states as plain Python values (picklable, gatherable, weights-only loadable)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state().tolist(),
            "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
            "python": random.getstate()}


def _set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def _atomic_write_text(text: str, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _load_checkpoint(path: Path) -> Dict[str, Any]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the user's to fix
        reason = str(err).strip().splitlines()[0][:120] if str(err).strip() else type(err).__name__
        raise AugLocalError(f"cannot read checkpoint {path} ({reason}); delete it or use another --out") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != _CKPT_FORMAT:
        raise AugLocalError(f"{path} is not an auglocal-fx training checkpoint; delete it or use another --out")
    if ckpt.get("version") != _CKPT_VERSION:
        raise AugLocalError(f"{path} has checkpoint version {ckpt.get('version')}, this auglocal-fx reads "
                            f"{_CKPT_VERSION}; start a new run in another --out")
    return ckpt


# ----------------------------------------------------------------------------- the loop


class _Run:
    """One process's training run."""

    def __init__(self, cfg: TrainConfig, rank: int, world: int, local_rank: int):
        self.cfg, self.rank, self.world = cfg, rank, world
        self.main = rank == 0
        self.out = Path(cfg.out)
        self.device = _device(cfg, local_rank)
        self.batch_size, self.lr = default_recipe(cfg.dataset, cfg.batch_size, cfg.lr)
        if self.batch_size % world:
            raise AugLocalError(f"batch size {self.batch_size} is not divisible by {world} processes; "
                                "change --batch-size or --nproc")
        self.channels_last = cfg.channels_last if cfg.channels_last is not None else self.device.type == "cuda"
        self.amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.amp]

        data = build_datasets(cfg.dataset, cfg.data_dir, cfg.input_size, augment=cfg.augment)
        self.num_classes, self.input_size = data.num_classes, data.input_size
        self.train_set = _subset(data.train, cfg.train_subset, cfg.seed)
        self.test_set = _subset(data.test, cfg.test_subset, cfg.seed + 1)

        torch.manual_seed(cfg.seed)  # the same initial weights on every process
        self.net, self.primary = self._build_model()
        self.net.to(self.device)
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)
        if world > 1:
            _broadcast_buffers(self.net)
            for p in self.net.parameters():
                dist.broadcast(p.data, 0)
        torch.manual_seed(cfg.seed * 7919 + rank)  # decorrelate augmentation across processes
        np.random.seed((cfg.seed * 7919 + rank) % 2 ** 32)
        random.seed(cfg.seed * 7919 + rank)

        self.params = [p for p in self.net.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(self.params, lr=self.lr, momentum=cfg.momentum,
                                         nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
        self.sampler = _GlobalBatchSampler(len(self.train_set), self.batch_size, rank, world, cfg.seed)
        self.total_steps = cfg.epochs * self.sampler.steps
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        total = self.total_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total)))
        self.scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        self.history: List[Dict[str, Any]] = []
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0

    def _build_model(self) -> Tuple[nn.Module, nn.Module]:
        cfg = self.cfg
        if cfg.method == "auglocal":
            local = to_local(cfg.model, d=cfg.d, tau=cfg.tau, pyramid=cfg.pyramid, selection=cfg.selection,
                             input_size=self.input_size, num_classes=self.num_classes)
            return local, local.export()
        if isinstance(cfg.model, nn.Module):
            return cfg.model, cfg.model
        model = resolve_model(cfg.model, num_classes=self.num_classes, input_size=self.input_size).model
        return model, model

    # -- checkpoints

    def _state(self) -> Dict[str, Any]:
        rng = _rng_state()
        if self.world > 1:
            states: List[Any] = [None] * self.world
            dist.all_gather_object(states, rng)
        else:
            states = [rng]
        return {"format": _CKPT_FORMAT, "version": _CKPT_VERSION, "config": _resume_view(self.cfg),
                "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                "total_steps": self.total_steps, "world_size": self.world,
                "model": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "rng": states, "history": self.history}

    def save(self) -> None:
        state = self._state()  # every process takes part (RNG gather)
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_save(state, self.out / "last.pt")
            _atomic_write_text("".join(json.dumps(h) + "\n" for h in self.history), self.out / "metrics.jsonl")
            _plot(self.history, self.out / "curves.png")
        if self.world > 1:
            dist.barrier()

    def restore(self) -> bool:
        path = self.out / "last.pt"
        if not path.exists():
            if self.main:
                self._log(f"no {path} to resume from; starting a new run")
            return False
        ckpt = _load_checkpoint(path)
        mine, theirs = _resume_view(self.cfg), ckpt.get("config", {})
        diff = [k for k in _RESUME_KEYS if theirs.get(k) != mine[k]]
        if diff:
            k = diff[0]
            raise AugLocalError(f"{path} belongs to a different run ({k}={theirs.get(k)!r}, now {mine[k]!r}); "
                                "use the same options or another --out")
        try:
            self.net.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            if self.scaler is not None and ckpt["scaler"] is not None:
                self.scaler.load_state_dict(ckpt["scaler"])
        except (KeyError, RuntimeError, ValueError) as err:
            reason = str(err).strip().splitlines()[0][:120]
            raise AugLocalError(f"{path} does not match this model ({reason}); delete it or use another --out") from None
        if ckpt["world_size"] == self.world:
            _set_rng_state(ckpt["rng"][self.rank])
        self.epoch, self.step_in_epoch = ckpt["epoch"], ckpt["step_in_epoch"]
        self.global_step, self.history = ckpt["global_step"], list(ckpt["history"])
        if self.main:
            self._log(f"resumed from {path} at epoch {self.epoch}, step {self.global_step}")
        return True

    # -- steps

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def _to_device(self, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = x.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y.to(self.device, non_blocking=True)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        if self.cfg.method == "auglocal":
            losses = self.net.train_step(x, y, loss_fn=self.loss_fn, scaler=self.scaler,
                                         autocast_dtype=self.amp_dtype)
        else:
            with self._autocast():
                loss = self.loss_fn(self.net(x), y)
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            losses = loss.detach().reshape(1)
        if self.world > 1:
            _average_gradients(self.params, self.world)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.cfg.grad_clip is not None:
            for group in self._clip_groups():
                nn.utils.clip_grad_norm_(group, self.cfg.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        return losses.float()

    def _clip_groups(self) -> List[List[nn.Parameter]]:
        if self.cfg.method == "bp":
            return [self.params]
        groups = [list(self.net.block_parameters(j)) for j in range(len(self.net.aux))]
        return groups + [list(self.net.output_module_parameters())]

    @torch.no_grad()
    def evaluate(self) -> Tuple[float, List[float]]:
        self.net.eval()
        n_aux = len(self.net.aux) if self.cfg.method == "auglocal" else 0
        counts = torch.zeros(2 + n_aux, dtype=torch.float64)  # seen, primary correct, aux correct...
        indices = list(range(self.rank, len(self.test_set), self.world))
        loader = DataLoader(Subset(self.test_set, indices), batch_size=max(1, self.batch_size // self.world),
                            num_workers=self.cfg.num_workers, pin_memory=self.device.type == "cuda",
                            generator=torch.Generator().manual_seed(0))
        for x, y in self._bar(loader, "eval"):
            x, y = self._to_device(x, y)
            with self._autocast():
                if n_aux:
                    h = x
                    for j, block in enumerate(self.net.blocks):
                        h = block(h)
                        if j < n_aux:
                            counts[2 + j] += (self.net.aux[j](h).argmax(1) == y).sum().item()
                    logits = self.net.head(h)
                else:
                    logits = self.net(x)
            counts[0] += len(y)
            counts[1] += (logits.argmax(1) == y).sum().item()
        if self.world > 1:
            reduced = counts.to(self.device)  # NCCL reduces device tensors only
            dist.all_reduce(reduced)
            counts = reduced.cpu()
        self.net.train()
        acc = (100.0 * counts[1:] / counts[0].clamp(min=1)).tolist()
        return acc[0], acc[1:]

    def _bar(self, iterable, desc: str, total: Optional[int] = None, initial: int = 0):
        if not (self.main and self.cfg.progress):
            return iterable
        return tqdm(iterable, desc=desc, total=total, initial=initial, leave=False, dynamic_ncols=True)

    def _log(self, text: str) -> None:
        if self.cfg.progress:
            tqdm.write(text)

    def fit(self) -> TrainResult:
        if self.cfg.resume:
            self.restore()
        elif (self.out / "last.pt").exists():
            raise AugLocalError(f"{self.out / 'last.pt'} exists; pass --resume to continue that run or "
                                "choose another --out")
        self.net.train()
        steps = self.sampler.steps
        while self.epoch < self.cfg.epochs and self.global_step < self.total_steps:
            self.sampler.set_epoch(self.epoch, self.step_in_epoch)
            # A private generator seeds the workers, so creating the loader leaves the global RNG alone.
            gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.epoch * 101 + self.rank)
            loader = DataLoader(self.train_set, batch_sampler=self.sampler, num_workers=self.cfg.num_workers,
                                pin_memory=self.device.type == "cuda", generator=gen)
            sums, count, start = None, 0, time.perf_counter()
            bar = self._bar(loader, f"epoch {self.epoch + 1}/{self.cfg.epochs}", total=steps,
                            initial=self.step_in_epoch)
            for x, y in bar:
                losses = self.train_step(*self._to_device(x, y))
                sums = losses if sums is None else sums + losses
                count += 1
                self.step_in_epoch += 1
                self.global_step += 1
                if self.global_step >= self.total_steps:
                    break
            finished_epoch = self.step_in_epoch >= steps
            if sums is not None and self.world > 1:
                dist.all_reduce(sums)
                sums /= self.world
            if self.world > 1:
                _broadcast_buffers(self.net)
            test_acc, aux_acc = self.evaluate()
            mean = (sums / max(1, count)).tolist() if sums is not None else []
            record = {"epoch": self.epoch + 1, "step": self.global_step, "partial": not finished_epoch,
                      "method": self.cfg.method, "lr": self.scheduler.get_last_lr()[0],
                      "train_loss": mean[-1] if mean else None,
                      "local_losses": mean[:-1] if self.cfg.method == "auglocal" else [],
                      "test_acc": test_acc, "aux_acc": aux_acc,
                      "epoch_seconds": round(time.perf_counter() - start, 3)}
            self.history.append(record)
            if finished_epoch:
                self.epoch, self.step_in_epoch = self.epoch + 1, 0
            self.save()
            if self.main:
                aux = f", aux nets {min(aux_acc):.1f}..{max(aux_acc):.1f}%" if aux_acc else ""
                loss = f"{record['train_loss']:.4f}" if record["train_loss"] is not None else "-"
                self._log(f"epoch {record['epoch']}: loss {loss}, test acc {test_acc:.2f}%{aux}")
        return self.finish()

    def finish(self) -> TrainResult:
        path = self.out / "model.pt"
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            state = {k: v.detach().cpu() for k, v in self.primary.state_dict().items()}
            atomic_save(state, path)
        if self.world > 1:
            dist.barrier()
        last = self.history[-1] if self.history else {"test_acc": float("nan"), "aux_acc": []}
        return TrainResult(str(self.out), last["test_acc"], list(last["aux_acc"]), list(self.history), str(path))


def _run(cfg: TrainConfig) -> TrainResult:
    rank, world, local_rank = _init_distributed(cfg)
    try:
        return _Run(cfg, rank, world, local_rank).fit()
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _result_from_disk(cfg: TrainConfig) -> TrainResult:
    out = Path(cfg.out)
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = history[-1] if history else {"test_acc": float("nan"), "aux_acc": []}
    return TrainResult(str(out), last["test_acc"], list(last["aux_acc"]), history, str(out / "model.pt"))


def _plot(history: List[Dict[str, Any]], path: Path) -> None:
    """Loss and accuracy curves (matplotlib, Agg backend)."""
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    if any(h["train_loss"] is not None for h in history):
        ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="output loss")
    if history[-1]["local_losses"]:
        local = np.array([h["local_losses"] for h in history])
        ax_loss.plot(epochs, local.mean(axis=1), "s--", label="mean local loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss")
    ax_loss.legend()
    ax_acc.plot(epochs, [h["test_acc"] for h in history], "o-", color="black", label="primary network")
    if history[-1]["aux_acc"]:
        aux = np.array([h["aux_acc"] for h in history])
        cmap = plt.get_cmap("viridis")
        for j in range(aux.shape[1]):
            ax_acc.plot(epochs, aux[:, j], color=cmap(j / max(1, aux.shape[1] - 1)), alpha=0.6, lw=1,
                        label="aux nets (early -> late)" if j == 0 else None)
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("test top-1 (%)")
    ax_acc.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
