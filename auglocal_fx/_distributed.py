"""Data-parallel plumbing for training: process groups, gradient averaging, spawning.

The local step calls ``backward`` once per local module, so DDP's reducer (one backward per
step) does not fit: gradients are averaged with bucketed ``all_reduce`` after the step instead.
gloo on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import os
import socket
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from .errors import AugLocalError

__all__ = ["launched_by_torchrun", "init_distributed", "check_same_settings", "average_gradients",
           "broadcast_buffers", "spawn"]


def launched_by_torchrun() -> bool:
    """Whether this process was started by ``torchrun`` (or with its environment)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(nproc: int, worker: Callable[..., Any], *args: Any) -> None:
    """Run ``worker(*args)`` in ``nproc`` processes that form one process group.

    Each process gets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and a free local port, and an
    equal share of the CPU threads. An ``AugLocalError`` raised in a worker is raised here
    as one line.
    """
    import torch.multiprocessing as mp

    port = _free_port()
    try:
        mp.spawn(_spawned, args=(nproc, port, worker, args), nprocs=nproc, join=True)
    except mp.ProcessRaisedException as err:
        text = str(err).strip().splitlines()
        last = text[-1] if text else "unknown error"
        if "AugLocalError:" in last:
            raise AugLocalError(last.split("AugLocalError:", 1)[1].strip()) from None
        raise
    except mp.ProcessExitedException as err:
        raise AugLocalError(f"process {err.error_index} of {nproc} exited ({str(err).strip()}); the others were "
                            "stopped; continue from the last checkpoint with --resume") from None


def _spawned(rank: int, nproc: int, port: int, worker: Callable[..., Any], args: Tuple[Any, ...]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // nproc))
    worker(*args)


def init_distributed(wants_cuda: bool) -> Tuple[int, int, int]:
    """Join the process group the environment describes: ``(rank, world_size, local_rank)``."""
    if "RANK" not in os.environ:
        return 0, 1, 0
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if world == 1:
        return 0, 1, 0
    if wants_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if wants_cuda else "gloo", rank=rank, world_size=world)
    return rank, world, local_rank


def check_same_settings(settings: Dict[str, Any]) -> None:
    """Raise if any process of the group was started with other ``settings`` than rank 0."""
    every: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, settings)
    for rank, theirs in enumerate(every):
        for key, value in settings.items():
            if theirs.get(key) != every[0].get(key):
                raise AugLocalError(f"process {rank} was started with {key}={theirs.get(key)!r}, process 0 with "
                                    f"{every[0].get(key)!r}; launch every process with the same options")


def average_gradients(params: Sequence[nn.Parameter], world: int, bucket_bytes: int = 25 * 2 ** 20,
                      group: Optional[Any] = None) -> None:
    """All-reduce and average the gradients of ``params`` over ``group`` (of ``world`` processes;
    default the whole process group), in buckets."""
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
            dist.all_reduce(flat, group=group)
            flat /= world
            offset = 0
            for b in bucket:
                b.copy_(flat[offset:offset + b.numel()].view_as(b))
                offset += b.numel()
        bucket, size = ([g], g.numel() * g.element_size()) if g is not None else ([], 0)


def broadcast_buffers(module: nn.Module, src: int = 0, group: Optional[Any] = None) -> None:
    """Give every process of ``group`` the buffers (batch-norm statistics) of global rank ``src``."""
    for buf in module.buffers():
        dist.broadcast(buf, src, group=group)
