"""FLOP counting (fvcore convention: one multiply-add = one FLOP); budget solving is in test_budget.py."""

import json
import os

import pytest
import torch
from torch import nn

from auglocal_fx import AugLocalError, to_local
from auglocal_fx.flops import LocalFlops, count_flops, count_module_flops

# Module fixtures (the counted models) are built once per process: under
# `pytest -n`, these tests stay on one worker.
pytestmark = pytest.mark.xdist_group("flops")

TINY = os.path.join(os.path.dirname(__file__), "_tiny_models.py") + ":tiny_cnn"


@pytest.fixture(scope="module")
def resnet32_d3():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return to_local("paper:resnet32", d=3)
    finally:
        torch.set_num_threads(threads)


def test_conv_and_linear_counts_are_multiply_adds():
    conv = nn.Conv2d(3, 16, 3, padding=1, bias=False)
    flops, unsupported = count_module_flops(conv, (3, 32, 32))
    assert flops == 16 * 32 * 32 * 3 * 3 * 3
    assert not unsupported
    flops, _ = count_module_flops(nn.Linear(64, 10), (64,))
    assert flops == 640


def test_cache_is_per_architecture_and_shape():
    a, b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
    assert count_module_flops(a, (4, 8, 8))[0] == count_module_flops(b, (4, 8, 8))[0]
    assert count_module_flops(a, (4, 16, 16))[0] == 4 * count_module_flops(a, (4, 8, 8))[0]
    wider = nn.Conv2d(4, 8, 3, padding=1)
    assert count_module_flops(wider, (4, 8, 8))[0] == 2 * count_module_flops(a, (4, 8, 8))[0]


def test_cache_sees_plain_attributes():
    class Upsampled(nn.Module):
        def __init__(self, factor):
            super().__init__()
            self.factor = factor  # not in any extra_repr, but changes the conv's FLOPs
            self.conv = nn.Conv2d(2, 2, 3, padding=1, bias=False)

        def forward(self, x):
            return self.conv(nn.functional.interpolate(x, scale_factor=self.factor))

    once, _ = count_module_flops(Upsampled(1), (2, 8, 8))
    twice, _ = count_module_flops(Upsampled(2), (2, 8, 8))
    conv = 2 * 8 * 8 * 2 * 9  # at 8x8; fvcore adds the upsampling's outputs
    assert conv <= once < 2 * conv
    assert 4 * conv <= twice < 8 * conv


def test_uncounted_operators_are_listed():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return x + self.conv(x)

    _, unsupported = count_module_flops(Residual(), (4, 8, 8))
    assert unsupported["aten::add"] == 1


def test_count_flops_is_lazy(resnet32_d3, monkeypatch):
    import auglocal_fx.flops as flops_module

    counted = []
    real = flops_module._count_module

    def counting(module, *args, **kwargs):
        counted.append(module)
        return real(module, *args, **kwargs)

    monkeypatch.setattr(flops_module, "_count_module", counting)
    flops = LocalFlops(resnet32_d3)
    assert counted == []  # nothing runs until the first query
    aux = {id(net) for net in resnet32_d3.aux}
    flops.primary
    assert {id(b) for b in resnet32_d3.blocks} <= {id(c) for c in counted}
    assert not aux & {id(c) for c in counted}  # the primary only
    flops.total
    assert aux <= {id(c) for c in counted}
    calls = len(counted)
    flops.total
    flops.primary
    flops.blocks, flops.head, flops.aux, flops.unsupported_ops()
    assert len(counted) == calls  # cached


def test_primary_equals_fvcore_on_the_original_model(resnet32_d3):
    from fvcore.nn import FlopCountAnalysis

    flops = count_flops(resnet32_d3)
    original = resnet32_d3.export().eval()
    analysis = FlopCountAnalysis(original, torch.zeros(1, 3, 32, 32))
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    assert flops.primary == analysis.total()
    assert len(flops.blocks) == 16
    assert len(flops.aux) == resnet32_d3.num_local - 1
    assert flops.total == flops.primary + sum(a.flops for a in flops.aux)
    assert flops.params_primary == sum(p.numel() for p in original.parameters())
    assert flops.params_aux == sum(p.numel() for p in resnet32_d3.aux.parameters())
    assert flops.unsupported_ops()["aten::add"] > 0  # residual additions: listed, not dropped


def test_counting_runs_each_module_once_in_fvcores_trace_only(resnet32_d3):
    calls = {}
    modules = list(resnet32_d3.blocks) + [resnet32_d3.head] + [m for net in resnet32_d3.aux for m in net]
    handles = [m.register_forward_hook(lambda m, i, o: calls.__setitem__(id(m), calls.get(id(m), 0) + 1))
               for m in modules]
    try:
        count_flops(resnet32_d3).as_dict()
    finally:
        for handle in handles:
            handle.remove()
    # an uncached module runs once, inside fvcore's trace; a cached one does not run at all
    assert calls and max(calls.values()) == 1
    assert len(calls) < len(modules)  # repeated blocks and copies hit the cache


def _count_traces(monkeypatch):
    """Record ``(module, input shape)`` of every fvcore analysis made from now on."""
    import fvcore.nn

    traced = []
    real = fvcore.nn.FlopCountAnalysis

    def analysis(module, inputs):
        traced.append((module, tuple(inputs[0].shape[1:])))
        return real(module, inputs)

    monkeypatch.setattr(fvcore.nn, "FlopCountAnalysis", analysis)
    return traced


def test_each_analysis_counts_with_its_own_cache(resnet32_d3, monkeypatch):
    # Two analyses of one network share nothing unless given one cache: the second traces as
    # many modules as the first. Given the first's cache, it traces none.
    from auglocal_fx.flops import FlopCache

    traced = _count_traces(monkeypatch)
    first = count_flops(resnet32_d3).as_dict()
    once = len(traced)
    assert once > 0
    assert count_flops(resnet32_d3).as_dict() == first
    assert len(traced) == 2 * once
    cache = FlopCache()
    count_flops(resnet32_d3, cache).total
    assert len(traced) == 3 * once and len(cache) > 0
    assert count_flops(resnet32_d3, cache).as_dict() == first
    assert len(traced) == 3 * once


def _fvcore_direct(module, shape):
    """fvcore on ``module`` itself (eval mode, batch 1): total and operators left uncounted."""
    from fvcore.nn import FlopCountAnalysis

    training = module.training
    module.eval()
    try:
        analysis = FlopCountAnalysis(module, torch.randn(1, *shape))
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        analysis.tracer_warnings("none")
        return analysis.total(), dict(analysis.unsupported_ops())
    finally:
        module.train(training)


@pytest.mark.parametrize("spec, d, size", [
    ("paper:resnet32", 3, None),
    ("timm:regnetx_002", 6, (3, 64, 64)),
    ("timm:mobilenetv2_050", 4, (3, 64, 64)),
    ("timm:vit_tiny_patch16_224", 2, None),
])
def test_every_count_equals_fvcore_run_on_that_module(spec, d, size):
    # Independent reference: fvcore run directly on each primary block, the head, each whole
    # auxiliary network and the exported original, at the input shapes a forward pass gives;
    # our counts chain shapes from the counts and count auxiliary networks child by child.
    from fvcore.nn import FlopCountAnalysis

    local = to_local(spec, d=d, input_size=size).eval()
    flops = count_flops(local)
    with torch.no_grad():
        h = torch.randn(1, *local.input_size)
        outputs, unsupported = [], {}
        for j, block in enumerate(local.blocks):
            expected, ops = _fvcore_direct(block, tuple(h.shape[1:]))
            assert flops.blocks[j].flops == expected, f"block {j}"
            assert flops.blocks[j].input_shape == tuple(h.shape[1:])
            h = block(h)
            assert flops.blocks[j].output_shape == tuple(h.shape[1:])
            outputs.append(tuple(h.shape[1:]))
            for k, v in ops.items():
                unsupported[k] = unsupported.get(k, 0) + v
        assert flops.head.flops == _fvcore_direct(local.head, tuple(h.shape[1:]))[0]
        assert flops.head.output_shape == tuple(local.head(h).shape[1:])
        for cost, net in zip(flops.aux, local.aux):
            expected, ops = _fvcore_direct(net, outputs[cost.block])
            assert cost.flops == expected, f"auxiliary network {cost.block}"
            for k, v in ops.items():
                unsupported[k] = unsupported.get(k, 0) + v
        for k, v in _fvcore_direct(local.head, tuple(h.shape[1:]))[1].items():
            unsupported[k] = unsupported.get(k, 0) + v
    assert dict(flops.unsupported_ops()) == unsupported
    original = local.export().eval()
    analysis = FlopCountAnalysis(original, torch.randn(1, *local.input_size))
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    assert flops.primary == analysis.total()


def test_as_dict_is_json_with_integer_flops(resnet32_d3):
    summary = json.loads(json.dumps(count_flops(resnet32_d3).as_dict()))
    for key in ("primary", "aux", "total"):
        assert isinstance(summary["flops"][key], int)
    assert summary["flops"]["total"] == summary["flops"]["primary"] + summary["flops"]["aux"]
    assert [a["block"] for a in summary["aux_nets"]] == list(range(len(summary["aux_nets"])))
    assert "aten::add" in summary["unsupported_ops"]


def test_count_flops_rejects_a_plain_model():
    with pytest.raises(AugLocalError, match="to_local"):
        count_flops(nn.Linear(2, 2))
