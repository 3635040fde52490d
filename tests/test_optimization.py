"""The trainer's optimizers, schedules, mixup and weight EMA against formulas written out by hand."""

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from auglocal_fx import AugLocalError
from auglocal_fx._train_loop import GlobalBatchSampler, Run
from auglocal_fx.recipe import default_warmup_epochs, learning_rate
from auglocal_fx.rules.base import similarity_loss
from auglocal_fx.training import TrainConfig, _check_config, train

TINY = str(Path(__file__).with_name("_tiny_models.py")) + ":tiny_cnn"


def _config(out, **kw):
    base = dict(model=TINY, dataset="synthetic", input_size=16, batch_size=4, train_subset=8, test_subset=8,
                epochs=1, warmup_epochs=0, out=str(out), progress=False, device="cpu", augment=False)
    base.update(kw)
    return _check_config(TrainConfig(**base), {})


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 10, (4,), generator=g)


def _record_rates(run):
    """The learning rate each optimizer update runs at."""
    rates, step = [], run.optimizer.step

    def recording_step(*args, **kwargs):
        rates.append(run.optimizer.param_groups[0]["lr"])
        return step(*args, **kwargs)

    run.optimizer.step = recording_step
    return rates


# ----------------------------------------------------------------------------- the paper's recipe


@pytest.mark.parametrize("method", ["auglocal", "bp"])
def test_default_recipe_equals_a_hand_built_nesterov_sgd_loop_bit_for_bit(tmp_path, method):
    epochs, warmup, lr = 3, 1, 0.2
    run = Run(_config(tmp_path, method=method, epochs=epochs, warmup_epochs=warmup, lr=lr), 0, 1, 0)
    ref = copy.deepcopy(run.net)
    sgd = torch.optim.SGD(ref.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=1e-4)
    run.fit()
    data = run.train_set
    for epoch in range(epochs):
        for group in sgd.param_groups:
            group["lr"] = learning_rate(epoch + 1, epochs, lr, warmup)
        sampler = GlobalBatchSampler(len(data), 4, 0, 1, 0)
        sampler.set_epoch(epoch)
        for indices in sampler:
            x = torch.stack([data[i][0] for i in indices])
            y = torch.tensor([data[i][1] for i in indices])
            sgd.zero_grad(set_to_none=True)
            if method == "auglocal":
                ref.train_step(x, y)
            else:
                F.cross_entropy(ref(x), y).backward()
            sgd.step()
    mine, theirs = run.net.state_dict(), ref.state_dict()
    for key in theirs:
        assert torch.equal(mine[key], theirs[key]), key


def test_default_warmup_is_a_small_share_of_the_run():
    assert _check_config(None, {}).epochs == 10
    assert _check_config(None, {}).warmup_epochs == 0  # 10 epochs: no warmup at all
    assert _check_config(None, {"epochs": 40}).warmup_epochs == 2
    assert _check_config(None, {"epochs": 400}).warmup_epochs == 10  # the paper's 10 of 400
    assert _check_config(None, {"epochs": 10, "warmup_epochs": 3}).warmup_epochs == 3  # explicit: honoured
    for epochs in range(1, 500):
        assert default_warmup_epochs(epochs) <= max(0.05 * epochs, 0)


# ----------------------------------------------------------------------------- timm optimizers and schedules


def test_adamw_first_step_is_the_formula_and_skips_norms_and_biases(tmp_path):
    lr, wd, eps = 1e-3, 0.05, 1e-8
    run = Run(_config(tmp_path, opt="adamw", lr=lr, weight_decay=wd, sched="cosine", opt_eps=eps,
                      step_each_module=False), 0, 1, 0)  # the gradients stay for the formula
    run.schedule.start_epoch(0)
    before = {n: p.detach().clone() for n, p in run.net.named_parameters()}
    run.train_step(*_batch())
    decayed = 0
    for name, p in run.net.named_parameters():
        w, g = before[name], p.grad
        decay = 0.0 if p.ndim <= 1 else wd  # timm: no decay for 1-D parameters (norms, biases)
        decayed += decay > 0
        # First AdamW step: m_hat = g, v_hat = g^2.
        expected = w - lr * decay * w - lr * g / (g.abs() + eps)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-9, msg=name)
    assert decayed and decayed < len(before)


def test_a_workers_optimizer_holds_only_its_own_modules(tmp_path):
    from auglocal_fx.optimization import build_optimizer

    run = Run(_config(tmp_path, opt="adamw"), 0, 1, 0)
    own = torch.nn.ModuleList([run.net.blocks[1], run.net.aux[1]])
    opt = build_optimizer(run.cfg, own, 1e-3)
    held = {id(p) for group in opt.param_groups for p in group["params"]}
    assert held == {id(p) for p in run.net.block_parameters(1)}
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0, run.cfg.weight_decay}


def test_timm_cosine_per_update_rates_are_the_formula(tmp_path):
    base, warmup_lr, min_lr = 0.1, 1e-4, 1e-3
    cfg = _config(tmp_path, train_subset=16, epochs=2, lr=base, sched="cosine", sched_on_updates=True,
                  warmup_epochs=1, warmup_lr=warmup_lr, min_lr=min_lr)
    run = Run(cfg, 0, 1, 0)
    rates = _record_rates(run)
    run.fit()
    total, warm = 8, 4  # 4 updates per epoch
    expected = [warmup_lr + n * (base - warmup_lr) / warm if n < warm
                else min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * n / total)) for n in range(total)]
    assert run.step_each_module  # each local module steps on its own, at the update's rate
    assert rates == pytest.approx([r for r in expected for _ in range(run.net.num_local)], rel=1e-12)


def test_timm_step_schedule_per_epoch(tmp_path):
    cfg = _config(tmp_path, epochs=4, lr=0.1, sched="step", decay_epochs=2, decay_rate=0.5, opt="momentum",
                  step_each_module=False)  # one optimizer.step per update
    run = Run(cfg, 0, 1, 0)
    rates = _record_rates(run)
    run.fit()
    assert rates == pytest.approx([0.1] * 4 + [0.05] * 4, rel=1e-12)  # 2 updates per epoch, halved at epoch 2
    assert run.optimizer.param_groups[0]["nesterov"] is False  # timm's "momentum"


# ----------------------------------------------------------------------------- mixup, label smoothing


def test_mixup_soft_targets_reach_every_local_loss(tmp_path):
    smoothing = 0.1
    run = Run(_config(tmp_path, mixup=0.8, label_smoothing=smoothing), 0, 1, 0)
    x, y = _batch()
    xm, ym = run._training_batch(x.clone(), y)  # timm mixes in place
    # The images are mixed with their mirror in the batch; read lam back from them.
    d = x - x.flip(0)
    lam = ((xm - x.flip(0)) * d).sum() / (d * d).sum()
    off = smoothing / 10
    hard = torch.full((4, 10), off).scatter_(1, y[:, None], 1 - smoothing + off)
    torch.testing.assert_close(ym, lam * hard + (1 - lam) * hard.flip(0), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        logits, aux_logits = run.net(xm)  # train mode: the batch statistics the step sees
    losses = run.train_step(xm, ym)
    expected = [(-ym * F.log_softmax(a, 1)).sum(1).mean() for a in aux_logits + [logits]]
    torch.testing.assert_close(losses, torch.stack(expected), rtol=1e-5, atol=1e-6)


def test_predsim_similarity_of_soft_targets_generalises_one_hot():
    decoded, y = torch.randn(6, 5, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 0, 3, 1])
    soft = F.one_hot(y, 10).float()
    assert similarity_loss(decoded, y, 10) == similarity_loss(decoded, soft, 10)
    mixed = 0.7 * soft + 0.3 * soft.flip(0)
    assert similarity_loss(decoded, mixed, 10) != similarity_loss(decoded, y, 10)


def test_predsim_trains_with_mixup(tmp_path):
    result = train(_config(tmp_path, rule="predsim", aux_head="copy", max_steps=1, mixup=0.8, cutmix=1.0))
    assert all(math.isfinite(v) for v in result.history[-1]["local_losses"])


# ----------------------------------------------------------------------------- weight EMA


def test_ema_is_the_formula_after_each_update(tmp_path):
    d = 0.9
    run = Run(_config(tmp_path, model_ema=True, model_ema_decay=d, lr=0.5), 0, 1, 0)
    ema = {k: v.clone() for k, v in run.primary.state_dict().items()}
    for seed in range(3):
        run.train_step(*_batch(seed))
        for k, w in run.primary.state_dict().items():
            ema[k] = d * ema[k] + (1 - d) * w if w.is_floating_point() else w.clone()
    mine = run.ema.module.state_dict()
    for k in ema:
        torch.testing.assert_close(mine[k], ema[k], rtol=1e-6, atol=1e-7, msg=k)
    assert not torch.equal(mine["fc.weight"], run.primary.state_dict()["fc.weight"])


def test_ema_survives_resume(tmp_path):
    common = dict(epochs=2, train_subset=16, model_ema=True, model_ema_decay=0.5, lr=0.5)
    whole = train(_config(tmp_path / "whole", **common))
    train(_config(tmp_path / "split", max_steps=4, **common))  # the first epoch
    resumed = train(_config(tmp_path / "split", resume=True, **common))
    a = torch.load(tmp_path / "whole" / "model_ema.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "model_ema.pt", weights_only=True)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed.test_acc_ema == whole.test_acc_ema is not None
    assert [h["test_acc_ema"] for h in resumed.history] == [h["test_acc_ema"] for h in whole.history]


# ----------------------------------------------------------------------------- bad options


@pytest.mark.parametrize("options, message", [
    ({"opt": "sgdd"}, "unknown optimizer 'sgdd'; use a timm name such as sgd, momentum, adamw"),
    ({"sched": "plateau"}, "unknown schedule 'plateau'; choose from paper, cosine"),
    ({"sched_on_updates": True}, "the paper's schedule sets the rate once per epoch"),
    ({"min_lr": 1e-4}, "min_lr needs a timm schedule"),
    ({"mixup_prob": 1.5}, "mixup_prob must be in [0, 1]"),
    ({"mixup": -1.0}, "mixup must be >= 0"),
    ({"model_ema": True, "model_ema_decay": 1.0}, "model_ema_decay must be in (0, 1)"),
    ({"model_ema": True, "pipeline": 2}, "model_ema is not supported with pipeline > 1"),
])
def test_bad_options_are_one_line(tmp_path, options, message):
    with pytest.raises(AugLocalError) as err:
        train(TrainConfig(model=TINY, dataset="synthetic", out=str(tmp_path), progress=False, **options))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_mixup_needs_an_even_batch_per_process(tmp_path):
    with pytest.raises(AugLocalError, match="mixup pairs the images of a batch: 3 per process is odd"):
        Run(_config(tmp_path, batch_size=3, cutmix=1.0), 0, 1, 0)


def test_position_embedding_and_class_token_are_not_decayed(tmp_path):
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, depth=3, embed_dim=32,
                            num_heads=2, num_classes=10)
    run = Run(_config(tmp_path, model=vit, opt="adamw", weight_decay=0.05, sched="cosine"), 0, 1, 0)
    decay_of = {id(p): group["weight_decay"] for group in run.optimizer.param_groups for p in group["params"]}
    assert {"pos_embed", "cls_token"} <= set(vit.no_weight_decay())
    assert decay_of[id(vit.pos_embed)] == 0.0 and decay_of[id(vit.cls_token)] == 0.0  # 3-D, yet exempt
    assert decay_of[id(vit.blocks[0].mlp.fc1.weight)] == 0.05
