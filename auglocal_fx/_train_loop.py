"""One process's training run: steps, evaluation, results (data order in ``_sampling``, checkpoints
in ``_run_checkpoints``)."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from ._device import resolve_device
from ._handover import unpack_network
from ._distributed import broadcast_buffers
from ._io import atomic_save
from ._memory_choice import MemoryChoice, choose_memory_options, parse_memory
from ._run_checkpoints import Checkpointing
from ._sampling import GlobalBatchSampler
from ._updates import GradientUpdates, steps_each_module_exactly
from .data import build_datasets, dataset_normalization, subset
from .errors import AugLocalError
from .local import to_local
from .optimization import LearningRateSchedule, build_optimizer, no_weight_decay_parameters
from .recipe import default_recipe
from .regularization import build_ema, build_loss, build_mixup
from .specs import resolve_model
from .train_config import TrainConfig, TrainResult

__all__ = ["Run", "GlobalBatchSampler", "subset", "wants_cuda", "build_network"]


def wants_cuda(cfg: TrainConfig) -> bool:
    return cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())


def _device(cfg: TrainConfig, local_rank: int) -> torch.device:
    device = resolve_device(cfg.device)
    if device.type == "cuda" and dist.is_initialized():
        device = torch.device("cuda", local_rank)
    if cfg.amp == "fp16" and device.type != "cuda":
        raise AugLocalError("--amp fp16 needs CUDA (gradient scaling); use --amp bf16 on CPU")
    return device


def build_network(cfg: TrainConfig, num_classes: int, input_size) -> Tuple[nn.Module, nn.Module]:
    """``(network trained, primary network)`` for ``cfg`` on a dataset of this geometry.

    Draws from the global RNG: seed it first (the run seeds ``cfg.seed``, so every process
    starts from the same weights).
    """
    options = {"model_kwargs": cfg.model_kwargs, "weights": cfg.weights} if isinstance(cfg.model, str) else {}
    if cfg.method == "auglocal":
        # A model object has its own classifier; a spec is created for the dataset's classes.
        classes = {"num_classes": num_classes} if isinstance(cfg.model, str) else {}
        local = to_local(cfg.model, input_size=input_size, normalization=dataset_normalization(cfg.dataset),
                         options=cfg.local_options(), **classes, **options)
        return local, local.export()
    if isinstance(cfg.model, nn.Module):
        return cfg.model, cfg.model
    model = resolve_model(cfg.model, num_classes=num_classes, input_size=input_size, **options).model
    return model, model


class Run(Checkpointing):
    """One process's training run.

    Args:
        network: the converted network as :func:`~auglocal_fx._handover.pack_network` gives it,
            built by the launching process from the same seed (pipeline workers); ``None``:
            this process converts the model itself.
    """

    def __init__(self, cfg: TrainConfig, rank: int, world: int, local_rank: int,
                 network: Optional[bytes] = None):
        self.cfg, self.rank, self.world = cfg, rank, world
        self.handed_network = network
        self.main = rank == 0
        self.out = Path(cfg.out)
        self.device = _device(cfg, local_rank)
        # Data parallel: this process's replica among dp_world, gradients averaged over dp_group.
        self.dp_rank, self.dp_world, self.dp_group = self._data_parallel()
        self.batch_size, self.lr = default_recipe(cfg.dataset, cfg.batch_size, cfg.lr)
        if self.batch_size % self.dp_world:
            raise AugLocalError(f"batch size {self.batch_size} is not divisible by {self.dp_world} data-parallel "
                                "processes; change --batch-size or --nproc")
        self.channels_last = cfg.channels_last if cfg.channels_last is not None else self.device.type == "cuda"
        self.amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.amp]

        data = build_datasets(cfg.dataset, cfg.data_dir, cfg.input_size, augment=cfg.augment)
        self.num_classes, self.input_size = data.num_classes, data.input_size
        self.train_set = subset(data.train, cfg.train_subset, cfg.seed)
        self.test_set = subset(data.test, cfg.test_subset, cfg.seed + 1)

        torch.manual_seed(cfg.seed)  # the same initial weights on every process
        self.net, self.primary = self._build_model()
        self.memory_choice = self._choose_memory() if cfg.max_memory is not None else None
        self.net.to(self.device)
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)
        if world > 1:
            broadcast_buffers(self.net)
            for p in self.net.parameters():
                dist.broadcast(p.data, 0)
        torch.manual_seed(cfg.seed * 7919 + rank)  # decorrelate augmentation across processes
        np.random.seed((cfg.seed * 7919 + rank) % 2 ** 32)
        random.seed(cfg.seed * 7919 + rank)

        trained = self._trained_modules()
        self.params = [p for p in trained.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(cfg, trained, self.lr, exempt=no_weight_decay_parameters(self.primary))
        self.sampler = GlobalBatchSampler(len(self.train_set), self.batch_size, self.dp_rank, self.dp_world,
                                          cfg.seed)
        self.schedule = LearningRateSchedule(cfg, self.optimizer, self.lr, self.sampler.steps)
        self.total_steps = cfg.epochs * self.sampler.steps
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self.scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None
        # BP is one module: its step after its one loss is the step at the end.
        each = cfg.step_each_module if cfg.step_each_module is not None else steps_each_module_exactly(self.optimizer)
        if self.memory_choice is not None:
            each = self.memory_choice.step_each_module
        self.step_each_module = cfg.method == "auglocal" and each
        self.updates = GradientUpdates(self.optimizer, self._clip_groups(), self.step_each_module, self.scaler,
                                       cfg.grad_clip, self.dp_world, self.dp_group)
        self.mixup = build_mixup(cfg, self.num_classes)
        if self.mixup is not None and (self.batch_size // self.dp_world) % 2:
            raise AugLocalError(f"mixup pairs the images of a batch: {self.batch_size // self.dp_world} per process "
                                "is odd; use an even --batch-size per process")
        self.loss_fn = build_loss(cfg)
        self.ema = build_ema(cfg, self.primary)
        self.history: List[Dict[str, Any]] = []
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0

    def _trained_modules(self) -> nn.Module:
        """What this process's optimizer steps: the whole network here."""
        return self.net

    def _data_parallel(self) -> Tuple[int, int, Optional[Any]]:
        """``(replica, replicas, process group)``: every process is a replica here."""
        return self.rank, self.world, None

    def _build_model(self) -> Tuple[nn.Module, nn.Module]:
        if self.handed_network is not None:
            local = unpack_network(self.handed_network)
            self.handed_network = None  # the bytes are not needed again
            return local, local.export()
        return build_network(self.cfg, self.num_classes, self.input_size)

    def _choose_memory(self) -> MemoryChoice:
        """``max_memory``: rank 0 measures and picks, every process takes its choice (the same collectives)."""
        cfg, choice = self.cfg, [None]
        if self.rank == 0:
            try:
                choice = [self._measure_choice()]
            except AugLocalError as err:
                choice = [str(err)]  # every process stops with rank 0's reason
        if self.world > 1:
            dist.broadcast_object_list(choice, src=0)
        if isinstance(choice[0], str):
            raise AugLocalError(choice[0])
        if self.main:
            self._log(choice[0].reason)
        if cfg.method == "auglocal":
            self.net.aux_checkpoint = choice[0].aux_checkpoint
        return choice[0]

    def _measure_choice(self) -> MemoryChoice:
        cfg = self.cfg
        exempt = no_weight_decay_parameters(self.primary)
        exact = steps_each_module_exactly(build_optimizer(cfg, self.net, self.lr, exempt=exempt))
        each = (cfg.step_each_module,) if cfg.step_each_module is not None else (False, True) if exact else (False,)
        return choose_memory_options(self.net, cfg.method, parse_memory(cfg.max_memory), self.batch_size // self.dp_world,
                                     self.device, lambda params: build_optimizer(cfg, nn.ParameterList(params), self.lr),
                                     each_module=each, input_size=self.input_size)

    # -- steps

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def _to_device(self, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = x.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y.to(self.device, non_blocking=True)

    def _training_batch(self, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """On the device, mixed (soft targets) when mixup or cutmix is on."""
        x, y = self._to_device(x, y)
        return self.mixup(x, y) if self.mixup is not None else (x, y)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self._begin_step()
        if self.cfg.method == "auglocal":
            losses, _ = self._train_modules(x, y)
        else:
            with self._autocast():
                loss = self.loss_fn(self.net(x), y)
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            losses = loss.detach().reshape(1)
        taken = self._apply_gradients()
        if self.cfg.method == "auglocal":
            self.net.after_optimizer_step((self.global_step + 1) / self.total_steps, stepped=taken)
        return losses.float()

    def _begin_step(self) -> None:
        """No gradients, and the schedule's rate for this update (set before any module steps)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.before_update(self.global_step)

    def _train_modules(self, h: torch.Tensor, y: torch.Tensor, start: int = 0, stop: Optional[int] = None,
                       image: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Local modules ``start .. stop-1`` (``LocalNet.train_modules``), each stepped as soon as
        its loss is back-propagated when ``step_each_module``: the losses and the last output."""
        losses, out = [], h
        for i, (loss, out) in enumerate(self.net.module_losses(h, y, start, stop, image=image, loss_fn=self.loss_fn,
                                                               autocast_dtype=self.amp_dtype)):
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            losses.append(loss.detach())
            del loss  # module i's graph goes before its update runs
            self.updates.module_done(i)
        return torch.stack([v.float() for v in losses]), out

    def _apply_gradients(self) -> bool:
        """Average over the replicas, unscale, clip, step (what ``step_each_module`` did not step yet),
        update the scale and the EMA; whether every step was taken (AMP's scaler skips overflows)."""
        taken = self.updates.finish()
        if self.ema is not None:
            self.ema.update(self.primary)
        return taken

    def _clip_groups(self) -> List[List[nn.Parameter]]:
        if self.cfg.method == "bp":
            return [self.params]
        groups = [list(self.net.block_parameters(j)) for j in range(len(self.net.aux))]
        return groups + [list(self.net.output_module_parameters())]

    def _test_loader(self) -> DataLoader:
        """This replica's share of the test set, in a fixed order."""
        indices = list(range(self.dp_rank, len(self.test_set), self.dp_world))
        return DataLoader(Subset(self.test_set, indices), batch_size=max(1, self.batch_size // self.dp_world),
                          num_workers=self.cfg.num_workers, pin_memory=self.device.type == "cuda",
                          generator=torch.Generator().manual_seed(0))

    @torch.no_grad()
    def evaluate(self) -> Tuple[float, List[float]]:
        self.net.eval()
        n_aux = len(self.net.aux) if self.cfg.method == "auglocal" else 0
        counts = torch.zeros(2 + n_aux, dtype=torch.float64)  # seen, primary correct, aux correct...
        for x, y in self._bar(self._test_loader(), "eval"):
            x, y = self._to_device(x, y)
            with self._autocast():
                if n_aux:
                    for j, h in enumerate(self.net.block_outputs(x)):
                        if j < n_aux:
                            counts[2 + j] += (self.net.aux[j](h).argmax(1) == y).sum().item()
                    logits = self.net.head(h)
                else:
                    logits = self.net(x)
            counts[0] += len(y)
            counts[1] += (logits.argmax(1) == y).sum().item()
        self.net.train()
        return self._accuracies(counts)

    @torch.no_grad()
    def evaluate_ema(self) -> Optional[float]:
        """Top-1 test accuracy of the EMA weights (``None`` without EMA)."""
        if self.ema is None:
            return None
        model = self.ema.module.eval()
        counts = torch.zeros(2, dtype=torch.float64)  # seen, correct
        for x, y in self._bar(self._test_loader(), "eval ema"):
            x, y = self._to_device(x, y)
            with self._autocast():
                counts[1] += (model(x).argmax(1) == y).sum().item()
            counts[0] += len(y)
        return self._accuracies(counts)[0]

    def _accuracies(self, counts: torch.Tensor) -> Tuple[float, List[float]]:
        """Sum ``counts`` (seen, correct...) over the processes: the primary and auxiliary accuracies."""
        if self.world > 1:
            reduced = counts.to(self.device)  # NCCL reduces device tensors only
            dist.all_reduce(reduced)
            counts = reduced.cpu()
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
            self.schedule.start_epoch(self.epoch)
            start = time.perf_counter()
            sums, count = self._train_epoch()
            train_seconds = time.perf_counter() - start
            finished_epoch = self.step_in_epoch >= steps
            if sums is not None:
                sums = self._reduce_losses(sums)
            self._sync_buffers()
            test_acc, aux_acc = self.evaluate()
            test_acc_ema = self.evaluate_ema()
            mean = (sums / max(1, count)).tolist() if sums is not None else []
            record = {"epoch": self.epoch + 1, "step": self.global_step, "partial": not finished_epoch,
                      "method": self.cfg.method, "lr": self.optimizer.param_groups[0]["lr"],
                      "train_loss": mean[-1] if mean else None,
                      "local_losses": mean[:-1] if self.cfg.method == "auglocal" else [],
                      "test_acc": test_acc, "aux_acc": aux_acc, "test_acc_ema": test_acc_ema,
                      "train_seconds": round(train_seconds, 3),
                      "epoch_seconds": round(time.perf_counter() - start, 3), **self._record_extra(train_seconds),
                      **({"max_memory": self.memory_choice.reason} if self.memory_choice is not None else {})}
            self.history.append(record)
            if finished_epoch:
                self.epoch, self.step_in_epoch = self.epoch + 1, 0
            self.save()
            if self.main:
                aux = f", aux nets {min(aux_acc):.1f}..{max(aux_acc):.1f}%" if aux_acc else ""
                loss = f"{record['train_loss']:.4f}" if record["train_loss"] is not None else "-"
                self._log(f"epoch {record['epoch']}: loss {loss}, test acc {test_acc:.2f}%{aux}")
        return self.finish()

    def _epoch_steps(self) -> int:
        """Steps left in this epoch (the run may stop early at ``max_steps``)."""
        return min(len(self.sampler), self.total_steps - self.global_step)

    def _train_loader(self) -> DataLoader:
        # A private generator seeds the workers, so creating the loader leaves the global RNG alone.
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.epoch * 101 + self.rank)
        return DataLoader(self.train_set, batch_sampler=self.sampler, num_workers=self.cfg.num_workers,
                          pin_memory=self.device.type == "cuda", generator=gen)

    def _train_epoch(self) -> Tuple[Optional[torch.Tensor], int]:
        """Run this epoch's steps: the summed per-step losses and the number of steps."""
        sums, count = None, 0
        bar = self._bar(self._train_loader(), f"epoch {self.epoch + 1}/{self.cfg.epochs}",
                        total=self.sampler.steps, initial=self.step_in_epoch)
        for x, y in bar:
            losses = self.train_step(*self._training_batch(x, y))
            sums = losses if sums is None else sums + losses
            count += 1
            self.step_in_epoch += 1
            self.global_step += 1
            if self.global_step >= self.total_steps:
                break
        return sums, count

    def _reduce_losses(self, sums: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(sums)
            sums /= self.world
        return sums

    def _sync_buffers(self) -> None:
        """Rank 0's batch-norm statistics for evaluation, as DDP gives them at each forward."""
        if self.world > 1:
            broadcast_buffers(self.net)
            if self.ema is not None:
                broadcast_buffers(self.ema.module)

    def _record_extra(self, train_seconds: float) -> Dict[str, Any]:
        return {}

    def finish(self) -> TrainResult:
        path = self.out / "model.pt"
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            state = {k: v.detach().cpu() for k, v in self.primary.state_dict().items()}
            atomic_save(state, path)
            if self.ema is not None:
                atomic_save({k: v.detach().cpu() for k, v in self.ema.module.state_dict().items()},
                            self.out / "model_ema.pt")
        if self.world > 1:
            dist.barrier()
        last = self.history[-1] if self.history else {"test_acc": float("nan"), "aux_acc": []}
        return TrainResult(str(self.out), last["test_acc"], list(last["aux_acc"]), list(self.history), str(path),
                           last.get("test_acc_ema"))
