"""Heads that are no cut point: a token selection the classifier reads starts the head.

Hand-written networks with the head forms of timm's VOLO (a class-token head plus an
auxiliary head on every token), CoaT (class tokens of several streams, aggregated) and
CrossViT (two streams from the input to a head taking both), and parameters shared between blocks (CoaT's position
encodings).
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from auglocal_fx import AugLocalError, resolve_model, to_local
from auglocal_fx.partition import partition_blocks
from auglocal_fx.tracing import trace_model

from .test_sweep import check_local

DIM = 8
SIZE = (3, 16, 16)
CLASSES = 5


class Mix(nn.Module):
    """A residual token MLP (the repeated unit)."""

    def __init__(self, dim: int = DIM):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class Embed(nn.Module):
    """Patches with a squeeze-excitation (a global pooling that is no head) and a class token."""

    def __init__(self, dim: int = DIM, stride: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(3, dim, stride, stride=stride)
        self.se = nn.Conv2d(dim, dim, 1)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))

    def forward(self, x):
        x = self.conv(x)
        x = x * torch.sigmoid(self.se(x.mean((2, 3), keepdim=True)))
        x = x.flatten(2).transpose(1, 2)
        return torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)


class AuxTokenHead(nn.Module):
    """VOLO's head: the class token's logits plus half the max over every token's logits."""

    def __init__(self):
        super().__init__()
        self.embed = Embed()
        self.blocks = nn.Sequential(Mix(), Mix(), Mix())
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, CLASSES)
        self.aux_head = nn.Linear(DIM, CLASSES)

    def forward(self, x):
        x = self.norm(self.blocks(self.embed(x)))
        out = self.head(x[:, 0])
        return out + 0.5 * self.aux_head(x[:, 1:]).max(1)[0]


class MergedStreams(nn.Module):
    """CoaT's head: a second stream branches off, both are mixed, their class tokens aggregated."""

    def __init__(self):
        super().__init__()
        self.embed = Embed()
        self.stage1 = nn.Sequential(Mix(), Mix())
        self.proj = nn.Linear(DIM, DIM)
        self.stage2 = Mix()
        self.parallel2 = Mix()
        self.parallel3 = Mix()
        self.norm2 = nn.LayerNorm(DIM)
        self.norm3 = nn.LayerNorm(DIM)
        self.aggregate = nn.Conv1d(2, 1, 1)
        self.head = nn.Linear(DIM, CLASSES)

    def forward(self, x):
        x2 = self.stage1(self.embed(x))
        x3 = self.stage2(self.proj(x2[:, :5]))
        x2, x3 = self.parallel2(x2), self.parallel3(x3) + x2[:, :5]
        tokens = torch.stack([self.norm2(x2)[:, 0], self.norm3(x3)[:, 0]], dim=1)
        return self.head(self.aggregate(tokens).squeeze(1))


class TwoStreams(nn.Module):
    """CrossViT's form: two streams from the input, exchanging class tokens, two heads averaged."""

    def __init__(self):
        super().__init__()
        self.embed_a = Embed(stride=4)
        self.embed_b = Embed(stride=8)
        self.mix_a = nn.Sequential(Mix(), Mix())
        self.mix_b = nn.Sequential(Mix(), Mix())
        self.norm_a = nn.LayerNorm(DIM)
        self.norm_b = nn.LayerNorm(DIM)
        self.head_a = nn.Linear(DIM, CLASSES)
        self.head_b = nn.Linear(DIM, CLASSES)

    def forward(self, x):
        a, b = self.embed_a(x), self.embed_b(x)
        for mix_a, mix_b in zip(self.mix_a, self.mix_b):
            a, b = mix_a(a), mix_b(b)
            a = torch.cat([a[:, :1] + b[:, :1], a[:, 1:]], dim=1)
        logits = [self.head_a(self.norm_a(a)[:, 0]), self.head_b(self.norm_b(b)[:, 0])]
        return torch.stack(logits).mean(0)


class SharedConvs(nn.Module):
    """Residual blocks 1 and 3 call one convolution; the head reuses block 5's."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, DIM, 3, padding=1)
        self.convs = nn.ModuleList(nn.Conv2d(DIM, DIM, 3, padding=1) for _ in range(5))
        self.convs[2] = self.convs[0]
        self.fc = nn.Linear(DIM, CLASSES)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        for conv in self.convs:
            x = x + torch.relu(conv(x))
        pooled = x.mean((2, 3))
        # the last block's convolution read again on the pooled features (a 1x1 map)
        return self.fc(pooled + self.convs[4](pooled[:, :, None, None]).flatten(1))


def _partition(model, shared_parameters="sum"):
    return partition_blocks(trace_model(model.eval(), SIZE), shared_parameters=shared_parameters)


def test_aux_token_head_starts_at_the_final_norm():
    part = _partition(AuxTokenHead())
    assert part.block_names == [["embed"], ["blocks.0"], ["blocks.1"], ["blocks.2"]]
    assert part.head_names == ["norm", "head", "aux_head"]


def test_aux_token_head_keeps_every_guarantee():
    model = AuxTokenHead()
    local = to_local(model, d=2, input_size=SIZE)
    x = torch.randn(3, *SIZE)
    model.eval()
    local.eval()
    with torch.no_grad():
        assert torch.equal(local(x), model(x))
    check_local(model, local, SIZE, CLASSES, AuxTokenHead)


def test_merged_streams_head_starts_where_the_streams_meet_as_a_tuple():
    # The last single cut is where the second stream branches off; the streams cross a later
    # gap as one tuple, before the class-token selections: the head starts there.
    part = _partition(MergedStreams())
    assert part.block_names == [["embed"], ["stage1.0"], ["stage1.1"], ["proj", "stage2", "parallel2", "parallel3"]]
    assert part.head_names == ["norm2", "norm3", "aggregate", "head"]
    assert part.head.arity == 2


def test_merged_streams_keep_every_guarantee():
    model = MergedStreams()
    local = to_local(model, d=2, input_size=SIZE)
    check_local(model, local, SIZE, CLASSES, MergedStreams)


def test_streams_from_the_input_make_a_head_taking_both():
    # No single tensor carries everything anywhere: the blocks and the head take tuples (the
    # image and stream a, then both streams); the final norms join the head, as a ViT's does.
    part = _partition(TwoStreams())
    assert part.block_names == [["embed_a"], ["embed_b"], ["mix_a.0", "mix_b.0"], ["mix_a.1", "mix_b.1"]]
    assert part.head_names == ["norm_a", "head_a", "norm_b", "head_b"]
    assert part.head.arity == 2
    assert part.output_shapes[0] == ((3, 16, 16), (17, DIM))
    assert part.output_shapes[-1] == ((5, DIM), (17, DIM))


def test_streams_from_the_input_keep_every_guarantee():
    model = TwoStreams()
    local = to_local(model, d=2, input_size=SIZE)
    check_local(model, local, SIZE, CLASSES, TwoStreams)
    # The auxiliary network's head is a copy of the network's two-stream head, fresh weights.
    head_copy = local.aux[0][-1]
    assert sorted(n for n, m in head_copy.named_modules() if isinstance(m, nn.Linear)) == ["head_a", "head_b"]
    assert not torch.equal(head_copy.head_a.weight, local.head.eval_graph.head_a.weight)


class FourWay(nn.Module):
    """Four convolutions side by side: of one input (repeated), or one per stream."""

    def __init__(self, channels: int):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(channels, DIM, 3, padding=1) for _ in range(4))

    def forward(self, *xs):
        xs = xs * 4 if len(xs) == 1 else xs
        return tuple(torch.relu(conv(x)) for conv, x in zip(self.convs, xs))


class FourStreams(nn.Module):
    """Four streams from the input to their heads: more than a boundary may carry."""

    def __init__(self):
        super().__init__()
        self.first, self.second = FourWay(3), FourWay(DIM)
        self.heads = nn.ModuleList(nn.Linear(DIM, CLASSES) for _ in range(4))

    def forward(self, x):
        streams = self.second(*self.first(x))
        return sum(head(s.mean((2, 3))) for head, s in zip(self.heads, streams))


def test_more_streams_than_a_boundary_carries_are_refused_in_one_line():
    with pytest.raises(AugLocalError, match="several tensors run side by side") as error:
        _partition(FourStreams())
    assert "\n" not in str(error.value)


def test_blocks_sharing_a_parameter_merge_when_asked():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        part = _partition(SharedConvs(), shared_parameters="merge")
    # stem, convs 0-2 (0 and 2 are one module), conv 3; conv 4 is read by the head
    assert part.block_names == [["stem"], ["convs.0", "convs.1"], ["convs.3"]]
    assert part.head_names == ["convs.4", "fc"]
    message = next(str(w.message) for w in caught if "merged" in str(w.message))
    assert "convs.0" in message and "convs.4" in message
    # by default (shared_parameters="sum") every residual block stays a block
    part = _partition(SharedConvs())
    assert part.block_names == [["stem"]] + [[f"convs.{k}"] for k in (0, 1, 0, 3, 4)]
    assert part.head_names == ["convs.4", "fc"]


def test_shared_parameters_get_one_loss_when_merged():
    model = SharedConvs()
    local = to_local(model, d=2, input_size=SIZE, shared_parameters="merge")
    check_local(model, local, SIZE, CLASSES, SharedConvs)
    # every parameter belongs to one local module
    owners = [{id(p) for p in block.parameters()} for block in local.blocks] \
        + [{id(p) for p in local.head.parameters()}]
    assert sum(len(o) for o in owners) == len(set().union(*owners))


@pytest.mark.sweep
def test_timm_crossvit_head_takes_both_streams():
    resolved = resolve_model("timm:crossvit_tiny_240", num_classes=CLASSES,
                             input_size=(3, 120, 120), model_kwargs={"img_size": 120})
    part = partition_blocks(trace_model(resolved.model, resolved.input_size))
    assert part.block_names == [["patch_embed", "pos_drop"], ["blocks.0"], ["blocks.1"], ["blocks.2"]]
    assert part.head_names == ["norm", "head_drop", "head"]
    assert part.head.arity == 2


@pytest.mark.sweep
def test_timm_coat_head_is_found_and_shared_encodings_merge_its_blocks_when_asked():
    # CoaT's serial blocks of a stage share one position encoding (cpe1, crpe1), and the
    # parallel blocks reuse those of stages 2-4: merged, stage 1 is one block, stages 2-4 and
    # the parallel blocks another (tests/test_shared_parameters.py: apart, by default).
    resolved = resolve_model("timm:coat_tiny", num_classes=CLASSES, input_size=(3, 32, 32),
                             model_kwargs={"embed_dims": (64, 64, 64, 64), "parallel_depth": 2})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        part = partition_blocks(trace_model(resolved.model, resolved.input_size), shared_parameters="merge")
    assert part.block_names[0] == ["patch_embed1", "cpe1", "serial_blocks1", "crpe1"]
    assert len(part.block_names) == 2 and part.block_names[1][:2] == ["patch_embed2", "cpe2"]
    assert "parallel_blocks" in part.block_names[1]
    assert part.head_names[:4] == ["norm2", "norm3", "norm4", "aggregate"]
    message = next(str(w.message) for w in caught if "merged" in str(w.message))
    assert "cpe1.proj" in message and "cpe2.proj" in message


def test_tables_and_cost_profile_show_the_streams_that_reach_the_head():
    from auglocal_fx import count_flops, cost_report
    from auglocal_fx.tables import flops_table

    local = to_local(TwoStreams(), d=2, input_size=SIZE)
    # (batch, tokens, dim) of each stream; the blocks before the head return (b, a)
    assert "(5x8, 17x8)" in flops_table(count_flops(local))
    report = cost_report(TwoStreams(), (2,), batch_size=2, input_size=SIZE, memory=False, timing=False)
    assert report.profile[-1]["activation_bytes"] == (5 * DIM + 17 * DIM) * 4 * 2
