"""``auglocal-fx train`` through click's CliRunner: a fraction of an epoch, and one-line errors."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

try:
    from auglocal_fx_cli.train import train
except ImportError:  # not pip-installed: the package directory is cli/
    from cli.train import train

TINY = str(Path(__file__).with_name("_tiny_models.py")) + ":tiny_cnn"


def _invoke(args):
    return CliRunner().invoke(train, args, catch_exceptions=False)


def test_train_on_synthetic(tmp_path):
    out = tmp_path / "run"
    result = _invoke([TINY, "--dataset", "synthetic", "--input-size", "3", "16", "16", "--batch-size", "4",
                      "--max-steps", "3", "--test-subset", "8", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "test accuracy" in result.output and "auxiliary nets" in result.output
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 3 and record["partial"]
    assert (out / "model.pt").exists() and (out / "last.pt").exists()


def test_train_paper_resnet32_on_digits_with_bp(tmp_path):
    result = _invoke(["paper:resnet32", "--dataset", "digits", "--method", "bp", "--batch-size", "2",
                      "--max-steps", "2", "--test-subset", "8", "--out", str(tmp_path), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "auxiliary" not in result.output


def test_train_paper_resnet32_on_digits_with_auglocal(tmp_path):
    result = _invoke(["paper:resnet32", "--dataset", "digits", "--d", "3", "--batch-size", "2",
                      "--max-steps", "2", "--test-subset", "8", "--out", str(tmp_path), "--quiet"])
    assert result.exit_code == 0, result.output
    assert len(json.loads((tmp_path / "metrics.jsonl").read_text())["aux_acc"]) == 16 - 2 - 1


@pytest.mark.parametrize("args, message", [
    (["--dataset", "cifar10", "--data-dir", "/nonexistent/cifar"], "does not exist"),
    (["--dataset", "svhn"], "--data-dir"),
    (["--d", "1"], "auxiliary depth d=1 is invalid"),
    (["--warmup-epochs", "-1"], "--warmup-epochs"),
    (["--pipeline", "2", "--method", "bp"], "pipeline needs local learning"),
    (["--pipeline", "0"], "--pipeline"),
    (["--method", "bp", "--aux-checkpoint"], "needs method 'auglocal'"),
])
def test_library_errors_are_one_line(tmp_path, args, message):
    result = CliRunner().invoke(train, [TINY, "--out", str(tmp_path), "--quiet"] + args)
    assert result.exit_code in (1, 2)  # 2: click's own usage errors
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error: ") and message in last, result.output
    assert "Traceback" not in result.output
    if result.exit_code == 1:  # ours: exactly one line
        assert len(result.output.strip().splitlines()) == 1
