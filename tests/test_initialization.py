"""Auxiliary networks as the authors build and initialise them (rules 5 and 10 of docs/method.md).

The expected structures are derived from the authors' rule as their ``AuxNetwork`` states it
(``networks/auxiliary_nets.py``, ``net_config == 'unifSamp'``): per sampled block, a BasicBlock
whose first conv halves the resolution when ``log2(width / in_width)`` pending reductions allow,
with a 1x1 conv + BN projection when the shape changes; then pool, flatten, BatchNorm1d (one
sampled block only) and the linear classifier. Their init: He fan-out normal convolutions,
BatchNorm weight 1 and bias 0, PyTorch's default for linear layers.
"""

import math

import pytest
import torch
from torch import nn

from auglocal_fx import to_local
from auglocal_fx.initialization import FanRule, InitReference, TensorInit, describe_init, fit_fan_rule
from auglocal_fx.planning import pyramid_depths

_WIDTHS = {"resnet32": [16] * 6 + [32] * 5 + [64] * 5, "resnet110": [16] * 19 + [32] * 18 + [64] * 18}


def _authors_layers(widths, j, depth, resolution):
    """Sorted (type, parameter shapes, output shape) of the authors' auxiliary network ``j``."""
    num_blocks = len(widths)
    if depth >= num_blocks - 1 - j:
        selected = list(range(j + 1, num_blocks))
    else:
        selected = [round(j + (num_blocks - j - 1) / depth * i) for i in range(1, depth + 1)]
    layers, pending, planes, res = [], 0, widths[j], resolution
    for k in selected:
        pending += int(math.log2(widths[k] // planes))
        stride = 2 if pending >= 1 else 1
        pending -= stride == 2
        out, res = widths[k], res // stride
        shape = (2, out, res, res)
        layers += [("Conv2d", ((out, planes, 3, 3),), shape), ("BatchNorm2d", ((out,), (out,)), shape),
                   ("Conv2d", ((out, out, 3, 3),), shape), ("BatchNorm2d", ((out,), (out,)), shape)]
        if stride != 1 or planes != out:
            layers += [("Conv2d", ((out, planes, 1, 1),), shape), ("BatchNorm2d", ((out,), (out,)), shape)]
        planes = out
    if depth <= 1:
        layers.append(("BatchNorm1d", ((planes,), (planes,)), (2, planes)))
    layers.append(("Linear", ((10, planes), (10,)), (2, 10)))
    return sorted(layers)


def _our_layers(aux, in_shape):
    records, hooks = [], []
    for module in aux.modules():
        if not list(module.children()) and list(module.parameters(recurse=False)):
            hooks.append(module.register_forward_hook(lambda m, i, o: records.append(
                (type(m).__name__, tuple(tuple(p.shape) for p in m.parameters(recurse=False)), tuple(o.shape)))))
    aux.eval()
    with torch.no_grad():
        aux(torch.randn(2, *in_shape))
    for hook in hooks:
        hook.remove()
    return sorted(records)


@pytest.mark.parametrize("arch,depths", [("resnet32", (2, 3, 4, 5, 6)), ("resnet110", (2, 6))])
def test_aux_nets_have_the_authors_layers(arch, depths):
    widths = _WIDTHS[arch]
    for d in depths:
        local = to_local(f"paper:{arch}", d=d)
        planned = pyramid_depths(len(widths), d, 0.5)
        assert len(local.aux) == len(planned)
        for j, (aux, n) in enumerate(zip(local.aux, planned)):
            expected = _authors_layers(widths, j, n, local.block_shapes[j][1])
            assert _our_layers(aux, local.block_shapes[j]) == expected, (arch, d, j)


def test_batchnorm1d_only_before_the_classifier_of_single_block_aux_nets():
    local = to_local("paper:resnet32", d=4)
    for aux in local.aux:
        head = aux[-1]
        norms = [m for m in head.modules() if isinstance(m, nn.BatchNorm1d)]
        assert len(norms) == (1 if len(aux.plan.selected) == 1 else 0)
        if norms:
            order = [type(m) for m in head.modules() if isinstance(m, (nn.BatchNorm1d, nn.Linear))]
            assert order[-2:] in ([nn.Linear, nn.BatchNorm1d], [nn.BatchNorm1d, nn.Linear])
            x = torch.randn(2, 64, 8, 8)
            seen = []
            hook = norms[0].register_forward_hook(lambda m, i, o: seen.append(o))
            fc = [m for m in head.modules() if isinstance(m, nn.Linear)][-1]
            fc_in = []
            hook2 = fc.register_forward_hook(lambda m, i, o: fc_in.append(i[0]))
            head.eval()
            head(x)
            hook.remove(), hook2.remove()
            assert fc_in[0] is seen[0]  # the classifier reads the normalised features


def _he_fan_out_std(conv):
    return math.sqrt(2.0 / (conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels))


def test_copied_convs_follow_the_source_models_he_fan_out_rule():
    """Copied, channel-adapted and added (projection) convs: std within 10% of the authors'."""
    torch.manual_seed(1)
    local = to_local("paper:resnet110", d=3)
    checked = 0
    for aux in local.aux:
        for name, module in aux.named_modules():
            if isinstance(module, nn.Conv2d) and module.weight.numel() >= 256:
                std = module.weight.std().item()
                assert abs(std / _he_fan_out_std(module) - 1) < 0.10, (name, std)
                # zero mean: the source's sample mean and ours, each within ~3 standard errors
                assert abs(module.weight.mean().item()) < 6 * std / math.sqrt(module.weight.numel())
                checked += 1
            elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
                assert torch.all(module.weight == 1) and torch.all(module.bias == 0), name
            elif isinstance(module, nn.Linear):
                bound = 1 / math.sqrt(module.in_features)  # PyTorch's default, as the source fc
                assert module.weight.abs().max() <= 1.05 * bound  # (sampled with the source's empirical std)
                assert abs(module.weight.std().item() / (bound / math.sqrt(3)) - 1) < 0.15
    assert checked > 200


def test_adapted_layers_follow_the_fitted_fan_rule():
    # A custom fan-in rule (normal, std 0.5 / sqrt(fan_in), unlike PyTorch's uniform default):
    # a copy of conv c (32 -> 32) adapted to 8 input channels must get std 0.5 / sqrt(8 * 9).
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = nn.Conv2d(8, 32, 3, stride=2, padding=1)
            self.c = nn.Conv2d(32, 32, 3, padding=1)
            self.e = nn.Conv2d(32, 32, 3, padding=1)
            self.fc = nn.Linear(32, 5)
            for conv in (self.a, self.b, self.c, self.e):
                fan_in = conv.in_channels * 9
                nn.init.normal_(conv.weight, 0.0, 0.5 / math.sqrt(fan_in))

        def forward(self, x):
            for conv in (self.a, self.b, self.c, self.e):
                x = torch.relu(conv(x))
            return self.fc(x.mean((2, 3)))

    local = to_local(Net(), d=3, input_size=(3, 32, 32))
    assert local.aux[0].plan.selected == (2, 3)
    conv = [m for m in local.aux[0][0].modules() if isinstance(m, nn.Conv2d)][0]
    assert conv.in_channels == 8 and conv.out_channels == 32
    assert abs(conv.weight.std().item() / (0.5 / math.sqrt(8 * 9)) - 1) < 0.1
    assert describe_init(conv.weight).family == "normal"  # PyTorch's default would be uniform
    unchanged = [m for m in local.aux[0][1].modules() if isinstance(m, nn.Conv2d)][0]
    assert abs(unchanged.weight.std().item() / (0.5 / math.sqrt(32 * 9)) - 1) < 0.1


def test_zero_initialised_last_norm_stays_zero_in_copies():
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", num_classes=10)  # zero_init_last: bn2.weight == 0
    assert torch.all(model.layer1[0].bn2.weight == 0)
    local = to_local(model, d=2, input_size=(3, 32, 32))
    zeros = [m for aux in local.aux for n, m in aux.named_modules()
             if n.endswith("bn2") and isinstance(m, nn.BatchNorm2d)]
    assert zeros and all(torch.all(m.weight == 0) for m in zeros)


def test_init_comes_from_the_initial_weights_when_a_weights_file_is_loaded(tmp_path):
    from auglocal_fx import resolve_model

    trained = resolve_model("paper:resnet32").model
    with torch.no_grad():
        for p in trained.parameters():
            p.mul_(50.0)  # weights far from any init
    path = tmp_path / "w.pt"
    torch.save(trained.state_dict(), path)
    local = to_local("paper:resnet32", d=2, weights=str(path))
    conv = next(m for m in local.aux[3].modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3))
    assert abs(conv.weight.std().item() / _he_fan_out_std(conv) - 1) < 0.1


def test_describe_init_and_fit_fan_rule():
    torch.manual_seed(0)
    assert describe_init(torch.ones(7)) == TensorInit("constant", 1.0, 0.0)
    assert describe_init(torch.zeros(3, 3)).family == "constant"
    assert describe_init(torch.empty(4000).uniform_(-1, 1)).family == "uniform"
    assert describe_init(torch.empty(4000).normal_(0, 1)).family == "normal"
    assert describe_init(torch.nn.init.trunc_normal_(torch.empty(4000), std=0.02)).family == "normal"
    # std * sqrt(fan_out) constant -> fan_out rule
    samples = [(math.sqrt(2 / fo), fi, fo, "normal") for fi, fo in ((16, 144), (144, 288), (288, 576))]
    rule = fit_fan_rule(samples)
    assert rule.mode == "fan_out" and abs(rule.scale - math.sqrt(2)) < 1e-9
    assert abs(rule.std(10, 50) - math.sqrt(2 / 50)) < 1e-12
    fixed = fit_fan_rule([(0.02, 10, 20, "normal"), (0.02, 40, 80, "normal")])
    assert fixed == FanRule("fixed", 0.02, "normal")
    assert fit_fan_rule([]) is None


def test_init_reference_records_shared_parameters_once():
    conv = nn.Conv2d(3, 3, 1)
    model = nn.Sequential(conv, conv)
    ref = InitReference.from_model(model)
    assert len(ref.by_param) == 2  # weight and bias, once each


def test_copies_are_initialised_once_by_the_init_rule(monkeypatch):
    # PyTorch's default draw before the init rule's was a quarter of a conversion; a copied conv
    # must be drawn by the init rule alone (a reset on the meta device, while re-creating a
    # layer for another width, allocates and draws nothing).
    from auglocal_fx.models.cifar import resnet32

    model = resnet32()
    drawn = []
    reset = nn.Conv2d.reset_parameters

    def counting(self):
        if self.weight.device.type != "meta":
            drawn.append(self)
        reset(self)

    monkeypatch.setattr(nn.Conv2d, "reset_parameters", counting)
    local = to_local(model, d=2)
    assert not drawn
    conv = next(m for m in local.aux[3].modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3))
    assert abs(conv.weight.std().item() / _he_fan_out_std(conv) - 1) < 0.1


def test_a_layer_the_init_rule_cannot_draw_keeps_pytorchs_default():
    # The source has no BatchNorm and no Linear bias rule for an added layer: skipping PyTorch's
    # reset there would leave the memory `to_empty` gave (zeros or garbage).
    class NoNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = nn.Conv2d(8, 16, 3, stride=2, padding=1)
            self.c = nn.Conv2d(16, 16, 3, padding=1)
            self.fc = nn.Linear(16, 5)

        def forward(self, x):
            x = torch.relu(self.a(x))
            x = torch.relu(self.b(x))
            x = x + torch.relu(self.c(x))
            return self.fc(x.mean((2, 3)))

    model = NoNorm()
    ref = InitReference.from_model(model)
    norm = nn.BatchNorm1d(16)
    assert not ref.draws_all(norm, {})  # no BatchNorm in the source: no rule
    assert ref.draws_all(nn.Conv2d(8, 16, 3), {})  # a fitted rule for conv weight and bias
    local = to_local(model, d=2, input_size=(3, 16, 16))
    added = [m for aux in local.aux for m in aux.modules() if isinstance(m, nn.BatchNorm1d)]
    assert added  # the authors' BatchNorm1d before a one-block auxiliary classifier
    for m in added:
        assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
        assert torch.all(m.running_var == 1) and torch.all(m.running_mean == 0)
