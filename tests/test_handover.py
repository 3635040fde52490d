"""The converted network handed to pipeline workers: rebuilt bit for bit, without tracing."""

import pytest
import torch
from torch import fx
from torch.utils._pytree import tree_flatten

from auglocal_fx import to_local
from auglocal_fx._handover import pack_network, unpack_network


@pytest.mark.parametrize("spec, kwargs", [
    ("paper:resnet32", dict(d=2)),
    ("timm:regnetx_002", dict(d=3, input_size=(3, 64, 64), aux_resolution="source")),
])
def test_unpacked_network_is_the_packed_one_and_nothing_is_traced(spec, kwargs, monkeypatch):
    local = to_local(spec, **kwargs)
    data = pack_network(local)
    traced = []
    real = fx.Tracer.trace
    monkeypatch.setattr(fx.Tracer, "trace", lambda self, *a, **k: traced.append(1) or real(self, *a, **k))
    again = unpack_network(data)
    assert traced == []  # pickle's own GraphModule path traces every graph again
    ours, theirs = local.state_dict(), again.state_dict()
    assert list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    # The primary blocks still share their tensors with the original model (export, strict load).
    assert {id(p) for p in again.export().parameters()} <= {id(p) for p in again.parameters()}
    assert [a.reductions for a in again.aux] == [a.reductions for a in local.aux]
    x = torch.randn(2, *local.input_size)
    for mode in (True, False):
        torch.manual_seed(0)
        expected = tree_flatten(local.train(mode)(x))[0]
        torch.manual_seed(0)
        got = tree_flatten(again.train(mode)(x))[0]
        assert all(torch.equal(a, b) for a, b in zip(expected, got)), f"train={mode}"
