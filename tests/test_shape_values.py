"""Shape-only values (a grid size, a position table, the batch size) passed to every block
become constants of the converted network; cuts then carry the features alone."""

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from auglocal_fx import AugLocalError, load, to_local
from auglocal_fx.shape_values import CONSTANT_PREFIX
from auglocal_fx.tracing import trace_model

from .conftest import batch

SIZE = (3, 16, 16)


class _GridBlock(nn.Module):
    """A token block that needs the grid size, the batch size and a position table from outside
    (PVT-v2's feature size, a rotary table)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.dw = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.fc = nn.Linear(dim, dim)

    def forward(self, x, grid, count, positions):
        y = self.norm(x).transpose(1, 2).reshape(count, x.shape[2], grid[0], grid[1])
        y = self.dw(y).flatten(2).transpose(1, 2)
        return x + self.fc(torch.relu(y)) * positions


class _GridNet(nn.Module):
    def __init__(self, dim: int = 8, depth: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 4, stride=4)
        self.pos_embed = nn.Parameter(torch.randn(1, dim, 2, 2))
        self.blocks = nn.ModuleList(_GridBlock(dim) for _ in range(depth))
        self.fc = nn.Linear(dim, 5)

    def forward(self, x):
        x = self.stem(x)
        grid = x.shape[2:]  # shape-only, the same for every batch size
        count = x.shape[0]  # the batch size: must stay free
        positions = torch.arange(grid[0] * grid[1], dtype=x.dtype, device=x.device)
        positions = (1.0 + positions / positions.numel()).reshape(1, -1, 1)
        x = x.flatten(2).transpose(1, 2)
        for k, block in enumerate(self.blocks):
            if k == len(self.blocks) - 1:
                # Computed from a parameter far from the tensor whose size it takes: trained,
                # so never a constant (the frozen grid makes it local to this block).
                pos = F.interpolate(self.pos_embed, size=grid, mode="bilinear", align_corners=False)
                x = x + pos.flatten(2).transpose(1, 2)
            x = block(x, grid, count, positions)
        return self.fc(x.mean(1))


def _exact(model, local, x):
    model.eval()
    local.eval()
    with torch.no_grad():
        return torch.equal(local(x), model(x))


def test_grid_values_become_constants():
    model = _GridNet()
    local = to_local(model, d=2, input_size=SIZE)
    # Without constants the grid, the batch size and the table cross every cut: one block.
    assert len(local.blocks) == 4  # the stem joins the first block
    assert local.blocks[0].input_size == SIZE
    for n in (2, 3, 1):  # the batch dimension stays free
        assert _exact(model, local, batch(SIZE, n=n)[0]), f"batch {n}"
    x, y = batch(SIZE)
    model.train()
    local.train()
    torch.manual_seed(0)
    expected = model(x)
    torch.manual_seed(0)
    h = x
    for block in local.blocks:
        h = block(h)
    assert torch.equal(local.head(h), expected)
    local.zero_grad()
    assert torch.isfinite(local.train_step(x, y)).all()
    assert model.pos_embed.grad is not None and model.pos_embed.grad.abs().sum() > 0


def test_tensor_constants_are_buffers():
    model = _GridNet()
    local = to_local(model, d=2, input_size=SIZE)
    keys = [k for k in local.state_dict() if CONSTANT_PREFIX in k]
    assert keys, "the position table is saved with the network"
    local.to(torch.float64)
    assert all(local.state_dict()[k].dtype == torch.float64 for k in keys)
    # The exported network is the original: nothing of ours in it.
    fresh = _GridNet()
    fresh.load_state_dict(local.export().state_dict(), strict=True)


def test_constants_survive_save_and_load(tmp_path):
    model = _GridNet()
    local = to_local(model, d=2, input_size=SIZE)
    path = tmp_path / "grid.pt"
    local.save(path)
    again = load(path, model=_GridNet())
    x, _ = batch(SIZE)
    local.eval()
    again.eval()
    with torch.no_grad():
        assert torch.equal(again(x), local(x))


def test_other_input_size_refused():
    local = to_local(_GridNet(), d=2, input_size=SIZE)
    local.eval()
    with pytest.raises(AugLocalError, match=r"converted for inputs of size \(3, 16, 16\).*convert"):
        local(torch.randn(2, 3, 32, 32))
    with pytest.raises(AugLocalError, match="convert the model again"):
        local.blocks[0](torch.randn(2, 3, 24, 24))


def test_trained_position_embedding_is_followed():
    model = _GridNet()
    local = to_local(model, d=2, input_size=SIZE)
    with torch.no_grad():
        model.pos_embed.add_(1.0)  # as a training step would: the converted network follows
    assert _exact(model, local, batch(SIZE)[0])


def test_networks_without_shape_values_take_any_size(tiny_resnet):
    local = to_local(tiny_resnet, d=2, input_size=(3, 16, 16))
    assert local.blocks[0].input_size is None
    assert _exact(tiny_resnet, local, torch.randn(2, 3, 24, 24))


@fx.wrap
def _pool_with_size(x):
    # An untraced function returning a size beside the tensor (MViT-v2's reshape_post_pool).
    y = F.avg_pool2d(x, 2)
    return y, y.shape[-1]


@fx.wrap
def _pool_with_count(x):
    # ... or a number computed from the data, which no constant may replace (the same at
    # both batch sizes, for most images).
    return F.avg_pool2d(x, 2), int((x > 0).float().mean() * 2) + 1


class _OpaqueNet(nn.Module):
    def __init__(self, from_data: bool):
        super().__init__()
        self.from_data = from_data
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.convs = nn.ModuleList(nn.Conv2d(8, 8, 3, padding=1) for _ in range(3))
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        # fx.wrap records calls by their global name: each function is called by its name.
        x, value = _pool_with_count(x) if self.from_data else _pool_with_size(x)
        for conv in self.convs:
            x = torch.relu(conv(x)) * value
        return self.fc(x.mean((2, 3)))


def test_size_returned_by_untraced_function():
    model = _OpaqueNet(from_data=False).eval()
    traced = trace_model(model, SIZE)
    assert traced.frozen > 0
    local = to_local(model, d=2, input_size=SIZE)
    assert len(local.blocks) == 4
    assert _exact(model, local, batch(SIZE)[0])


def test_number_computed_from_data_stays_computed():
    model = _OpaqueNet(from_data=True).eval()
    traced = trace_model(model, SIZE)
    assert traced.frozen == 0
    with torch.no_grad():
        for seed in range(4):  # other data give other counts
            x = torch.randn(2, *SIZE, generator=torch.Generator().manual_seed(seed)) * 2 + seed - 2
            assert torch.equal(traced.eval_graph(x), model(x)), seed
