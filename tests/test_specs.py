"""Model specs and the errors a user can cause with them."""

from pathlib import Path

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


# -- model_kwargs and weights files

@pytest.fixture
def wide_file():
    return str(Path(__file__).with_name("_tiny_models.py")) + ":wide_cnn"


@pytest.mark.parametrize("pairs,expected", [
    (["depth=6", "img_size=32"], {"depth": 6, "img_size": 32}),
    (["drop_rate=0.25", "class_token=False", "fc_norm=None"],
     {"drop_rate": 0.25, "class_token": False, "fc_norm": None}),
    (["img_size=(32, 48)", "out_indices=[1, 2]"], {"img_size": (32, 48), "out_indices": [1, 2]}),
    (["global_pool=avg", "act_layer='gelu'", "name=a=b", "empty="],
     {"global_pool": "avg", "act_layer": "gelu", "name": "a=b", "empty": ""}),
])
def test_parse_model_kwargs_as_timm_does(pairs, expected):
    from auglocal_fx.specs import parse_model_kwargs

    parsed = parse_model_kwargs(pairs)
    assert parsed == expected
    assert [type(v) for v in parsed.values()] == [type(v) for v in expected.values()]


@pytest.mark.parametrize("pair", ["foo", "=3", "2x=3"])
def test_parse_model_kwargs_refuses_what_is_not_key_value(pair):
    from auglocal_fx.specs import parse_model_kwargs

    with pytest.raises(AugLocalError, match="is not KEY=VALUE"):
        parse_model_kwargs([pair])


def test_model_kwargs_reach_timm_create_model():
    spec = resolve_model("timm:vit_tiny_patch16_224", num_classes=3,
                         model_kwargs={"patch_size": 4, "img_size": 32, "depth": 2})
    model = spec.model
    assert len(model.blocks) == 2 and tuple(model.patch_embed.patch_size) == (4, 4)
    assert spec.input_size == (3, 32, 32)  # from img_size, not the registered 224
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 3)
    assert len(spec.create().blocks) == 2  # fresh copies keep them


def test_model_kwargs_reach_torchvision_and_a_file_factory(wide_file):
    spec = resolve_model("torchvision:mobilenet_v2", num_classes=2, model_kwargs={"width_mult": 0.5})
    assert spec.model.features[0][0].out_channels == 16  # 32 at width 1
    made = resolve_model(wide_file, input_size=(3, 8, 8), model_kwargs={"width": 6, "depth": 2})
    assert made.model[0].out_channels == 6 and len(made.model) == 3 + 3 * 2 + 3


@pytest.mark.parametrize("kwargs,message", [
    ({"foo": 1}, r"cannot be built with model_kwargs foo=1: TypeError: .*foo"),
    ({"pretrained": True}, "nothing is downloaded"),
    ({"num_classes": 3}, "give num_classes="),
])
def test_model_kwargs_errors_are_one_line(kwargs, message):
    with pytest.raises(AugLocalError, match=message) as info:
        resolve_model("timm:resnet18", model_kwargs=kwargs)
    assert "\n" not in str(info.value)


def test_model_kwargs_are_saved_and_reloaded(tmp_path, wide_file):
    from auglocal_fx import load

    local = to_local(wide_file, d=2, input_size=(3, 8, 8), num_classes=3,
                     model_kwargs={"width": 6, "depth": 2})
    path = tmp_path / "net.pt"
    local.save(path)
    again = load(path)
    assert again.options["model_kwargs"] == {"width": 6, "depth": 2}
    assert again.export()[0].out_channels == 6 and len(again.blocks) == len(local.blocks)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(again.eval()(x), local.eval()(x))
    with pytest.raises(AugLocalError, match="model_kwargs apply to spec strings only"):
        to_local(again.export(), input_size=(3, 8, 8), model_kwargs={"width": 6})


def test_checkpoints_from_before_model_kwargs_and_aux_init_still_load(tmp_path, wide_file):
    from auglocal_fx import load

    local = to_local(wide_file, d=2, input_size=(3, 8, 8))
    path = tmp_path / "old.pt"
    local.save(path)
    payload = torch.load(path, weights_only=True)
    for key in ("model_kwargs", "aux_init"):
        payload["options"].pop(key, None)
    torch.save(payload, path)
    again = load(path)
    assert again.options["aux_init"] == "init" and "model_kwargs" not in again.options
    theirs = again.state_dict()
    assert all(torch.equal(theirs[k], v) for k, v in local.state_dict().items())


def _model_and_state(wide_file, **kwargs):
    model = resolve_model(wide_file, input_size=(3, 8, 8), **kwargs).model
    torch.nn.init.normal_(model[1].running_mean)  # buffers travel too
    return model, model.state_dict()


@pytest.mark.parametrize("layout", ["plain", "state_dict", "model", "state_dict_ema", "model_ema",
                                    "ddp", "timm_checkpoint", "torchvision_checkpoint",
                                    "torchvision_ema"])
def test_weights_file_layouts(tmp_path, wide_file, layout):
    import argparse

    source, state = _model_and_state(wide_file)
    other = {k: torch.zeros_like(v) for k, v in state.items()}  # what must not be taken
    payload = {
        "plain": state,
        "state_dict": {"state_dict": state, "epoch": 3},
        "model": {"model": state, "epoch": 3},
        "state_dict_ema": {"state_dict_ema": state, "epoch": 3},
        "model_ema": {"model_ema": state},
        "ddp": {"state_dict": {f"module.{k}": v for k, v in state.items()}},
        # timm's CheckpointSaver: plain weights first, EMA beside them, argparse options
        "timm_checkpoint": {"arch": "widenet", "state_dict": state, "state_dict_ema": other,
                            "args": argparse.Namespace(lr=0.1, img_size=(8, 8)), "version": 2},
        # torchvision's train.py
        "torchvision_checkpoint": {"model": state, "model_ema": other, "optimizer": {},
                                   "args": argparse.Namespace(lr=0.5), "epoch": 9},
        # torchvision's --model-ema alone: an AveragedModel's state (module. + n_averaged)
        "torchvision_ema": {"model_ema": {"n_averaged": torch.tensor(7),
                                          **{f"module.{k}": v for k, v in state.items()}}},
    }[layout]
    path = tmp_path / "w.pth"
    torch.save(payload, path)
    loaded = resolve_model(wide_file, input_size=(3, 8, 8), weights=str(path)).model.state_dict()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


def test_weights_are_loaded_before_conversion(tmp_path, wide_file):
    source, state = _model_and_state(wide_file)
    path = tmp_path / "w.pt"
    torch.save(state, path)
    local = to_local(wide_file, d=2, input_size=(3, 8, 8), weights=str(path)).eval()
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(local(x), source.eval()(x))
    fresh = to_local(wide_file, d=2, input_size=(3, 8, 8)).eval()
    assert not torch.allclose(fresh(x), source(x))


def test_weights_with_another_classifier_load_all_but_it(tmp_path, wide_file):
    source, state = _model_and_state(wide_file)  # 10 classes
    path = tmp_path / "w.pt"
    torch.save(state, path)
    torch.manual_seed(1)
    fresh_fc = resolve_model(wide_file, input_size=(3, 8, 8), num_classes=4).model[-1]
    torch.manual_seed(1)
    with pytest.warns(UserWarning, match=r"10-class classifier, the model 4 classes: loaded all "
                                         r"weights but the classifier's \(11.weight, 11.bias\)"):
        model = resolve_model(wide_file, input_size=(3, 8, 8), num_classes=4, weights=str(path)).model
    loaded = model.state_dict()
    for key, value in state.items():
        if not key.startswith("11."):
            assert torch.equal(loaded[key], value), key
    assert torch.equal(model[-1].weight, fresh_fc.weight)  # the classifier as created


def _changed(wide_file, key, shape):
    state = resolve_model(wide_file, input_size=(3, 8, 8)).model.state_dict()
    state[key] = torch.zeros(shape)
    return state


@pytest.mark.parametrize("make_file,message", [
    (lambda path, wide: path.write_bytes(b"\x80garbage"), "cannot read weights file"),
    (lambda path, wide: torch.save({"epoch": 3, "optimizer": {}}, path), "holds no state_dict"),
    (lambda path, wide: torch.save(resolve_model(wide, input_size=(3, 8, 8),
                                                 model_kwargs={"width": 5}).model.state_dict(), path),
     r"0.weight has shape \(5, 3, 3, 3\) in the file, \(4, 3, 3, 3\) in the model"),
    (lambda path, wide: torch.save(resolve_model(wide, input_size=(3, 8, 8),
                                                 model_kwargs={"depth": 3}).model.state_dict(), path),
     "the file's 9.weight.*have no counterpart"),
    # only the classifier may differ, and only in its number of classes
    (lambda path, wide: torch.save(_changed(wide, "0.weight", (7, 3, 3, 3)), path),
     r"0.weight has shape \(7, 3, 3, 3\) in the file, \(4, 3, 3, 3\)"),
    (lambda path, wide: torch.save(_changed(wide, "11.weight", (10, 5)), path),
     r"11.weight has shape \(10, 5\) in the file, \(10, 4\)"),
])
def test_weights_that_do_not_fit_are_one_line(tmp_path, wide_file, make_file, message):
    path = tmp_path / "w.pt"
    make_file(path, wide_file)
    with pytest.raises(AugLocalError, match=message) as info:
        resolve_model(wide_file, input_size=(3, 8, 8), weights=str(path))
    assert "\n" not in str(info.value)
