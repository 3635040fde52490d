"""Every reader of a weights file goes through ``auglocal_fx.checkpoints``: one check, one wording.

The four readers (``load``, ``load_trained``, the trainer's ``load_checkpoint`` and a spec's
``weights=``) are given the same bad files and must say the same thing in the same words.
"""

import os
import re

import pytest
import torch

from auglocal_fx import AugLocalError, load, to_local
from auglocal_fx._train_state import load_checkpoint
from auglocal_fx.analysis import load_trained
from auglocal_fx.checkpoints import LOCALNET, TRAINING
from auglocal_fx.specs import resolve_model

from .conftest import TinyResNet

TINY = os.path.join(os.path.dirname(__file__), "_tiny_models.py") + ":tiny_cnn"

READERS = {
    "load": load,
    "load_trained": load_trained,
    "load_checkpoint": load_checkpoint,
    "weights": lambda path: resolve_model(TINY, input_size=(3, 8, 8), weights=str(path)),
}


def _message(reader, path) -> str:
    with pytest.raises(AugLocalError) as info:
        READERS[reader](path)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("reader", READERS)
def test_a_missing_file(tmp_path, reader):
    message = _message(reader, tmp_path / "none.pt")
    assert re.fullmatch(r"(checkpoint|weights file) '.*none\.pt' does not exist: check the path", message)


@pytest.mark.parametrize("reader", READERS)
def test_a_corrupt_file(tmp_path, reader):
    path = tmp_path / "corrupt.pt"
    path.write_bytes(b"\x80garbage")
    message = _message(reader, path)
    assert re.fullmatch(r"cannot read (checkpoint|weights file) '.*corrupt\.pt': corrupt or not a torch file "
                        r"\(\w+\); .+", message), message


@pytest.mark.parametrize("reader", READERS)
def test_not_a_dict(tmp_path, reader):
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(2), path)
    assert re.fullmatch(r"'.*tensor\.pt' is not an? [^;]+; .+", _message(reader, path))


@pytest.fixture
def localnet_file(tmp_path):
    path = tmp_path / "net.pt"
    to_local(TinyResNet(), d=2, input_size=(3, 16, 16)).save(path)
    return path


@pytest.fixture
def training_file(tmp_path):
    path = tmp_path / "state.pt"  # not named last.pt: the payload's tag is what is read
    torch.save({"format": TRAINING.format, "version": TRAINING.version, "config": {}}, path)
    return path


@pytest.mark.parametrize("reader", ["load", "load_trained"])
def test_a_training_state_is_named_as_such(training_file, reader):
    message = _message(reader, training_file)
    assert re.fullmatch(r"'.*state\.pt' is not an? .+ but an auglocal-fx training checkpoint \(the training "
                        r"state\); .+", message), message


def test_a_localnet_checkpoint_is_not_a_training_state(localnet_file):
    assert _message("load_checkpoint", localnet_file).startswith(
        f"{str(localnet_file)!r} is not {TRAINING.name} but {LOCALNET.name}; delete it or use another --out")


def test_the_training_state_is_read_at_its_version_only(tmp_path):
    path = tmp_path / "last.pt"
    torch.save({"format": TRAINING.format, "version": TRAINING.version - 1}, path)
    assert _message("load_checkpoint", path) == (
        f"{str(path)!r} is version {TRAINING.version - 1} of {TRAINING.name}; this auglocal-fx reads version "
        f"{TRAINING.version}: delete it or use another --out")
    torch.save({"format": TRAINING.format, "version": TRAINING.version}, path)
    assert load_checkpoint(path)["version"] == TRAINING.version


def test_a_localnet_checkpoint_of_any_version_loads(localnet_file):
    """LocalNet checkpoints are not version-checked: every one written so far still loads."""
    payload = torch.load(localnet_file, weights_only=True)
    payload.pop("version")
    torch.save(payload, localnet_file)
    assert len(load(localnet_file, model=TinyResNet()).blocks) > 1
