"""Which process runs what: the whole run, a data-parallel replica or a pipeline worker.

``run`` is one process's part (``torchrun`` starts it in every process, ``run_spawned``
spawns the processes itself); it picks ``Run`` or, for
``pipeline > 1``, ``PipelineRun``. ``run_spawned`` converts an AugLocal model once for all its
processes (pipeline workers and data-parallel replicas) and hands each the network
(``auglocal_fx._handover``); under ``torchrun`` each process converts it itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist

from ._distributed import check_same_settings, init_distributed, spawn
from ._handover import pack_network
from ._pipeline import PipelineRun, check_pipeline_fits
from .data import build_datasets
from .train_config import TrainConfig, TrainResult
from ._train_loop import Run, build_network, wants_cuda
from ._train_state import resume_view
from .errors import AugLocalError, first_line

__all__ = ["run", "run_spawned", "result_from_disk"]


def run(cfg: TrainConfig, network: Optional[bytes] = None) -> TrainResult:
    """This process's part of the run: the whole of it, a data-parallel replica or a pipeline worker.

    ``network``: the network converted by the launching process (:func:`run_spawned`);
    ``None``: the process converts it.
    """
    rank, world, local_rank = init_distributed(wants_cuda(cfg))
    threads = torch.get_num_threads()  # restored at the end: a run in the caller's process leaves it as it was
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        if world > 1:
            check_same_settings(_settings(cfg))
        if cfg.pipeline == 1:
            return Run(cfg, rank, world, local_rank, network).fit()
        try:
            return PipelineRun(cfg, rank, world, local_rank, network).fit()
        except AugLocalError:
            raise
        except Exception as err:  # noqa: BLE001 - the other workers must learn which one failed
            reason = first_line(err, "", 200)
            raise AugLocalError(f"pipeline worker {rank} failed: {type(err).__name__}: {reason}") from err
    finally:
        torch.set_num_threads(threads)
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _settings(cfg: TrainConfig) -> Dict[str, Any]:
    """The options every process of one run must share."""
    view = resume_view(cfg)
    view.update(pipeline=cfg.pipeline, pipeline_balance=cfg.pipeline_balance, lr=cfg.lr, amp=cfg.amp,
                grad_clip=cfg.grad_clip, max_steps=cfg.max_steps, test_subset=cfg.test_subset)
    return view


def result_from_disk(cfg: TrainConfig) -> TrainResult:
    out = Path(cfg.out)
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = history[-1] if history else {"test_acc": float("nan"), "aux_acc": []}
    return TrainResult(str(out), last["test_acc"], list(last["aux_acc"]), history, str(out / "model.pt"),
                       last.get("test_acc_ema"))


def run_spawned(cfg: TrainConfig) -> TrainResult:
    """Run ``cfg`` in ``cfg.nproc x cfg.pipeline`` spawned processes; the result is read from rank 0's files."""
    # BP builds the model alone (nothing to convert); every process of an AugLocal run would
    # convert the same network with the same seed, so it is converted here once.
    network = _converted_once(cfg) if cfg.method == "auglocal" else None
    spawn(cfg.nproc * cfg.pipeline, run, cfg, network)
    return result_from_disk(cfg)


def _converted_once(cfg: TrainConfig) -> bytes:
    """The network every spawned process would convert, converted here once (``Run``'s seed and
    dataset geometry) and packed; the caller's random state is left as it was."""
    data = build_datasets(cfg.dataset, cfg.data_dir, cfg.input_size, augment=cfg.augment)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        net, _ = build_network(cfg, data.num_classes, data.input_size)
    if cfg.pipeline > 1:
        check_pipeline_fits(net, cfg.pipeline)  # here, before any process starts
    return pack_network(net)
