"""Parameters used by several blocks (``shared_parameters="sum"``, the default): the blocks stay,
each user's local loss adds to the parameter's gradient, and it is stepped once, after its last
user. The network is :class:`tests._tiny_models.SharedNet`: CoaT-like position encodings shared
by the blocks of a stage, and a channel mix that uses the classifier."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fvcore.nn import FlopCountAnalysis

from auglocal_fx import AugLocalError, ConversionOptions, load, resolve_model, to_local
from auglocal_fx._pipeline import check_shared_parameters
from auglocal_fx._train_loop import Run
from auglocal_fx.flops import count_flops
from auglocal_fx.local_net import step_groups
from auglocal_fx.training import TrainConfig, train

from ._tiny_models import SharedNet
from .conftest import batch
from .test_sweep import check_local

SIZE = (3, 16, 16)
CLASSES = 10
SHARED = str(Path(__file__).with_name("_tiny_models.py")) + ":shared_net"
SHARED_NOBN = str(Path(__file__).with_name("_tiny_models.py")) + ":shared_nobn"


def _converted(d=2, **kw):
    torch.manual_seed(0)
    model = SharedNet(CLASSES)
    return model, to_local(model, d=d, input_size=SIZE, **kw)


def _fresh():
    torch.manual_seed(0)
    return SharedNet(CLASSES)


def test_blocks_stay_apart_and_every_guarantee_of_the_sweep_holds():
    model, local = _converted()
    assert local.block_names == [["stem"], ["cpe1", "stage1.0"], ["cpe1", "stage1.1"], ["down"],
                                 ["cpe2", "stage2.0"], ["fc"], ["cpe2", "stage2.2"], ["cpe2", "stage2.3"]]
    assert local.head_names == ["pool", "fc"]
    # d=2: K = 7 local modules; module 6 is blocks 6-7 and the head
    named = dict(local.named_parameters())
    users = {name.rsplit(".", 2)[-2]: mods for name, mods in local.shared_parameters().items()}
    assert users == {"cpe1": [1, 2], "cpe2": [4, 6], "fc": [5, 6]}
    assert named[next(n for n in local.shared_parameters() if n.endswith("cpe1.weight"))] is model.cpe1.weight
    check_local(model, local, SIZE, CLASSES, _fresh)  # exact outputs, isolation, strict export
    for d in (3, 4):
        model, local = _converted(d=d)
        check_local(model, local, SIZE, CLASSES, _fresh)


def test_merge_keeps_one_loss_per_parameter():
    model, local = _converted(shared_parameters="merge")
    assert local.block_names == [["stem"], ["cpe1", "stage1"], ["down"]]
    assert local.shared_parameters() == {}
    assert "shared_parameters='merge'" in repr(local)
    # a checkpoint written before the option was made when such blocks merged
    old = {k: v for k, v in ConversionOptions().to_dict().items() if k != "shared_parameters"}
    assert ConversionOptions.from_dict(old).shared_parameters == "merge"
    assert ConversionOptions().to_dict()["shared_parameters"] == "sum"
    with pytest.raises(AugLocalError, match="shared_parameters must be 'sum'.*or 'merge'"):
        ConversionOptions(shared_parameters="mean")
    check_local(model, local, SIZE, CLASSES, _fresh)


def test_a_shared_gradient_is_the_sum_of_its_users_local_losses():
    model, local = _converted()
    x, y = batch(SIZE, num_classes=CLASSES)
    local.train()
    local.zero_grad(set_to_none=True)
    local.train_step(x, y)
    # By hand, on the original model's modules: each local loss on the detached input of its block.
    ce = F.cross_entropy
    h0 = model.stem(x)
    h1 = model.stage1[0](h0.detach())
    h2 = model.stage1[1](h1.detach())
    h3 = model.down(h2.detach())
    h4 = model.stage2[0](h3.detach())
    h5 = model.stage2[1](h4.detach())
    h7 = model.stage2[3](model.stage2[2](h5.detach()))
    loss = {1: ce(local.aux[1](h1), y), 2: ce(local.aux[2](h2), y), 4: ce(local.aux[4](h4), y),
            5: ce(local.aux[5](h5), y), 6: ce(model.fc(torch.flatten(model.pool(h7), 1)), y)}

    def grad(j, p):
        return torch.autograd.grad(loss[j], p, retain_graph=True)[0]

    for p, users in ((model.cpe1.weight, (1, 2)), (model.cpe1.bias, (1, 2)), (model.cpe2.weight, (4, 6)),
                     (model.fc.weight, (5, 6)), (model.fc.bias, (5, 6))):
        expected = grad(users[0], p) + grad(users[1], p)
        assert torch.equal(p.grad, expected)
        assert not torch.equal(p.grad, grad(users[0], p))  # both users contribute
    assert torch.equal(model.stage1[0].conv.weight.grad, grad(1, model.stage1[0].conv.weight))


def test_copies_of_blocks_using_a_shared_module_have_their_own_parameters():
    model, local = _converted(d=4)
    primary = {id(p) for p in model.parameters()}
    assert not any(id(p) in primary for p in local.aux.parameters())
    # aux 0 copies blocks using cpe1 and cpe2; each copy holds its own encoding
    copies = [m for m in local.aux.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    assert len(copies) >= 2 and len({id(m.weight) for m in copies}) == len(copies)


@pytest.mark.parametrize("options", [dict(aux_tie=True), dict(aux_follow=0.5)])
def test_copies_of_a_shared_encoding_find_it_as_their_source(options):
    model, local = _converted(d=3, options=ConversionOptions(**options))
    copies = [m for name, m in local.aux.named_modules() if name.endswith(".cpe2")]
    assert copies  # aux 0 copies blocks 4 and 7, both reading cpe2
    if "aux_tie" in options:  # the copy reads the shared tensor (detached) instead of its own
        assert all("weight" not in dict(m.named_parameters()) for m in copies)
        with torch.no_grad():
            model.cpe2.weight.add_(1.0)
        x = torch.randn(2, model.cpe2.in_channels, 4, 4)
        # the kernel is the shared one; the bias (1-D) stays the copy's own
        assert all(torch.equal(m(x), F.conv2d(x, model.cpe2.weight, m.bias, m.stride, m.padding, m.dilation,
                                              m.groups)) for m in copies)
    else:  # the copy starts at its source and follows it
        assert all(torch.equal(m.weight, model.cpe2.weight) for m in copies)
    # a copy's loss never reaches the shared tensor: block 4's step gradient is its users' alone
    check_local(model, local, SIZE, CLASSES, _fresh)


def test_step_groups_put_each_parameter_with_its_last_user():
    a, b, c, d = (torch.nn.Parameter(torch.zeros(1)) for _ in range(4))
    groups = step_groups([[a, b], [b, c, b], [a, d]])
    assert [[id(p) for p in g] for g in groups] == [[], [id(b), id(c)], [id(a), id(d)]]


def test_step_each_module_is_bit_identical_with_shared_parameters(tmp_path):
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, *SIZE, generator=g), torch.randint(0, CLASSES, (8,), generator=g)) for _ in range(3)]
    for recipe in (dict(), dict(opt="adamw", lr=3e-3, weight_decay=0.05), dict(grad_clip=1e-2, lr=0.5)):
        runs = []
        for each in (False, True):
            run = Run(TrainConfig(model=SHARED, dataset="synthetic", input_size=16, batch_size=8, train_subset=16,
                                  test_subset=8, epochs=1, warmup_epochs=0, out=str(tmp_path / f"{each}"),
                                  progress=False, step_each_module=each, **recipe), 0, 1, 0)
            assert run.step_each_module is each and run.net.shared_parameters()
            start = run.net.export().cpe2.weight.detach().clone()
            for x, y in batches:
                run.train_step(x, y)
            assert not torch.equal(run.net.export().cpe2.weight, start)
            runs.append(run)
        at_end, each = (r.net.state_dict() for r in runs)
        for key in at_end:
            assert torch.equal(at_end[key], each[key]), (recipe, key)


def test_save_and_load_keep_the_parameter_shared(tmp_path):
    model, local = _converted()
    local.train_step(*batch(SIZE, num_classes=CLASSES))
    torch.optim.SGD(local.parameters(), lr=0.5).step()
    local.save(tmp_path / "net.pt")
    again = load(tmp_path / "net.pt", model=SharedNet(CLASSES))
    assert again.conversion.shared_parameters == "sum" and again.shared_parameters() == local.shared_parameters()
    assert again.blocks[4].eval_graph.cpe2.weight is again.blocks[6].eval_graph.cpe2.weight
    assert torch.equal(again.export().cpe2.weight, model.cpe2.weight)
    fresh_model = SharedNet(CLASSES)
    fresh_model.load_state_dict(local.export().state_dict(), strict=True)
    x = torch.randn(2, *SIZE)
    assert torch.equal(fresh_model.eval()(x), again.eval()(x))


def test_a_pipeline_refuses_users_on_different_workers_in_one_line():
    _, local = _converted()
    check_shared_parameters(local, [(0, 3), (3, 7)])  # cpe1 on worker 0; cpe2 and fc on worker 1
    with pytest.raises(AugLocalError, match=r"cpe1\.weight is shared by local modules 1 and 2.*workers 0 and 1") \
            as error:
        check_shared_parameters(local, [(0, 2), (2, 7)])
    assert "\n" not in str(error.value)
    with pytest.raises(AugLocalError, match=r"cpe2\.weight is shared by local modules 4 and 6"):
        check_shared_parameters(local, [(0, 3), (3, 5), (5, 7)])


def test_parameters_and_flops_count_a_shared_parameter_once():
    model, local = _converted()
    flops = count_flops(local)
    total = sum(p.numel() for p in model.parameters())  # PyTorch lists each parameter once
    assert flops.params_primary == total
    assert sum(b.params for b in flops.blocks) + flops.head.params == total
    assert flops.blocks[2].params == sum(p.numel() for n, p in model.stage1[1].named_parameters()
                                         if not n.startswith("cpe"))  # cpe1 counted with block 1
    # a shared module called by several blocks costs FLOPs at each call, as fvcore counts the original
    assert flops.primary == FlopCountAnalysis(model.eval(), torch.randn(1, *SIZE)).total()


def test_two_gloo_processes_equal_one_process_with_shared_parameters(tmp_path):
    common = dict(model=SHARED_NOBN, dataset="synthetic", input_size=16, augment=False, max_steps=2, batch_size=8,
                  train_subset=16, test_subset=8, epochs=1, device="cpu", d=3, pyramid=False, warmup_epochs=1,
                  progress=False)  # no batch norm, and no aux head with BatchNorm1d (two copies each)
    train(TrainConfig(out=str(tmp_path / "one"), **common))
    train(TrainConfig(out=str(tmp_path / "two"), nproc=2, **common))
    a, b = (torch.load(tmp_path / n / "model.pt", weights_only=True) for n in ("one", "two"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.sweep
def test_timm_coat_keeps_a_block_per_serial_and_parallel_block():
    resolved = resolve_model("timm:coat_tiny", num_classes=7, input_size=(3, 32, 32),
                             model_kwargs={"embed_dims": (32, 32, 32, 32), "parallel_depth": 2})
    local = to_local(resolved.model, d=3, input_size=resolved.input_size)
    assert [n[2] if n[0].startswith("patch_embed") else n[1] for n in local.block_names[:8]] == \
        [f"serial_blocks{s}.{k}" for s in (1, 2, 3, 4) for k in (0, 1)]
    assert [next(m for m in n if m.startswith("parallel")) for n in local.block_names[8:]] == \
        ["parallel_blocks.0", "parallel_blocks.1"]
    assert local.head_names == ["norm2", "norm3", "norm4", "aggregate", "head_drop", "head"]
    users = {n.split(".eval_graph.")[1]: u for n, u in local.shared_parameters().items()}
    assert users["cpe1.proj.weight"] == [0, 1]  # d=3: K = 8, the output module is blocks 7-9
    assert users["cpe2.proj.weight"] == [2, 3, 7]  # stage 2's blocks and the parallel blocks
