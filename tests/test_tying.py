"""Tied copies (``aux_tie``, issue 24): the copies hold no kernel of their own, read their
sources' live tensors, pass no gradient to them, survive moves, copies and checkpoints, and
count once in the memory; every check compares with untied copies set to the sources' values."""

import copy
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from auglocal_fx import AugLocalError, ConversionOptions, load, measure_memory, to_local
from auglocal_fx.training import TrainConfig, train
from auglocal_fx._train_loop import Run
from .conftest import TinyResNet, batch

SIZE = (3, 16, 16)
TINY = str(Path(__file__).with_name("_tiny_models.py")) + ":tiny_cnn"
# TinyResNet, d=2, sequential selection: auxiliary network 0 copies block 1 (a1, a2: 8 -> 8),
# network 1 copies block 2 (b1, b2, proj: 8 -> 16) and the head (fc: 16 -> 5); network 0's head
# copy is re-fitted to 8 inputs (5 x 8), so it keeps its own kernel.
TIED = {"aux.0.0.a1.weight": 8 * 8 * 9, "aux.0.0.a2.weight": 8 * 8 * 9, "aux.1.0.b1.weight": 16 * 8 * 9,
        "aux.1.0.b2.weight": 16 * 16 * 9, "aux.1.0.proj.weight": 16 * 8, "aux.1.1.fc.weight": 5 * 16}


def _pair(**options):
    """A tied network and its untied twin: the same primary weights and the same copies' own weights."""
    model = TinyResNet()
    twin_model = copy.deepcopy(model)
    options = dict(d=2, selection="sequential", **options)
    tied = to_local(model, input_size=SIZE, options=ConversionOptions(aux_tie=True, **options))
    twin = to_local(twin_model, input_size=SIZE, options=ConversionOptions(**options))
    missing, unexpected = twin.load_state_dict(tied.state_dict(), strict=False)
    assert sorted(missing) == sorted(TIED) and not unexpected
    return tied, twin


def _source(net, key):
    """The primary parameter an auxiliary key ``aux.j.i.name`` copies, found from the plan."""
    _, j, i, name = key.split(".", 3)
    selected = net.aux[int(j)].plan.selected
    source = net.blocks[selected[int(i)]] if int(i) < len(selected) else net.head
    return source.eval_graph.get_parameter(name)


@torch.no_grad()
def _set_twin_copies(twin):
    """The untied twin's copy kernels := their sources' current values."""
    for key in TIED:
        twin.get_parameter(key).copy_(_source(twin, key))


@torch.no_grad()
def _move_primary(*nets):
    """The same in-place change of every primary weight, as an optimizer step makes it."""
    g = torch.Generator().manual_seed(3)
    changes = [torch.randn(p.shape, generator=g) * 0.1 for p in nets[0].blocks.parameters()]
    changes += [torch.randn(p.shape, generator=g) * 0.1 for p in nets[0].head.parameters()]
    for net in nets:
        for p, c in zip([*net.blocks.parameters(), *net.head.parameters()], changes):
            p += c


def _grads(net):
    return {n: p.grad for n, p in net.named_parameters()}


def test_tied_copies_store_no_kernel_and_count_the_parameters_by_hand():
    tied, twin = _pair()
    assert len(tied.tying) == len(TIED)
    assert not set(TIED) & set(tied.state_dict())
    # TinyResNet: stem 3*8*9+8 + bn 16, a1 a2 8*8*9+8 each, b1 16*8*9+16, b2 16*16*9+16,
    # proj 16*8+16, c 16*16*9+16, fc 16*5+5.
    primary = (3 * 8 * 9 + 8) + 16 + 2 * (8 * 8 * 9 + 8) + (16 * 8 * 9 + 16) + 2 * (16 * 16 * 9 + 16) \
        + (16 * 8 + 16) + (16 * 5 + 5)
    # Network 0: a1, a2 biases; its own re-fitted head 8*5+5 and BatchNorm1d(8).
    # Network 1: b1, b2, proj biases; the head's fc bias and BatchNorm1d(16).
    aux = (8 + 8) + (8 * 5 + 5) + 2 * 8 + (16 + 16 + 16) + 5 + 2 * 16
    assert sum(p.numel() for p in tied.parameters()) == primary + aux
    assert sum(p.numel() for p in twin.parameters()) == primary + aux + sum(TIED.values())


def test_the_copies_read_the_live_source_and_compute_what_untied_copies_set_to_it_compute():
    tied, twin = _pair()
    _move_primary(tied, twin)  # the sources moved after conversion: a stale copy would not see it
    _set_twin_copies(twin)
    x, y = batch(SIZE, n=4)
    for net in (tied, twin):
        net.train()
        net.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same dropout masks
        losses = net.train_step(x, y)
        net.losses = losses
    assert torch.equal(tied.losses, twin.losses)
    a, b = _grads(tied), _grads(twin)
    assert a.keys() == set(b) - set(TIED)
    for name, grad in a.items():
        assert torch.equal(grad, b[name]), name


@pytest.mark.parametrize("aux_checkpoint", [False, True])
def test_no_gradient_reaches_the_source_through_a_tied_copy(aux_checkpoint):
    tied, _ = _pair(aux_checkpoint=aux_checkpoint)
    x, y = batch(SIZE, n=4)
    tied.train()
    h = x
    for j in range(len(tied.aux)):
        tied.zero_grad(set_to_none=True)
        loss, out = next(tied.module_losses(h, y, start=j, stop=j + 1, image=x))
        loss.backward()
        with_grad = {id(p) for p in tied.parameters() if p.grad is not None}
        assert with_grad == {id(p) for p in tied.block_parameters(j)}, j
        h = out


def test_a_source_changed_in_place_before_the_copys_backward_fails_loudly():
    tied, _ = _pair()
    x, y = batch(SIZE, n=4)
    tied.train()
    loss, _ = next(tied.module_losses(x, y))  # network 0 read block 1's kernels
    with torch.no_grad():
        tied.blocks[1].eval_graph.a1.weight.mul_(0.5)  # an optimizer step of block 1 too early
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def _run(tmp_path, name, batches, each, **kw):
    cfg = TrainConfig(model=TINY, dataset="synthetic", input_size=16, batch_size=4, train_subset=16, test_subset=8,
                      epochs=1, out=str(tmp_path / name), progress=False, step_each_module=each, **kw)
    return Run(cfg, 0, 1, 0)


@pytest.mark.parametrize("each,aux_checkpoint", [(True, False), (False, False), (True, True)])
def test_the_trainers_orders_give_the_weights_of_untied_copies_reset_to_their_sources(tmp_path, each, aux_checkpoint):
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(3)]
    tied = _run(tmp_path, "tied", batches, each, aux_tie=True, aux_checkpoint=aux_checkpoint)
    twin = _run(tmp_path, "twin", batches, each, aux_checkpoint=aux_checkpoint)
    assert tied.step_each_module is each and len(tied.net.tying) == 4  # tiny_cnn: block 3's conv, the head's fc
    own = tied.net.state_dict()
    kernels = sorted(set(twin.net.state_dict()) - set(own))
    assert len(kernels) == 4
    twin.net.load_state_dict(own, strict=False)
    for x, y in batches:
        with torch.no_grad():  # what the tied copies read: the sources as they are now
            for key in kernels:
                twin.net.get_parameter(key).copy_(_source(twin.net, key))
        torch.manual_seed(5)
        tied.train_step(x, y)
        torch.manual_seed(5)
        twin.train_step(x, y)
    after = twin.net.state_dict()
    for key, value in tied.net.state_dict().items():
        assert torch.equal(value, after[key]), key


def test_moves_dtype_and_deep_copies_keep_reading_their_own_source():
    tied, twin = _pair()
    _set_twin_copies(twin)
    tied.double().train()
    twin.double().train()
    h = torch.randn(4, 8, 16, 16, dtype=torch.float64)
    torch.manual_seed(1)
    out = tied.aux[0](h)
    torch.manual_seed(1)
    assert out.dtype == torch.float64 and torch.equal(out, twin.aux[0](h))
    clone = copy.deepcopy(tied)
    with torch.no_grad():
        clone.blocks[1].eval_graph.a1.weight.zero_()  # the clone's source, not the original's
    torch.manual_seed(1)
    assert torch.equal(tied.aux[0](h), out)
    torch.manual_seed(1)
    assert not torch.equal(clone.aux[0](h), out)
    assert not any(hasattr(m, "weight") and "weight" in m.__dict__ for m in tied.aux.modules())  # nothing kept


def test_the_checkpoint_holds_each_kernel_once_and_a_loaded_network_ties_again(tmp_path):
    tied, twin = _pair()
    tied.save(tmp_path / "n.pt")
    payload = torch.load(tmp_path / "n.pt", weights_only=True)
    assert not set(TIED) & set(payload["state_dict"]) and payload["options"]["aux_tie"] is True
    back = load(tmp_path / "n.pt", model=TinyResNet())
    assert back.conversion == tied.conversion and len(back.tying) == len(TIED)
    _move_primary(back, twin)
    _set_twin_copies(twin)
    back.train()
    twin.train()
    h = torch.randn(4, 8, 16, 16)
    for j in range(2):
        torch.manual_seed(1)
        out = back.aux[j](h if j == 0 else back.blocks[1](h))
        torch.manual_seed(1)
        assert torch.equal(out, twin.aux[j](h if j == 0 else twin.blocks[1](h))), j
    # The primary network exported as the original model, strictly, and its eval output exact.
    fresh = TinyResNet()
    fresh.load_state_dict(back.export().state_dict(), strict=True)
    back.eval()
    x = torch.randn(2, *SIZE)
    assert torch.equal(back(x), fresh.eval()(x))


def test_memory_counts_a_tied_kernel_once():
    tied, twin = _pair()
    _set_twin_copies(twin)
    rows = [measure_memory(net, methods=("auglocal",), batch_size=4, rss=False).rows[0] for net in (tied, twin)]
    params = sum(p.numel() for p in twin.parameters()) - sum(TIED.values())
    assert rows[0].param_bytes == 4 * params  # float32, each tensor once: the source's
    assert rows[1].param_bytes - rows[0].param_bytes == 4 * sum(TIED.values())
    assert rows[0].optimizer_bytes == rows[0].param_bytes  # SGD momentum: one buffer per trained parameter
    assert rows[0].saved_peak == rows[1].saved_peak  # the kernel a tied copy saves is the source's storage
    assert rows[1].whole_peak - rows[0].whole_peak >= 2 * 4 * sum(TIED.values())  # kernel + momentum


def test_options_refuse_what_cannot_tie():
    with pytest.raises(AugLocalError, match="aux_tie and aux_follow .* choose one"):
        ConversionOptions(aux_tie=True, aux_follow=0.9)
    with pytest.raises(AugLocalError, match="rule 'dgl' has none"):
        ConversionOptions(aux_tie=True, rule="dgl")
    with pytest.raises(AugLocalError, match="aux_tie must be True or False"):
        ConversionOptions(aux_tie=1)
    options = ConversionOptions(aux_tie=True, aux_freeze=0.5)
    assert ConversionOptions.from_dict(options.to_dict()) == options and "aux_tie=True" in options.describe()
    assert "aux_tie" not in ConversionOptions().to_dict()  # older versions read it as before
    with pytest.raises(AugLocalError, match="aux_tie is not supported with pipeline > 1"):
        train(TrainConfig(model=TINY, dataset="synthetic", aux_tie=True, pipeline=2, out="unused"))
    with pytest.raises(AugLocalError, match="needs method 'auglocal'"):
        train(TrainConfig(model=TINY, dataset="synthetic", aux_tie=True, method="bp", out="unused"))


def test_commands_take_the_beyond_flags():
    try:
        from auglocal_fx_cli.main import cli
    except ImportError:  # not installed: run from the repository root
        from cli.main import cli
    runner = CliRunner()
    size = ["--input-size", "3", "16", "16"]
    result = runner.invoke(cli, ["report", TINY, "--d", "2", *size, "--flops-only", "--json", "--aux-tie"])
    assert result.exit_code == 0, result.output
    plain = runner.invoke(cli, ["report", TINY, "--d", "2", *size, "--flops-only", "--json"])
    params = [{r["method"]: r["params"] for r in json.loads(out.output)["rows"]} for out in (result, plain)]
    assert params[0]["AugLocal d=2"] < params[1]["AugLocal d=2"]
    for flags in (["--aux-follow", "0.9", "--aux-follow-adapted", "slice"], ["--aux-freeze", "0.5"]):
        assert runner.invoke(cli, ["report", TINY, "--d", "2", *size, "--flops-only", *flags]).exit_code == 0
    # The values reach ConversionOptions: its checks answer, in one line.
    for flags, message in ((["--aux-follow", "1.5"], "aux_follow must be an EMA momentum"),
                           (["--aux-freeze", "0"], "aux_freeze must be the fraction")):
        out = runner.invoke(cli, ["report", TINY, "--d", "2", *size, "--flops-only", *flags])
        assert out.exit_code != 0 and message in out.output and len(out.output.strip().splitlines()) == 1, flags
    bad = runner.invoke(cli, ["report", TINY, "--d", "2", *size, "--flops-only", "--aux-tie", "--aux-follow", "0.9"])
    assert bad.exit_code != 0 and "choose one" in bad.output and "Traceback" not in bad.output
    convert = runner.invoke(cli, ["convert", TINY, "--d", "2", *size, "--aux-tie"])
    assert convert.exit_code == 0 and "aux_tie=True" in convert.output


def test_two_gloo_processes_train_tied_copies_alike_in_both_orders(tmp_path):
    # Each process reads its own sources, which the start-up broadcast made equal; the averaged
    # gradients are those of the trained parameters only (the tied kernels are none).
    common = dict(model=str(Path(__file__).with_name("_tiny_models.py")) + ":tiny_nobn", dataset="synthetic",
                  input_size=16, batch_size=8, train_subset=32, test_subset=8, epochs=1, max_steps=3,
                  augment=False, warmup_epochs=1, progress=False, device="cpu", nproc=2, threads=1, aux_tie=True)
    weights = {}
    for each in (False, True):
        train(TrainConfig(out=str(tmp_path / str(each)), step_each_module=each, **common))
        weights[each] = torch.load(tmp_path / str(each) / "last.pt", map_location="cpu", weights_only=True)["model"]
    assert weights[True].keys() == weights[False].keys()
    for key, value in weights[False].items():
        assert torch.equal(value, weights[True][key]), key
    # Both auxiliary networks copy block 3 (features.6, a convolution): its kernel is the source's only.
    assert not any(key.startswith("aux.") and key.endswith("features.6.weight") for key in weights[True])
