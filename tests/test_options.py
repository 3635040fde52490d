"""ConversionOptions: validation, words, checkpoint dict, and the entry points that take it."""

import pytest
import torch
from torch import nn

from auglocal_fx import AugLocalError, ConversionOptions, load, to_local
from auglocal_fx.costs import cost_report
from auglocal_fx.training import TrainConfig, _check_config


class _BigHead(nn.Module):
    """Two small convolutions and a head (pre-logits MLP + classifier) holding most parameters."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 8, 3, padding=1)
        self.pre_logits = nn.Sequential(nn.Linear(8, 256), nn.ReLU())
        self.fc = nn.Linear(256, 4)

    def forward(self, x):
        x = torch.relu(self.c(torch.relu(self.b(torch.relu(self.a(x))))))
        return self.fc(self.pre_logits(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)))


@pytest.mark.parametrize("bad, message", [
    (dict(d=1), "auxiliary depth d=1"),
    (dict(tau=1.5), "pyramid decay"),
    (dict(selection="random"), "unknown selection"),
    (dict(aux_head="wide"), "unknown auxiliary head"),
    (dict(aux_init="zeros"), "unknown auxiliary initialisation"),
    (dict(rule="backprop"), "unknown local learning rule"),
    (dict(aux_checkpoint="yes"), "aux_checkpoint must be"),
    (dict(normalization=((0.5,), (0.2, 0.3))), "normalization must be"),
    (dict(input_size=(3, 8, 8), normalization=((0.5, 0.5), (0.2, 0.2))), "1 or 3 values"),
])
def test_options_validate_themselves(bad, message):
    with pytest.raises(AugLocalError, match=message):
        ConversionOptions(**bad)
    with pytest.raises(AugLocalError, match=message):  # and so does every replace
        ConversionOptions().replace(**bad)


def test_options_are_frozen_and_normalised():
    opts = ConversionOptions(tau=1, input_size=[3, 8, 8], block_boundaries=["a"],
                             normalization=([0.5], [0.25]))
    assert opts == ConversionOptions(tau=1.0, input_size=(3, 8, 8), block_boundaries=("a",),
                                     normalization=((0.5,), (0.25,)))
    with pytest.raises(Exception):
        opts.d = 3


def test_describe_in_words():
    assert ConversionOptions(d=6).describe() == "d=6, tau=0.5, pyramid=True, selection=uniform"
    both = ConversionOptions(d=3, tau=0.25, pyramid=False, selection="sequential", rule="auglocal+infopro",
                             resolved_aux_head="slim")
    assert both.describe() == ("d=3, tau=0.25, pyramid=False, selection=sequential, rule=auglocal+infopro, "
                               "slim auxiliary heads")
    assert ConversionOptions(rule="dgl").describe() == "rule=dgl, every block but the last trained locally"
    assert ConversionOptions(d=4).describe("brief") == "auglocal d=4"
    assert ConversionOptions(rule="predsim").describe("brief") == "predsim"
    assert ConversionOptions().describe("method") == "AugLocal"
    assert ConversionOptions(rule="infopro").describe("method") == "local learning"
    assert ConversionOptions(d=3, rule="dgl", aux_checkpoint=True).describe("repr") == (
        "d=3, tau=0.5, pyramid=True, selection='uniform', aux_head='auto', rule='dgl', aux_checkpoint=True")


def test_checkpoint_dict_round_trip_and_old_dicts():
    opts = ConversionOptions(d=3, input_size=(3, 8, 8), num_classes=5, normalization=((0.5,), (0.25,)),
                             model_kwargs={"depth": 2}, resolved_aux_head="copy", block_boundaries=("a",))
    data = opts.to_dict()
    assert data["input_size"] == [3, 8, 8] and data["normalization"] == [[0.5], [0.25]]
    assert ConversionOptions.from_dict(data) == opts
    # A checkpoint from before aux_head, rule, normalization, aux_init and aux_checkpoint.
    old = {"d": 2, "tau": 0.5, "pyramid": True, "selection": "uniform", "input_size": [3, 8, 8],
           "num_classes": 5, "block_boundaries": None}
    again = ConversionOptions.from_dict(old)
    assert (again.aux_head, again.rule, again.aux_init, again.aux_checkpoint) == ("copy", "auglocal", "init", False)
    with pytest.raises(AugLocalError, match="unknown conversion option"):
        ConversionOptions.from_dict(dict(old, depth=3))


def test_to_local_takes_options_and_keywords_override(tiny_resnet):
    opts = ConversionOptions(d=3, tau=0.0, selection="sequential", input_size=(3, 16, 16))
    local = to_local(tiny_resnet, options=opts)
    assert (local.conversion.d, local.conversion.tau, local.conversion.selection) == (3, 0.0, "sequential")
    assert local.conversion.num_classes == 5 and local.options["d"] == 3
    # Sequential selection at d=3, tau=0: block 0 copies blocks 1 and 2 (docs/method.md).
    assert local.plan[0].selected == (1, 2)
    override = to_local(tiny_resnet, d=2, options=opts)
    assert override.conversion.d == 2 and override.conversion.selection == "sequential"
    assert local.extra_repr().startswith("blocks=4, aux_nets=1, d=3, tau=0.0, pyramid=True, selection='sequential'")


def test_resolved_aux_head_is_stored_and_saved(tmp_path):
    model = _BigHead()
    head = sum(p.numel() for m in (model.pre_logits, model.fc) for p in m.parameters())
    assert head >= sum(p.numel() for p in model.parameters()) / 2  # so "auto" means slim
    local = to_local(model, d=2, input_size=(3, 8, 8))
    assert local.conversion.aux_head == "auto" and local.conversion.resolved_aux_head == "slim"
    assert local.conversion.describe().endswith(", slim auxiliary heads")
    local.save(tmp_path / "net.pt")
    saved = torch.load(tmp_path / "net.pt", weights_only=True)["options"]
    assert saved["aux_head"] == "auto" and saved["resolved_aux_head"] == "slim"
    assert load(tmp_path / "net.pt", model=_BigHead()).conversion == local.conversion


def test_train_config_takes_options():
    cfg = _check_config(TrainConfig(conversion=ConversionOptions(d=3, rule="dgl", aux_init="copy")),
                        {"dataset": "digits"})
    assert (cfg.d, cfg.rule, cfg.aux_init, cfg.conversion) == (3, "dgl", "copy", None)
    assert cfg.local_options() == ConversionOptions(d=3, rule="dgl", aux_init="copy")
    with pytest.raises(AugLocalError, match="d is given both"):
        _check_config(TrainConfig(d=4, conversion=ConversionOptions(d=3)), {"dataset": "digits"})
    with pytest.raises(AugLocalError, match="auxiliary depth"):
        _check_config(TrainConfig(d=1), {"dataset": "digits"})


def test_cost_report_takes_options(tiny_resnet):
    slim = ConversionOptions(aux_head="slim", input_size=(3, 16, 16))
    report = cost_report(tiny_resnet, depths=(2,), rules=("auglocal",), options=slim, memory=False,
                         timing=False)
    reference = to_local(tiny_resnet, d=2, aux_head="slim", input_size=(3, 16, 16))
    assert report.rows[0].params == sum(p.numel() for p in reference.parameters())
