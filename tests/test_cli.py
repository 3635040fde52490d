"""The ``auglocal-fx`` commands through click's CliRunner: outputs, JSON, checkpoints, errors."""

import json
import os
import textwrap

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from auglocal_fx import load, to_local

try:
    from auglocal_fx_cli.main import cli
except ImportError:  # not installed: run from the repository root
    from cli.main import cli

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = os.path.join(HERE, "_tiny_models.py") + ":tiny_cnn"
TINY_SIZE = ["--input-size", "3", "16", "16"]

# Table 7 of the paper: CIFAR-10 ResNet-110, forward FLOPs of one 32x32 image (fvcore).
TABLE7_AUGLOCAL = {2: 0.63e9, 3: 0.69e9, 4: 0.80e9, 5: 0.98e9, 6: 1.13e9}
TABLE7_BP = 0.25e9

USER_MODELS = textwrap.dedent("""
    import torch
    from torch import nn

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.fc = nn.Linear(8, 10)

        def forward(self, x):
            x = self.conv(x)
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
                x = x * 2
            return self.fc(x.mean((2, 3)))

    def branchy():
        return Branchy()

    def no_head():
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
""")


@pytest.fixture
def run(tmp_path, monkeypatch):
    """Invoke the CLI in a temporary working directory."""
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(cli, [str(a) for a in args])
    return invoke


def assert_user_error(result, *fragments):
    """A user mistake: non-zero exit, one line, no traceback."""
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# -- convert --------------------------------------------------------------------------------

def test_convert_prints_table_and_writes_nothing_unless_asked(run, tmp_path):
    for extra in ([], ["--json"]):
        result = run("convert", "paper:resnet32", "--d", "3", *extra)
        assert result.exit_code == 0, result.output
        assert list(tmp_path.iterdir()) == [], "convert wrote a file without -o"
    out = run("convert", "paper:resnet32", "--d", "3").output
    assert "aux copies" in out and "primary (BP forward)" in out and "ratio total / primary" in out
    assert "1 multiply-add = 1 FLOP" in out
    assert "aten::add" in out  # what fvcore does not count is listed
    assert "saved" not in out


def test_convert_refuses_to_overwrite_without_force(run, tmp_path):
    (tmp_path / "r.pt").write_bytes(b"precious")
    assert_user_error(run("convert", TINY, *TINY_SIZE, "--d", "2", "-o", "r.pt"), "exists", "--force")
    assert (tmp_path / "r.pt").read_bytes() == b"precious"
    result = run("convert", TINY, *TINY_SIZE, "--d", "2", "-o", "r.pt", "--force")
    assert result.exit_code == 0, result.output
    assert "saved r.pt" in result.output.splitlines()[-1]
    assert load(tmp_path / "r.pt").options["d"] == 2


def test_convert_pauses_the_cycle_collector_and_resumes_it(run, monkeypatch):
    import gc

    import auglocal_fx

    seen = []
    real = auglocal_fx.to_local

    def converting(*args, **kwargs):
        seen.append(gc.isenabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(auglocal_fx, "to_local", converting)
    assert gc.isenabled()
    result = run("convert", TINY, *TINY_SIZE, "--d", "2")
    assert result.exit_code == 0, result.output
    assert seen == [False] and gc.isenabled()  # paused while converting, on again after
    assert_user_error(run("convert", TINY, *TINY_SIZE, "--d", "2", "--force"), "-o FILE")
    assert gc.isenabled()  # also after a user error


def test_the_command_line_freezes_its_imports_and_what_is_left_at_exit():
    # After importing the commands the collector is on; at exit everything alive is frozen, so
    # Python's last collection does not re-scan it.
    import subprocess
    import sys

    code = ("import atexit, gc; from auglocal_fx_cli.main import cli; junk = [[] for _ in range(5000)]; "
            "frozen = gc.get_freeze_count(); atexit._run_exitfuncs(); "
            "print(gc.isenabled(), frozen > 0, gc.get_freeze_count() - frozen > 1000)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True", "True"], out.stdout + out.stderr


_CONSOLE_SCRIPT = textwrap.dedent("""
    import atexit, os, sys, threading, time
    from auglocal_fx_cli.main import main

    quick_exit = os._exit
    os._exit = lambda status: (os.write(1, b"quick exit\\n"), quick_exit(status))
    atexit.register(lambda: print("exit functions ran"))
    if sys.argv[1] == "--with-thread":
        del sys.argv[1]
        threading.Thread(target=lambda: (time.sleep(0.3), print("thread finished"))).start()
    sys.argv[0] = "auglocal-fx"
    main()
""")


@pytest.mark.parametrize("thread", [False, True], ids=["quick-exit", "thread-running"])
def test_the_console_script_flushes_runs_exit_functions_and_keeps_the_status(thread):
    # main() ends the process with os._exit (no teardown), but after the exit functions, with
    # its output flushed into a pipe and click's status; with a non-daemon thread still running
    # it takes the normal exit, which waits for the thread.
    import subprocess
    import sys

    def console(*args: str) -> "subprocess.CompletedProcess[str]":
        extra = ["--with-thread"] if thread else []
        env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # buffered pipes
        return subprocess.run([sys.executable, "-c", _CONSOLE_SCRIPT, *extra, *args],
                              capture_output=True, text=True, env=env)

    ok = console("--version")
    assert ok.returncode == 0, ok.stderr
    lines = ok.stdout.splitlines()
    assert lines[0].startswith("auglocal-fx, version") and "exit functions ran" in lines
    assert ("quick exit" in lines) != thread and ("thread finished" in lines) == thread
    bad = console("convert", "paper:resnet32")  # no --d: a user error
    assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [
        "Error: give the auxiliary depth --d D (e.g. --d 2) or a --flops-budget like 3x"]
    assert "exit functions ran" in bad.stdout.splitlines()
    assert ("quick exit" in bad.stdout.splitlines()) != thread


def test_convert_json(run, tmp_path):
    result = run("convert", "paper:resnet32", "--d", "2", "--json", "-o", "r32.pt")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    for key in ("model", "blocks", "aux_nets", "flops", "params"):
        assert key in data
    assert data["model"] == "paper:resnet32"
    assert len(data["blocks"]) == 16 and len(data["aux_nets"]) == 14  # K = L - 1 for d = 2
    flops = data["flops"]
    assert all(isinstance(flops[k], int) for k in ("primary", "aux", "total"))
    assert flops["total"] == flops["primary"] + flops["aux"]
    assert flops["primary"] == sum(b["flops"] for b in data["blocks"]) + data["head"]["flops"]
    assert flops["aux"] == sum(a["flops"] for a in data["aux_nets"])
    assert all(isinstance(data["params"][k], int) for k in ("primary", "aux"))
    assert data["checkpoint"] == "r32.pt" and (tmp_path / "r32.pt").is_file()


def test_convert_options_reach_the_network(run):
    result = run("convert", TINY, *TINY_SIZE, "--d", "3", "--no-pyramid", "--selection",
                 "sequential", "--num-classes", "7", "--json", "-o", "t.pt")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["options"]["pyramid"] is False and data["options"]["selection"] == "sequential"
    assert data["num_classes"] == 7 and data["input_size"] == [3, 16, 16]
    assert [a["selected"] for a in data["aux_nets"]] == [[1, 2]]
    local = load("t.pt")
    assert local.options["d"] == 3 and local.num_classes == 7


def test_rule_option_and_report_rules(run):
    result = run("convert", TINY, *TINY_SIZE, "--rule", "dgl", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["options"]["rule"] == "dgl" and len(data["aux_nets"]) == len(data["blocks"]) - 1
    result = run("report", "paper:resnet32", "--rules", "bp", "gc", "dgl", "predsim", "infopro",
                 "auglocal", "--d", "2", "3", "--flops-only", "--json")
    assert result.exit_code == 0, result.output
    rows = {r["method"]: r for r in json.loads(result.output)["rows"]}
    assert list(rows) == ["BP", "GC", "DGL", "PredSim", "InfoPro", "AugLocal d=2", "AugLocal d=3"]
    assert rows["InfoPro"]["rule"] == "infopro" and rows["BP"]["rule"] is None
    assert rows["BP"]["flops"] < rows["PredSim"]["flops"] < rows["DGL"]["flops"] < rows["InfoPro"]["flops"]
    both = run("report", TINY, *TINY_SIZE, "--rule", "dgl", "--rules", "bp", "--flops-only")
    assert_user_error(both, "--rule or --rules")


def test_convert_aux_head_option(run):
    result = run("convert", TINY, *TINY_SIZE, "--d", "2", "--aux-head", "slim", "-o", "s.pt")
    assert result.exit_code == 0, result.output
    assert "slim auxiliary heads" in result.output
    assert load("s.pt").options["aux_head"] == "slim"
    params = {}
    for head in ("copy", "slim"):  # each row is the network converted with that head
        result = run("report", TINY, *TINY_SIZE, "--d", "2", "--flops-only", "--aux-head", head, "--json")
        assert result.exit_code == 0, result.output
        row = next(r for r in json.loads(result.output[result.output.index("{"):])["rows"]
                   if r["method"] == "AugLocal d=2")
        local = to_local(TINY, d=2, input_size=(3, 16, 16), aux_head=head)
        params[head] = sum(p.numel() for p in local.parameters())
        assert row["params"] == params[head], head
    assert params["copy"] != params["slim"]
    wrong = run("convert", TINY, "--d", "2", "--aux-head", "wide")
    assert wrong.exit_code == 2 and "'wide' is not one of 'auto', 'copy', 'slim'" in wrong.output


def test_convert_checkpoint_round_trip(run, tmp_path):
    torch.manual_seed(123)
    result = run("convert", TINY, *TINY_SIZE, "--d", "2", "-o", "tiny.pt")
    assert result.exit_code == 0, result.output
    torch.manual_seed(123)
    reference = to_local(TINY, d=2, input_size=(3, 16, 16)).eval()  # what the CLI converted
    restored = load(tmp_path / "tiny.pt").eval()
    saved = torch.load(tmp_path / "tiny.pt", weights_only=True)["state_dict"]
    for name, value in restored.state_dict().items():
        assert torch.equal(value, saved[name]), name
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(restored(x), reference(x))
        h = x
        for j, block in enumerate(restored.blocks[: len(restored.aux)]):
            h = block(h)
            assert torch.equal(restored.aux[j](h), reference.aux[j](h))
    # A fresh conversion has other random weights: the outputs above came from the file.
    fresh = to_local(TINY, d=2, input_size=(3, 16, 16)).eval()
    with torch.no_grad():
        assert not torch.equal(fresh(x), restored(x))


def test_convert_flops_budget(run, monkeypatch):
    from auglocal_fx._module_flops import _arch_key
    from tests.test_flops import _count_traces

    traced = _count_traces(monkeypatch)
    result = run("convert", "paper:resnet32", "--flops-budget", "3x", "--json", "-o", "b.pt")
    assert result.exit_code == 0, result.output
    keys = [(_arch_key(module), shape) for module, shape in traced]
    assert keys and len(keys) == len(set(keys))  # the chosen network reuses the search's counts
    data = json.loads(result.output)
    budget = data["budget"]
    assert data["options"]["d"] == budget["d"] and data["options"]["tau"] == budget["tau"]
    assert data["flops"]["total"] == budget["flops"] <= 3 * data["flops"]["primary"]
    result = run("convert", "paper:resnet32", "--flops-budget", "3x")
    assert result.output.startswith(f"picked d={budget['d']}, tau={budget['tau']:g}")


# -- report ---------------------------------------------------------------------------------

def test_report_flops_only_json(run):
    result = run("report", TINY, *TINY_SIZE, "--d", "2", "3", "--flops-only", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert [r["method"] for r in data["rows"]] == ["BP", "GC", "AugLocal d=2", "AugLocal d=3"]
    assert all(isinstance(r["flops"], int) for r in data["rows"])
    assert all(r["memory"] is None and r["step_time"] is None for r in data["rows"])
    assert len(data["profile"]) == 4


def test_report_measures_time_and_memory(run, tmp_path):
    result = run("report", TINY, *TINY_SIZE, "--d", "2", "--batch-size", "2", "--repeats", "1",
                 "--plot", "r.png")
    assert result.exit_code == 0, result.output
    assert "time/step" in result.output and "plot written to r.png" in result.output
    assert (tmp_path / "r.png").stat().st_size > 1000
    result = run("report", TINY, *TINY_SIZE, "--d", "2", "--batch-size", "2", "--repeats", "1",
                 "--threads", "1", "--json")
    data = json.loads(result.output)
    assert all(r["step_time"] > 0 for r in data["rows"])
    assert "1 CPU thread" in data["time_how"]
    # Measured for every row (this machine can measure the saved-tensor peak on CPU).
    assert all(isinstance(r["memory"], int) and r["memory"] > 0 for r in data["rows"]), data["memory_note"]
    assert data["memory_how"]
    # Every combination by default; the whole peak holds the weights besides the saved bytes.
    assert [r["method"] for r in data["rows"]] == ["BP", "GC", "AugLocal d=2", "AugLocal d=2 +step each",
                                                   "AugLocal d=2 +recompute", "AugLocal d=2 +recompute +step each"]
    whole = {r["method"]: r["whole"] for r in data["rows"]}
    assert whole["AugLocal d=2 +step each"] <= whole["AugLocal d=2"]  # (a tiny peak may come before any gradient)
    assert whole["AugLocal d=2 +recompute +step each"] <= whole["AugLocal d=2 +recompute"]
    assert all(r["whole"] > r["memory"] for r in data["rows"])
    assert any(h.startswith("whole peak:") for h in data["memory_how"])


def test_report_does_not_hide_a_broken_measurement(monkeypatch):
    import auglocal_fx.memory
    from auglocal_fx.costs import cost_report

    def broken(*args, **kwargs):
        raise KeyError("a bug in measure_memory")

    monkeypatch.setattr(auglocal_fx.memory, "measure_memory", broken)
    with pytest.raises(KeyError, match="a bug"):
        cost_report(TINY, depths=(2,), input_size=(3, 16, 16), batch_size=2, timing=False)


def test_report_resnet110_matches_table7(run):
    result = run("report", "paper:resnet110", "--d", "2", "3", "4", "5", "6", "--flops-only",
                 "--json")
    assert result.exit_code == 0, result.output
    rows = {r["method"]: r["flops"] for r in json.loads(result.output)["rows"]}
    got = {d: rows[f"AugLocal d={d}"] for d in TABLE7_AUGLOCAL}
    for d, expected in TABLE7_AUGLOCAL.items():
        assert got[d] == pytest.approx(expected, rel=0.02), (d, got)


def test_report_resnet110_bp_matches_table7(run):
    """fvcore counts 0.2553 G (0.2531 G without BatchNorm); the paper prints 0.25 G, two digits."""
    result = run("report", "paper:resnet110", "--d", "2", "--flops-only", "--json")
    rows = {r["method"]: r["flops"] for r in json.loads(result.output)["rows"]}
    assert rows["BP"] == pytest.approx(TABLE7_BP, rel=0.03)  # within the paper's rounding


# -- blocks ---------------------------------------------------------------------------------

def test_blocks_table_and_svg(run, tmp_path):
    result = run("blocks", "paper:resnet32", "--d", "3", "--svg", "b.svg")
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if line[:4].strip().isdigit()]
    assert len(rows) == 16
    assert "output module" in result.output and "layer3.4" in result.output
    assert "<svg" in (tmp_path / "b.svg").read_text()[:2000]


def test_blocks_of_a_checkpoint(run):
    assert run("convert", TINY, *TINY_SIZE, "--d", "3", "-o", "c.pt").exit_code == 0
    result = run("blocks", "c.pt")
    assert result.exit_code == 0, result.output
    assert "d=3" in result.output
    # options that cannot apply to a checkpoint are refused, not dropped
    assert_user_error(run("blocks", "c.pt", "--d", "2"), "checkpoint", "--d")
    assert_user_error(run("blocks", "c.pt", "--tau", "0.1", "--selection", "sequential"),
                      "--tau, --selection")


# -- user errors: one line, non-zero exit, no traceback --------------------------------------

@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "user_models.py"
    path.write_text(USER_MODELS)
    return str(path)


@pytest.mark.parametrize("args, fragment", [
    (["convert", "timm:not_a_model_xyz", "--d", "2"], "unknown timm model"),
    (["convert", "torchvision:not_a_model", "--d", "2"], "unknown torchvision"),
    (["convert", "foo:bar", "--d", "2"], "unknown spec prefix"),
    (["convert", "resnet32", "--d", "2"], "no prefix"),
    (["convert", "missing.py:factory", "--d", "2"], "does not exist"),
    (["convert", "paper:resnet32", "--d", "1"], "auxiliary depth d=1 is invalid"),
    (["convert", "paper:resnet32", "--d", "16"], "too large"),
    (["convert", "paper:resnet32", "--d", "2", "--tau", "1.5"], "tau=1.5"),
    (["convert", "paper:resnet32", "--d", "2", "--tau", "0.3", "--no-pyramid"], "not both"),
    (["convert", "paper:resnet32"], "--d"),
    (["convert", "paper:vgg19", "--d", "2", "--input-size", "3", "8", "8"], "input"),
    (["convert", "paper:resnet32", "--d", "2", "--input-size", "3", "0", "32"], "input size"),
    (["convert", "paper:resnet32", "--flops-budget", "lots"], "budget"),
    (["convert", "paper:resnet32", "--flops-budget", "1.01x"], "too small"),
    (["convert", "paper:resnet32", "--flops-budget", "3x", "--tau", "0.2"], "chooses tau"),
    (["convert", "paper:resnet32", "--flops-budget", "3x", "--no-pyramid"], "chooses tau"),
    (["convert", "paper:resnet32", "--d", "2", "--force"], "-o FILE"),
    (["report", "paper:resnet32", "--d", "2", "--flops-only", "--plot", "x.gif"], ".png"),
    (["blocks", "paper:resnet32", "--svg", "no/such/folder/b.svg"], "does not exist"),
    (["blocks", "missing.pt"], "does not exist"),
])
def test_user_errors(run, args, fragment):
    assert_user_error(run(*args), fragment)


def test_missing_factory(run, user_file):
    assert_user_error(run("convert", f"{user_file}:nope", "--d", "2"), "no callable 'nope'")


def test_untraceable_model(run, user_file):
    assert_user_error(run("convert", f"{user_file}:branchy", "--d", "2", *TINY_SIZE), "trace")


def test_no_classifier_head(run, user_file):
    assert_user_error(run("convert", f"{user_file}:no_head", "--d", "2", *TINY_SIZE),
                      "no classifier head")


def test_corrupt_checkpoint(run, tmp_path):
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    assert_user_error(run("blocks", "corrupt.pt"), "corrupt")


def test_foreign_checkpoint(run, tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    assert_user_error(run("blocks", "foreign.pt"), "not an auglocal-fx")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu(run):
    assert_user_error(run("report", TINY, *TINY_SIZE, "--d", "2", "--device", "cuda"), "cpu")


# -- --model-kwargs, --weights, --aux-init

@pytest.fixture
def wide_spec():
    return str(Path(__file__).with_name("_tiny_models.py")) + ":wide_cnn"


def test_model_kwargs_on_the_command_line(run, wide_spec):
    plain = run("blocks", wide_spec, "--input-size", 3, 8, 8)
    assert plain.exit_code == 0, plain.output
    assert "3 blocks + head" in plain.output
    # several pairs after one flag, the spec after them, as timm's train.py takes them
    deeper = run("blocks", "--model-kwargs", "depth=4", "width=6", wide_spec, "--input-size", 3, 8, 8)
    assert deeper.exit_code == 0, deeper.output
    assert "5 blocks + head" in deeper.output and "6x8x8" in deeper.output
    saved = run("convert", wide_spec, "--d", 2, "--input-size", 3, 8, 8, "--model-kwargs", "depth=3",
                "-o", "net.pt")
    assert saved.exit_code == 0, saved.output
    assert load("net.pt").options["model_kwargs"] == {"depth": 3}
    # --d stays single-valued where the command takes one
    single = run("convert", wide_spec, "--model-kwargs", "depth=4", "--d", 2, 3, "--input-size", 3, 8, 8)
    assert single.exit_code != 0 and "unexpected extra argument" in single.output


@pytest.mark.parametrize("args, fragment", [
    (["--model-kwargs", "foo"], "model kwarg 'foo' is not KEY=VALUE"),
    (["--model-kwargs", "foo=1"], "cannot be built with model_kwargs foo=1"),
    (["--weights", "missing.pt"], "weights file 'missing.pt' does not exist"),
])
def test_model_option_errors_are_one_line(run, wide_spec, args, fragment):
    assert_user_error(run("convert", wide_spec, "--d", 2, "--input-size", 3, 8, 8, *args), fragment)


def test_weights_and_aux_init_on_convert(run, wide_spec, tmp_path):
    from auglocal_fx import resolve_model

    source = resolve_model(wide_spec, input_size=(3, 8, 8)).model
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "w.pth")
    result = run("convert", wide_spec, "--d", 2, "--input-size", 3, 8, 8, "--weights", "w.pth",
                 "--aux-init", "copy", "-o", "net.pt")
    assert result.exit_code == 0, result.output
    local = load("net.pt")
    assert local.options["aux_init"] == "copy"
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(local.eval()(x), source.eval()(x))
    assert torch.equal(local.aux[0][0].get_parameter("6.weight"), source[6].weight)  # block 2's conv


def test_a_classifier_for_other_classes_is_one_warning_line(run, wide_spec, tmp_path):
    import sys
    import warnings

    from auglocal_fx import resolve_model

    source = resolve_model(wide_spec, input_size=(3, 8, 8)).model  # 10 classes
    torch.save(source.state_dict(), tmp_path / "w.pt")
    def show(message, category, filename, lineno, file=None, line=None):  # Python's own, un-captured by pytest
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        result = run("convert", wide_spec, "--d", 2, "--input-size", 3, 8, 8, "--num-classes", 4,
                     "--weights", "w.pt")
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Warning: auglocal-fx: w.pt has a 10-class classifier, "
                                                   "the model 4 classes: loaded all weights but"), lines
