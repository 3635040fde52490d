"""Every file of weights auglocal-fx reads: what each kind holds, one format check, one wording.

The kinds (a payload is a ``torch.save``'d dict; the tagged ones carry ``format`` and ``version``):

* a LocalNet checkpoint (``LocalNet.save``, ``auglocal-fx convert --output``): spec, options and
  the network's ``state_dict``; ``format`` ``"auglocal-fx/localnet"``, any version is read;
* the training state (``OUT/last.pt``): the run's config, position, weights, optimizer and RNG;
  ``format`` ``"auglocal-fx-train"``, version 3 only (a run resumes with the exact state);
* a pipeline worker's part of the training state (``OUT/last.stageK-of-N.stepS.pt``), likewise;
* a weights file: a plain ``state_dict`` (``OUT/model.pt``, the original model's weights), or a
  timm / torchvision training checkpoint that holds one.

Whatever the kind, a missing file, an unreadable one and one of another kind give one line in
the same words (``read``), each followed by what to do:

* ``<noun> '<path>' does not exist: check the path``;
* ``cannot read <noun> '<path>': corrupt or not a torch file (<error type>)``;
* ``'<path>' is not <kind> [but <the kind it is>]``, or ``... is version N of <kind>``.

Files are read with ``weights_only=True``: nothing in them is executed.
"""

from __future__ import annotations

import argparse
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

import torch
from torch import nn

from .errors import AugLocalError

__all__ = ["Kind", "LOCALNET", "TRAINING", "PIPELINE_PART", "WEIGHTS", "TRAINED", "read", "read_state_dict",
           "load_weights", "model_file", "trained_config"]

PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class Kind:
    """One kind of file, as the messages name it.

    Attributes:
        name: what a file of this kind is, with its article (``"an auglocal-fx LocalNet checkpoint"``).
        noun: what the file is called in "does not exist" / "cannot read" (``"checkpoint"``).
        hint: what to do when the file is not readable as this kind.
        format: the payload's ``format`` tag; ``None`` for an untagged dict.
        version: the version this auglocal-fx writes.
        strict_version: only ``version`` is read (else any).
    """

    name: str
    noun: str
    hint: str
    format: Optional[str] = None
    version: Optional[int] = None
    strict_version: bool = False


LOCALNET = Kind("an auglocal-fx LocalNet checkpoint", "checkpoint",
                "write it with `auglocal-fx convert --output` or LocalNet.save()", "auglocal-fx/localnet", 1)
TRAINING = Kind("an auglocal-fx training checkpoint (the training state)", "checkpoint",
                "delete it or use another --out", "auglocal-fx-train", 3, strict_version=True)
PIPELINE_PART = Kind("an auglocal-fx pipeline part of a training checkpoint", "checkpoint",
                     "delete the run's last*.pt files or use another --out", "auglocal-fx-pipeline-part", 3,
                     strict_version=True)
WEIGHTS = Kind("a weights file: it holds no state_dict (name -> tensor)", "weights file",
               "is it a torch.save'd state_dict or a training checkpoint?")
# What the analysis reads: a train run's model.pt (plain weights, its options in last.pt) or a LocalNet.
TRAINED = Kind("a trained network (an `auglocal-fx train` run's model.pt or a LocalNet checkpoint)",
               "checkpoint", "pass the model.pt of a finished `auglocal-fx train` run")
_TAGGED = (LOCALNET, TRAINING, PIPELINE_PART)


def read(path: PathLike, kind: Kind, map_location: Union[str, torch.device] = "cpu",
         mmap: bool = False) -> Dict[str, Any]:
    """The payload of a file of ``kind``, checked, or one line saying what is wrong with it.

    Args:
        path: the file.
        kind: what it must be (``LOCALNET``, ``TRAINING``, ``PIPELINE_PART``, ``WEIGHTS``).
        map_location: where to load the tensors.
        mmap: map the tensors instead of reading them (to look at the tags only).

    Raises:
        AugLocalError: the file is missing, unreadable, not a dict, of another kind or version.
    """
    payload = _load(path, kind, map_location, mmap)
    found = _tag(payload)
    if kind.format is not None and found is not kind:
        raise _wrong_kind(path, kind, found)
    if kind.strict_version and payload.get("version") != kind.version:
        raise AugLocalError(f"{_q(path)} is version {payload.get('version')} of {kind.name}; this auglocal-fx "
                            f"reads version {kind.version}: {kind.hint}")
    return payload


def _wrong_kind(path: PathLike, kind: Kind, found: Optional[Kind] = None, hint: Optional[str] = None) -> AugLocalError:
    """The error for a file that is not ``kind`` (``found``: what it is, where known)."""
    but = f" but {found.name}" if found is not None else ""
    return AugLocalError(f"{_q(path)} is not {kind.name}{but}; {hint or kind.hint}")


def _tag(payload: Dict[str, Any]) -> Optional[Kind]:
    """The tagged kind a payload says it is (``None``: untagged or unknown)."""
    return next((k for k in _TAGGED if k.format == payload.get("format")), None)


def _load(path: PathLike, kind: Kind, map_location: Union[str, torch.device], mmap: bool) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise AugLocalError(f"{kind.noun} {_q(path)} does not exist: check the path")
    try:
        # timm and torchvision save their argparse options beside the weights.
        with torch.serialization.safe_globals([argparse.Namespace]):
            payload = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
        # The type only: torch's message for a file that is not a torch file is a page about
        # weights_only, which is beside the point here.
        raise AugLocalError(f"cannot read {kind.noun} {_q(path)}: corrupt or not a torch file "
                            f"({type(exc).__name__}); {kind.hint}") from None
    if not isinstance(payload, dict):
        raise _wrong_kind(path, kind)
    return payload


def _q(path: PathLike) -> str:
    return repr(os.fspath(path))


# ----------------------------------------------------------------------------- weights files

# Where training scripts keep the weights in their checkpoints, in the order they are taken:
# timm's CheckpointSaver writes state_dict (+ state_dict_ema), torchvision's train.py model
# (+ model_ema). The plain weights come first, as timm's load_checkpoint(use_ema=False) does.
_STATE_KEYS = ("state_dict", "model", "state_dict_ema", "model_ema")


def read_state_dict(path: PathLike) -> Dict[str, torch.Tensor]:
    """The weights in a local file: a ``state_dict``, or a timm / torchvision checkpoint.

    A checkpoint dict holds them under ``state_dict``, ``model``, ``state_dict_ema`` or
    ``model_ema`` (the first present is taken); a ``module.`` prefix on every key (a
    ``DistributedDataParallel`` model's, or torchvision's EMA with its ``n_averaged``) is removed.

    Raises:
        AugLocalError: when the file is missing, unreadable or holds no weights.
    """
    state = read(path, WEIGHTS)
    for key in _STATE_KEYS:
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    if not state or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise _wrong_kind(path, WEIGHTS, hint=f"nor one under {', '.join(_STATE_KEYS)}: save model.state_dict()")
    if all(k.startswith("module.") for k in state if k != "n_averaged"):
        # DDP's wrapper, or torchvision's EMA (an AveragedModel: the model under module.,
        # beside its n_averaged count).
        state = {k[len("module."):]: v for k, v in state.items() if k != "n_averaged"}
    return state


def load_weights(model: nn.Module, path: PathLike, num_classes: Optional[int] = None) -> None:
    """Load a local weights file into ``model``: every tensor must fit, but the classifier's.

    The file is read by ``read_state_dict``. Every name must match, and every shape, except
    where the file's classifier has another number of classes (fine-tuning a pretrained network
    on a new dataset): the tensors whose first dimension is ``num_classes`` in the model and
    one other number in the file are left as the model initialised them, with one warning.

    Args:
        model: the model to load into.
        path: the weights file.
        num_classes: the model's classifier width; ``None``: every shape must match.

    Raises:
        AugLocalError: when the file is missing, unreadable or does not fit the model.
    """
    state = read_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = [f"{what} {_some(keys)}" for what, keys in
                 (("the model's", missing), ("the file's", unexpected)) if keys]
        raise AugLocalError(f"weights in {_q(path)} do not fit the model: {' and '.join(parts)} have no "
                            "counterpart; is it a checkpoint of this architecture?")
    differ = [k for k in own if tuple(state[k].shape) != tuple(own[k].shape)]
    classifier = [k for k in differ if num_classes is not None and own[k].dim() >= 1
                  and own[k].shape[0] == num_classes and state[k].shape[1:] == own[k].shape[1:]]
    file_classes = {int(state[k].shape[0]) for k in classifier}
    if len(file_classes) > 1 or set(differ) != set(classifier):
        k = next(k for k in differ if k not in classifier or len(file_classes) > 1)
        raise AugLocalError(f"weights in {_q(path)} do not fit the model: {k} has shape "
                            f"{tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model; "
                            "is it a checkpoint of this architecture (and model_kwargs)?")
    for k in classifier:
        del state[k]
    model.load_state_dict(state, strict=False)
    if classifier:
        warnings.warn(
            f"auglocal-fx: {path} has a {file_classes.pop()}-class classifier, the model "
            f"{num_classes} classes: loaded all weights but the classifier's ({', '.join(classifier)}), "
            "which start freshly initialised", stacklevel=3)


def _some(keys: Sequence[str], most: int = 3) -> str:
    return ", ".join(keys[:most]) + (f" (+{len(keys) - most} more)" if len(keys) > most else "")


# ----------------------------------------------------------------------------- a train run's output


def model_file(path: PathLike) -> Path:
    """The weights file of a trained network: ``OUT/model.pt`` for a run's folder, else ``path``.

    Raises:
        AugLocalError: a missing folder or file, a folder without ``model.pt``, or ``last.pt``.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
        if not path.is_file():
            raise AugLocalError(f"{path.parent} has no model.pt: pass the OUT folder of a finished "
                                "`auglocal-fx train` run")
    elif not path.is_file():
        raise AugLocalError(f"{TRAINED.noun} {_q(path)} does not exist: check the path")
    if path.name == "last.pt":  # known by its name: no need to read a large file to refuse it
        raise _wrong_kind(path, TRAINED, TRAINING, _pass_model_pt(path))
    return path


def _pass_model_pt(path: Path) -> str:
    return f"pass {path.parent}/model.pt or the folder {path.parent}"


def trained_config(path: PathLike) -> Optional[Dict[str, Any]]:
    """The training options of a ``train`` output (``OUT`` or ``OUT/model.pt``), from ``OUT/last.pt``.

    Returns ``None`` for a LocalNet checkpoint (it holds no training options).

    Raises:
        AugLocalError: a missing folder or file, or an unreadable ``last.pt``.
    """
    file = model_file(path)
    found = _tag(read(file, TRAINED, mmap=True))
    if found is LOCALNET:
        return None
    if found is not None:
        raise _wrong_kind(file, TRAINED, found, _pass_model_pt(file))
    last = file.parent / "last.pt"
    if not last.is_file():
        raise AugLocalError(f"{file} has no last.pt beside it, so its model and options are unknown; "
                            "pass the OUT folder of an `auglocal-fx train` run")
    return dict(read(last, TRAINING)["config"])
