"""Auxiliary networks: channel and stride adaptation, fresh weights, the paper's Table 6."""

import pytest
import torch
from torch import nn

from auglocal_fx import to_local


def _convs(module):
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)]


def test_resnet110_d2_table6():
    """Every auxiliary network is one 64-channel residual block, pooling and a 10-way FC."""
    local = to_local("paper:resnet110", d=2)
    assert len(local.aux) == 53
    for aux in local.aux:
        copy, head = aux[0], aux[1]
        convs = [c for c in _convs(copy) if c.kernel_size == (3, 3)]
        assert [c.out_channels for c in convs] == [64, 64]
        fcs = [m for m in head.modules() if isinstance(m, nn.Linear)]
        assert len(fcs) == 1 and fcs[0].in_features == 64 and fcs[0].out_features == 10


def test_channel_and_stride_adaptation():
    local = to_local("paper:resnet32", d=2)
    copy = local.aux[0][0]  # block 0 (16 ch, 32 px) -> copy of the last block (64 ch)
    convs = _convs(copy)
    first = next(c for c in convs if c.kernel_size == (3, 3))
    assert first.in_channels == 16 and first.stride == (2, 2)
    # the identity shortcut became a projection with the block's stride
    projections = [c for c in convs if c.kernel_size == (1, 1)]
    assert len(projections) == 1
    assert projections[0].in_channels == 16 and projections[0].out_channels == 64
    assert projections[0].stride == (2, 2)
    h = torch.randn(2, 16, 32, 32)
    assert copy(h).shape == (2, 64, 16, 16)


def test_two_copies_share_the_pending_reduction():
    local = to_local("paper:resnet32", d=3, pyramid=False)
    # block 9 (16 px) copies blocks 12 and 15 (both 8 px in the primary): one 2x reduction is
    # pending, so the first copy halves the resolution and the second keeps it
    assert local.block_shapes[9][1:] == (16, 16)
    assert local.block_shapes[12][1:] == local.block_shapes[15][1:] == (8, 8)
    plan = local.plan[9]
    assert plan.selected == (12, 15) and plan.strides == (2, 1)
    h = torch.randn(2, 32, 16, 16)
    out = local.aux[9][0](h)
    assert out.shape == (2, 64, 8, 8)
    assert local.aux[9][1](out).shape == (2, 64, 8, 8)


def test_aux_weights_fresh_and_unshared():
    local = to_local("paper:resnet32", d=2)
    primary = {id(p) for p in local.blocks.parameters()}
    assert not any(id(p) in primary for p in local.aux.parameters())
    last = local.blocks[15].eval_graph.get_submodule("layer3.4.conv2").weight
    copy_conv = local.aux[13][0].get_submodule("layer3.4.conv2").weight
    assert copy_conv.shape == last.shape and not torch.equal(copy_conv, last)


def test_sequential_and_repetitive_selection_build():
    for selection in ("sequential", "repetitive"):
        local = to_local("paper:resnet32", d=3, selection=selection)
        for j, aux in enumerate(local.aux):
            h = torch.randn(2, *local.block_shapes[j])
            assert aux(h).shape == (2, 10)


def test_dense_and_inception_blocks():
    for spec, size in (("torchvision:densenet121", 64), ("timm:inception_v3", 96)):
        local = to_local(spec, d=3, input_size=(3, size, size), num_classes=4)
        local.eval()
        h = torch.randn(1, 3, size, size)
        for j, aux in enumerate(local.aux):
            h = local.blocks[j](h)
            assert aux.eval()(h).shape == (1, 4)


def test_input_adapter_fallback_warns_naming_the_modules():
    import warnings

    from auglocal_fx import resolve_model

    model = resolve_model("timm:dpn68").model  # DPN slices channels at hard-coded widths
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        local = to_local(model, d=2, input_size=(3, 32, 32))
    messages = [str(w.message) for w in caught if "input adapter" in str(w.message)]
    assert messages and all("features.conv5_3" in m for m in messages)
    assert any("auglocal_input_adapter" in name for name, _ in local.aux[0].named_modules())


def test_unexpected_errors_in_adaptation_propagate(monkeypatch):
    """Only shape errors fall back to the input adapter; a bug is not hidden behind it."""
    import auglocal_fx.synthesis.copies as copies  # where adapt_copy calls it

    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(copies, "_adapt", broken)
    with pytest.raises(KeyError, match="a bug"):
        to_local("paper:resnet32", d=2)


def _pretrained_resnet32():
    """A ResNet-32 holding values no init rule draws (BN weights not 1, running stats set)."""
    from auglocal_fx.models.cifar import resnet32

    model = resnet32()
    with torch.no_grad():
        for tensor in list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]:
            tensor.uniform_(0.5, 1.5)
    return model


def _tensors(module):
    return [(n, t) for n, t in list(module.named_parameters()) + list(module.named_buffers())
            if t.is_floating_point()]


def test_aux_init_copy_starts_from_the_source_where_shapes_match_and_draws_the_rest():
    model = _pretrained_resnet32()
    source = dict(_tensors(model))
    torch.manual_seed(3)
    copied = to_local(model, d=2, aux_init="copy")
    torch.manual_seed(3)
    drawn = to_local(model, d=2, aux_init="init")
    assert copied.options["aux_init"] == "copy" and drawn.options["aux_init"] == "init"
    kept, redrawn = set(), set()
    for aux_copy, aux_drawn in zip(copied.aux, drawn.aux):
        for part_copy, part_drawn in zip(aux_copy, aux_drawn):  # block copies, then the head
            theirs = dict(_tensors(part_drawn))
            for name, tensor in _tensors(part_copy):
                twin = source.get(name)
                if twin is not None and twin.shape == tensor.shape:
                    assert torch.equal(tensor, twin), name  # the source's value, not a draw
                    assert not torch.equal(theirs[name], twin), name  # "init" draws afresh
                    kept.add(name.rsplit(".", 1)[-1])
                else:  # widened layers and added shortcuts: the init rule's draw, as with "init"
                    assert torch.equal(tensor, theirs[name]), name
                    redrawn.add(name)
    assert {"weight", "bias", "running_mean", "running_var"} <= kept
    assert any(n.startswith("auglocal_shortcut") for n in redrawn)
    assert any(n.endswith("conv1.weight") for n in redrawn)  # a copy whose input width changed


def test_aux_init_is_checked():
    from auglocal_fx import AugLocalError

    with pytest.raises(AugLocalError, match="unknown auxiliary initialisation 'pretrained'"):
        to_local("paper:resnet32", d=2, aux_init="pretrained")


def test_a_pointwise_copy_reads_every_position_when_it_reduces():
    """MobileNetV3's last block is a 1x1 conv: striding it by 2 would never read odd positions."""
    import timm

    model = timm.create_model("mobilenetv3_small_100", num_classes=10)
    local = to_local(model, d=2, input_size=(3, 32, 32))
    copy = local.aux[0][0].eval()
    assert local.plan[0].strides == (2,) and local.block_names[-1] == ["blocks.5"]
    convs = [m for m in copy.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(c.kernel_size == (1, 1) and c.stride == (1, 1) for c in convs)
    h = torch.randn(1, *local.block_shapes[0])
    moved = h.clone()
    moved[..., 1::2, 1::2] += 1.0  # only positions a stride-2 1x1 conv skips
    with torch.no_grad():
        out, out_moved = copy(h), copy(moved)
    assert out.shape[-2:] == (8, 8)  # half of block 0's 16x16, as planned
    assert not torch.allclose(out, out_moved)


def test_meta_batch_norm_shortcut_keeps_the_shape_checks():
    # Batch norms pass meta shapes through without PyTorch's slow meta decomposition; a wrong
    # channel count or rank must still fail as running the layer does (and then be repaired).
    from torch import fx

    from auglocal_fx.synthesis.repair import _execute, _meta_batch_norm_fits

    norm = nn.BatchNorm2d(8)
    assert _meta_batch_norm_fits(norm, torch.empty(2, 8, 4, 4, device="meta"))
    assert not _meta_batch_norm_fits(norm, torch.empty(2, 6, 4, 4, device="meta"))
    assert not _meta_batch_norm_fits(norm, torch.empty(2, 8, 4, 4))  # real tensors run the layer
    with pytest.raises(ValueError):
        _meta_batch_norm_fits(norm, torch.empty(2, 8, device="meta"))
    gm = fx.symbolic_trace(nn.Sequential(nn.BatchNorm2d(8)).to("meta"))
    node = next(n for n in gm.graph.nodes if n.op == "call_module")
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    out = _execute(gm, node, {placeholder: torch.empty(2, 8, 5, 5, device="meta")})
    assert out.shape == (2, 8, 5, 5) and out.is_meta
    with pytest.raises(RuntimeError):
        _execute(gm, node, {placeholder: torch.empty(2, 6, 5, 5, device="meta")})


def test_copies_share_nothing_with_their_source():
    # The meta copy copies the graph node by node and the modules it uses: the source block's
    # graph, modules and recorded shapes stay as they were.
    from auglocal_fx.synthesis import adapt_copy
    from auglocal_fx.tracing import SHAPE_KEY

    local = to_local("paper:resnet32", d=2)
    source = local.blocks[15].eval_graph
    nodes = [(n.name, n.op, n.target, n.meta.get(SHAPE_KEY)) for n in source.graph.nodes]
    copy_gm, shape = adapt_copy(source, (16, 32, 32), 2, "Copy")
    assert shape == (64, 16, 16)
    assert [(n.name, n.op, n.target, n.meta.get(SHAPE_KEY)) for n in source.graph.nodes] == nodes
    theirs = {id(t) for t in list(source.parameters()) + list(source.buffers())}
    assert not theirs & {id(t) for t in list(copy_gm.parameters()) + list(copy_gm.buffers())}
    assert not {id(m) for m in source.modules()} & {id(m) for m in copy_gm.modules()}
    assert all(n.graph is copy_gm.graph for n in copy_gm.graph.nodes)


@pytest.mark.parametrize("spec, d, size", [
    ("paper:resnet32", 4, None),
    ("timm:regnetx_002", 6, (3, 64, 64)),
    ("timm:dpn68", 2, (3, 32, 32)),  # input adapters (channels)
    ("timm:swin_tiny_patch4_window7_224", 3, (3, 56, 56)),  # ShapeAdapters: they draw when built
])
def test_copies_cloned_from_a_template_equal_copies_adapted_afresh(spec, d, size, monkeypatch):
    # The same conversion, seed and all, with every copy adapted afresh (no templates): the
    # same modules in the same order, the same operations and the same drawn weights. (Node
    # names are not compared: two conversions in one process number them differently anyway.)
    import warnings

    import auglocal_fx.synthesis.copies as copies

    def convert():
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return to_local(spec, d=d, input_size=size)

    cloned = convert()
    monkeypatch.setattr(copies.CopyTemplates, "adapted", lambda self, source, *args: copies._adapt(source, *args))
    fresh = convert()
    for ours, theirs in zip(cloned.aux, fresh.aux):
        assert [type(m).__name__ for m in ours] == [type(m).__name__ for m in theirs]
        assert [[(n.op, str(n.target)) for n in m.graph.nodes] for m in ours if hasattr(m, "graph")] \
            == [[(n.op, str(n.target)) for n in m.graph.nodes] for m in theirs if hasattr(m, "graph")]
        assert [n for n, _ in ours.named_modules()] == [n for n, _ in theirs.named_modules()]
    ours, theirs = cloned.state_dict(), fresh.state_dict()
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def _count_adaptations(monkeypatch):
    import auglocal_fx.synthesis.copies as copies

    calls = []
    real = copies._adapt
    monkeypatch.setattr(copies, "_adapt", lambda *args: calls.append(args[0]) or real(*args))
    return calls


def test_copy_templates_belong_to_one_conversion(monkeypatch):
    # Each conversion (and each synthesize call not given templates) adapts its copies itself:
    # nothing is kept between them. Within one, identical copies are cloned from the first.
    import gc
    import weakref

    from auglocal_fx.synthesis import CopyTemplates, synthesize_aux_net

    made = []
    real_init = CopyTemplates.__init__

    def init(self):
        made.append(weakref.ref(self))
        real_init(self)

    monkeypatch.setattr(CopyTemplates, "__init__", init)
    adapted = _count_adaptations(monkeypatch)
    local = to_local("paper:resnet32", d=4)
    copies = sum(len(net) for net in local.aux)
    first = len(adapted)
    assert 0 < first < copies  # templates within the conversion
    gc.collect()
    assert made and all(ref() is None for ref in made)  # dropped with the conversion
    plan = local.plan[0]
    synthesize_aux_net(local.partition, plan)
    once = len(adapted) - first
    synthesize_aux_net(local.partition, plan)
    assert once > 0 and len(adapted) - first == 2 * once  # the first call kept nothing
    shared = CopyTemplates()
    synthesize_aux_net(local.partition, plan, templates=shared)
    before = len(adapted)
    synthesize_aux_net(local.partition, plan, templates=shared)
    assert len(adapted) == before  # the same templates: cloned, not adapted again
