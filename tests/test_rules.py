"""The paper's comparison systems as rules: structures, Table 7 FLOPs, every guarantee."""

import pytest
import torch
from torch import nn

from auglocal_fx import AugLocalError, load, to_local
from auglocal_fx.flops import count_flops
from auglocal_fx.rules import RULES, RuleAux

from .test_sweep import NUM_CLASSES, _make, check_local

BASELINES = ("dgl", "predsim", "infopro")


def _layers(module):
    """(type name, parameter shapes) of each leaf layer with parameters, in order, plus pools."""
    out = []
    for m in module.modules():
        if list(m.children()):
            continue
        if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AvgPool2d)):
            size = m.output_size if isinstance(m, nn.AdaptiveAvgPool2d) else m.kernel_size
            out.append((type(m).__name__, size))
        elif list(m.parameters(recurse=False)):
            out.append((type(m).__name__, tuple(tuple(p.shape) for p in m.parameters(recurse=False))))
    return out


def _dgl(c, size, features):
    conv = [("Conv2d", ((c, c, 1, 1),)), ("BatchNorm2d", ((c,), (c,)))] * 3
    mlp = [("Linear", ((features, features),)), ("BatchNorm1d", ((features,), (features,)))] * 2
    return [("AdaptiveAvgPool2d", size)] + conv + [("AdaptiveAvgPool2d", (2, 2))] + mlp + [
        ("Linear", ((10, features), (10,)))]


def _infopro(c, width):
    return [("Conv2d", ((width, c, 3, 3),)), ("BatchNorm2d", ((width,), (width,))),
            ("AdaptiveAvgPool2d", (1, 1)), ("Linear", ((128, width), (128,))),
            ("Linear", ((10, 128), (10,)))]


# The authors' auxiliary networks for ResNet-32's three stages (16 ch at 32 px, 32 at 16, 64 at
# 8), written out from their networks/auxiliary_nets.py (AuxNetwork, Decoder_*), hidden_dim 512.
AUTHORS = {
    "dgl": {0: _dgl(16, (8, 8), 64), 6: _dgl(32, (4, 4), 128), 12: _dgl(64, (2, 2), 256)},
    "predsim": {0: [("AvgPool2d", (8, 4)), ("Linear", ((10, 512), (10,)))],
                6: [("AvgPool2d", (4, 4)), ("Linear", ((10, 512), (10,)))],
                12: [("AvgPool2d", (4, 2)), ("Linear", ((10, 512), (10,)))]},
    "infopro": {0: _infopro(16, 32), 6: _infopro(32, 64), 12: _infopro(64, 64)},
}
DECODERS = {
    "predsim": lambda c: [("Conv2d", ((c, c, 3, 3),))],
    "infopro": lambda c: [("Conv2d", ((12, c, 3, 3), (12,))), ("BatchNorm2d", ((12,), (12,))),
                          ("Conv2d", ((3, 12, 3, 3), (3,)))],
}


@pytest.mark.parametrize("rule", BASELINES)
def test_baselines_build_the_authors_auxiliary_networks(rule):
    local = to_local("paper:resnet32", rule=rule)
    assert local.num_local == 16 and len(local.aux) == 15  # every block but the last
    for j, expected in AUTHORS[rule].items():
        aux = local.aux[j]
        classifier = aux.classifier if isinstance(aux, RuleAux) else aux
        assert _layers(classifier) == expected, f"{rule} block {j}"
        if rule in DECODERS:
            channels = local.block_shapes[j][0]
            assert _layers(aux.decoder) == DECODERS[rule](channels)


def test_predsim_and_infopro_loss_weights_follow_run_sh():
    predsim = to_local("paper:resnet32", rule="predsim")
    assert {aux.weights for aux in predsim.aux} == {(0.99, 0.01)}
    infopro = to_local("paper:resnet32", rule="infopro")
    assert infopro.aux[0].weights == (5.0, 0.05)
    assert infopro.aux[-1].weights == pytest.approx((0.2, 0.5))
    combined = to_local("paper:resnet32", d=2, rule="auglocal+infopro")
    assert combined.aux[0].weights == (5.0, 1.0)  # AugLocal's cross-entropy stays at 1


@pytest.mark.parametrize("rule,table7", [("predsim", 0.25e9), ("dgl", 0.26e9), ("infopro", 0.34e9)])
def test_table7_flops(rule, table7):
    flops = count_flops(to_local("paper:resnet110", rule=rule))
    assert flops.primary == pytest.approx(0.25e9, rel=0.03)
    assert flops.total == pytest.approx(table7, rel=0.03)


def test_second_losses_reach_their_decoders():
    local = to_local("paper:resnet32", rule="infopro").train()
    x, y = torch.rand(2, 3, 32, 32), torch.tensor([1, 3])
    losses = local.train_step(x, y)
    assert torch.isfinite(losses).all()
    assert all(p.grad is not None for aux in local.aux for p in aux.decoder.parameters())
    # the reconstruction term: the loss is not the weighted cross-entropy alone
    h = local.blocks[0](x)
    ce = nn.functional.cross_entropy(local.aux[0](h), y)
    assert not torch.isclose(local.aux[0].local_loss(h, x, y), 0.05 * ce)


def test_rule_survives_save_and_load(tmp_path):
    local = to_local("paper:resnet32", rule="dgl")
    local.save(tmp_path / "dgl.pt")
    again = load(tmp_path / "dgl.pt")
    assert again.options["rule"] == "dgl" and len(again.aux) == 15
    with pytest.raises(AugLocalError, match="unknown local learning rule"):
        to_local("paper:resnet32", rule="hebbian")


# A dozen models of the sweep: ConvNets of several families, and token / channels-last models.
RULE_SWEEP = ["timm:resnet18", "timm:mobilenetv3_small_100", "timm:efficientnet_b0",
              "timm:regnetx_004", "timm:convnext_atto", "timm:ghostnet_100", "timm:lcnet_050",
              "torchvision:shufflenet_v2_x0_5", "torchvision:squeezenet1_0",
              "timm:vit_tiny_patch16_224", "timm:swin_tiny_patch4_window7_224", "timm:levit_128s"]


@pytest.mark.sweep
@pytest.mark.parametrize("spec", RULE_SWEEP)
def test_every_rule_on_the_sweep(spec):
    for rule in (*BASELINES, "auglocal+infopro"):
        resolved, _ = _make(spec, d=2, convert=False)
        local = to_local(resolved.model, d=2, input_size=resolved.input_size, rule=rule)
        check_local(resolved.model, local, resolved.input_size, NUM_CLASSES, resolved.create)


def test_rules_registry_names():
    assert tuple(RULES) == ("auglocal", "dgl", "predsim", "infopro", "auglocal+infopro")
