"""Beyond AugLocal (issue 24): copies that follow their sources, auxiliary layers that freeze.

Two tables, side by side with plain AugLocal and BP:

1. ``runs``: accuracy, gap to BP and training seconds per step of whole runs of ResNet-32
   (``paper:resnet32``) on Fashion-MNIST, each run ``auglocal_fx.train`` in its own process on
   one thread, ``--jobs`` at a time (SGD Nesterov 0.9, lr 0.1, batch 128, weight decay 1e-4, the
   paper's cosine with one warmup epoch). Finished runs are read back from ``--out`` (a run
   folder is ``OUT/<variant>-s<seed>``), so an interrupted sweep resumes. Only runs that finished
   ``--epochs`` count. Accuracy is the mean over seeds with its sample standard deviation and the
   per-seed values; the gap to BP, and a second table of each change against plain AugLocal of the
   same depth, are paired by seed (a seed also fixes the training and test subsets), and so is the
   step-time change against plain AugLocal ("vs plain": mean over seeds of the per-seed ratio).
2. ``--step-time``: one training step (``LocalNet.train_step``, batch 128, one thread) with every
   auxiliary layer training and with every auxiliary layer frozen, measured alternately on the
   same network so that load on a shared machine hits both alike; medians.

Variants: ``bp``, ``d2``, ``d2f`` (``aux_follow``), ``d2fs`` (``aux_follow`` with
``aux_follow_adapted="slice"``), ``d2z`` (``aux_freeze``), ``d4``, ``d4f``, ``d2t`` and ``d4t``
(``aux_tie``: copies read their sources' kernels)::

    python benchmarks/beyond.py --variants bp d2 d2f d2z --seeds 0 --epochs 5 --train-subset 1024
    python benchmarks/beyond.py --out runs/beyond --report-only
    python benchmarks/beyond.py --step-time --depths 2 4
    python benchmarks/beyond.py --tie-step-time --depths 2 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"bp": ("bp", 2, {}), "d2": ("auglocal", 2, {}), "d2f": ("auglocal", 2, {"aux_follow": None}),
            "d2fs": ("auglocal", 2, {"aux_follow": None, "aux_follow_adapted": "slice"}),
            "d2z": ("auglocal", 2, {"aux_freeze": None}), "d4": ("auglocal", 4, {}),
            "d4f": ("auglocal", 4, {"aux_follow": None}), "d2t": ("auglocal", 2, {"aux_tie": True}),
            "d4t": ("auglocal", 4, {"aux_tie": True})}
LABELS = {"bp": "BP", "d2": "AugLocal d=2", "d2f": "d=2 + follow", "d2fs": "d=2 + follow (slice)",
          "d2z": "d=2 + freeze", "d4": "AugLocal d=4", "d4f": "d=4 + follow",
          "d2t": "d=2 + tie", "d4t": "d=4 + tie"}


def _options(variant: str, args: argparse.Namespace) -> Dict[str, object]:
    """The variant's extra TrainConfig fields, with the momentum and fraction of the command line."""
    extra = dict(VARIANTS[variant][2])
    if "aux_follow" in extra:
        extra["aux_follow"] = args.follow
    if "aux_freeze" in extra:
        extra["aux_freeze"] = args.freeze
    return extra


def _worker(args: argparse.Namespace) -> None:
    import torch

    from auglocal_fx.training import train

    torch.set_num_threads(1)
    method, d, _ = VARIANTS[args.variant]
    train(model="paper:resnet32", dataset="fashion-mnist", method=method, d=d, epochs=args.epochs,
          batch_size=128, lr=0.1, warmup_epochs=1, seed=args.seed, device="cpu", input_size=args.image_size,
          train_subset=args.train_subset, test_subset=args.test_subset, out=args.worker, progress=False,
          resume=True, **_options(args.variant, args))


def _run(args: argparse.Namespace, variant: str, seed: int) -> Path:
    folder = Path(args.out, f"{variant}-s{seed}")
    if args.report_only:
        return folder
    cmd = [sys.executable, __file__, "--worker", str(folder), "--variant", variant, "--seed", str(seed),
           "--epochs", str(args.epochs), "--train-subset", str(args.train_subset), "--test-subset",
           str(args.test_subset), "--image-size", str(args.image_size), "--follow", str(args.follow),
           "--freeze", str(args.freeze)]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines() or [f"exit code {proc.returncode}"]
        sys.exit(f"{variant} seed {seed} failed: {tail[-1]}")
    return folder


def _read(folder: Path, epochs: int) -> Optional[dict]:
    """Final accuracy and training seconds per step of a run that finished ``epochs``, or None."""
    path = folder / "metrics.jsonl"
    if not path.exists():
        return None
    history = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    # A run still going (or stopped) has fewer epochs: its accuracy is not the recipe's.
    if not history or history[-1]["epoch"] < epochs or history[-1].get("partial"):
        return None
    steps = history[-1]["step"]
    return {"acc": history[-1]["test_acc"], "epochs": len(history),
            "s_per_step": sum(h["train_seconds"] for h in history) / max(1, steps)}


def _plain(variant: str) -> Optional[str]:
    """The plain AugLocal variant of the same depth that ``variant`` changes, or None."""
    method, d, extra = VARIANTS[variant]
    return f"d{d}" if method == "auglocal" and extra else None


def _paired(rows: Dict[str, Dict[int, dict]], variant: str, other: str) -> Dict[int, float]:
    """Per seed, ``variant``'s accuracy minus ``other``'s, over the seeds both have run."""
    return {s: rows[variant][s]["acc"] - rows[other][s]["acc"] for s in rows[variant] if s in rows.get(other, {})}


def _spread(values: List[float]) -> str:
    """Sample standard deviation, or '-' for a single value."""
    return f"{statistics.stdev(values):.2f}" if len(values) > 1 else "-"


def _runs_table(args: argparse.Namespace) -> None:
    rows: Dict[str, Dict[int, dict]] = {}
    # Seed by seed, so that a sweep stopped early leaves whole seeds to pair.
    runs = [(variant, seed) for seed in args.seeds for variant in args.variants]
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        folders = list(pool.map(lambda run: _run(args, *run), runs))
    for (variant, seed), folder in zip(runs, folders):
        result = _read(folder, args.epochs)
        if result is not None:
            rows.setdefault(variant, {})[seed] = result
    # Gaps are paired by seed: a seed fixes the training and test subsets, so pairing removes their
    # share of the spread, and a variant missing a seed is not compared with another set of seeds.
    # Times are paired too: runs of one seed ran one after another, so under more similar load.
    print(f"{'variant':22} {'runs':>4} {'test acc %':>10} {'sd':>5} {'gap to BP':>9} {'s/step':>7} {'vs plain':>8}"
          "  per seed")
    for variant in args.variants:
        if variant not in rows:
            print(f"{LABELS[variant]:22} {0:>4}  (not run)")
            continue
        accs = [r["acc"] for r in rows[variant].values()]
        speed = statistics.mean(r["s_per_step"] for r in rows[variant].values())
        other = _plain(variant)
        ratios = [r["s_per_step"] / rows[other][s]["s_per_step"] - 1 for s, r in rows[variant].items()
                  if s in rows.get(other, {})] if other else []
        gaps = list(_paired(rows, variant, "bp").values())
        gap = f"{statistics.mean(gaps):+.2f}" if gaps else "-"
        ratio = f"{statistics.mean(ratios):+.0%}" if ratios else "-"
        seeds = " ".join(f"s{s}:{r['acc']:.1f}" for s, r in sorted(rows[variant].items()))
        print(f"{LABELS[variant]:22} {len(accs):>4} {statistics.mean(accs):>10.2f} {_spread(accs):>5} {gap:>9}"
              f" {speed:>7.2f} {ratio:>8}  {seeds}")
    print("\npaired by seed: accuracy minus that of plain AugLocal of the same d and seed")
    print(f"{'variant':22} {'seeds':>5} {'mean':>6} {'sd':>5}  per seed")
    for variant in args.variants:
        other = _plain(variant)
        diffs = _paired(rows, variant, other) if other and variant in rows else {}
        if diffs:
            values = list(diffs.values())
            seeds = " ".join(f"s{s}:{v:+.1f}" for s, v in sorted(diffs.items()))
            mean = statistics.mean(values)
            print(f"{LABELS[variant]:22} {len(values):>5} {mean:>+6.2f} {_spread(values):>5}  {seeds}")


def _step_table(args: argparse.Namespace) -> None:
    import torch

    from auglocal_fx import ConversionOptions, to_local

    torch.set_num_threads(1)
    print(f"{'network':18} {'all training s':>14} {'all frozen s':>12} {'change':>7}")
    for d in args.depths:
        torch.manual_seed(0)
        local = to_local("paper:resnet32", input_size=(3, args.image_size, args.image_size),
                         options=ConversionOptions(d=d, aux_freeze=1.0))
        local.train()
        x, y = torch.randn(128, 3, args.image_size, args.image_size), torch.randint(0, 10, (128,))
        local.train_step(x, y)  # warm-up
        times: Dict[float, List[float]] = {0.0: [], 1.0: []}
        for _ in range(args.repeats):
            for progress in times:  # alternate, so that the machine's load hits both alike
                local.freezing.set_progress(progress)
                local.zero_grad(set_to_none=True)
                start = time.perf_counter()
                local.train_step(x, y)
                times[progress].append(time.perf_counter() - start)
        on, off = statistics.median(times[0.0]), statistics.median(times[1.0])
        print(f"{'ResNet-32 d=' + str(d):18} {on:>14.2f} {off:>12.2f} {off / on - 1:>+7.0%}", flush=True)


def _tie_step_table(args: argparse.Namespace) -> None:
    """Plain and tied copies, one training step each in turn (forward, backward, SGD step)."""
    import torch

    from auglocal_fx import ConversionOptions, to_local

    torch.set_num_threads(1)
    print(f"{'network':18} {'plain s':>8} {'tied s':>8} {'change':>7}")
    size = (3, args.image_size, args.image_size)
    x, y = torch.randn(128, *size), torch.randint(0, 10, (128,))
    for d in args.depths:
        nets, times = {}, {}
        for tie in (False, True):
            torch.manual_seed(0)
            local = to_local("paper:resnet32", input_size=size, options=ConversionOptions(d=d, aux_tie=tie)).train()
            sgd = torch.optim.SGD(local.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
            nets[tie], times[tie] = (local, sgd), []
        for step in range(args.repeats + 1):
            for tie, (local, sgd) in nets.items():  # alternate, so that the machine's load hits both alike
                sgd.zero_grad(set_to_none=True)
                start = time.perf_counter()
                local.train_step(x, y)
                sgd.step()
                if step:  # the first is a warm-up
                    times[tie].append(time.perf_counter() - start)
        plain, tied = statistics.median(times[False]), statistics.median(times[True])
        print(f"{'ResNet-32 d=' + str(d):18} {plain:>8.2f} {tied:>8.2f} {tied / plain - 1:>+7.0%}", flush=True)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["bp", "d2", "d2f", "d2z"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--train-subset", type=int, default=1024)
    parser.add_argument("--test-subset", type=int, default=1000)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--follow", type=float, default=0.9, help="aux_follow momentum")
    parser.add_argument("--freeze", type=float, default=0.3, help="aux_freeze fraction")
    parser.add_argument("--out", default="runs/beyond")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at a time, one thread each (seconds per step are only comparable at one)")
    parser.add_argument("--report-only", action="store_true", help="read finished runs, train none")
    parser.add_argument("--step-time", action="store_true", help="the step-time table instead of runs")
    parser.add_argument("--tie-step-time", action="store_true",
                        help="the step time of plain and tied copies (aux_tie), alternated, instead of runs")
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
    elif args.step_time:
        _step_table(args)
    elif args.tie_step_time:
        _tie_step_table(args)
    else:
        _runs_table(args)


if __name__ == "__main__":
    main()
