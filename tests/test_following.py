"""Issue 24: copies that follow their source blocks (``aux_follow``) and auxiliary layers that
freeze (``aux_freeze``): the EMA as written out, exactness, no gradient across blocks, strict
export, checkpoints, and the options' errors."""

import copy
from pathlib import Path

import pytest
import torch

from auglocal_fx import AugLocalError, ConversionOptions, load, to_local
from auglocal_fx.training import TrainConfig, train
from .conftest import TinyResNet, batch

SIZE = (3, 16, 16)
TINY = str(Path(__file__).with_name("_tiny_models.py")) + ":tiny_cnn"


def _local(model=None, **options):
    return to_local(model if model is not None else TinyResNet(), input_size=SIZE,
                    options=ConversionOptions(d=2, **options))


def _step(local, x, y, lr=0.1, progress=None):
    """One SGD step on every local loss, then the after-step hook."""
    local.train()
    local.zero_grad(set_to_none=True)
    local.train_step(x, y)
    with torch.no_grad():
        for p in local.parameters():
            if p.grad is not None:
                p -= lr * p.grad
    local.after_optimizer_step(progress)


def _source_block(local):
    return local.blocks[local.aux[0].plan.selected[0]].eval_graph


def test_copies_start_at_their_source_and_follow_it_by_the_written_out_ema():
    m = 0.75
    local = _local(aux_follow=m)
    copy_fc = local.aux[0][-1].get_parameter("fc.weight")  # the head copy's classifier
    source = local.head.eval_graph.get_parameter("fc.weight")
    assert torch.equal(copy_fc, source)  # delta = 0 at the start
    ema_before = source.detach().clone()  # E_0 = S_0
    x, y = batch(SIZE, n=4)
    local.train()
    local.train_step(x, y)
    with torch.no_grad():  # an update of both, as an optimizer makes it
        for p in local.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    trained_copy, new_source = copy_fc.detach().clone(), source.detach().clone()
    local.after_optimizer_step()
    # W = E + delta, E_1 = m E_0 + (1 - m) S_1: the copy moves by (1 - m) (S_1 - E_0).
    expected = trained_copy + (1 - m) * (new_source - ema_before)
    assert not torch.equal(new_source, ema_before) and not torch.equal(trained_copy, ema_before)
    assert torch.allclose(copy_fc, expected, atol=1e-6)


def test_refitted_parameters_keep_their_own_weights_or_follow_the_leading_slice():
    own, sliced = _local(aux_follow=0.9), _local(aux_follow=0.9, aux_follow_adapted="slice")
    # Block 0 has 8 channels, its copy of the last block (16 -> 16) is re-fitted to take 8.
    for local, follows in ((own, False), (sliced, True)):
        weight = local.aux[0][0].get_parameter("c.weight")
        source = _source_block(local).get_parameter("c.weight")
        assert weight.shape == (16, 8, 3, 3) and source.shape == (16, 16, 3, 3)
        assert torch.equal(weight, source[:, :8]) == follows
    # Both auxiliary networks (blocks 0 and 1 give 8 channels) hold that re-fitted convolution.
    assert len(sliced.following) == len(own.following) + 2


def test_following_and_freezing_leave_the_primary_weights_and_eval_output_exact():
    model = TinyResNet()
    local = _local(model, aux_follow=0.9, aux_freeze=0.5)
    x, y = batch(SIZE, n=4)
    for progress in (0.25, 0.5, 1.0):
        _step(local, x, y, progress=progress)
    primary = {k: v.clone() for k, v in local.export().state_dict().items()}
    local.after_optimizer_step(1.0)  # the hook alone never touches a primary weight
    assert all(torch.equal(v, local.export().state_dict()[k]) for k, v in primary.items())
    fresh = TinyResNet()
    fresh.load_state_dict(local.export().state_dict(), strict=True)
    local.eval()
    assert torch.equal(local(x), fresh.eval()(x))


def test_no_gradient_reaches_another_block_through_a_followed_copy():
    local = _local(aux_follow=0.9)
    x, y = batch(SIZE, n=4)
    _step(local, x, y)  # the copies have followed once
    local.zero_grad(set_to_none=True)
    loss, _ = next(local.module_losses(x, y, stop=1))  # local module 0 alone
    loss.backward()
    with_grad = {id(p) for p in local.parameters() if p.grad is not None}
    assert with_grad == {id(p) for p in local.block_parameters(0)}


def test_auxiliary_layers_freeze_top_first_and_the_block_still_trains():
    local = _local(aux_freeze=0.5)
    x, y = batch(SIZE, n=4)
    copy_layer, head_layer = local.aux[0][0], local.aux[0][1]
    local.after_optimizer_step(0.25)  # of 2 layers, the top (head) freezes at 0.25 of the run
    assert not any(p.requires_grad for p in head_layer.parameters())
    assert all(p.requires_grad for p in copy_layer.parameters())
    local.after_optimizer_step(0.5)
    assert not any(p.requires_grad for aux in local.aux for p in aux.parameters())
    local.zero_grad(set_to_none=True)
    local.train_step(x, y)
    assert all(p.grad is None for aux in local.aux for p in aux.parameters())
    for j in range(len(local.aux)):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in local.blocks[j].parameters()), j


def test_freezing_only_takes_the_auxiliary_layers_out_of_the_update():
    torch.manual_seed(0)
    a = _local(aux_freeze=0.5)
    b = copy.deepcopy(a)
    x, y = batch(SIZE, n=4)
    b.after_optimizer_step(0.5)
    for local in (a, b):
        local.train()
        local.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same dropout masks
        local.train_step(x, y)
    # The same gradients reach the primary: the frozen auxiliary layers still pass them down.
    for pa, pb in zip(a.blocks.parameters(), b.blocks.parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-6)


def test_checkpoint_keeps_the_averages_and_the_frozen_layers(tmp_path):
    local = _local(aux_follow=0.9, aux_follow_adapted="slice", aux_freeze=0.5)
    x, y = batch(SIZE, n=4)
    _step(local, x, y, progress=0.3)
    local.save(tmp_path / "n.pt")
    back = load(tmp_path / "n.pt", model=TinyResNet())
    assert back.conversion == local.conversion
    state, restored = local.state_dict(), back.state_dict()
    assert state.keys() == restored.keys() and all(torch.equal(state[k], restored[k]) for k in state)
    frozen = [p.requires_grad for p in local.aux.parameters()]
    assert [p.requires_grad for p in back.aux.parameters()] == frozen and not all(frozen)


def test_old_checkpoint_options_mean_neither_option():
    old = ConversionOptions().to_dict()
    assert "aux_follow" not in old and "aux_freeze" not in old
    options = ConversionOptions.from_dict(old)
    assert options.aux_follow is None and options.aux_freeze is None and options.aux_follow_adapted == "own"
    assert ConversionOptions.from_dict(ConversionOptions(aux_follow=0.5, aux_freeze=1).to_dict()) == \
        ConversionOptions(aux_follow=0.5, aux_freeze=1.0)
    assert "aux_follow=0.5" in ConversionOptions(aux_follow=0.5).describe()


@pytest.mark.parametrize("options, words", [
    (dict(aux_follow=1.0), "aux_follow must be"),
    (dict(aux_follow=-0.1), "aux_follow must be"),
    (dict(aux_follow=0.9, aux_follow_adapted="shared"), "unknown aux_follow_adapted"),
    (dict(aux_freeze=0.0), "aux_freeze must be"),
    (dict(aux_freeze=True), "aux_freeze must be"),
    (dict(aux_follow=0.9, rule="dgl"), "rule 'dgl' has none"),
])
def test_bad_options_are_one_clear_line(options, words):
    with pytest.raises(AugLocalError, match=words) as info:
        ConversionOptions(**options)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("config, words", [
    (dict(pipeline=2, aux_follow=0.9), "not supported with pipeline > 1"),
    (dict(pipeline=2, aux_freeze=0.5), "not supported with pipeline > 1"),
    (dict(method="bp", aux_freeze=0.5), "need method 'auglocal'"),
])
def test_trainer_refuses_what_it_cannot_do(tmp_path, config, words):
    with pytest.raises(AugLocalError, match=words):
        train(TrainConfig(model=TINY, dataset="synthetic", input_size=16, batch_size=4, train_subset=8,
                          test_subset=4, max_steps=1, out=str(tmp_path), progress=False, **config))


def test_train_runs_both_and_records_them(tmp_path):
    result = train(TrainConfig(model=TINY, dataset="synthetic", input_size=16, batch_size=4, train_subset=16,
                               test_subset=8, epochs=2, out=str(tmp_path), progress=False,
                               aux_follow=0.9, aux_freeze=0.5))
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert any(k.startswith("following.ema") for k in ckpt["model"])
    assert float(ckpt["model"]["freezing.progress"]) == pytest.approx(1.0)
    assert len(result.history) == 2


def test_cli_flags_reach_the_run_and_bad_values_are_one_line(tmp_path):
    from click.testing import CliRunner

    try:
        from auglocal_fx_cli.main import cli
    except ImportError:  # not installed: run from the repository root
        from cli.main import cli
    common = ["train", TINY, "--dataset", "synthetic", "--input-size", "3", "16", "16", "--batch-size", "4",
              "--train-subset", "8", "--test-subset", "4", "--max-steps", "2", "--quiet"]
    result = CliRunner().invoke(cli, common + ["--aux-follow", "1.5", "--out", str(tmp_path / "a")])
    assert result.exit_code != 0 and "aux_follow must be" in result.output
    assert len(result.output.strip().splitlines()) == 1
    result = CliRunner().invoke(cli, common + ["--aux-follow", "0.5", "--aux-follow-adapted", "slice",
                                               "--aux-freeze", "0.5", "--out", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    state = torch.load(tmp_path / "b" / "last.pt", weights_only=True)["model"]
    assert "freezing.progress" in state and any(k.startswith("following.ema") for k in state)


@pytest.mark.parametrize("each", [False, True])
def test_a_step_the_grad_scaler_skips_does_not_move_the_copies(tmp_path, each):
    from auglocal_fx._train_loop import Run

    cfg = TrainConfig(model=TINY, dataset="synthetic", input_size=16, batch_size=4, train_subset=16, test_subset=8,
                      epochs=1, out=str(tmp_path), progress=False, aux_follow=0.5, step_each_module=each)
    run = Run(cfg, 0, 1, 0)
    # AMP's scaler on CPU: fp32 gradients, the same unscale and inf check as fp16 on CUDA.
    run.scaler = run.updates.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    x, y = batch(SIZE, n=4, num_classes=10)
    run.train_step(x, y)  # a step taken: the averages now differ from the sources
    averages = {k: v.clone() for k, v in run.net.following.state_dict().items()}
    aux1 = [p.detach().clone() for p in run.net.aux[1].parameters()]
    poisoned = run._clip_groups()[1][0]  # a parameter of local module 1
    handle = poisoned.register_hook(lambda g: torch.full_like(g, float("inf")))
    run.train_step(x, y)
    handle.remove()
    assert run.scaler.get_scale() == 2.0 ** 9  # the scaler did skip
    moved = [k for k, v in run.net.following.state_dict().items() if not torch.equal(v, averages[k])]
    assert not moved  # the averages stand still ...
    assert all(torch.equal(p, q) for p, q in zip(run.net.aux[1].parameters(), aux1))  # ... and so do the copies
    run.train_step(x, y)  # the next step taken moves them again
    assert any(not torch.equal(v, averages[k]) for k, v in run.net.following.state_dict().items())
