"""Block counts of the paper's networks and the torchvision ones the issue names."""

import pytest
import torch
from torch import nn

from auglocal_fx import AugLocalError, resolve_model, to_local
from auglocal_fx.partition import find_cut_points, partition_blocks
from auglocal_fx.tracing import trace_model


@pytest.mark.parametrize("spec,size,expected", [
    ("paper:resnet32", 32, 16),
    ("paper:resnet110", 32, 55),
    ("paper:vgg19", 32, 16),
    ("torchvision:resnet34", 64, 17),
    ("torchvision:resnet101", 64, 34),
    ("torchvision:vgg13", 64, 10),
    ("torchvision:vgg13_bn", 64, 10),
])
def test_block_counts(spec, size, expected):
    resolved = resolve_model(spec, input_size=(3, size, size), num_classes=10)
    part = partition_blocks(trace_model(resolved.model, resolved.input_size))
    assert len(part.blocks) == expected


def test_resnet_blocks_are_residual_blocks():
    resolved = resolve_model("paper:resnet32")
    part = partition_blocks(trace_model(resolved.model, resolved.input_size))
    assert part.block_names[0] == ["conv1", "bn1", "relu"]
    assert part.block_names[1:] == [[f"layer{s}.{b}"] for s in (1, 2, 3) for b in range(5)]
    assert part.head_names == ["avgpool", "fc"]
    assert part.resolutions == [32] * 6 + [16] * 5 + [8] * 5


def test_squeezenet_head_starts_at_conv_classifier():
    resolved = resolve_model("torchvision:squeezenet1_0", input_size=(3, 64, 64), num_classes=10)
    part = partition_blocks(trace_model(resolved.model, resolved.input_size))
    assert part.head_names == ["classifier.1", "classifier.2", "classifier.3"]


def test_cut_points_skip_residual_interior(tiny_resnet):
    traced = trace_model(tiny_resnet, (3, 16, 16))
    cuts = find_cut_points(traced.eval_graph.graph)
    # x, stem (conv, bn, relu), block a, block b, block c, pool, flatten, fc, dropout
    names = [c.name for c in cuts]
    assert "a1" not in names and "b1" not in names  # inside residual blocks
    part = partition_blocks(traced)
    assert len(part.blocks) == 4


def test_block_boundaries_override(tiny_resnet):
    traced = trace_model(tiny_resnet, (3, 16, 16))
    part = partition_blocks(traced, block_boundaries=["stem"])
    assert len(part.blocks) == 2  # the stem, then everything up to the head
    with pytest.raises(AugLocalError, match="not a block boundary"):
        partition_blocks(traced, block_boundaries=["a1"])
    with pytest.raises(AugLocalError, match="names no module"):
        partition_blocks(traced, block_boundaries=["nope"])


class _NoHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x)


def test_no_classifier_head():
    with pytest.raises(AugLocalError, match="no classifier head"):
        trace_model(_NoHead(), (3, 16, 16))


class _Wrapper(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, x):
        return self.inner(x)


def test_a_wrapped_model_keeps_its_blocks():
    resolved = resolve_model("paper:resnet32")
    part = partition_blocks(trace_model(_Wrapper(resolved.model), resolved.input_size))
    assert len(part.blocks) == 16
    assert part.block_names[0] == ["inner.conv1", "inner.bn1", "inner.relu"]


class _Unit(nn.Module):
    """Three residual sums in one forward (as a transformer block adds two): single cuts between
    them lie inside the unit's own code."""

    def __init__(self, hidden):
        super().__init__()
        self.mix = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.mix2 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.mlp = nn.Sequential(nn.Conv2d(8, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, 8, 1))

    def forward(self, x):
        x = x + self.mix(x)
        x = x + self.mix2(x)
        return x + self.mlp(x)


class _WideLastUnit(nn.Module):
    """Four units; the last one's MLP is 32 times wider, so that unit holds 0.57 of the parameters
    (its mix pieces 0.06 each, its MLP 0.45)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.units = nn.Sequential(_Unit(8), _Unit(8), _Unit(8), _Unit(256))
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.units(self.stem(x)).mean((2, 3)))


def test_a_unit_over_a_third_is_cut_between_its_residual_sums():
    from .test_sweep import check_local

    torch.manual_seed(0)
    model = _WideLastUnit()
    part = partition_blocks(trace_model(model.eval(), (3, 8, 8)))
    # units under a third stay whole (rule 1); the wide one is cut at its inner single cuts, its
    # two small pieces joined (together under a third), the MLP alone
    assert part.block_names == [["stem"], ["units.0"], ["units.1"], ["units.2"],
                                ["units.3.mix", "units.3.mix2"], ["units.3.mlp"]]
    for d in (2, 3):
        local = to_local(model, d=d, input_size=(3, 8, 8))
        assert local.block_names == part.block_names
        check_local(model, local, (3, 8, 8), 5, _WideLastUnit)


class _FiveDimStem(nn.Module):
    """A stem whose values have a dimension more than a map, as csatv2's DCT stem has."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.mix = nn.Conv3d(8, 8, 1)
        self.body = nn.Sequential(*[nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()) for _ in range(3)])
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        folded = torch.relu(self.stem(x)).unsqueeze(2)  # (N, 8, 1, H, W): single cuts follow
        return self.fc(self.body(torch.relu(self.mix(folded)).squeeze(2)).mean((2, 3)))


def test_no_boundary_carries_more_than_a_map():
    # Auxiliary networks, their input adapters and heads take maps, tokens or features: a value
    # with more dimensions is no boundary (csatv2 failed to convert on one).
    from .test_sweep import check_local

    model = _FiveDimStem()
    part = partition_blocks(trace_model(model.eval(), (3, 8, 8)))
    # the cut after the stem's ReLU, not after the unsqueeze that follows it (old: (8, 1, 8, 8))
    assert part.block_names == [["stem"], ["mix"], ["body.0"], ["body.1"], ["body.2"]]
    assert part.output_shapes == [((8, 8, 8),)] * 5
    local = to_local(model, d=2, input_size=(3, 8, 8))
    check_local(model, local, (3, 8, 8), 5, _FiveDimStem)
