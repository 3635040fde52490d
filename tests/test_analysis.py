"""Representation analysis: the CKA estimator's invariances, per-block CKA, probes, ``analyze``.

The estimator is checked at the feature-matrix level (``linear_cka``); the networks are the tiny
CNN of ``_tiny_models.py`` at 16x16 on the synthetic dataset, one of them trained for a few
seconds (module fixture), so the whole file stays well under a minute on two busy cores.
"""

import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset
from click.testing import CliRunner

from auglocal_fx import AugLocalError, block_cka, linear_probe, to_local
from auglocal_fx.analysis import analysis_data, compare, hsic_unbiased, linear_cka, load_trained
from auglocal_fx.cka import _gram
from auglocal_fx.training import train

from ._tiny_models import TinyCNN

# Module fixtures (runs: a trained network) are built once per process: under
# `pytest -n`, these tests stay on one worker.
pytestmark = pytest.mark.xdist_group("analysis")

try:
    from auglocal_fx_cli.analyze import analyze
except ImportError:  # not pip-installed: the package directory is cli/
    from cli.analyze import analyze

TINY = str(Path(__file__).with_name("_tiny_models.py")) + ":tiny_cnn"
SIZE = (3, 16, 16)


def _features(n=1000, seed=0):
    """Two feature matrices that share a low-dimensional signal (a CKA near 0.9)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 8, generator=g)
    x = z @ torch.randn(8, 200, generator=g) + 0.5 * torch.randn(n, 200, generator=g)
    y = torch.relu(z @ torch.randn(8, 300, generator=g)) + 0.5 * torch.randn(n, 300, generator=g)
    return x, y


# ----------------------------------------------------------------------------- the estimator


def test_hsic_matches_the_formula_written_out():
    """HSIC_1 of Song et al. (2012) with explicit ones-vectors and matrix products."""
    x, y = _features(20)
    k, l = (x @ x.T).double(), (y @ y.T).double()
    kt, lt = k - torch.diag(torch.diag(k)), l - torch.diag(torch.diag(l))
    n, one = 20, torch.ones(20, 1, dtype=torch.float64)
    expected = (torch.trace(kt @ lt) + (one.T @ kt @ one) * (one.T @ lt @ one) / ((n - 1) * (n - 2))
                - 2 / (n - 2) * (one.T @ kt @ lt @ one)) / (n * (n - 3))
    assert torch.allclose(hsic_unbiased(k, l), expected.squeeze(), rtol=1e-12)


def test_cka_of_features_with_themselves_is_one():
    x, _ = _features(300)
    assert linear_cka(x, x.clone(), batch_size=64) == pytest.approx(1.0, abs=1e-6)


def test_cka_is_invariant_to_orthogonal_transforms_and_isotropic_scaling():
    x, y = _features(400)
    q, _ = torch.linalg.qr(torch.randn(200, 200, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    reference = linear_cka(x, y, batch_size=100)
    assert linear_cka((x.double() @ q), y, batch_size=100) == pytest.approx(reference, abs=1e-9)
    assert linear_cka(3.7 * x, 0.01 * y, batch_size=100) == pytest.approx(reference, abs=1e-9)
    assert 0.5 < reference < 0.99  # a real similarity, not a degenerate 0 or 1


def test_minibatch_estimate_agrees_with_the_full_set_within_1e3():
    """Each minibatch HSIC_1 is an unbiased estimate of the same population HSIC as the one
    computed on all 1000 examples as a single batch, so the two CKA values differ only by the
    estimators' noise, which is small for features with a shared signal (measured 2.7e-4 here;
    the biased full-set formula of Kornblith et al. gives 0.9146)."""
    x, y = _features(1000)
    full = linear_cka(x, y)
    assert linear_cka(x, y, batch_size=250) == pytest.approx(full, abs=1e-3)
    xc, yc = x.double() - x.double().mean(0), y.double() - y.double().mean(0)
    biased = float((xc.T @ yc).norm() ** 2 / ((xc.T @ xc).norm() * (yc.T @ yc).norm()))
    assert full == pytest.approx(biased, abs=2e-3)


def test_gram_matrix_in_column_chunks_is_the_float64_product():
    x, _ = _features(16)
    assert torch.allclose(_gram(x.reshape(16, 10, 20), chunk=7), x.double() @ x.double().T, rtol=1e-12)


def test_batches_need_four_examples():
    x, y = _features(10)
    with pytest.raises(AugLocalError, match="at least 4"):
        linear_cka(x[:3], y[:3])
    with pytest.raises(AugLocalError, match="batch_size"):
        linear_cka(x, y, batch_size=2)


# ----------------------------------------------------------------------------- networks


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny CNN trained by BP for 4 epochs on the synthetic set (~8 s), and an AugLocal run of
    the same network cut short after 2 steps."""
    root = tmp_path_factory.mktemp("runs")
    with torch.random.fork_rng():
        torch.set_num_threads(1)
        common = dict(model=TINY, dataset="synthetic", input_size=16, warmup_epochs=0, batch_size=32,
                      lr=0.05, augment=False, progress=False)
        train(**common, method="bp", epochs=4, out=str(root / "bp"))
        train(**common, method="auglocal", d=2, max_steps=2, out=str(root / "auglocal"))
    return root


def test_block_cka_of_a_network_with_itself_is_one_per_block():
    local = to_local(TINY, input_size=SIZE, num_classes=10)
    images = torch.randn(40, *SIZE)
    result = block_cka(local, local, images, batch_size=16, progress=False)
    assert len(result.values) == len(local.blocks) and result.batches == 2 and result.examples == 32
    assert result.values == pytest.approx([1.0] * len(local.blocks), abs=1e-6)
    copy = to_local(TINY, input_size=SIZE, num_classes=10)
    copy.load_state_dict(local.state_dict())  # another object with the same weights: no shortcut
    assert block_cka(local, copy, images, batch_size=16, progress=False).values == pytest.approx(
        [1.0] * len(local.blocks), abs=1e-6)
    assert local.training  # the mode is restored


def test_plain_models_are_converted_at_the_data_size():
    torch.manual_seed(0)
    a, b = TinyCNN(), TinyCNN()
    result = compare(a, b, dataset="synthetic", batch_size=64, progress=False)
    assert result.names == ("TinyCNN", "TinyCNN") and result.input_size == (3, 32, 32)
    assert len(result.cka.values) == 4 and result.cka.batches == 2 and result.probe_a is None
    direct = block_cka(a, b, torch.randn(16, *SIZE), batch_size=8, progress=False)
    assert direct.shapes[0] == (8, 16, 16)


def test_trained_network_differs_from_its_initialisation(runs):
    trained = load_trained(runs / "bp")
    torch.manual_seed(0)
    fresh = to_local(TINY, input_size=SIZE, num_classes=10)
    values = block_cka(trained, fresh, torch.randn(64, *SIZE), batch_size=32, progress=False).values
    assert all(0.0 < v < 0.999 for v in values)


def test_linear_probe_on_random_init_is_far_below_trained(runs):
    """Trained network: BP, 4 epochs on the synthetic set (the ``runs`` fixture)."""
    data = analysis_data("synthetic", SIZE)
    trained = linear_probe(runs / "bp", data.train, data.test, progress=False)
    torch.manual_seed(0)
    fresh = linear_probe(to_local(TINY, input_size=SIZE, num_classes=10), data.train, data.test, progress=False)
    assert trained.accuracy[-1] >= fresh.accuracy[-1] + 25, (trained.accuracy, fresh.accuracy)
    again = linear_probe(runs / "bp", data.train, data.test, progress=False)
    assert again.accuracy == trained.accuracy  # deterministic
    assert trained.features == [8, 8, 8, 8] and trained.test_examples == 128


def test_cuda_gives_the_cpu_values(runs):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    local, data = load_trained(runs / "bp"), analysis_data("synthetic", SIZE, probe_train_subset=256)
    cpu = block_cka(local, runs / "auglocal", data.test, batch_size=32, progress=False)
    gpu = block_cka(local, runs / "auglocal", data.test, batch_size=32, device="cuda", progress=False)
    assert gpu.values == pytest.approx(cpu.values, abs=1e-4)
    assert next(local.parameters()).device.type == "cpu"  # moved back
    probe_cpu = linear_probe(local, data.train, data.test, progress=False).accuracy
    probe_gpu = linear_probe(local, data.train, data.test, device="cuda", progress=False).accuracy
    assert probe_gpu == pytest.approx(probe_cpu, abs=2.0)


@pytest.mark.parametrize("other, message", [
    (lambda: TinyCNN(depth=6), "have 4 and 6 blocks"),
    (lambda: TinyCNN(width=16), r"block 0 outputs \(8, 16, 16\) in one network and \(16, 16, 16\)"),
])
def test_mismatched_architectures_are_refused(other, message):
    local = to_local(TINY, input_size=SIZE, num_classes=10)
    with pytest.raises(AugLocalError, match=message):
        block_cka(local, to_local(other(), input_size=SIZE), torch.randn(8, *SIZE), progress=False)


# ----------------------------------------------------------------------------- checkpoints and CLI


def _invoke(args):
    return CliRunner().invoke(analyze, args + ["--quiet"])


def test_cli_table_json_and_plot(runs, tmp_path):
    a, b = str(runs / "bp"), str(runs / "auglocal" / "model.pt")
    result = _invoke([a, b, "--batch-size", "32", "--probe", "--json", str(tmp_path / "r.json"),
                      "--plot", str(tmp_path / "cka.png")])
    assert result.exit_code == 0, result.output
    assert "tiny_cnn, bp" in result.output and "auglocal d=2" in result.output
    assert "average CKA over 4 blocks" in result.output and "probe A (%)" in result.output
    record = json.loads((tmp_path / "r.json").read_text())
    assert record["dataset"] == "synthetic" and record["input_size"] == [3, 16, 16]
    assert len(record["blocks"]) == 4 and {"cka", "probe_a", "probe_b"} <= set(record["blocks"][0])
    assert record["cka_protocol"]["batches"] == 4 and record["cka_protocol"]["batch_size"] == 32
    assert (tmp_path / "cka.png").stat().st_size > 0
    printed = _invoke([a, a, "--batch-size", "32", "--json", "-"])
    assert printed.exit_code == 0, printed.output
    assert json.loads(printed.output)["mean_cka"] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_bytes(b"not a torch file"), "corrupt"),
    (lambda p: torch.save({"weight": torch.zeros(2)}, p), "no last.pt"),
])
def test_cli_bad_checkpoint_is_one_line(runs, tmp_path, make, message):
    bad = tmp_path / "model.pt"
    make(bad)
    result = _invoke([str(runs / "bp"), str(bad)])
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and message in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_cli_training_state_and_empty_folder_are_refused(runs, tmp_path):
    result = _invoke([str(runs / "bp" / "last.pt"), str(runs / "bp")])
    assert result.exit_code == 1 and "training state" in result.output
    result = _invoke([str(tmp_path), str(runs / "bp")])
    assert result.exit_code == 1 and "no model.pt" in result.output


def test_block_cka_and_probes_take_a_dataloader():
    torch.manual_seed(0)
    a = to_local(TINY, input_size=SIZE, num_classes=10).eval()
    b = to_local(TINY, input_size=SIZE, num_classes=10).eval()
    images, labels = torch.randn(40, *SIZE), torch.arange(40) % 4
    loader = DataLoader(TensorDataset(images, labels), batch_size=7)  # batches unlike the CKA's 16
    result = block_cka(a, b, loader, batch_size=16, progress=False)
    with torch.no_grad():  # the reference: the estimator on features taken by hand, 2 batches of 16
        expected = [linear_cka(fa[:32].flatten(1), fb[:32].flatten(1), batch_size=16)
                    for fa, fb in zip(a.block_outputs(images), b.block_outputs(images))]
    assert result.examples == 32 and result.batches == 2
    assert result.values == pytest.approx(expected, abs=1e-9)
    dataset = TensorDataset(images, labels)
    from_loaders = linear_probe(a, DataLoader(dataset, batch_size=5), DataLoader(dataset, batch_size=3),
                                progress=False)
    assert from_loaders.accuracy == linear_probe(a, dataset, dataset, progress=False).accuracy
    assert from_loaders.train_examples == 40


@pytest.mark.parametrize("bad", [[(torch.randn(*SIZE), 0)] * 8, "images", torch.randn(3)])
def test_block_cka_refuses_other_inputs_in_one_line(bad):
    local = to_local(TINY, input_size=SIZE, num_classes=10)
    with pytest.raises(AugLocalError) as err:
        block_cka(local, local, bad, batch_size=4, progress=False)
    assert "\n" not in str(err.value)
