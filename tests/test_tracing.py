"""Tracing: train/eval fidelity, untraceable pieces, training-only outputs."""

import warnings

import pytest
import torch
from torch import nn

from auglocal_fx import AugLocalError, load, to_local
from auglocal_fx.tracing import trace_model

from .conftest import batch


class _TrainOnlyScale(nn.Module):
    def forward(self, x):
        if self.training:  # a training-only branch outside any leaf module
            x = x * 0.5
        return x


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return self.conv(x)
        return -self.conv(x)


class _Net(nn.Module):
    def __init__(self, middle: nn.Module):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.c1 = nn.Conv2d(8, 8, 3, padding=1)
        self.middle = middle
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.middle(torch.relu(self.c1(torch.relu(self.stem(x)))))
        x = torch.relu(self.c2(x))
        return self.fc(x.mean((2, 3)))


class _RootUntraceable(_Net):
    def forward(self, x):
        if x.shape[-1] > 8 and x.sum() > 0:
            return super().forward(x)
        return super().forward(-x)


def test_train_mode_branch_kept():
    model = _Net(_TrainOnlyScale())
    local = to_local(model, d=2, input_size=(3, 16, 16))
    x, _ = batch((3, 16, 16))
    model.train()
    local.train()
    h = x
    for block in local.blocks:
        h = block(h)
    assert torch.equal(local.head(h), model(x))
    model.eval()
    local.eval()
    assert torch.equal(local(x), model(x))
    assert not torch.equal(model.train()(x), model.eval()(x))


def test_untraceable_submodule_becomes_leaf():
    model = _Net(_Untraceable())
    with pytest.warns(UserWarning, match="'middle' cannot be traced"):
        local = to_local(model, d=2, input_size=(3, 16, 16))
    x, _ = batch((3, 16, 16))
    model.eval()
    local.eval()
    assert torch.equal(local(x), model(x))


def test_untraceable_root_names_the_fix():
    with pytest.raises(AugLocalError, match="leaf_modules="):
        to_local(_RootUntraceable(nn.Identity()), input_size=(3, 16, 16))


def test_user_leaf_by_name():
    model = _Net(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()))
    plain = to_local(model, d=2, input_size=(3, 16, 16))
    leaf = to_local(model, d=2, input_size=(3, 16, 16), leaf_modules=["middle"])
    assert len(leaf.blocks) == len(plain.blocks)
    traced = trace_model(model, (3, 16, 16), leaf_modules=["middle"])
    assert any(n.target == "middle" for n in traced.eval_graph.graph.nodes)


def test_training_only_outputs_dropped_with_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        local = to_local("torchvision:googlenet", d=2, input_size=(3, 64, 64), num_classes=5)
    assert any("auxiliary logits" in str(w.message) for w in caught)
    local.train()
    logits, aux = local(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 5) and len(aux) == local.num_local - 1


def test_model_mode_and_buffers_untouched():
    model = _Net(_TrainOnlyScale())
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trace_model(model, (3, 16, 16))
    assert not model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_train_graph_saved_once_and_restored(tmp_path):
    model = _Net(_TrainOnlyScale())
    local = to_local(model, d=2, input_size=(3, 16, 16))
    keys = list(local.state_dict())
    assert any(k.startswith("blocks.") and ".eval_graph." in k for k in keys)
    assert not any(".train_graph." in k for k in keys)  # shared tensors are saved once
    assert any(b.train_graph is not None for b in list(local.blocks) + [local.head])
    path = tmp_path / "m.pt"
    local.save(path)
    again = load(path, model=_Net(_TrainOnlyScale()))
    x, _ = batch((3, 16, 16))

    def primary(net):
        h = x
        for block in net.blocks:
            h = block(h)
        return net.head(h)

    again.train()
    local.train()
    assert torch.equal(primary(again), primary(local))
