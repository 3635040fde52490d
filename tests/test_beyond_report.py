"""The report of ``benchmarks/beyond.py`` over several seeds: only finished runs count, gaps are
paired by seed, and each change is compared with plain AugLocal of the same depth and seed."""

import json
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import beyond  # noqa: E402


def _run(out: Path, name: str, accs, epochs: int = 5, seconds: float = 8.0) -> None:
    """A run folder whose metrics end at ``epochs`` with the last of ``accs`` as the test accuracy."""
    folder = out / name
    folder.mkdir(parents=True)
    lines = [{"epoch": e + 1, "step": 8 * (e + 1), "partial": False, "test_acc": acc, "train_seconds": seconds}
             for e, acc in enumerate(accs[:epochs])]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def _rows(text: str):
    """Table lines by their label (the first table and the paired one separately)."""
    first, paired = text.split("paired by seed")
    return ({line[:22].strip(): line[22:].split() for line in first.splitlines()[1:] if line.strip()},
            {line[:22].strip(): line[22:].split() for line in paired.splitlines()[2:] if line.strip()})


def test_report_pairs_by_seed_and_skips_unfinished_runs(tmp_path, capsys):
    for name, acc in {"bp-s0": 50.0, "bp-s1": 60.0, "bp-s2": 70.0, "d2-s1": 52.0, "d2f-s0": 49.0}.items():
        _run(tmp_path, name, [10.0] * 4 + [acc])
    # seconds per epoch; each seed's runs ran under its own load
    _run(tmp_path, "d2-s0", [10.0] * 4 + [45.0], seconds=4.0)
    _run(tmp_path, "d2f-s1", [10.0] * 4 + [58.0], seconds=8.8)
    _run(tmp_path, "d2f-s2", [10.0, 99.0], epochs=2)  # still running: 2 of 5 epochs
    beyond.main(["--variants", "bp", "d2", "d2f", "d4", "--seeds", "0", "1", "2", "--epochs", "5",
                 "--out", str(tmp_path), "--report-only"])
    table, paired = _rows(capsys.readouterr().out)
    assert table["BP"][:3] == ["3", "60.00", "10.00"]  # mean and sample sd of 50, 60, 70
    # d=2 has seeds 0 and 1: (45 - 50 + 52 - 60) / 2, not 48.5 - 60 over BP's three seeds
    assert table["AugLocal d=2"][:4] == ["2", "48.50", "4.95", "-6.50"]
    assert table["d=2 + follow"][0] == "2" and table["d=2 + follow"][-2:] == ["s0:49.0", "s1:58.0"]
    # step time against d=2 of the same seed: (8 / 4 + 8.8 / 8) / 2 - 1, not 8.4 / 6 - 1 = +40%
    assert table["d=2 + follow"][-3] == "+55%" and table["AugLocal d=2"][-3] == "-"
    assert table["AugLocal d=4"] == ["0", "(not", "run)"]
    assert paired == {"d=2 + follow": ["2", "+5.00", "1.41", "s0:+4.0", "s1:+6.0"]}
