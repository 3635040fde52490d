"""The training run's checkpoint: writing ``last.pt`` and resuming from it (a mixin of ``Run``).

The file's format and reading belong to ``_train_state`` and ``auglocal_fx.checkpoints``; this
is the run's side: which of its attributes are saved, and how they are put back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from ._io import atomic_save, atomic_write_text
from ._train_state import CKPT_FORMAT, CKPT_VERSION, RESUME_KEYS, load_checkpoint, resume_view, rng_state, saved_view, set_rng_state
from .errors import AugLocalError, first_line
from .plots import plot_training_curves

__all__ = ["Checkpointing"]


class Checkpointing:
    """``Run``'s checkpoint methods: it provides ``cfg``, ``net``, ``optimizer``, ``scaler``, ``ema``,
    ``out``, ``rank``, ``world``, ``main``, the position (``epoch``, ``step_in_epoch``,
    ``global_step``, ``total_steps``), ``history`` and ``_log``."""

    def _gather_rng(self, size: int, group: Optional[Any] = None) -> List[Any]:
        """The RNG states of the ``size`` processes of ``group`` (default all), in rank order."""
        rng = rng_state()
        if size == 1:
            return [rng]
        states: List[Any] = [None] * size
        dist.all_gather_object(states, rng, group=group)
        return states

    def _progress_state(self) -> Dict[str, Any]:
        """What ``last.pt`` holds besides the weights: config, position, history."""
        return {"format": CKPT_FORMAT, "version": CKPT_VERSION, "config": resume_view(self.cfg),
                "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                "total_steps": self.total_steps, "world_size": self.world, "history": self.history}

    def _trainer_state(self, model: Dict[str, torch.Tensor], rng: List[Any]) -> Dict[str, Any]:
        return {"model": model, "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None, "rng": rng,
                "ema": self.ema.module.state_dict() if self.ema is not None else None}

    def _write_progress(self, state: Dict[str, Any]) -> None:
        """Rank 0: ``last.pt``, ``metrics.jsonl`` and the curves."""
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_save(state, self.out / "last.pt")
        atomic_write_text("".join(json.dumps(h) + "\n" for h in self.history), self.out / "metrics.jsonl")
        plot_training_curves(self.history, self.out / "curves.png")

    def save(self) -> None:
        rng = self._gather_rng(self.world)  # every process takes part
        if self.main:
            self._write_progress({**self._progress_state(), **self._trainer_state(self.net.state_dict(), rng)})
        if self.world > 1:
            dist.barrier()

    def _read_resumable(self) -> Optional[Dict[str, Any]]:
        """``last.pt`` if it exists and belongs to this run's options, else ``None``."""
        path = self.out / "last.pt"
        if not path.exists():
            if self.main:
                self._log(f"no {path} to resume from; starting a new run")
            return None
        ckpt = load_checkpoint(path)
        mine, theirs = resume_view(self.cfg), saved_view(ckpt.get("config", {}))
        diff = [k for k in RESUME_KEYS if theirs.get(k) != mine[k]]
        if diff:
            k = diff[0]
            raise AugLocalError(f"{path} belongs to a different run ({k}={theirs.get(k)!r}, now {mine[k]!r}); "
                                "use the same options or another --out")
        stages = (ckpt.get("pipeline") or {}).get("stages", 1)
        if stages != self.cfg.pipeline:
            raise AugLocalError(f"{path} was written by a run with --pipeline {stages}; resume it with "
                                f"--pipeline {stages} or use another --out")
        return ckpt

    def _load_trainer_state(self, state: Dict[str, Any], path: Path, rank_in_rng: int, strict: bool = True):
        """Weights, optimizer, scaler and this process's RNG (``rank_in_rng < 0``: keep the RNG)."""
        try:
            loaded = self.net.load_state_dict(state["model"], strict=strict)
            self.optimizer.load_state_dict(state["optimizer"])
            if self.scaler is not None and state["scaler"] is not None:
                self.scaler.load_state_dict(state["scaler"])
            if self.ema is not None:
                self.ema.module.load_state_dict(state["ema"])
        except (KeyError, RuntimeError, ValueError) as err:
            reason = first_line(err, limit=120)
            raise AugLocalError(f"{path} does not match this model ({reason}); delete it or use another --out") from None
        if 0 <= rank_in_rng < len(state["rng"]):
            set_rng_state(state["rng"][rank_in_rng])
        return loaded

    def _restore_progress(self, ckpt: Dict[str, Any]) -> None:
        self.epoch, self.step_in_epoch = ckpt["epoch"], ckpt["step_in_epoch"]
        self.global_step, self.history = ckpt["global_step"], list(ckpt["history"])
        if self.main:
            self._log(f"resumed from {self.out / 'last.pt'} at epoch {self.epoch}, step {self.global_step}")

    def restore(self) -> bool:
        ckpt = self._read_resumable()
        if ckpt is None:
            return False
        # RNG states are per process: restored only when the number of processes is the same.
        self._load_trainer_state(ckpt, self.out / "last.pt", self.rank if ckpt["world_size"] == self.world else -1)
        self._restore_progress(ckpt)
        return True
