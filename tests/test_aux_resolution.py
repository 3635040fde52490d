"""``aux_resolution="source"``: each auxiliary copy runs at its source block's resolution."""

import pytest
import torch
from torch import nn

from auglocal_fx import AugLocalError, ConversionOptions, load, resolve_model, to_local


def _leaf_shapes(module: nn.Module, x: torch.Tensor):
    """``{module name: (input shape, output shape)}`` of every leaf module, batch left out."""
    shapes, hooks = {}, []
    for name, leaf in module.named_modules():
        if name and not any(True for _ in leaf.children()):
            def hook(mod, args, out, name=name):
                if name not in shapes and torch.is_tensor(args[0]) and torch.is_tensor(out):
                    shapes[name] = (tuple(args[0].shape[1:]), tuple(out.shape[1:]))
            hooks.append(leaf.register_forward_hook(hook))
    with torch.no_grad():
        out = module(x)
    for h in hooks:
        h.remove()
    return shapes, out


def _spatial(shape):
    return shape[1:] if len(shape) == 3 else shape


def _copies_against_original(spec, **kwargs):
    """Per copied block: its modules' spatial sizes in the copy and in the original model.

    The reference is the original model's own forward (hooks), not the conversion's records.
    """
    torch.manual_seed(0)
    original = resolve_model(spec, num_classes=10, input_size=(3, 32, 32)).model.eval()
    reference, _ = _leaf_shapes(original, torch.randn(2, 3, 32, 32))
    local = to_local(spec, d=2, input_size=(3, 32, 32), num_classes=10, **kwargs).eval()
    pairs = []
    for plan, aux in zip(local.plan, local.aux):
        x = torch.randn(2, *local.block_shapes[plan.block])
        for k, copy in zip(plan.selected, aux):
            seen, x = _leaf_shapes(copy, x)
            names = [n for n in seen if n in reference]  # modules the adaptation added have no twin
            assert names, f"copy of block {k} shares no module with the original"
            pairs.append((plan.block, k, [(n, _spatial(seen[n][0]), _spatial(reference[n][0])) for n in names],
                          [(n, _spatial(seen[n][1]), _spatial(reference[n][1])) for n in names]))
    return pairs


@pytest.mark.parametrize("spec", ["paper:resnet32", "timm:regnetx_004"])
def test_source_copies_see_the_shapes_their_source_blocks_see(spec):
    for block, k, ins, outs in _copies_against_original(spec, aux_resolution="source"):
        for name, copy_in, original_in in ins:
            assert copy_in == original_in, (block, k, name, "input")
        for name, copy_out, original_out in outs:
            assert copy_out == original_out, (block, k, name, "output")


def test_paper_copies_run_finer_than_their_sources_and_stay_the_default():
    """At 32 px the paper's plan runs block 0's copy of the last block at 16 px (one 2x
    reduction of 32 px), the last block itself runs at 8 px; the default is that plan."""
    pairs = _copies_against_original("paper:resnet32")
    block, k, ins, _ = pairs[0]
    assert (block, k) == (0, 15)
    first = next(p for p in ins if p[0] == "layer3.4.conv1")
    assert first[1:] == ((32, 32), (8, 8))  # copy input 32 px, source input 8 px
    assert ConversionOptions().aux_resolution == "paper"


def test_source_copies_pool_first_and_keep_the_source_strides():
    local = to_local("paper:resnet32", d=2, aux_resolution="source")
    copy = local.aux[0][0]  # block 0 (16 ch, 32 px) -> copy of the last block (64 ch, 8 px)
    assert isinstance(copy.get_submodule("auglocal_source_pool"), nn.AdaptiveAvgPool2d)
    assert copy.get_submodule("layer3.4.conv1").stride == (1, 1)  # the source's own stride
    out = copy(torch.randn(2, 16, 32, 32))
    assert out.shape == (2, 64, 8, 8)
    # A copy of block 6 (the 2x reducing layer2.0) from block 0 keeps its stride 2: 32 -> 32 -> 16.
    three = to_local("paper:resnet32", d=3, pyramid=False, selection="sequential", aux_resolution="source")
    assert three.plan[5].selected == (6, 7)
    reducing = three.aux[5][0]
    assert reducing.get_submodule("layer2.0.conv1").stride == (2, 2)
    assert not hasattr(reducing, "auglocal_source_pool")  # its input is already at 32 px
    assert reducing(torch.randn(2, 16, 32, 32)).shape == (2, 32, 16, 16)


def test_default_conversion_unchanged_bit_for_bit():
    torch.manual_seed(5)
    default = to_local("paper:resnet32", d=3)
    torch.manual_seed(5)
    paper = to_local("paper:resnet32", d=3, aux_resolution="paper")
    assert default.conversion == paper.conversion and "aux_resolution" not in default.options
    theirs = paper.state_dict()
    for name, tensor in default.state_dict().items():
        assert torch.equal(tensor, theirs[name]), name
    assert [str(a) for a in default.aux] == [str(a) for a in paper.aux]


def test_aux_resolution_saved_with_the_network(tmp_path):
    local = to_local("paper:resnet32", d=2, aux_resolution="source")
    assert "aux_resolution=source" in local.conversion.describe()
    local.save(tmp_path / "net.pt")
    again = load(tmp_path / "net.pt")
    assert again.conversion.aux_resolution == "source"
    assert hasattr(again.aux[0][0], "auglocal_source_pool")
    again.load_state_dict(local.state_dict())  # strict: the same structure was rebuilt
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(again.eval()(x), local.eval()(x))


@pytest.mark.parametrize("bad", ["native", "Source", None, 2])
def test_bad_aux_resolution_is_one_line(bad):
    with pytest.raises(AugLocalError, match="unknown auxiliary resolution") as err:
        ConversionOptions(aux_resolution=bad)
    assert "\n" not in str(err.value)


def test_train_config_and_cli_take_it(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from auglocal_fx.training import TrainConfig
    from auglocal_fx_cli.main import cli as main

    assert TrainConfig(aux_resolution="source").local_options().aux_resolution == "source"
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    result = runner.invoke(main, ["convert", "paper:resnet32", "--d", "2", "--aux-resolution", "source",
                                  "-o", "net.pt"])
    assert result.exit_code == 0, result.output
    assert load("net.pt").conversion.aux_resolution == "source"
    bad = runner.invoke(main, ["convert", "paper:resnet32", "--d", "2", "--aux-resolution", "fine"])
    assert bad.exit_code != 0 and "'fine' is not one of 'paper', 'source'" in bad.output


def test_report_takes_it():
    import json

    from click.testing import CliRunner

    from auglocal_fx_cli.main import cli as main

    def aug_flops(*flags):
        result = CliRunner().invoke(main, ["report", "paper:resnet32", "--d", "2", "--flops-only", "--json", *flags])
        assert result.exit_code == 0, result.output
        return next(r["flops"] for r in json.loads(result.output)["rows"] if r["method"] == "AugLocal d=2")

    # Pooled copies run at coarser resolutions: a flag that does not reach the conversion gives equal counts.
    assert aug_flops("--aux-resolution", "source") < aug_flops()


def _measured_marks(local):
    """Per auxiliary network, ``k`` or ``k/r`` for each copy, from a forward pass.

    The reference is the copies themselves running: hooks read the height of what enters and
    leaves each copy (not the conversion's records, not the plan).
    """
    marks = []
    local.eval()
    with torch.no_grad():
        h, outputs = torch.randn(1, *local.input_size), []
        for block in local.blocks:
            h = block(h)
            outputs.append(h)
        for plan, aux in zip(local.plan, local.aux):
            seen = []
            hooks = [copy.register_forward_hook(lambda m, args, out: seen.append((args[0].shape[-2], out.shape[-2])))
                     for copy in list(aux)[:-1]]
            aux(outputs[plan.block])
            for hook in hooks:
                hook.remove()
            parts = []
            for k, (before, after) in zip(plan.selected, seen):
                assert before % after == 0  # exact on these models: the mark is the ratio itself
                parts.append(f"{k}/{before // after}" if before > after else str(k))
            marks.append(",".join(parts))
    return marks


def _planned_marks(local):
    return [",".join(f"{k}/2" if s == 2 else str(k) for k, s in zip(p.selected, p.strides)) for p in local.plan]


@pytest.mark.parametrize("spec, kwargs", [
    ("timm:regnetx_002", dict(d=3, input_size=(3, 64, 64))),
    ("paper:resnet32", dict(d=2)),  # at d=3 the source's reductions are the plan's
])
def test_printed_reductions_are_the_copies_measured_ones(spec, kwargs):
    # Under "source" the copies pool before their strides: the tables must say what runs (the
    # plan's strides say something else), and under "paper" too.
    from auglocal_fx.flops import count_flops
    from auglocal_fx.tables import blocks_table, flops_table

    for resolution in ("source", "paper"):
        local = to_local(spec, aux_resolution=resolution, **kwargs)
        measured = _measured_marks(local)
        assert [list(a.reductions) for a in local.aux] == [
            [int(part.split("/")[1]) if "/" in part else 1 for part in marks.split(",")] for marks in measured]
        flops = count_flops(local)
        blocks_rows = [line.split()[-1] for line in blocks_table(flops).splitlines()[2:2 + len(measured)]]
        assert blocks_rows == measured, resolution
        convert_rows = [line.split()[6] for line in flops_table(flops).splitlines()[2:2 + len(measured)]]
        assert convert_rows == measured, resolution
        if resolution == "source":
            assert measured != _planned_marks(local)  # the test tells the two apart
            assert any(int(m.split("/")[1]) > 2 for marks in measured for m in marks.split(",") if "/" in m)
            assert "'k/r' = the copy of block k divides the resolution by r" in blocks_table(flops)


def test_blocks_command_takes_aux_resolution_and_plots_what_runs(tmp_path, monkeypatch):
    import matplotlib.axes
    from click.testing import CliRunner

    from auglocal_fx_cli.main import cli as main

    rings = []
    real = matplotlib.axes.Axes.scatter

    def scatter(self, x, y, *args, **kwargs):
        if kwargs.get("edgecolors") is not None:  # a copied block: a ring where it reduces
            rings.append((float(y[0]), int(x[0]), kwargs.get("color") == "white"))
        return real(self, x, y, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "scatter", scatter)
    args = ["blocks", "timm:regnetx_002", "--d", "3", "--input-size", "3", "64", "64", "--aux-resolution", "source",
            "--svg", str(tmp_path / "b.svg")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    local = to_local("timm:regnetx_002", d=3, input_size=(3, 64, 64), aux_resolution="source")
    measured = _measured_marks(local)
    printed = [line.split()[-1] for line in result.output.splitlines()[2:2 + len(measured)]]
    assert printed == measured
    expected = [(-(p.block + 1) * 0.5, k, "/" in mark)
                for p, marks in zip(local.plan, measured) for k, mark in zip(p.selected, marks.split(","))]
    assert rings == expected


def test_rules_with_a_second_loss_report_their_classifiers_reductions():
    from auglocal_fx.flops import count_flops

    local = to_local("paper:resnet32", d=2, rule="auglocal+infopro", aux_resolution="source")
    assert local.plan[0].strides == (2,)
    assert count_flops(local).aux[0].reductions == (4,)  # 32 px pooled to 8 px: the last block's own
