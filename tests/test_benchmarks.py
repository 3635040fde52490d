"""The benchmarks' shared helpers: the run cache (``benchmarks/_cache.py``), order-and-shape pairing
with the authors' layers (``benchmarks/_pairs.py``), and what ``benchmarks/accuracy.py`` makes of
them (cached, retrained and missing rows), with the training subprocess replaced by a stub."""

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import _cache  # noqa: E402
import accuracy  # noqa: E402
from _pairs import Mismatch, pairs  # noqa: E402


def _counting(result):
    calls = []

    def fn(workdir):
        calls.append(workdir)
        (workdir / "last.pt").write_text("checkpoint")  # what a training run leaves behind
        return dict(result)

    return fn, calls


def test_cached_run_trains_once_per_key_and_records_the_commit(tmp_path):
    fn, calls = _counting({"acc": 1.0})
    first = _cache.cached_run("run", {"seed": 0}, tmp_path, fn)
    again = _cache.cached_run("run", {"seed": 0}, tmp_path, fn)
    assert len(calls) == 1 and again == first
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=BENCHMARKS, capture_output=True,
                          text=True).stdout.strip()
    assert first["made_by"].startswith(head) and first["key"] == {"seed": 0} and first["acc"] == 1.0


def test_another_key_or_rerun_trains_in_an_empty_folder(tmp_path):
    fn, calls = _counting({"acc": 1.0})
    _cache.cached_run("run", {"seed": 0}, tmp_path, fn)
    _cache.cached_run("run", {"seed": 1}, tmp_path, fn)  # another key: not the first one's last.pt
    assert len(calls) == 2 and calls[0] != calls[1]
    seen = []
    _cache.cached_run("run", {"seed": 0}, tmp_path, lambda workdir: seen.append(list(workdir.iterdir())) or {})
    assert seen == []  # cached: nothing ran
    _cache.cached_run("run", {"seed": 0}, tmp_path, lambda workdir: seen.append(list(workdir.iterdir())) or {},
                      rerun=True)
    assert seen == [[]]  # rerun: trained, and not from the earlier checkpoint


def test_a_failed_run_stores_nothing(tmp_path):
    def fails(workdir):
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError):
        _cache.cached_run("run", {"seed": 0}, tmp_path, fails)
    fn, calls = _counting({"acc": 1.0})
    _cache.cached_run("run", {"seed": 0}, tmp_path, fn)
    assert len(calls) == 1


def test_a_second_caller_waits_for_the_run_and_reads_its_result(tmp_path):
    # Two invocations sharing a cache folder once trained the same run into the same folder.
    started, release = threading.Event(), threading.Event()
    calls, results = [], {}

    def slow(workdir):
        calls.append("first")
        started.set()
        release.wait(20)
        return {"acc": 1.0}

    def other(workdir):
        calls.append("second")
        return {"acc": 2.0}

    def call(label, fn):
        results[label] = _cache.cached_run("run", {"seed": 0}, tmp_path, fn)

    first = threading.Thread(target=call, args=("first", slow))
    first.start()
    assert started.wait(20)
    second = threading.Thread(target=call, args=("second", other))
    second.start()
    second.join(0.5)
    assert second.is_alive()  # waiting for the first, not training
    release.set()
    first.join(20)
    second.join(20)
    assert calls == ["first"] and results["second"]["acc"] == 1.0


def test_reference_identity_follows_the_python_sources(tmp_path):
    (tmp_path / "networks").mkdir()
    source = tmp_path / "networks" / "resnet.py"
    source.write_text("x = 1\n")
    before = _cache.reference_identity(str(tmp_path))
    (tmp_path / "README.md").write_text("notes")
    assert _cache.reference_identity(str(tmp_path)) == before
    source.write_text("x = 2\n")
    assert _cache.reference_identity(str(tmp_path)) != before
    assert _cache.reference_identity(None) is None


def test_pairs_refuse_other_counts_and_shapes():
    assert pairs(["ab", "c"], ["xy", "z"], "layers", len) == [("ab", "xy"), ("c", "z")]
    with pytest.raises(Mismatch, match="aux nets: ours has 3, the authors' 2"):
        pairs([1, 2, 3], [1, 2], "aux nets")
    with pytest.raises(Mismatch, match=r"layer #1: ours \(4, 8\), the authors' \(4, 9\)"):
        pairs([(2, 2), (4, 8)], [(2, 2), (4, 9)], "layer")


# ----------------------------------------------------------------------------- accuracy.py


@pytest.fixture
def bench(tmp_path, monkeypatch):
    """accuracy.main with a stub for the training subprocess; returns (run, calls)."""
    reference = tmp_path / "authors"
    (reference / "networks").mkdir(parents=True)
    (reference / "networks" / "resnet.py").write_text("# their network\n")
    calls = []

    def launch(args, impl, method, d, seed, workdir):
        calls.append((impl, method, args.test_subset))
        if impl == "theirs" and method == "infopro":
            raise RuntimeError("AssertionError: image_size in [32, 96]")
        acc = 50.0 + seed if impl == "ours" else 40.0 + 3 * seed
        return {"impl": impl, "method": method, "d": d, "seed": seed, "test_acc": acc, "history": [acc], "seconds": 0.0, "recipe": accuracy._recipe(args)}

    monkeypatch.setattr(accuracy, "_launch", launch)

    def run(*extra):
        accuracy.main(["--reference", str(reference), "--out", str(tmp_path / "runs"), "--plot", "",
                       "--seeds", "0", "1", "--methods", "dgl", *extra])

    return run, calls


def test_accuracy_retrains_on_rerun_and_on_other_options(bench, capsys):
    run, calls = bench
    run()
    assert len(calls) == 4  # two seeds, ours and theirs
    run()
    assert len(calls) == 4  # all cached
    out = capsys.readouterr().out
    # Sample standard deviations: 50, 51 -> sqrt(0.5); 40, 43 -> sqrt(4.5). Standard error of the
    # difference: sqrt(0.5 / 2 + 4.5 / 2) = 1.58.
    assert "| DGL | 2 | 50.50 +- 0.71 (50.00, 51.00) | 41.50 +- 2.12 (40.00, 43.00) | +9.00 (1.58) |" in out
    run("--rerun")
    assert len(calls) == 8
    run("--test-subset", "100")
    assert len(calls) == 12 and calls[-1][2] == 100


def test_accuracy_retrains_when_the_code_or_the_reference_changes(bench, monkeypatch, tmp_path):
    run, calls = bench
    run()
    (tmp_path / "authors" / "networks" / "resnet.py").write_text("# their network, edited\n")
    run()
    assert [c[0] for c in calls[4:]] == ["theirs", "theirs"]  # only their side depends on it
    monkeypatch.setattr(accuracy, "code_identity", lambda: {"source": "edited", "commit": "abc"})
    run()
    assert len(calls) == 10


def test_accuracy_exits_non_zero_naming_a_missing_row(bench, capsys, tmp_path):
    run, _ = bench
    with pytest.raises(SystemExit) as exit_info:
        run("--methods", "dgl", "infopro")
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "missing row theirs-infopro-seed0: AssertionError: image_size in [32, 96]" in err
    summary = json.loads((tmp_path / "runs" / "summary.json").read_text())
    assert len(summary["missing"]) == 2


def test_accuracy_refuses_an_image_size_the_authors_rules_cannot_build(bench, capsys):
    run, calls = bench
    with pytest.raises(SystemExit) as exit_info:
        run("--image-size", "16")
    assert exit_info.value.code == 2 and calls == []
    assert "need --image-size 32 or 96" in capsys.readouterr().err


def test_zoo_options_make_a_variant_of_the_local_methods_only(monkeypatch, tmp_path, capsys):
    import zoo_accuracy

    calls = []

    def fake(args, family, method, seed, workdir):
        calls.append((method, dict(args.options)))
        acc = 70.0 if method == "bp" else 60.0 + len(args.options)
        return {"family": family, "spec": "s", "model_kwargs": {}, "recipe_name": "sgd", "method": method,
                "seed": seed, "test_acc": acc, "history": [acc], "aux_acc": [], "steps": 1, "step_seconds": 1.0,
                "seconds": 0.0, "saved_bytes": 1, "rss_bytes": None, "recipe": {},
                "options": dict(args.options) if method != "bp" else {}}

    monkeypatch.setattr(zoo_accuracy, "_train_in_subprocess", fake)

    def run(*extra):
        return zoo_accuracy.main(["--families", "resnet18", "--methods", "bp", "auglocal2", "--confirm-seeds",
                                  "--jobs", "1", "--out", str(tmp_path / "runs"), "--json", str(tmp_path / "z.json"),
                                  "--plot", "", *extra])

    assert run() == 0
    assert run("--options", "aux_head=slim") == 0
    # BP is shared by the variant; the local method trains again with the option
    assert calls == [("bp", {}), ("auglocal2", {}), ("auglocal2", {"aux_head": "slim"})]
    assert "| resnet18 (sgd) | AugLocal d=2 aux_head=slim | 1 | 61.00 | +9.00 |" in capsys.readouterr().out


def test_zoo_prints_the_gap_after_each_epoch(monkeypatch, tmp_path, capsys):
    import zoo_accuracy

    histories = {"bp": [50.0, 70.0, 75.0], "auglocal2": [30.0, 66.0, 74.5]}

    def fake(args, family, method, seed, workdir):
        h = histories[method]
        return {"family": family, "spec": "s", "model_kwargs": {}, "recipe_name": "sgd", "method": method,
                "seed": seed, "test_acc": h[-1], "history": h, "aux_acc": [], "steps": 1, "step_seconds": 1.0,
                "seconds": 0.0, "saved_bytes": 1, "rss_bytes": None, "recipe": {}, "options": {}}

    monkeypatch.setattr(zoo_accuracy, "_train_in_subprocess", fake)
    assert zoo_accuracy.main(["--families", "regnet", "--methods", "bp", "auglocal2", "--confirm-seeds",
                              "--jobs", "1", "--out", str(tmp_path / "runs"), "--json", str(tmp_path / "z.json"),
                              "--plot", ""]) == 0
    assert "regnet AugLocal d=2: +20.00 +4.00 +0.50" in capsys.readouterr().out
