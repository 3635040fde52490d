"""Rules as plug-ins: a toy rule in one file is a rule of to_local, report --rules and train --rule."""

import importlib
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from auglocal_fx import AugLocalError, solve_budget, to_local
from auglocal_fx.costs import CostReport, CostRow
from auglocal_fx.rules import RULES, LocalRule, register_rule, unregister_rule
from auglocal_fx.tables import cost_table

try:
    from auglocal_fx_cli.main import cli
except ImportError:  # not pip-installed: the package directory is cli/
    from cli.main import cli

from .conftest import batch

TINY = str(Path(__file__).with_name("_tiny_models.py")) + ":tiny_cnn"


@pytest.fixture
def toy():
    """The toy rule registered (by importing its file), and unregistered afterwards."""
    module = importlib.import_module("tests._toy_rule")
    if "toy" not in RULES:  # imported by an earlier test, then unregistered
        register_rule(module.ToyRule)
    yield module.ToyRule
    unregister_rule("toy")


def test_toy_rule_converts_and_trains(toy, tiny_resnet):
    local = to_local(tiny_resnet, rule="toy", input_size=(3, 16, 16))
    # Every block but the last, each with pooling and one Linear(C_j, 5) on its output.
    widths = [shape[0] for shape in local.block_shapes[:-1]]
    assert [a[-1].in_features for a in local.aux] == widths and len(widths) == len(local.blocks) - 1
    assert all(a[-1].out_features == 5 for a in local.aux)
    assert local.conversion.describe() == "rule=toy, every block but the last trained locally"
    losses = local.train().train_step(*batch((3, 16, 16)))
    assert losses.shape == (len(local.blocks),) and torch.isfinite(losses).all()
    assert all(p.grad is not None for p in local.aux.parameters())


def test_toy_rule_is_a_report_row(toy, tiny_resnet):
    result = CliRunner().invoke(cli, ["report", TINY, "--input-size", "3", "16", "16", "--rules", "bp", "toy",
                                      "--flops-only", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["method"]: r for r in json.loads(result.output)["rows"]}
    assert set(rows) == {"BP", "Toy"}  # the registry's label; no depth, so one row
    # Toy's parameters: the model's, plus one Linear(8, 10) per block but the last (by hand).
    from tests._tiny_models import tiny_cnn
    local = to_local(tiny_cnn(), rule="toy", input_size=(3, 16, 16))
    assert rows["Toy"]["params"] == rows["BP"]["params"] + (len(local.blocks) - 1) * (8 * 10 + 10)


def test_toy_rule_trains_from_the_cli(toy, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", TINY, "--rule", "toy", "--dataset", "synthetic", "--input-size",
                                      "3", "16", "16", "--batch-size", "4", "--max-steps", "1", "--test-subset",
                                      "4", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert len(record["aux_acc"]) == 3  # tiny_cnn: 4 blocks, every one but the last local


def test_unknown_rule_is_refused_once_unregistered(toy, tiny_resnet):
    unregister_rule("toy")
    with pytest.raises(AugLocalError, match="unknown local learning rule 'toy'"):
        to_local(tiny_resnet, rule="toy", input_size=(3, 16, 16))
    register_rule(toy)


def test_registry_refuses_taken_and_nameless_rules():
    class Again(LocalRule):
        name, label = "dgl", "DGL again"

    class Nameless(LocalRule):
        label = "Nameless"

    with pytest.raises(AugLocalError, match="already registered"):
        register_rule(Again)
    with pytest.raises(AugLocalError, match="needs a name and a label"):
        register_rule(Nameless)
    assert RULES["dgl"].label == "DGL"


def test_registry_lists_by_order(toy):
    assert tuple(RULES) == ("auglocal", "dgl", "predsim", "infopro", "auglocal+infopro", "toy")


def test_budget_refuses_rules_without_depth(tiny_resnet):
    with pytest.raises(AugLocalError, match="the dgl rule has neither"):
        solve_budget(tiny_resnet, "3x", rule="dgl", input_size=(3, 16, 16))


def test_second_loss_note_follows_the_registry_flag():
    def table(second_loss):
        rows = [CostRow("BP", None, 100, 10), CostRow("X", None, 150, 20, rule="x", second_loss=second_loss)]
        return cost_table(CostReport("m", (3, 8, 8), 2, "cpu", rows, []))

    assert "decoders of PredSim's and InfoPro's second losses" in table(True)
    assert "second losses" not in table(False)


def test_report_rows_carry_the_second_loss_flag(tiny_resnet):
    from auglocal_fx.costs import cost_report

    report = cost_report(tiny_resnet, depths=(2,), rules=("auglocal", "predsim", "dgl"), input_size=(3, 16, 16),
                         memory=False, timing=False)
    # PredSim's similarity-matching loss is its second loss; AugLocal and DGL use cross-entropy only.
    assert [(r.method, r.second_loss) for r in report.rows] == [
        ("AugLocal d=2", False), ("PredSim", True), ("DGL", False)]
