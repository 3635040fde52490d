"""Transformers, hybrids and the blocks that cannot be re-strided: partition, adapters, heads."""

import warnings

import pytest
import timm
import torch
from torch import nn

from auglocal_fx import AugLocalError, resolve_model, to_local
from auglocal_fx.layouts import NCHW, NHWC, TOKENS, ShapeAdapter, grid_size, layout_of
from auglocal_fx.partition import partition_blocks
from auglocal_fx.synthesis import SLIM_WIDTH, choose_aux_head
from auglocal_fx.tracing import trace_model

from .conftest import batch
from .test_sweep import check_local


def _vit(**kwargs):
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=4,
                             num_classes=5, **kwargs)


def test_vit_blocks_and_head():
    part = partition_blocks(trace_model(_vit(), (3, 32, 32)))
    # the patch embedding (a linear map) joins the first transformer block
    assert part.block_names[0][0].startswith("patch_embed")
    assert part.block_names[0][-1] == "blocks.0"
    assert part.block_names[1:] == [["blocks.1"], ["blocks.2"], ["blocks.3"]]
    assert part.head_names == ["norm", "fc_norm", "head_drop", "head"]  # final norm + pooling + fc
    assert part.block_shapes == [(17, 192)] * 4  # class token + 4x4 grid
    assert part.resolutions == [4] * 4


@pytest.mark.parametrize("d", [2, 3])
def test_vit_with_dropout_and_drop_path_keeps_every_guarantee(d):
    """Train-mode fidelity with stochastic layers: same seed, same output as the original."""
    model = _vit(drop_rate=0.1, drop_path_rate=0.2, attn_drop_rate=0.1, proj_drop_rate=0.1)
    local = to_local(model, d=d, input_size=(3, 32, 32))
    check_local(model, local, (3, 32, 32), 5,
                lambda: _vit(drop_rate=0.1, drop_path_rate=0.2, attn_drop_rate=0.1,
                             proj_drop_rate=0.1))


def test_isotropic_vit_copies_need_no_adapter():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no adapter warning: widths and grids agree
        local = to_local(_vit(), d=3, input_size=(3, 32, 32))
    for aux in local.aux:
        assert not any(isinstance(m, ShapeAdapter) for m in aux.modules())


def test_an_auxiliary_head_keeps_its_selected_token_not_the_token_map():
    """The class token selected from the normed tokens is copied out of them (issue 22): the
    BatchNorm1d and classifier after it keep an ``(N, C)`` row, so the ``(N, T, C)`` map is held
    once (the final norm's input), not a second time through the view ``x[:, 0]``."""
    head = to_local(_vit(), d=2, input_size=(3, 32, 32)).aux[0][-1].train()
    tokens = torch.randn(2, 17, 192, requires_grad=True)
    params = {p.untyped_storage().data_ptr() for p in head.parameters()}
    held = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            held[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        head(tokens)
    token_map = tokens.numel() * tokens.element_size()
    assert token_map <= sum(held.values()) < 1.5 * token_map


def test_swin_blocks_merge_patch_merging_into_the_next_block():
    resolved = resolve_model("timm:swin_tiny_patch4_window7_224", num_classes=5,
                             input_size=(3, 56, 56))
    part = partition_blocks(trace_model(resolved.model, resolved.input_size))
    assert len(part.blocks) == 12  # depths 2, 2, 6, 2: one block per transformer block
    # patch embedding and patch merging (linear) join the transformer block after them
    assert part.block_names[0] == ["patch_embed", "layers.0.downsample", "layers.0.blocks.0"]
    assert part.block_names[2] == ["layers.1.downsample", "layers.1.blocks.0"]
    assert part.head_names == ["norm", "head"]
    assert part.input_layouts[1:-1] == [NHWC] * 11
    assert part.resolutions == [14, 14, 7, 7, 4, 4, 4, 4, 4, 4, 2, 2]


def test_adapter_warning_names_modules_never_fx_nodes():
    resolved = resolve_model("timm:swin_tiny_patch4_window7_224", num_classes=5,
                             input_size=(3, 56, 56))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        local = to_local(resolved.model, d=3, input_size=resolved.input_size)
    messages = [str(w.message) for w in caught if "auxiliary copies" in str(w.message)]
    assert len(messages) == 1  # one warning per conversion
    assert "layers.3.blocks.1" in messages[0] and "%" not in messages[0]
    adapters = [m for aux in local.aux for m in aux.modules() if isinstance(m, ShapeAdapter)]
    assert adapters and all(a.out_layout == NHWC for a in adapters)


class _ChannelShuffleNet(nn.Module):
    """A hand-written ShuffleNet-style network whose units shuffle channels with ``permute``."""

    def __init__(self, num_classes=5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.units = nn.ModuleList()
        for stride, width in ((1, 16), (2, 32), (1, 32), (2, 64), (1, 64)):
            self.units.append(_ShuffleUnit(stride, width))
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.stem(x)
        for unit in self.units:
            x = unit(x)
        return self.fc(x.mean((2, 3)))


class _ShuffleUnit(nn.Module):
    def __init__(self, stride, width):
        super().__init__()
        self.stride = stride
        self.branch = nn.Sequential(
            nn.Conv2d(width // 2 if stride == 1 else width // 2, width // 2, 1), nn.BatchNorm2d(width // 2),
            nn.ReLU(), nn.Conv2d(width // 2, width // 2, 3, stride, 1, groups=width // 2),
            nn.BatchNorm2d(width // 2), nn.Conv2d(width // 2, width // 2, 1), nn.ReLU())
        self.down = nn.Conv2d(width // 2, width // 2, 3, stride, 1) if stride == 2 else None

    def forward(self, x):
        n, c, h, w = x.shape
        if self.stride == 1:
            a, b = x.chunk(2, dim=1)
            x = torch.cat([a, self.branch(b)], 1)
        else:
            x = x[:, : self.branch[0].in_channels]
            x = torch.cat([self.down(x), self.branch(x)], 1)
        c = x.shape[1]
        # channel shuffle through permute (not view/transpose)
        x = x.reshape(n, 2, c // 2, x.shape[2], x.shape[3]).permute(0, 2, 1, 3, 4)
        return x.reshape(n, c, x.shape[3], x.shape[4])


def test_channel_shuffle_with_permute_converts_with_a_documented_fallback():
    model = _ChannelShuffleNet()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        local = to_local(model, d=3, input_size=(3, 16, 16))
    messages = [str(w.message) for w in caught]
    assert all("%" not in m for m in messages)
    # the fallback of docs/method.md rule 11, announced with the module it applies to
    assert any("(units.2)" in m and "average pooling + a linear projection" in m for m in messages), messages
    check_local(model, local, (3, 16, 16), 5, _ChannelShuffleNet)


def test_shape_adapter_layouts():
    tokens = torch.randn(2, 1 + 16, 8)  # class token + 4x4 grid
    adapter = ShapeAdapter((17, 8), TOKENS, (2, 2, 12), NHWC).eval()
    assert adapter(tokens).shape == (2, 2, 2, 12)
    adapter = ShapeAdapter((8, 4, 4), NCHW, (5, 6), TOKENS).eval()  # 1 prefix token + 2x2
    assert adapter(torch.randn(2, 8, 4, 4)).shape == (2, 5, 6)
    same = ShapeAdapter((8, 4, 4), NCHW, (8, 2, 2), NCHW)
    assert not list(same.parameters())  # pooling only: nothing to learn
    assert grid_size((197, 192), TOKENS) == (1, 14, 14)
    assert grid_size((198, 192), TOKENS) == (2, 14, 14)
    assert layout_of((56, 56, 96)) == NHWC and layout_of((96, 56, 56)) == NCHW


class _DefaultedArguments(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv3 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x, attn_mask=None, is_causal=False, scale=1.0):
        x = torch.relu(self.conv(x))
        x = torch.relu(self.conv2(x)) * scale
        x = torch.relu(self.conv3(x))
        return self.fc(x.mean((2, 3)))


def test_forward_arguments_with_defaults_are_not_inputs():
    model = _DefaultedArguments()
    local = to_local(model, d=2, input_size=(3, 8, 8)).eval()
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(local(x), model.eval()(x))


def test_slim_heads_for_heads_that_dominate():
    resolved = resolve_model("torchvision:vgg11", num_classes=10, input_size=(3, 32, 32))
    local = to_local(resolved.model, d=4, input_size=resolved.input_size)
    assert local.options["aux_head"] == "auto"
    assert choose_aux_head(local.partition, "auto") == "slim"
    primary = sum(p.numel() for p in resolved.model.parameters())
    aux = sum(p.numel() for a in local.aux for p in a.parameters())
    assert aux <= primary
    head = local.aux[0][-1]
    widths = [m.out_features for m in head.modules() if isinstance(m, nn.Linear)]
    assert widths == [SLIM_WIDTH, SLIM_WIDTH, 10]
    assert sum(isinstance(m, nn.BatchNorm1d) for m in head.modules()) == 2
    x, y = batch(resolved.input_size, num_classes=10)
    assert torch.isfinite(local.train().train_step(x, y)).all()


def test_pre_logits_mlp_is_part_of_the_head():
    resolved = resolve_model("timm:vgg11", num_classes=10, input_size=(3, 32, 32))
    part = partition_blocks(trace_model(resolved.model, resolved.input_size))
    assert "pre_logits" in part.head_names
    assert not any("pre_logits" in name for names in part.block_names for name in names)
    assert len(part.blocks) == 8  # vgg11's eight convolutions


def test_small_heads_are_copied_and_the_option_is_checked(tiny_resnet):
    local = to_local(tiny_resnet, d=2, input_size=(3, 16, 16))
    assert choose_aux_head(local.partition, "auto") == "copy"
    slim = to_local(tiny_resnet, d=2, input_size=(3, 16, 16), aux_head="slim")
    assert isinstance(slim.aux[0][-1], nn.Sequential)
    with pytest.raises(AugLocalError, match="unknown auxiliary head"):
        to_local(tiny_resnet, d=2, input_size=(3, 16, 16), aux_head="wide")


def test_aux_head_survives_save_and_load(tmp_path):
    local = to_local("paper:resnet32", d=2, aux_head="slim")
    path = tmp_path / "net.pt"
    local.save(path)
    from auglocal_fx import load

    again = load(path)
    assert again.options["aux_head"] == "slim"
    assert isinstance(again.aux[0][-1], nn.Sequential)
