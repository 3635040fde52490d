"""Model specs and the errors a user can cause with them."""

import pytest
import torch

from auglocal_fx import AugLocalError, resolve_model, to_local

FACTORY_FILE = '''
import torch
from torch import nn

def make(num_classes=10):
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(),
                         nn.Conv2d(4, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, num_classes))

not_a_model = 3
'''


@pytest.fixture
def factory_file(tmp_path):
    path = tmp_path / "mynet.py"
    path.write_text(FACTORY_FILE)
    return str(path)


def test_paper_defaults():
    spec = resolve_model("paper:resnet32")
    assert spec.input_size == (3, 32, 32) and spec.num_classes == 10 and spec.name == "resnet32"
    assert type(spec.create()) is type(spec.model)


def test_timm_default_input_size():
    spec = resolve_model("timm:regnetx_004", num_classes=3)
    assert spec.input_size == (3, 224, 224) and spec.num_classes == 3


def test_file_factory(factory_file):
    spec = resolve_model(f"{factory_file}:make", num_classes=4, input_size=(3, 16, 16))
    assert spec.num_classes == 4
    local = to_local(f"{factory_file}:make", input_size=(3, 16, 16), num_classes=4)
    assert len(local.blocks) == 3


def test_weights_file(tmp_path):
    spec = resolve_model("paper:resnet32")
    path = tmp_path / "w.pt"
    torch.save(spec.model.state_dict(), path)
    again = resolve_model("paper:resnet32", weights=str(path))
    assert torch.equal(again.model.fc.weight, spec.model.fc.weight)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(AugLocalError, match="cannot read weights"):
        resolve_model("paper:resnet32", weights=str(bad))
    with pytest.raises(AugLocalError, match="do not fit"):
        resolve_model("paper:vgg19", weights=str(path))


@pytest.mark.parametrize("spec,message", [
    ("timm:not_a_model_xyz", "unknown timm model"),
    ("torchvision:resnet_nope", "unknown torchvision"),
    ("paper:resnet56", "unknown paper model"),
    ("keras:resnet50", "unknown spec prefix"),
    ("resnet50", "has no prefix"),
    ("missing/file.py:make", "does not exist"),
])
def test_bad_specs(spec, message):
    with pytest.raises(AugLocalError, match=message):
        resolve_model(spec)


def test_missing_factory(factory_file):
    with pytest.raises(AugLocalError, match="has no callable 'nope'"):
        resolve_model(f"{factory_file}:nope")
    with pytest.raises(AugLocalError, match="has no callable 'not_a_model'"):
        resolve_model(f"{factory_file}:not_a_model")


def test_input_too_small():
    with pytest.raises(AugLocalError, match="too small"):
        to_local("torchvision:vgg13", input_size=(3, 8, 8))


@pytest.mark.parametrize("kwargs,message", [
    ({"d": 1}, "must be an integer >= 2"),
    ({"d": 17}, "too large"),
    ({"tau": 1.5}, "outside"),
    ({"selection": "best"}, "unknown selection"),
])
def test_bad_conversion_options(kwargs, message):
    with pytest.raises(AugLocalError, match=message):
        to_local("paper:resnet32", **kwargs)


def test_not_a_module():
    with pytest.raises(AugLocalError, match="takes an nn.Module"):
        to_local(42)


def test_model_objects_refuse_spec_only_options_and_need_a_stated_input_size():
    from torch import nn

    from auglocal_fx.models.cifar import resnet32

    with pytest.raises(AugLocalError, match="num_classes apply to spec strings only"):
        to_local(resnet32(), num_classes=7)
    with pytest.raises(AugLocalError, match="weights apply to spec strings only"):
        to_local(resnet32(), weights="w.pt")
    # the paper's networks state 32x32; a plain module states nothing and must be told
    assert to_local(resnet32(), d=2).input_size == (3, 32, 32)
    plain = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                          nn.Conv2d(8, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    with pytest.raises(AugLocalError, match=r"does not say its input size: pass input_size=\(C, H, W\)"):
        to_local(plain, d=2)
    assert to_local(plain, d=2, input_size=(3, 16, 16)).input_size == (3, 16, 16)
