"""FLOP counting (fvcore convention: one multiply-add = one FLOP); budget solving is in test_budget.py."""

import json
import os

import pytest
import torch
from torch import nn

from auglocal_fx import AugLocalError, to_local
from auglocal_fx.flops import LocalFlops, count_flops, count_module_flops

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
    real = flops_module.count_module_flops

    def counting(module, *args, **kwargs):
        counted.append(module)
        return real(module, *args, **kwargs)

    monkeypatch.setattr(flops_module, "count_module_flops", counting)
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
