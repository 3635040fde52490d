"""Shapes and shape-only values are recorded with the input's data on meta tensors, and for
real where meta tensors cannot run the model; either way the converted network is exact."""

from typing import List

import pytest
import torch
from torch import nn

from auglocal_fx import _meta_run, to_local
from auglocal_fx.tracing import SHAPE_KEY, trace_model

from .conftest import batch

SIZE = (3, 16, 16)


class _Probe(nn.Module):
    """A layer that notes the device of every input it is given (``seen``)."""

    def __init__(self, dim: int, seen: List[str], read_value: bool = False):
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.seen, self.read_value = seen, read_value

    def forward(self, x):
        self.seen.append(x.device.type)
        if self.read_value and x.abs().sum().item() < 0:  # reads the data: no meta tensor can
            return x
        return x + self.fc(x)


class _ShapeValueNet(nn.Module):
    """Blocks fed a position table built from the input's grid on the input's device (a rotary
    table); a class token concatenated (a list argument, a parameter beside data) and a keyword
    tensor argument."""

    def __init__(self, seen: List[str], read_value: bool = False, dim: int = 8, depth: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 4, stride=4)
        self.token = nn.Parameter(torch.randn(1, 1, dim))
        # Only the first block reads the data: auxiliary networks copy later ones, and adapting a
        # copy runs it on meta tensors too.
        self.probes = nn.ModuleList(_Probe(dim, seen, read_value and k == 0) for k in range(depth))
        self.fc = nn.Linear(dim, 5)

    def forward(self, x):
        x = self.stem(x)
        grid = x.shape[2:]
        positions = torch.arange(grid[0] * grid[1] + 1, dtype=x.dtype, device=x.device)
        positions = (1.0 + positions / positions.numel()).reshape(1, -1, 1)
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.token.expand(x.shape[0], -1, -1), x], dim=1)
        for probe in self.probes:
            x = probe(torch.mul(x, other=positions))
        return self.fc(x.mean(1))


@pytest.mark.parametrize("real_nodes,devices", [(3, {"meta"}), (9, {"cpu", "meta"}), (1000, {"cpu"})])
def test_run_goes_on_meta_tensors_after_real_ones(monkeypatch, real_nodes, devices):
    """A run that computes its first nodes for real and the rest on meta tensors (a clock that
    ticks once a node) records what a real run does."""
    ticks = iter(range(10**6))
    monkeypatch.setattr(_meta_run, "perf_counter", lambda: next(ticks))
    monkeypatch.setattr(_meta_run, "REAL_SECONDS", real_nodes)
    monkeypatch.setattr(_meta_run, "META_SECONDS_PER_NODE", 0.0)
    seen: List[str] = []
    model = _ShapeValueNet(seen)
    local = to_local(model, d=2, input_size=SIZE, leaf_modules=[_Probe])
    assert set(seen) == devices
    assert len(local.blocks) == 5
    assert all(b.device.type == "cpu" for b in local.buffers())
    assert _exact(model, local, batch(SIZE, n=3)[0])


def _all_on_meta(monkeypatch):
    monkeypatch.setattr(_meta_run, "REAL_SECONDS", 0.0)
    monkeypatch.setattr(_meta_run, "META_SECONDS_PER_NODE", 0.0)


def _exact(model, local, x):
    model.eval()
    local.eval()
    with torch.no_grad():
        return torch.equal(local(x), model(x))


def test_conversion_computes_no_data(monkeypatch):
    _all_on_meta(monkeypatch)  # a network this small would run for real
    seen: List[str] = []
    model = _ShapeValueNet(seen)
    local = to_local(model, d=2, input_size=SIZE, leaf_modules=[_Probe])
    # Shapes once, shape-only values at two batch sizes: four blocks each time, all on meta.
    assert seen == ["meta"] * 12
    assert len(local.blocks) == 5  # the table is a constant: the stem, then one block per probe
    # The constant was computed for real, on the input's device, not on the meta device.
    assert all(b.device.type == "cpu" for b in local.buffers())
    assert _exact(model, local, batch(SIZE, n=3)[0])


def test_data_read_at_conversion_runs_for_real(monkeypatch):
    _all_on_meta(monkeypatch)
    seen: List[str] = []
    model = _ShapeValueNet(seen, read_value=True)
    local = to_local(model, d=2, input_size=SIZE, leaf_modules=[_Probe])
    assert "cpu" in seen  # the meta run failed at the first probe; the real one ran
    assert len(local.blocks) == 5
    assert _exact(model, local, batch(SIZE)[0])


def test_shapes_are_those_of_a_real_run(tiny_resnet, monkeypatch):
    """Every module's recorded output shape, against the original model run eagerly."""
    _all_on_meta(monkeypatch)
    model = _ShapeValueNet([])
    for net in (model, tiny_resnet):
        net.eval()
        size = SIZE if net is model else (3, 12, 12)
        shapes = {}
        hooks = [m.register_forward_hook(lambda m, i, o, name=name: shapes.__setitem__(name, o.shape))
                 for name, m in net.named_modules() if name]
        with torch.no_grad():
            net(torch.randn(1, *size))
        for hook in hooks:
            hook.remove()
        traced = trace_model(net, size, leaf_modules=[_Probe])
        recorded = {n.target: n.meta[SHAPE_KEY] for n in traced.eval_graph.graph.nodes
                    if n.op == "call_module"}
        assert recorded and all(shapes[name] == shape for name, shape in recorded.items())


class _CachedTable(nn.Module):
    """Builds a table for the input's size on its first call and keeps it (a plain attribute)."""

    def __init__(self):
        super().__init__()
        self.table = None

    def forward(self, x):
        if self.table is None:
            self.table = torch.linspace(1.0, 2.0, x.shape[-1], device=x.device)
        return x * self.table


class _CachingNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(c, 8, 3, padding=1) for c in (3, 8, 8, 8))
        self.scale = _CachedTable()
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        for conv in self.convs:
            x = torch.relu(conv(x))
        return self.fc(self.scale(x).mean((2, 3)))


def test_attributes_set_on_meta_tensors_are_put_back(monkeypatch):
    _all_on_meta(monkeypatch)
    model = _CachingNet()
    local = to_local(model, d=2, input_size=(3, 8, 8), leaf_modules=[_CachedTable])
    assert model.scale.table is None  # the meta run left no meta table behind
    assert _exact(model, local, batch((3, 8, 8))[0])
