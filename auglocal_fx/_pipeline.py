"""Pipelined local training: K workers, each owning a contiguous range of local modules.

No gradient crosses a local module's boundary, so module ``j`` never waits for ``j+1``: worker
``k`` runs its modules on training batch ``t`` while worker ``k+1`` runs batch ``t-1``. Only
forward traffic crosses workers: each sends its last block's detached output and the targets
(and the images, for InfoPro's reconstruction) to the next. The training batches themselves
are the micro-batches: the pipeline fills at the start of an epoch and drains at its end
(``K-1`` steps each), and since block ``j``'s output at step ``t`` is computed with the weights
block ``j`` has before step ``t``, exactly as in the sequential step, the weights after ``N``
steps are those of the sequential schedule.

Processes: ``K x R`` (``R`` data-parallel replicas); global rank ``r*K + k`` is stage ``k`` of
replica ``r``. Stage ``k``'s replicas average gradients in their own process group; stage
``k`` of replica ``r`` sends to stage ``k+1`` of replica ``r``.
"""

from __future__ import annotations

import collections
import statistics
import time
from pathlib import Path
from typing import Any, Deque, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from ._device import synchronize
from ._distributed import broadcast_buffers
from ._io import atomic_save
from ._train_loop import Run
from ._train_state import CKPT_VERSION, load_checkpoint
from .checkpoints import PIPELINE_PART
from .errors import AugLocalError, first_line
from .flops import count_flops

__all__ = ["balance_stages", "check_pipeline_fits", "check_shared_parameters", "flop_costs",
           "measure_module_times", "PipelineRun", "BALANCE_MODES"]

BALANCE_MODES = ("time", "flops")
PART_FORMAT = PIPELINE_PART.format


def check_pipeline_fits(net: nn.Module, stages: int) -> None:
    """Refuse a converted network that ``stages`` pipeline workers cannot share out.

    The launcher calls it before starting any process (each worker would only fail the same way).

    Raises:
        AugLocalError: boundaries that carry several tensors, or more stages than local modules.
    """
    if any(len(shapes) > 1 for shapes in net.output_shapes):
        raise AugLocalError("--pipeline cannot send block boundaries that carry several tensors (this "
                            "network's streams); train with --pipeline 1")
    if stages > net.num_local:
        raise AugLocalError(f"--pipeline {stages} is more than the {net.num_local} local modules "
                            f"of this network; use at most {net.num_local}")


def balance_stages(costs: Sequence[float], stages: int) -> List[Tuple[int, int]]:
    """Split modules ``0 .. n-1`` into ``stages`` contiguous ranges minimising the largest total cost.

    Exact (dynamic programming over split points); among equal optima the earliest splits win.

    Args:
        costs: each module's cost (seconds per step, or FLOPs).
        stages: the number of ranges.

    Returns:
        ``[(start, stop), ...]``, one half-open range per stage, in order.
    """
    n = len(costs)
    if not 1 <= stages <= n:
        raise AugLocalError(f"cannot split {n} local modules into {stages} pipeline stages; use 1..{n}")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))
    inf = float("inf")
    # best[k][i]: the smallest largest stage cost of modules 0..i-1 in k stages; cut[k][i]: its last split.
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for k in range(1, stages + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                value = max(best[k - 1][j], prefix[i] - prefix[j])
                if value < best[k][i]:
                    best[k][i], cut[k][i] = value, j
    ranges, stop = [], n
    for k in range(stages, 0, -1):
        start = cut[k][stop]
        ranges.append((start, stop))
        stop = start
    return ranges[::-1]


def check_shared_parameters(net: nn.Module, ranges: Sequence[Tuple[int, int]]) -> None:
    """Refuse stage ranges that put the users of one shared parameter on different workers.

    A shared parameter's gradient is the sum of its users' losses' (``shared_parameters="sum"``):
    one worker must hold it and step it, and workers send only activations.
    """
    stage_of = {j: k for k, (start, stop) in enumerate(ranges) for j in range(start, stop)}
    for name, users in net.shared_parameters().items():
        stages = sorted({stage_of[j] for j in users})
        if len(stages) > 1:
            raise AugLocalError(
                f"--pipeline: parameter {name} is shared by local modules {users[0]} and {users[-1]}, which run on "
                f"pipeline workers {stages[0]} and {stages[-1]}; train with --pipeline 1, "
                "or convert with shared_parameters='merge'")


def flop_costs(net: nn.Module) -> List[float]:
    """Forward FLOPs of each local module: block ``j`` with its auxiliary network, and the output
    module (its blocks and the head). The first guess of each module's step time."""
    flops = count_flops(net)
    last = net.num_local - 1
    costs = [float(flops.blocks[j].flops + flops.aux[j].flops) for j in range(last)]
    costs.append(float(sum(b.flops for b in flops.blocks[last:]) + flops.head.flops))
    return costs


def measure_module_times(net: nn.Module, batch: int, num_classes: int, device: torch.device,
                         repeats: int = 1, autocast_dtype: Optional[torch.dtype] = None,
                         warmup: Optional[bool] = None) -> List[float]:
    """Seconds per training step of each local module (forward, loss, backward) on random data.

    The median of ``repeats`` passes (default one: the balance needs the modules' proportions,
    and every pass is a whole training step that all workers wait for), after one warm-up pass
    where ``warmup`` (default: on CUDA only, whose first pass pays for kernel selection). Weights,
    buffers, gradients and the RNG are left as they were, so measuring does not change the run.
    """
    warmup = device.type == "cuda" if warmup is None else warmup
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    x = torch.randn((batch,) + tuple(net.input_size), generator=g).to(device)
    y = torch.randint(num_classes, (batch,), generator=g).to(device)
    times: List[List[float]] = [[] for _ in range(net.num_local)]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for repeat in range(repeats + 1 if warmup else repeats):
            losses = net.module_losses(x, y, autocast_dtype=autocast_dtype)
            for j in range(net.num_local):
                synchronize(device)
                start = time.perf_counter()
                loss, _ = next(losses)
                loss.backward()
                synchronize(device)
                if repeat or not warmup:
                    times[j].append(time.perf_counter() - start)
                del loss
            for _ in losses:  # close the generator
                pass
    net.load_state_dict(state)
    net.zero_grad(set_to_none=True)
    return [statistics.median(t) for t in times]


# ----------------------------------------------------------------------------- traffic

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
           torch.uint8, torch.bool)
_MAX_DIMS = 8


class _Link:
    """Point-to-point traffic with one peer: tensors preceded by a dtype/shape header.

    Sends are asynchronous and up to ``depth`` steps' worth stay in flight, so a worker runs
    ahead of a slower successor by that much before it waits.
    """

    def __init__(self, rank: int, peer: int, device: torch.device, depth: int = 2):
        self.rank, self.peer, self.device, self.depth = rank, peer, device, depth
        self.pending: Deque[Tuple[List[Any], List[torch.Tensor]]] = collections.deque()

    def _lost(self, err: Exception) -> AugLocalError:
        reason = first_line(err, limit=160)
        return AugLocalError(f"pipeline worker {self.rank} lost pipeline worker {self.peer} ({reason}); "
                             f"worker {self.peer} stopped with an error or was killed")

    def send(self, tensors: Sequence[torch.Tensor]) -> None:
        works, keep = [], []
        try:
            for t in tensors:
                t = t.detach().contiguous()
                if t.dim() > _MAX_DIMS or t.dtype not in _DTYPES:
                    raise AugLocalError(f"a pipeline worker cannot send a {t.dtype} tensor of {t.dim()} dimensions")
                header = torch.zeros(2 + _MAX_DIMS, dtype=torch.int64)
                header[0], header[1] = _DTYPES.index(t.dtype), t.dim()
                header[2:2 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
                header = header.to(self.device)
                works += [dist.isend(header, self.peer), dist.isend(t, self.peer)]
                keep += [header, t]  # alive until the sends complete
            self.pending.append((works, keep))
            while len(self.pending) > self.depth:
                self._wait_oldest()
        except RuntimeError as err:
            raise self._lost(err) from None

    def _wait_oldest(self) -> None:
        works, _ = self.pending.popleft()
        for work in works:
            work.wait()

    def flush(self) -> None:
        try:
            while self.pending:
                self._wait_oldest()
        except RuntimeError as err:
            raise self._lost(err) from None

    def recv(self, count: int) -> List[torch.Tensor]:
        out = []
        try:
            for _ in range(count):
                header = torch.empty(2 + _MAX_DIMS, dtype=torch.int64, device=self.device)
                dist.recv(header, self.peer)
                code, ndim, *dims = header.tolist()
                t = torch.empty(dims[:ndim], dtype=_DTYPES[code], device=self.device)
                dist.recv(t, self.peer)
                out.append(t)
        except RuntimeError as err:
            raise self._lost(err) from None
        return out


# ----------------------------------------------------------------------------- the worker


class PipelineRun(Run):
    """One pipeline worker: stage ``rank % K`` of replica ``rank // K``."""

    def __init__(self, cfg, rank: int, world: int, local_rank: int, network: Optional[bytes] = None):
        stages = cfg.pipeline
        if world % stages:
            raise AugLocalError(f"{world} processes do not make whole pipelines of {stages} stages; "
                                f"launch a multiple of {stages} processes (torchrun --nproc-per-node)")
        self.stages, self.stage = stages, rank % stages
        self.replica, self.replicas = rank // stages, world // stages
        # Every process creates every group, in the same order (torch.distributed's rule).
        groups = [dist.new_group([r * stages + k for r in range(self.replicas)]) if self.replicas > 1 else None
                  for k in range(stages)]
        self.stage_group = groups[self.stage]
        self.ranges: List[Tuple[int, int]] = []
        self.busy_seconds = 0.0
        super().__init__(cfg, rank, world, local_rank, network)  # sets the ranges and this stage's modules
        self.is_first, self.is_last = self.stage == 0, self.stage == stages - 1
        self.prev = _Link(rank, rank - 1, self.device) if not self.is_first else None
        self.next = _Link(rank, rank + 1, self.device) if not self.is_last else None
        self.needs_image = self.net.needs_image
        prefixes = tuple(f"{name}." for name in self._owned_modules())
        self.own_keys = [k for k in self.net.state_dict() if k.startswith(prefixes)]

    # -- ownership

    def _data_parallel(self) -> Tuple[int, int, Optional[Any]]:
        return self.replica, self.replicas, self.stage_group

    def _owned_modules(self) -> Dict[str, nn.Module]:
        """This stage's modules by their names in the network."""
        last = self.net.num_local - 1
        owned: Dict[str, nn.Module] = {}
        for j in range(self.first, self.stop):
            if j < last:
                owned[f"blocks.{j}"], owned[f"aux.{j}"] = self.net.blocks[j], self.net.aux[j]
            else:
                owned.update({f"blocks.{i}": self.net.blocks[i] for i in range(last, len(self.net.blocks))})
                owned["head"] = self.net.head
        return owned

    def _trained_modules(self) -> nn.Module:
        """This stage's blocks and auxiliary networks: its optimizer steps (and decays) only them."""
        if self.cfg.method != "auglocal":
            raise AugLocalError("--pipeline needs local learning (--method auglocal); backprop's blocks wait "
                                "for each other's gradients")
        check_pipeline_fits(self.net, self.stages)
        self.ranges = self._choose_ranges()
        check_shared_parameters(self.net, self.ranges)
        self.first, self.stop = self.ranges[self.stage]
        self.own_modules = nn.ModuleList(self._owned_modules().values())
        return self.own_modules

    def _choose_ranges(self) -> List[Tuple[int, int]]:
        """Rank 0 decides (from the checkpoint when resuming, else by measured time or FLOPs)."""
        choice: List[Any] = [None]
        if self.rank == 0:
            ranges = self._checkpoint_ranges()
            if ranges is None:
                if self.cfg.pipeline_balance == "flops":
                    costs = flop_costs(self.net)
                else:
                    costs = measure_module_times(self.net, self.batch_size // self.dp_world, self.num_classes,
                                                 self.device, autocast_dtype=self.amp_dtype)
                ranges = balance_stages(costs, self.stages)
            choice = [[tuple(r) for r in ranges]]
        dist.broadcast_object_list(choice, src=0)
        return [tuple(r) for r in choice[0]]

    def _checkpoint_ranges(self) -> Optional[List[Tuple[int, int]]]:
        path = self.out / "last.pt"
        if not (self.cfg.resume and path.exists()):
            return None
        pipe = load_checkpoint(path).get("pipeline") or {}
        if pipe.get("stages") != self.stages:
            return None  # restore() says what is wrong
        return [tuple(r) for r in pipe["ranges"]]

    def _clip_groups(self) -> List[List[nn.Parameter]]:
        last = self.net.num_local - 1
        return [list(self.net.block_parameters(j) if j < last else self.net.output_module_parameters())
                for j in range(self.first, self.stop)]

    # -- steps

    def stage_step(self, h: torch.Tensor, y: torch.Tensor,
                   image: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """This stage's modules on ``h``: one optimizer step; the losses and the output to send."""
        self._begin_step()
        losses, out = self._train_modules(h, y, self.first, self.stop, image=image)
        self._apply_gradients()
        return losses, out

    def _receive(self, count: int) -> List[torch.Tensor]:
        tensors = self.prev.recv(count)
        if self.channels_last and tensors[0].dim() == 4:
            tensors[0] = tensors[0].contiguous(memory_format=torch.channels_last)
        return tensors

    def _train_epoch(self) -> Tuple[Optional[torch.Tensor], int]:
        steps = self._epoch_steps()
        sums = torch.zeros(self.net.num_local, device=self.device)
        batches = iter(self._train_loader()) if self.is_first else None
        extra = 1 if self.needs_image else 0
        self.busy_seconds = 0.0
        bar = self._bar(range(steps), f"epoch {self.epoch + 1}/{self.cfg.epochs}", total=self.sampler.steps,
                        initial=self.step_in_epoch)
        for _ in bar:
            if self.is_first:
                h, y = self._training_batch(*next(batches))
                image = h if self.needs_image else None
            else:
                h, y, *rest = self._receive(2 + extra)
                image = rest[0] if rest else None
            synchronize(self.device)
            start = time.perf_counter()
            losses, out = self.stage_step(h, y, image)
            synchronize(self.device)
            self.busy_seconds += time.perf_counter() - start
            if self.next is not None:
                self.next.send([out, y] + ([image] if extra else []))
            sums[self.first:self.stop] += losses
            self.step_in_epoch += 1
            self.global_step += 1
        if self.next is not None:
            self.next.flush()
        # Each worker's clock (train_seconds, hence samples/s) stops when the last one drains.
        dist.barrier()
        return (sums if steps else None), steps

    def _reduce_losses(self, sums: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(sums)  # each stage fills its own modules' entries
        return sums.cpu() / self.replicas

    def _sync_buffers(self) -> None:
        if self.replicas > 1:
            broadcast_buffers(self.own_modules, src=self.stage, group=self.stage_group)

    def _record_extra(self, train_seconds: float) -> Dict[str, Any]:
        busy: List[Any] = [None] * self.world
        dist.all_gather_object(busy, round(self.busy_seconds / max(train_seconds, 1e-9), 4))
        return {"pipeline": {"stages": self.stages, "replicas": self.replicas,
                             "modules": [list(r) for r in self.ranges], "busy": busy}}

    @torch.no_grad()
    def evaluate(self) -> Tuple[float, List[float]]:
        self.net.eval()
        last = self.net.num_local - 1
        counts = torch.zeros(2 + last, dtype=torch.float64)  # seen, primary correct, aux correct...
        loader = self._test_loader()
        batches = iter(loader) if self.is_first else None
        for _ in self._bar(range(len(loader)), "eval"):
            h, y = self._to_device(*next(batches)) if self.is_first else self._receive(2)
            with self._autocast():
                for j in range(self.first, self.stop):
                    if j < last:
                        h = self.net.blocks[j](h)
                        counts[2 + j] += (self.net.aux[j](h).argmax(1) == y).sum().item()
                        continue
                    for block in self.net.blocks[last:]:
                        h = block(h)
                    counts[0] += len(y)
                    counts[1] += (self.net.head(h).argmax(1) == y).sum().item()
            if self.next is not None:
                self.next.send([h, y])
        if self.next is not None:
            self.next.flush()
        self.net.train()
        return self._accuracies(counts)

    # -- checkpoints: every stage writes its part, then rank 0 a manifest naming the parts

    def _part_name(self, stage: int, step: int) -> str:
        return f"last.stage{stage}-of-{self.stages}.step{step}.pt"

    def save(self) -> None:
        rng = self._gather_rng(self.replicas, self.stage_group)
        name = self._part_name(self.stage, self.global_step)
        if self.replica == 0:
            state = self.net.state_dict()
            part = {"format": PART_FORMAT, "version": CKPT_VERSION, "stage": self.stage, "modules": list(self.ranges[self.stage]),
                    "global_step": self.global_step,
                    **self._trainer_state({k: state[k] for k in self.own_keys}, rng)}
            atomic_save(part, self.out / name)
        dist.barrier()  # every part is on disk before the manifest names it
        if self.main:
            self._write_progress({**self._progress_state(), "model": {},
                                  "pipeline": {"stages": self.stages, "ranges": [list(r) for r in self.ranges],
                                               "parts": [self._part_name(k, self.global_step)
                                                         for k in range(self.stages)]}})
        dist.barrier()
        if self.replica == 0:  # the manifest no longer names older parts
            for old in self.out.glob(f"last.stage{self.stage}-of-{self.stages}.step*.pt"):
                if old.name != name:
                    old.unlink(missing_ok=True)

    def restore(self) -> bool:
        ckpt = self._read_resumable()
        if ckpt is None:
            return False
        pipe = ckpt["pipeline"]
        path = self.out / pipe["parts"][self.stage]
        part = self._read_part(path, ckpt["global_step"])
        same_world = ckpt["world_size"] == self.world
        loaded = self._load_trainer_state(part, path, self.replica if same_world else -1, strict=False)
        missing = sorted(set(loaded.missing_keys) & set(self.own_keys))
        if missing or loaded.unexpected_keys:
            key = (missing or loaded.unexpected_keys)[0]
            raise AugLocalError(f"{path} does not match this stage's modules ({key!r}); delete the run's "
                                "last*.pt files or use another --out")
        self._restore_progress(ckpt)
        return True

    def _read_part(self, path: Path, step: int) -> Dict[str, Any]:
        part = load_checkpoint(path, PART_FORMAT)
        if part.get("global_step") != step or part.get("stage") != self.stage:
            raise AugLocalError(f"{path} is not the step-{step} part of stage {self.stage}; delete the run's "
                                "last*.pt files or use another --out")
        return part

    def finish(self):
        """Rank 0 gathers every stage's primary weights, then writes ``model.pt`` as a sequential run does."""
        state = self.net.state_dict()
        mine = {k: state[k].detach().cpu() for k in self.own_keys if not k.startswith("aux.")} \
            if self.replica == 0 else {}
        parts: Optional[List[Any]] = [None] * self.world if self.main else None
        dist.gather_object(mine, parts, dst=0)
        if self.main:
            merged: Dict[str, torch.Tensor] = {}
            for p in parts:
                merged.update(p)
            self.net.load_state_dict(merged, strict=False)
        return super().finish()
