"""The training checkpoint: what ``last.pt`` holds, RNG states, and reading it back.

The file format, its check and its error wording belong to ``auglocal_fx.checkpoints``
(``TRAINING``, ``PIPELINE_PART``); this module keeps the trainer's view of it.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch

from .checkpoints import PIPELINE_PART, TRAINING, read

__all__ = ["CKPT_FORMAT", "CKPT_VERSION", "RESUME_KEYS", "resume_view", "saved_view", "rng_state", "set_rng_state",
           "load_checkpoint"]

CKPT_FORMAT = TRAINING.format
CKPT_VERSION = TRAINING.version  # 3: optimizer and schedule options, EMA weights; the schedule needs no state
# Fields that must match for a run to be resumed from a checkpoint.
RESUME_KEYS = ("model", "dataset", "method", "d", "tau", "pyramid", "selection", "aux_head", "rule",
               "batch_size",
               "epochs", "warmup_epochs", "seed", "input_size", "train_subset", "augment",
               "opt", "sched", "sched_on_updates", "model_ema",
               "model_kwargs", "weights", "aux_init", "aux_resolution")
# What runs did before a key existed, for checkpoints written without it.
RESUME_DEFAULTS = {"aux_init": "init", "aux_resolution": "paper"}


def resume_view(cfg: Any) -> Dict[str, Any]:
    """The fields of a ``TrainConfig`` that a resumed run must share with its checkpoint."""
    view = {k: getattr(cfg, k) for k in RESUME_KEYS}
    if not isinstance(view["model"], str):
        view["model"] = type(view["model"]).__qualname__
    return view


def saved_view(config: Dict[str, Any]) -> Dict[str, Any]:
    """``resume_view`` as a checkpoint's ``config`` holds it (keys newer than it defaulted)."""
    return {k: config.get(k, RESUME_DEFAULTS.get(k)) for k in RESUME_KEYS}


def rng_state() -> Dict[str, Any]:
    """This process's RNG states as plain Python values (picklable, gatherable, weights-only loadable)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state().tolist(),
            "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
            "python": random.getstate()}


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def load_checkpoint(path: Path, fmt: str = CKPT_FORMAT) -> Dict[str, Any]:
    """Read a training checkpoint (``fmt``: ``last.pt``'s, or a pipeline worker's part) or raise one line."""
    return read(path, {TRAINING.format: TRAINING, PIPELINE_PART.format: PIPELINE_PART}[fmt])
