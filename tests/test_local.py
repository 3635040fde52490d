"""LocalNet: forward in both modes, the local step, export, save and load."""

import copy
from pathlib import Path

import pytest
import torch

from auglocal_fx import AugLocalError, LocalNet, load, to_local

from ._tiny_models import TinyCNN
from .conftest import TinyResNet, batch


def test_train_forward_matches_step_gradients(tiny_resnet):
    local = to_local(tiny_resnet, d=2, input_size=(3, 16, 16))
    assert isinstance(local, LocalNet)
    x, y = batch((3, 16, 16))
    local.train()
    torch.manual_seed(0)
    losses = local.train_step(x, y)
    step = {n: p.grad.clone() for n, p in local.named_parameters()}
    local.zero_grad()
    torch.manual_seed(0)
    logits, aux_logits = local(x)
    ce = torch.nn.functional.cross_entropy
    total = ce(logits, y) + sum(ce(a, y) for a in aux_logits)
    total.backward()
    for n, p in local.named_parameters():
        torch.testing.assert_close(p.grad, step[n], rtol=1e-5, atol=1e-7, msg=n)
    expected = torch.stack([ce(a, y) for a in aux_logits] + [ce(logits, y)]).detach()
    torch.testing.assert_close(losses, expected)


def test_parameter_groups_partition_everything(tiny_resnet):
    local = to_local(tiny_resnet, d=2, input_size=(3, 16, 16))
    groups = [set(map(id, local.block_parameters(j))) for j in range(local.num_local - 1)]
    groups.append(set(map(id, local.output_module_parameters())))
    union = set().union(*groups)
    assert union == set(map(id, local.parameters()))
    assert sum(len(g) for g in groups) == len(union)
    with pytest.raises(AugLocalError):
        list(local.block_parameters(local.num_local - 1))


def test_bf16_autocast_step(tiny_resnet):
    local = to_local(tiny_resnet, d=2, input_size=(3, 16, 16))
    x, y = batch((3, 16, 16))
    losses = local.train_step(x, y, autocast_dtype=torch.bfloat16)
    assert torch.isfinite(losses).all()


def test_export_is_the_trained_original(tiny_resnet):
    local = to_local(tiny_resnet, d=2, input_size=(3, 16, 16))
    x, y = batch((3, 16, 16))
    opt = torch.optim.SGD(local.parameters(), lr=0.1)
    local.train_step(x, y)
    opt.step()
    model = local.export()
    assert model is tiny_resnet
    fresh = TinyResNet()
    fresh.load_state_dict(model.state_dict(), strict=True)
    fresh.eval()
    local.eval()
    assert torch.equal(fresh(x), local(x))


def test_save_load_round_trip(tmp_path):
    local = to_local("paper:resnet32", d=3, tau=0.25, aux_checkpoint=True)
    first_aux_weight = next(local.aux[0].parameters())
    first_aux_weight.data.fill_(0.5)
    path = tmp_path / "r32.pt"
    local.save(path)
    again = load(path)
    assert again.options == local.options and again.spec == "paper:resnet32"
    local.eval()
    again.eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(again(x), local(x))
    assert torch.equal(next(again.aux[0].parameters()), first_aux_weight)


def test_load_errors(tmp_path, tiny_resnet):
    with pytest.raises(AugLocalError, match="does not exist"):
        load(tmp_path / "none.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00garbage")
    with pytest.raises(AugLocalError, match="corrupt"):
        load(corrupt)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(AugLocalError, match="not an auglocal-fx"):
        load(foreign)
    local = to_local(tiny_resnet, d=2, input_size=(3, 16, 16))
    path = tmp_path / "obj.pt"
    local.save(path)
    with pytest.raises(AugLocalError, match="pass load"):
        load(path)
    again = load(path, model=TinyResNet())
    assert len(again.aux) == len(local.aux)


def test_export_leaves_modes_alone(tiny_resnet):
    local = to_local(tiny_resnet, d=2, input_size=(3, 16, 16))
    tiny_resnet.eval()
    local.train()  # the blocks' modules (shared) train; the model's root stays as the user set it
    modes = {name: m.training for name, m in tiny_resnet.named_modules()}
    assert local.export() is tiny_resnet
    assert {name: m.training for name, m in tiny_resnet.named_modules()} == modes


def test_checkpoint_of_a_file_spec_loads_from_anywhere_and_names_a_missing_file(tmp_path, monkeypatch):
    source = Path(__file__).with_name("_tiny_models.py").read_text()
    models = tmp_path / "models"
    models.mkdir()
    (models / "mine.py").write_text(source)
    monkeypatch.chdir(models)
    local = to_local("mine.py:tiny_cnn", d=2, input_size=(3, 16, 16))
    assert local.spec == f"{models / 'mine.py'}:tiny_cnn"
    local.save(tmp_path / "c.pt")
    monkeypatch.chdir(tmp_path)  # the relative path would no longer resolve
    assert len(load(tmp_path / "c.pt").aux) == len(local.aux)
    (models / "mine.py").unlink()
    with pytest.raises(AugLocalError, match=r"mine\.py no longer exists: put the file back, or pass load"):
        load(tmp_path / "c.pt")


@pytest.mark.parametrize("make, d", [(TinyResNet, 3), (lambda: TinyCNN(depth=4), 2)],
                         ids=["dropout-in-aux", "batchnorm-in-aux"])
def test_aux_checkpoint_gives_the_same_gradients_and_statistics(make, d):
    # Recomputing the auxiliary forward in backward must change nothing a step produces: the
    # dropout masks are replayed and the BatchNorm running statistics updated once.
    torch.manual_seed(0)
    kept = to_local(make(), d=d, input_size=(3, 16, 16))
    recomputed = copy.deepcopy(kept)
    recomputed.aux_checkpoint = True
    assert any(isinstance(m, (torch.nn.Dropout, torch.nn.BatchNorm1d, torch.nn.BatchNorm2d))
               for m in kept.aux.modules())
    x, y = batch((3, 16, 16), num_classes=5)
    results = []
    for local in (kept, recomputed):
        local.train()
        torch.manual_seed(1)
        losses = local.train_step(x, y)
        results.append((losses, torch.rand(1)))  # the RNG stream after the step, too
    for (n, p), q in zip(kept.named_parameters(), recomputed.parameters()):
        assert torch.equal(p.grad, q.grad), n
    for (n, b), c in zip(kept.named_buffers(), recomputed.buffers()):
        assert torch.equal(b, c), n
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_conversion_freezes_old_objects_only_while_it_runs(monkeypatch):
    # Converting keeps the collector off the objects that were there before (gc.freeze) and
    # unfreezes them after, also when it fails; where the caller froze objects itself (the CLI
    # freezes what it imported), it touches nothing. The collector is simulated: the CLI's
    # import in this process has frozen objects for good.
    import gc

    import auglocal_fx.local

    events, frozen = [], [0]
    real = auglocal_fx.local.partition_blocks

    def partition_spy(*args, **kwargs):
        events.append("partition")
        return real(*args, **kwargs)

    monkeypatch.setattr(auglocal_fx.local, "partition_blocks", partition_spy)
    monkeypatch.setattr(gc, "get_freeze_count", lambda: frozen[0])
    monkeypatch.setattr(gc, "freeze", lambda: events.append("freeze"))
    monkeypatch.setattr(gc, "unfreeze", lambda: events.append("unfreeze"))
    to_local(TinyCNN(), d=2, input_size=(3, 16, 16))
    assert events == ["freeze", "partition", "unfreeze"]
    events.clear()
    with pytest.raises(AugLocalError):
        to_local(TinyCNN(), d=99, input_size=(3, 16, 16))
    assert events[0] == "freeze" and events[-1] == "unfreeze"
    events.clear()
    frozen[0] = 12345  # the caller's own freeze: neither extended nor undone
    to_local(TinyCNN(), d=2, input_size=(3, 16, 16))
    assert events == ["partition"]
