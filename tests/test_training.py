"""The trainer: AMP, BP, strict export, resume after SIGKILL, data parallel, checkpoint errors."""

import copy
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from auglocal_fx import AugLocalError, resolve_model
import torch.nn.functional as F

from auglocal_fx.data import DEFAULT_FASHION_MNIST_DIR
from auglocal_fx.recipe import learning_rate
from auglocal_fx._train_loop import Run
from auglocal_fx.training import TrainConfig, default_dataset, train

# Module fixtures (gloo_runs: spawned training runs) are built once per process: under
# `pytest -n`, these tests stay on one worker.
pytestmark = pytest.mark.xdist_group("training")

TINY = str(Path(__file__).with_name("_tiny_models.py")) + ":tiny_cnn"
TINY_NOBN = str(Path(__file__).with_name("_tiny_models.py")) + ":tiny_nobn"
ROOT = Path(__file__).resolve().parents[1]


def _config(out, **kw):
    base = dict(model=TINY, dataset="synthetic", input_size=16, batch_size=4, train_subset=16, test_subset=8,
                epochs=1, out=str(out), progress=False)
    base.update(kw)
    return TrainConfig(**base)


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_bf16_amp_writes_all_outputs_with_the_per_epoch_schedule(tmp_path):
    result = train(_config(tmp_path, amp="bf16", epochs=3, lr=0.2, warmup_epochs=1))
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(l["train_loss"])) for l in lines)
    assert len(lines[-1]["aux_acc"]) == len(lines[-1]["local_losses"]) >= 1
    assert result.aux_acc == lines[-1]["aux_acc"]
    # the rate of each epoch, set before it runs: warmup from 0.01, then the cosine
    assert [l["lr"] for l in lines] == pytest.approx([learning_rate(e, 3, 0.2, 1) for e in (1, 2, 3)])
    assert lines[0]["lr"] == pytest.approx(0.01) and lines[1]["lr"] == pytest.approx(0.05)
    for name in ("last.pt", "model.pt", "curves.png"):
        assert (tmp_path / name).stat().st_size > 0


@pytest.mark.parametrize("method", ["auglocal", "bp"])
def test_gradient_clipping_and_label_smoothing_act(tmp_path, method):
    cfg = _config(tmp_path, method=method, grad_clip=1e-3, label_smoothing=0.2,
                  step_each_module=False)  # the gradients stay after the step, to be read
    run = Run(cfg, 0, 1, 0)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    with torch.no_grad():
        out = run.net(x)  # train mode: the same batch statistics as the step's forward
    logits, aux_logits = out if method == "auglocal" else (out, [])
    losses = run.train_step(x, y)
    expected = [F.cross_entropy(a, y, label_smoothing=0.2) for a in aux_logits]
    expected.append(F.cross_entropy(logits, y, label_smoothing=0.2))
    torch.testing.assert_close(losses, torch.stack(expected), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(losses[-1], F.cross_entropy(logits, y), atol=1e-4)  # smoothing changed it
    for group in run._clip_groups():  # the gradients the step used: each group clipped to 1e-3
        norm = torch.norm(torch.stack([p.grad.norm() for p in group if p.grad is not None]))
        assert norm.item() == pytest.approx(1e-3, rel=1e-3)
    assert len(run._clip_groups()) == (len(run.net.aux) + 1 if method == "auglocal" else 1)


def test_first_update_is_sgd_on_the_clipped_gradient(tmp_path):
    cfg = _config(tmp_path, grad_clip=1e-3)
    run = Run(cfg, 0, 1, 0)
    assert run.optimizer.defaults["nesterov"] and cfg.momentum > 0 and cfg.weight_decay > 0
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    twin = copy.deepcopy(run.net)  # the raw gradients: the same step, outside the trainer
    twin.train_step(x, y)
    raw = {name: p.grad for name, p in twin.named_parameters()}
    params = dict(run.net.named_parameters())
    before = {name: p.detach().clone() for name, p in params.items()}
    names = {id(p): name for name, p in params.items()}
    run.train_step(x, y)
    lr, m, wd = run.optimizer.param_groups[0]["lr"], cfg.momentum, cfg.weight_decay
    scales = []
    for group in run._clip_groups():  # one per local module
        group = [names[id(p)] for p in group]
        norm = torch.norm(torch.stack([raw[n].norm() for n in group])).item()
        scales.append(min(1.0, 1e-3 / (norm + 1e-6)))
        for n in group:
            # Nesterov SGD, first step: buf = g + wd * w, w -= lr * (g + wd * w + m * buf)
            clipped = before[n] - lr * (1 + m) * (raw[n] * scales[-1] + wd * before[n])
            torch.testing.assert_close(params[n].detach(), clipped, rtol=1e-5, atol=1e-8)
    assert max(scales) < 0.1  # every module was clipped, so the unclipped update differs:
    name = max(raw, key=lambda n: raw[n].abs().max())
    unclipped = before[name] - lr * (1 + m) * (raw[name] + wd * before[name])
    assert not torch.allclose(params[name].detach(), unclipped, rtol=1e-3, atol=1e-6)


def test_default_dataset_can_tell_methods_apart():
    expected = "fashion-mnist" if os.path.isdir(DEFAULT_FASHION_MNIST_DIR) else "digits"
    assert default_dataset() == expected
    assert TrainConfig().dataset is None  # resolved when the run starts


@pytest.mark.parametrize("method", ["auglocal", "bp"])
def test_final_weights_load_strictly_into_the_original_model(tmp_path, method):
    train(_config(tmp_path, method=method, max_steps=2))
    fresh = resolve_model(TINY, num_classes=10, input_size=(3, 16, 16)).create()
    fresh.load_state_dict(_weights(tmp_path / "model.pt"), strict=True)


def test_fp16_needs_cuda(tmp_path):
    with pytest.raises(AugLocalError, match="bf16"):
        train(_config(tmp_path, amp="fp16", device="cpu"))


def test_corrupt_or_foreign_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "last.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(AugLocalError, match="cannot read checkpoint"):
        train(_config(tmp_path, resume=True))
    torch.save({"weights": torch.zeros(1)}, tmp_path / "last.pt")
    with pytest.raises(AugLocalError, match="not an auglocal-fx training checkpoint"):
        train(_config(tmp_path, resume=True))
    with pytest.raises(AugLocalError, match="--resume"):
        train(_config(tmp_path))


def test_checkpoint_of_another_run_is_refused(tmp_path):
    train(_config(tmp_path, max_steps=1))
    with pytest.raises(AugLocalError, match="different run"):
        train(_config(tmp_path, seed=5, resume=True))


_RUN = textwrap.dedent("""
    import sys
    from auglocal_fx.training import train
    train(model=sys.argv[1], dataset="synthetic", input_size=16, batch_size=4, train_subset=32,
          test_subset=8, epochs=int(sys.argv[3]), out=sys.argv[2], seed=3, progress=False,
          resume=sys.argv[4] == "1")
""")


def _launch(out, epochs, resume=False):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-c", _RUN, TINY, str(out), str(epochs), "1" if resume else "0"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_resume_after_sigkill_gives_the_same_weights(tmp_path):
    epochs = 5
    straight = _launch(tmp_path / "straight", epochs)
    killed = _launch(tmp_path / "killed", epochs)
    ckpt = tmp_path / "killed" / "last.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    done = torch.load(ckpt, weights_only=True)["epoch"]
    assert 1 <= done < epochs, f"the run was not killed mid-training (epoch {done})"
    resumed = _launch(tmp_path / "killed", epochs, resume=True)
    for proc in (straight, resumed):
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err.decode()[-2000:]
    a, b = _weights(tmp_path / "straight" / "model.pt"), _weights(tmp_path / "killed" / "model.pt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    full_a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)["model"]
    full_b = torch.load(tmp_path / "killed" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(full_a[k], full_b[k]) for k in full_a)  # auxiliary nets too


# Batch-norm-free model and no augmentation: with batch norm, each process would normalise with
# its own half-batch statistics, which legitimately differs from the whole batch. d=3: the
# auxiliary network copies two blocks, so its head has no BatchNorm1d either. warmup_epochs=1:
# one epoch of the paper's schedule without warmup runs at lr 0. Spawned runs cost seconds of
# imports each, so the four runs are made once for the two tests below.
_GLOO_RUNS = {"one": dict(step_each_module=False), "two": dict(step_each_module=False, nproc=2),
              "two_each": dict(step_each_module=True, nproc=2), "pipe": dict(step_each_module=True, pipeline=2)}


@pytest.fixture(scope="module")
def gloo_runs(tmp_path_factory):
    """The weights after 3 steps of one process, two gloo processes stepping at the end or each
    module, and two pipeline workers; ``last.pt``'s (auxiliary networks too) where kept whole."""
    root = tmp_path_factory.mktemp("gloo")
    common = dict(model=TINY_NOBN, augment=False, max_steps=3, batch_size=8, train_subset=32, device="cpu", d=3,
                  warmup_epochs=1, grad_clip=0.5, threads=1)
    runs = {}
    for name, extra in _GLOO_RUNS.items():
        train(_config(root / name, **common, **extra))
        # a pipeline's last.pt is a manifest (its workers' parts): its model.pt has the weights
        runs[name] = {"model.pt": _weights(root / name / "model.pt"),
                      "last.pt": None if name == "pipe" else _weights(root / name / "last.pt")["model"]}
    return runs


def test_two_gloo_processes_equal_one_process_on_the_whole_batch(gloo_runs):
    a, b = gloo_runs["one"]["model.pt"], gloo_runs["two"]["model.pt"]
    start = _initial_weights(TINY_NOBN, seed=0)
    moved = False
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
        moved |= not torch.allclose(a[key], start[key], atol=1e-4)
    assert moved


def _initial_weights(spec, seed):
    """The weights a run with ``seed`` starts from: it seeds, then creates the model."""
    torch.manual_seed(seed)
    return resolve_model(spec, num_classes=10, input_size=(3, 16, 16)).model.state_dict()


@pytest.mark.parametrize("seed", [0, 3])
def test_initial_weights_helper_matches_the_run(tmp_path, seed):
    """Guards the "weights moved" check above: the helper must give the run's starting point."""
    # One epoch without warmup runs at the cosine's end point, lr 0: the weights stay put.
    train(_config(tmp_path, model=TINY_NOBN, seed=seed, max_steps=1, warmup_epochs=0, method="bp"))
    trained, start = _weights(tmp_path / "model.pt"), _initial_weights(TINY_NOBN, seed)
    for key in trained:
        assert torch.equal(trained[key], start[key]), key


@pytest.mark.parametrize("method", ["auglocal", "bp"])
def test_trains_a_model_object(tmp_path, method):
    from tests._tiny_models import TinyCNN

    model = TinyCNN(num_classes=10)
    result = train(_config(tmp_path, model=model, method=method, max_steps=2))
    assert result.history and (tmp_path / "model.pt").exists()
    TinyCNN(num_classes=10).load_state_dict(_weights(tmp_path / "model.pt"), strict=True)


@pytest.mark.parametrize("rule", ["infopro", "predsim"])
def test_trains_with_a_comparison_rule(tmp_path, rule):
    result = train(_config(tmp_path, rule=rule, aux_head="copy", max_steps=2))
    assert len(result.aux_acc) == 3  # tiny_cnn: 4 blocks, every block but the last local
    fresh = resolve_model(TINY, num_classes=10, input_size=(3, 16, 16)).create()
    fresh.load_state_dict(_weights(tmp_path / "model.pt"), strict=True)
    saved = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=True)
    assert saved["config"]["rule"] == rule


# -- starting weights, builder arguments and auxiliary initialisation

NOBN_FILE = """
from tests._tiny_models import TinyCNN

def make(num_classes=10, width=8):
    return TinyCNN(num_classes, width=width, batch_norm=False)
"""


@pytest.mark.parametrize("method", ["auglocal", "bp"])
def test_training_starts_from_the_weights_file_with_the_model_kwargs(tmp_path, method, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    (tmp_path / "nobn.py").write_text(NOBN_FILE)
    spec = f"{tmp_path / 'nobn.py'}:make"
    torch.manual_seed(123)
    start = resolve_model(spec, num_classes=10, input_size=(3, 16, 16), model_kwargs={"width": 6}).model
    torch.save({"model": start.state_dict(), "epoch": 7}, tmp_path / "pretrained.pth")  # torchvision's layout
    out = tmp_path / "run"
    # One epoch without warmup runs at lr 0 (see above): the weights stay where they started.
    train(_config(out, model=spec, model_kwargs={"width": 6}, weights=str(tmp_path / "pretrained.pth"),
                  aux_init="copy", method=method, max_steps=1, warmup_epochs=0))
    trained = _weights(out / "model.pt")
    assert trained["fc.weight"].shape == (10, 6)
    for key, value in start.state_dict().items():
        assert torch.equal(trained[key], value), key
    from auglocal_fx.analysis import load_trained  # rebuilds the run's model from last.pt's config

    assert torch.equal(load_trained(out).export().fc.weight, start.fc.weight)
    if method == "auglocal":  # the auxiliary copies started from the file's weights too
        state = _weights(out / "last.pt")["model"]
        source = start.state_dict()
        copies = {k.split(".", 3)[3]: v for k, v in state.items() if k.startswith("aux.0.")}
        copies = {k: v for k, v in copies.items() if k in source and v.shape == source[k].shape}
        assert "fc.weight" in copies and any(k.startswith("features.") for k in copies)
        assert all(torch.equal(v, source[k]) for k, v in copies.items())
    with pytest.raises(AugLocalError, match="different run"):
        train(_config(out, model=spec, model_kwargs={"width": 6}, weights=str(tmp_path / "pretrained.pth"),
                      aux_init="init", method=method, max_steps=1, warmup_epochs=0, resume=True))


def test_checkpoints_from_before_the_model_options_resume(tmp_path):
    train(_config(tmp_path, max_steps=1))
    ckpt = _weights(tmp_path / "last.pt")
    for key in ("model_kwargs", "weights", "aux_init"):
        del ckpt["config"][key]
    torch.save(ckpt, tmp_path / "last.pt")
    train(_config(tmp_path, max_steps=1, resume=True))  # no "different run"
    with pytest.raises(AugLocalError, match="different run"):
        train(_config(tmp_path, max_steps=1, resume=True, aux_init="copy"))


def test_model_options_are_checked(tmp_path):
    with pytest.raises(AugLocalError, match="weights file .* does not exist"):
        train(_config(tmp_path, weights=str(tmp_path / "nope.pt")))
    with pytest.raises(AugLocalError, match="unknown auxiliary initialisation"):
        train(_config(tmp_path, aux_init="pretrained"))


def test_aux_checkpoint_trains_the_same_weights_with_recomputed_aux(tmp_path, monkeypatch):
    import auglocal_fx.local_net

    calls = []
    real = auglocal_fx.local_net.checkpoint
    monkeypatch.setattr(auglocal_fx.local_net, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    train(_config(tmp_path / "kept", max_steps=2))
    assert not calls
    train(_config(tmp_path / "recomputed", max_steps=2, aux_checkpoint=True))
    # tiny_cnn at d=2: blocks 0-1, and the output module's blocks 2 and 3, each recomputed on its
    # own (their auxiliary networks and the head keep their activations); 2 steps
    assert len(calls) == 2 * 4
    kept, recomputed = _weights(tmp_path / "kept" / "model.pt"), _weights(tmp_path / "recomputed" / "model.pt")
    assert kept.keys() == recomputed.keys() and all(torch.equal(kept[k], recomputed[k]) for k in kept)
    with pytest.raises(AugLocalError, match="needs method 'auglocal'"):
        train(_config(tmp_path / "bp", method="bp", aux_checkpoint=True))


# -- stepping each local module as soon as its loss is back-propagated (issue 22)


def _batches(n, seed=0, size=8):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 16, 16, generator=g), torch.randint(0, 10, (size,), generator=g))
            for _ in range(n)]


def _run_steps(tmp_path, each, batches, scaler=None, **kw):
    """A Run's weights (and optimizer state) after ``train_step`` on ``batches``."""
    run = Run(_config(tmp_path / str(each), step_each_module=each, batch_size=8, **kw), 0, 1, 0)
    if scaler is not None:  # AMP's scaler on CPU: fp32 gradients, the same scale/unscale/inf check
        run.scaler = run.updates.scaler = scaler()
    assert run.step_each_module is each
    for x, y in batches:
        run.train_step(x, y)
    return run


def _assert_equal_states(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("recipe", [
    dict(),  # the paper's: Nesterov SGD, weight decay on every parameter
    dict(opt="adamw", lr=3e-3, weight_decay=0.05, sched="cosine", sched_on_updates=True, warmup_epochs=1),
    dict(grad_clip=1e-2, lr=0.5, warmup_epochs=1),
    dict(opt="momentum", nesterov=False, weight_decay=1e-3, grad_clip=0.05, label_smoothing=0.1),
])
def test_stepping_each_module_gives_bit_identical_weights(tmp_path, recipe):
    batches = _batches(4)
    at_end = _run_steps(tmp_path, False, batches, **recipe)
    each = _run_steps(tmp_path, True, batches, **recipe)
    _assert_equal_states(at_end.net.state_dict(), each.net.state_dict())
    moved = _run_steps(tmp_path / "one", False, batches[:1], **recipe).net.state_dict()
    assert any(not torch.equal(moved[k], v) for k, v in each.net.state_dict().items())
    assert at_end.optimizer.state_dict()["state"].keys() == each.optimizer.state_dict()["state"].keys()
    for i, state in at_end.optimizer.state_dict()["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(each.optimizer.state_dict()["state"][i][name]))


def test_grad_scaler_steps_each_module_exactly_and_skips_only_an_overflowing_one(tmp_path):
    scaler = lambda: torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=2)  # noqa: E731
    batches = _batches(4)
    at_end = _run_steps(tmp_path, False, batches, scaler=scaler, grad_clip=0.1)
    each = _run_steps(tmp_path, True, batches, scaler=scaler, grad_clip=0.1)
    _assert_equal_states(at_end.net.state_dict(), each.net.state_dict())
    assert at_end.scaler.get_scale() == each.scaler.get_scale() == 2.0 ** 12  # grew twice: no overflow
    # An overflow in module 1 only: it skips its step, the others take theirs, the scale halves.
    run = _run_steps(tmp_path / "inf", True, [], scaler=scaler)
    before = {n: p.detach().clone() for n, p in run.net.named_parameters()}
    groups = run._clip_groups()
    poisoned = groups[1][0]
    handle = poisoned.register_hook(lambda g: torch.full_like(g, float("inf")))
    run.train_step(*batches[0])
    handle.remove()
    names = {id(p): n for n, p in run.net.named_parameters()}
    for j, group in enumerate(groups):
        unchanged = all(torch.equal(p.detach(), before[names[id(p)]]) for p in group)
        assert unchanged == (j == 1), j
    assert run.scaler.get_scale() == 2.0 ** 9


def test_at_most_one_modules_gradients_exist_at_a_time(tmp_path):
    for each, most in ((True, 1), (False, 3)):  # tiny_cnn at d=2: 3 local modules
        run = Run(_config(tmp_path / str(each), step_each_module=each), 0, 1, 0)
        groups = run._clip_groups()
        seen = []

        def count(_):
            seen.append(sum(any(p.grad is not None for p in g) for g in groups))

        handles = [p.register_post_accumulate_grad_hook(count) for g in groups for p in g]
        run.train_step(*_batches(1, size=4)[0])
        for h in handles:
            h.remove()
        assert max(seen) == most
        assert all(p.grad is None for g in groups for p in g) == each


def test_step_each_module_defaults_to_the_optimizers_where_it_is_exact(tmp_path):
    assert Run(_config(tmp_path, opt="adamw", sched="cosine"), 0, 1, 0).step_each_module
    assert not Run(_config(tmp_path, opt="lamb", sched="cosine"), 0, 1, 0).step_each_module  # global norm
    assert not Run(_config(tmp_path, method="bp"), 0, 1, 0).step_each_module  # one module
    with pytest.raises(AugLocalError, match="Lamb keeps state across parameters.*--step-at-end"):
        Run(_config(tmp_path, opt="lamb", sched="cosine", step_each_module=True), 0, 1, 0)
    with pytest.raises(AugLocalError, match="step_each_module must be True, False or None"):
        train(_config(tmp_path, step_each_module="yes"))


def test_step_each_module_with_two_gloo_processes_and_pipeline_workers_is_bit_identical(gloo_runs):
    # averaged per module = once at the end (the auxiliary networks too)
    _assert_equal_states(gloo_runs["two"]["last.pt"], gloo_runs["two_each"]["last.pt"])
    # workers stepping each module = one process stepping once at the end
    _assert_equal_states(gloo_runs["pipe"]["model.pt"], gloo_runs["one"]["model.pt"])


def test_a_run_resumes_mid_epoch_with_the_other_stepping(tmp_path):
    common = dict(epochs=2, warmup_epochs=1, opt="adamw", sched="cosine", sched_on_updates=True, lr=3e-3)
    straight = train(_config(tmp_path / "straight", step_each_module=True, **common))
    train(_config(tmp_path / "split", step_each_module=False, max_steps=6, **common))  # epoch 2, step 2 of 4
    assert _weights(tmp_path / "split" / "last.pt")["step_in_epoch"] == 2
    resumed = train(_config(tmp_path / "split", step_each_module=True, resume=True, **common))
    _assert_equal_states(_weights(straight.model_path), _weights(resumed.model_path))
    a, b = (_weights(tmp_path / n / "last.pt") for n in ("straight", "split"))
    _assert_equal_states(a["model"], b["model"])  # the auxiliary networks too
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()


# -- max_memory: the fastest combination whose measured whole peak fits (issue 22)


def test_max_memory_sizes_are_parsed_or_refused(tmp_path):
    from auglocal_fx._memory_choice import parse_memory

    assert parse_memory("8GB") == 8 * 10 ** 9 and parse_memory("7.5 GiB") == int(7.5 * 2 ** 30)
    assert parse_memory("512MiB") == 512 * 2 ** 20 and parse_memory(4096) == 4096
    for bad in ("8 apples", "-1GB", "GB", 0, True, 1.5):
        with pytest.raises(AugLocalError, match="is not a size; give bytes or a number with a unit"):
            parse_memory(bad)
    with pytest.raises(AugLocalError, match="max_memory chooses for one process"):
        train(_config(tmp_path, max_memory="1GB", pipeline=2))


def test_max_memory_takes_what_fits_and_says_the_smallest_peak_otherwise(tmp_path):
    from auglocal_fx.memory import measure_memory
    from auglocal_fx.units import format_bytes

    # At 8 px and 2 images the gradients held to the end of the step outweigh the activations, so
    # stepping each module changes the peak (recomputation never does: see test_memory).
    small = dict(input_size=8, batch_size=2)
    plain = Run(_config(tmp_path / "plain", **small), 0, 1, 0)
    report = measure_memory(plain.net, methods=("auglocal",), batch_size=2, rss=False, aux_checkpoint=(False, True),
                            step_each_module=(False, True))
    peaks = {(r.aux_checkpoint, r.step_each_module): r.whole_peak for r in report.rows}
    assert len(set(peaks.values())) > 1
    smallest = min(peaks, key=peaks.get)
    run = Run(_config(tmp_path / "tight", max_memory=peaks[smallest], **small), 0, 1, 0)  # only the smallest fits
    assert peaks[run.net.aux_checkpoint, run.step_each_module] == peaks[smallest]  # (or one of equal peaks)
    assert run.memory_choice.whole_peak == peaks[smallest]
    assert f"whole peak {format_bytes(peaks[smallest])}" in run.memory_choice.reason
    with pytest.raises(AugLocalError, match=f"the smallest whole peak is {format_bytes(peaks[smallest])} .*"
                                            "smaller --batch-size or --d"):
        Run(_config(tmp_path / "none", max_memory=peaks[smallest] - 1, **small), 0, 1, 0)
    roomy = Run(_config(tmp_path / "roomy", max_memory="64GB", **small), 0, 1, 0)
    assert "the fastest of 4 that fit" in roomy.memory_choice.reason


def test_max_memory_leaves_the_trained_weights_as_they_would_be(tmp_path):
    from auglocal_fx.units import format_bytes

    common = dict(max_steps=2, warmup_epochs=1)
    chosen = train(_config(tmp_path / "chosen", max_memory="64GB", **common))
    plain = train(_config(tmp_path / "plain", **common))
    assert chosen.history[-1]["max_memory"].startswith(f"max_memory {format_bytes(64 * 10 ** 9)}: AugLocal d=2")
    _assert_equal_states(_weights(tmp_path / "chosen" / "last.pt")["model"], _weights(tmp_path / "plain" / "last.pt")["model"])
    assert "max_memory" not in plain.history[-1]


def test_train_command_passes_the_stepping_and_memory_options(tmp_path, monkeypatch):
    from click.testing import CliRunner

    import auglocal_fx.training
    from cli.main import cli

    seen = {}

    def fake_train(config):
        seen["config"] = config
        raise AugLocalError("stop here")

    monkeypatch.setattr(auglocal_fx.training, "train", fake_train)
    result = CliRunner().invoke(cli, ["train", TINY, "--step-at-end", "--max-memory", "7.5GiB", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "stop here" in result.output
    assert seen["config"].step_each_module is False and seen["config"].max_memory == "7.5GiB"
    result = CliRunner().invoke(cli, ["train", TINY, "--step-each-module", "--out", str(tmp_path)])
    assert seen["config"].step_each_module is True and seen["config"].max_memory is None
    monkeypatch.undo()  # the real trainer checks the size before it builds anything
    result = CliRunner().invoke(cli, ["train", TINY, "--max-memory", "lots", "--out", str(tmp_path),
                                      "--dataset", "synthetic"])
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert "max_memory 'lots' is not a size" in result.output and "Traceback" not in result.output
