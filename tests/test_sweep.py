"""The model sweep: every timm / torchvision ConvNet listed converts and behaves.

For each model and depth: eval output equal to the original's, train-mode output equal under
one seed, finite losses and a gradient on every trainable parameter after one ``train_step``,
gradient isolation between blocks, and a strict load of the exported weights.
"""

import copy
import dataclasses
import functools

import pytest
import torch

from auglocal_fx import resolve_model, to_local

from .conftest import batch

TIMM_MODELS = [
    "resnet18", "resnet50", "resnet26d", "resnext26ts", "seresnet50", "regnetx_004",
    "regnety_002", "mobilenetv2_100", "mobilenetv3_small_100", "efficientnet_b0", "mnasnet_100",
    "lcnet_050", "ghostnet_100", "repvgg_a0", "vgg11", "densenet121", "convnext_atto", "dla34",
    "cspresnet50", "rexnet_100", "mixnet_s", "inception_v3", "dpn68", "hrnet_w18_small",
    "selecsls42b",
]
TORCHVISION_MODELS = [
    "resnet18", "resnet34", "vgg13_bn", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0",
    "regnet_x_400mf", "densenet121", "shufflenet_v2_x0_5", "squeezenet1_0", "googlenet",
]
SWEEP = [f"timm:{m}" for m in TIMM_MODELS] + [f"torchvision:{m}" for m in TORCHVISION_MODELS]

# Transformers and hybrids, each from another timm module, at the smallest input each accepts
# (a multiple of its patch size, windows and stage count), at one depth to keep CI short.
TRANSFORMERS = {
    "vit_tiny_patch16_224": 32, "deit_tiny_distilled_patch16_224": 32, "cait_xxs24_224": 32,
    "swin_tiny_patch4_window7_224": 56, "swinv2_tiny_window8_256": 64, "levit_128s": 64,
    "pvt_v2_b0": 64, "efficientformer_l1": 224, "maxvit_pico_rw_256": 64,
    "efficientvit_b0": 32, "fastvit_t8": 32, "mixer_s16_224": 32, "poolformer_s12": 32,
    "mobilevit_xxs": 64, "tiny_vit_5m_224": 64, "botnet26t_256": 64,
    "volo_d1_224": 32,  # a class-token head plus an auxiliary head on every token
}
# Families whose blocks take values computed from the input's shape (a grid size, rotary
# tables, a batch size read once): tiny configurations, each a few seconds (mvitv2 ~14 s).
SHAPE_VALUE_MODELS = {
    "xcit_nano_12_p16_224": (32, {"depth": 4}),
    "mvitv2_tiny": (32, {}),
    "vit_tiny_patch16_dinov3_qkvb": (32, {"depth": 4}),
    "pit_ti_224": (32, {}),
    "naflexvit_base_patch16_parfac_gap": (32, {"depth": 4, "embed_dim": 64, "num_heads": 2}),
    "qwen3_vit_88m": (32, {"depth": 4, "embed_dim": 64, "num_heads": 2}),
    "deepseek_vit_412m": (28, {"depth": 4, "embed_dim": 64, "num_heads": 2}),
}
TRANSFORMER_SWEEP = [f"timm:{m}" for m in TRANSFORMERS] + [f"timm:{m}" for m in SHAPE_VALUE_MODELS]
# Families whose block boundaries carry a tuple (cells reading the two cells before, pixel and
# patch streams, a stage's global query, trees): small configurations (pnasnet ~40 s).
TUPLE_MODELS = {
    "nasnetalarge": (64, {"num_features": 480, "stem_size": 32}),
    "pnasnet5large": (32, {}),
    "tnt_s_legacy_patch16_224": (32, {"depth": 4}),
    "gcvit_xxtiny": (64, {}),
    "dla46x_c": (32, {}),
    # two streams from the input to a head that takes both (one block per cross-attention stage)
    "crossvit_tiny_240": (120, {"img_size": 120, "depth": [[1, 1, 0]] * 3, "embed_dim": [48, 96]}),
    # blocks sharing position encodings (each user's loss trains them), three streams from
    # stage 2 to a head that aggregates their class tokens
    "coat_tiny": (32, {"embed_dims": (32, 32, 32, 32), "parallel_depth": 2}),
}
_MODEL_KWARGS = {f"timm:{m}": kwargs for m, (_, kwargs) in SHAPE_VALUE_MODELS.items()}
_MODEL_KWARGS.update({f"timm:{m}": kwargs for m, (_, kwargs) in TUPLE_MODELS.items() if kwargs})

# Small inputs keep the sweep fast; a few models need more than 32 px.
_INPUT_SIZE = {"timm:inception_v3": 75, **{f"timm:{m}": s for m, s in TRANSFORMERS.items()},
               **{f"timm:{m}": s for m, (s, _) in SHAPE_VALUE_MODELS.items()},
               **{f"timm:{m}": s for m, (s, _) in TUPLE_MODELS.items()}}
NUM_CLASSES = 7


@functools.lru_cache(maxsize=1)  # a model's tests run one after another: created once for them
def _pristine(spec):
    size = _INPUT_SIZE.get(spec, 32)
    return resolve_model(spec, num_classes=NUM_CLASSES, input_size=(3, size, size),
                         model_kwargs=_MODEL_KWARGS.get(spec))


def _make(spec, d, convert=True):
    """The model of ``spec`` (a copy of one created once: creating the largest costs seconds),
    whose ``create`` gives another copy, and its conversion at depth ``d``."""
    pristine = _pristine(spec)
    resolved = dataclasses.replace(pristine, model=copy.deepcopy(pristine.model),
                                   _factory=lambda: copy.deepcopy(pristine.model))
    local = to_local(resolved.model, d=d, input_size=resolved.input_size) if convert else None
    return resolved, local


@pytest.mark.sweep
@pytest.mark.parametrize("spec", [f"timm:{m}" for m in TUPLE_MODELS])
def test_convert_tuple_boundaries(spec):
    resolved, local = _make(spec, d=3)
    assert max(len(shapes) for shapes in local.output_shapes) > 1  # a boundary carries a tuple
    check_local(resolved.model, local, resolved.input_size, NUM_CLASSES, resolved.create)


def _block_grads(local, j):
    return [p.grad.clone() if p.grad is not None else None for p in local.blocks[j].parameters()]


@pytest.mark.sweep
@pytest.mark.parametrize("d", [2, 4])
@pytest.mark.parametrize("spec", SWEEP)
def test_convert(spec, d):
    resolved, local = _make(spec, d=d)
    K = local.num_local
    assert len(local.aux) == K - 1 == len(local.blocks) - d  # K = L - (d - 1)
    assert all(p.depth <= d for p in local.plan)
    check_local(resolved.model, local, resolved.input_size, NUM_CLASSES, resolved.create)


@pytest.mark.sweep
@pytest.mark.parametrize("spec", TRANSFORMER_SWEEP)
def test_convert_transformer(spec):
    resolved, local = _make(spec, d=3)
    assert len(local.aux) == local.num_local - 1 == len(local.blocks) - 3
    # Values frozen for the input size must leave the batch dimension free.
    x = torch.randn(3, *resolved.input_size)
    resolved.model.eval()
    local.eval()
    with torch.no_grad():
        assert torch.equal(local(x), resolved.model(x))
    check_local(resolved.model, local, resolved.input_size, NUM_CLASSES, resolved.create)


def check_local(model, local, input_size, num_classes, create):
    """Every guarantee of a conversion: eval and train-mode equality with the original, a
    finite step reaching every parameter, isolated block gradients, a strict export."""
    x, y = batch(input_size, num_classes=num_classes)
    K = local.num_local

    # eval: exactly the original
    model.eval()
    local.eval()
    with torch.no_grad():
        expected = model(x)
        got = local(x)
    assert torch.equal(got, expected)
    with torch.no_grad():
        h = x
        for j, aux in enumerate(local.aux):
            h = local.blocks[j](h)
            assert aux(h).shape == (2, num_classes), f"aux {j}"

    # train mode: blocks then head equal the original's train-mode output under one seed
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    local.train()
    torch.manual_seed(1)
    expected = model(x)
    if isinstance(expected, tuple):
        # Training-only outputs (auxiliary logits) are dropped from the graph; their dropout
        # draws random numbers that the converted network does not, so compare without dropout.
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.eval()
        model.load_state_dict(state)
        torch.manual_seed(1)
        expected = model(x)[0]
    model.load_state_dict(state)
    torch.manual_seed(1)
    h = x
    for block in local.blocks:
        h = block(h)
    assert torch.equal(local.head(h), expected)
    model.load_state_dict(state)

    # one local step: finite losses, a gradient on every trainable parameter
    local.zero_grad(set_to_none=True)
    torch.manual_seed(2)
    losses = local.train_step(x, y)
    assert losses.shape == (K,)
    assert torch.isfinite(losses).all()
    for name, p in local.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"No gradient for {name}"
    step_grads = {j: _block_grads(local, j) for j in range(K - 1)}

    # gradient isolation, through the LocalNet's own step (module_losses, what train_step runs)
    # and its own train-mode forward: block j's gradient is that of loss_j alone, except for a
    # parameter shared by several local modules, whose gradient is the sum of its users' losses'
    users = shared_users(local)
    checked = sorted({0, (K - 1) // 2, K - 2})  # first, middle and last local block
    model.load_state_dict(state)
    torch.manual_seed(2)
    module_losses = [loss for loss, _ in local.module_losses(x, y)]  # graphs kept alive
    for j in checked:
        params = [p for p in local.blocks[j].parameters() if p.requires_grad]
        refs = [g for g, p in zip(step_grads[j], local.blocks[j].parameters()) if p.requires_grad]
        for p, ref in zip(params, refs):
            g = None
            for u in users.get(id(p), [j]):  # in the order the step back-propagates them
                (part,) = torch.autograd.grad(module_losses[u], [p], retain_graph=True, allow_unused=True)
                g = part if g is None else g if part is None else g + part
            if g is None:
                assert ref is None or not ref.any()
            else:
                torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6)
        _assert_no_gradient(params, users, [(module_losses[j + 1], j + 1), (module_losses[-1], K - 1)], j)
    del module_losses  # the next forward updates the batch-norm statistics these graphs saved
    model.load_state_dict(state)
    logits, aux_logits = local(x)
    for j in checked:
        params = [p for p in local.blocks[j].parameters() if p.requires_grad]
        _assert_no_gradient(params, users, [(logits.sum(), K - 1)]
                            + [(a.sum(), j + 1) for a in aux_logits[j + 1:j + 2]], j)

    # export: strict load into a fresh model
    fresh = create()
    fresh.load_state_dict(local.export().state_dict(), strict=True)


def shared_users(local):
    """``{id(parameter): local modules using it}`` of the parameters several local modules use."""
    named = dict(local.named_parameters())
    return {id(named[name]): users for name, users in local.shared_parameters().items()}


def _assert_no_gradient(params, users, later, j):
    """No gradient of a later module's value reaches ``params``, but the shared ones it uses."""
    for value, module in later:
        crossed = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
        for p, g in zip(params, crossed):
            assert g is None or module in users.get(id(p), ()), f"gradient crossed into block {j}"
