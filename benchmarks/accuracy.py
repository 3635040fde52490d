"""Accuracy side by side: BP, AugLocal (d=2, d=4) and the comparison rules, ours and the authors'.

One recipe for every run: CIFAR ResNet-32 on real Fashion-MNIST (the Debian package
``dataset-fashion-mnist``), a fixed training subset, SGD with Nesterov momentum 0.9, weight
decay 1e-4, batch 128, peak learning rate 0.1, the paper's per-epoch cosine schedule with a
linear warmup from 0.01, the paper's crop + flip augmentation. Each run is a subprocess on one
thread; ``--jobs`` of them run at once.

Our side runs ``auglocal_fx.train`` exactly as a user would. The authors' side builds their
``LocalResNet`` (from ``--reference DIR``, a checkout of ChenxiangMA/AugLocal, or
``$AUGLOCAL_REFERENCE``) and runs their training step (``model(img=x, target=y)`` back-propagates
every local loss, then one SGD step) on the same data subset, batches and schedule. Without a
reference folder only our side runs, and the script says so.

Prints mean +- standard deviation over seeds per method, the gap to BP and the commit that made
the runs; with both implementations, a second table of ours - theirs and its standard error
(Welch's, from the two standard deviations). Writes JSON and a plot::

    python benchmarks/accuracy.py --reference ../AugLocal --seeds 0 1 --jobs 2
    python benchmarks/accuracy.py --reference ../AugLocal --methods dgl predsim infopro --seeds 0

``--methods`` picks rows: ``bp``, ``auglocal2``, ``auglocal4`` (default: those three), ``dgl``,
``predsim``, ``infopro``. The comparison rules run with the loss weights of the authors'
``run.sh`` for ResNet-32 on both sides (DGL: CE only; PredSim 0.99 similarity + 0.01 CE; InfoPro
reconstruction/CE 5/0.05 -> 0.2/0.5). Their InfoPro restores the image with CIFAR statistics
on CUDA; here it is given Fashion-MNIST's (the normalisation our data pipeline applies) on CPU.

Finished runs are cached in ``--out`` (``_cache.cached_run``: one JSON file each, keyed by the
recipe, the package source and the reference's source; an interrupted run resumes its own
checkpoints); ``--rerun`` trains every run anew. A row that cannot be built or fails makes the
script exit 1 with one line naming it. The authors' comparison rules need ``--image-size`` 32 or
96 (their auxiliary networks assert it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional

from _authors import LOSS_WEIGHTS, RULES, rule_resnet32
from _cache import cached_run, code_identity, reference_identity

ROOT = Path(__file__).resolve().parents[1]
METHOD_CHOICES = {"bp": ("bp", 0), "auglocal2": ("auglocal", 2), "auglocal4": ("auglocal", 4),
                  "dgl": ("dgl", 0), "predsim": ("predsim", 0), "infopro": ("infopro", 0)}
METHODS = (("bp", 0), ("auglocal", 2), ("auglocal", 4))  # the default rows


def _label(method: str, d: int) -> str:
    if method in RULES:
        return RULES[method]
    return "BP" if method == "bp" else f"AugLocal d={d}"


def _run_name(impl: str, method: str, d: int, seed: int) -> str:
    return f"{impl}-{method}{'' if method != 'auglocal' else f'-d{d}'}-seed{seed}"


# ----------------------------------------------------------------------------- one run (worker)


def _worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    start = time.perf_counter()
    if args.impl == "ours":
        history = _ours(args)
    else:
        history = _theirs(args)
    result = {"impl": args.impl, "method": args.method, "d": args.d, "seed": args.seed,
              "test_acc": history[-1], "history": history,
              "seconds": round(time.perf_counter() - start, 1), "recipe": _recipe(args)}
    Path(args.workdir, "result.json").write_text(json.dumps(result, indent=1))


def _recipe(args: argparse.Namespace) -> Dict[str, object]:
    return {"model": "paper:resnet32", "dataset": "fashion-mnist", "image_size": args.image_size,
            "train_subset": args.train_subset, "test_subset": args.test_subset, "epochs": args.epochs,
            "batch_size": 128, "lr": 0.1, "warmup_epochs": args.warmup_epochs, "momentum": 0.9,
            "nesterov": True, "weight_decay": 1e-4, "threads": 1}


def _ours(args: argparse.Namespace) -> List[float]:
    from auglocal_fx.training import train

    out = Path(args.workdir, "train")  # this key's own folder: resumes only its own last.pt
    rule = args.method if args.method in RULES else "auglocal"
    result = train(model="paper:resnet32", dataset="fashion-mnist",
                   method="bp" if args.method == "bp" else "auglocal", rule=rule,
                   d=max(2, args.d), epochs=args.epochs, batch_size=128, lr=0.1,
                   warmup_epochs=args.warmup_epochs, seed=args.seed, device="cpu",
                   input_size=args.image_size, train_subset=args.train_subset,
                   test_subset=args.test_subset, out=str(out), progress=False, resume=True)
    return [h["test_acc"] for h in result.history]


def _theirs(args: argparse.Namespace) -> List[float]:
    import torch
    from torch.utils.data import DataLoader

    from auglocal_fx.data import build_datasets
    from auglocal_fx.recipe import learning_rate
    from auglocal_fx.data import subset

    sys.path.insert(0, args.reference)
    import networks.resnet as reference  # the authors' code, from --reference

    data = build_datasets("fashion-mnist", input_size=args.image_size)
    train_set = subset(data.train, args.train_subset, args.seed)
    test_set = subset(data.test, args.test_subset, args.seed + 1)
    torch.manual_seed(args.seed)
    if args.method == "bp":
        model = reference.resnet32(local_module_num=1, batch_size=128, image_size=32,
                                   dataset="fashion-mnist", class_num=10, rule="BP")
    elif args.method in RULES:
        model = rule_resnet32(reference, args.method, 128, args.image_size)
    else:
        # Their train.py: AugLocal runs with local_module_num = 16 - aux_net_depth.
        depth = args.d - 1
        model = reference.resnet32(local_module_num=16 - depth, batch_size=128, image_size=32,
                                   dataset="fashion-mnist", class_num=10, aux_net_config="unifSamp",
                                   rule="AugLocal", aux_net_depth=depth, is_pyramid=True,
                                   paramid_coeff=0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                                weight_decay=1e-4)
    loader = DataLoader(train_set, batch_size=128, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(args.seed))
    history = []
    for epoch in range(1, args.epochs + 1):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(epoch, args.epochs, 0.1, args.warmup_epochs)
        model.train()
        for x, y in loader:
            optimizer.zero_grad()
            # Back-propagates every local loss and the output loss. The loss weights are their
            # train.py's defaults (ixy 1, ixx 0: cross-entropy only); the forward's own defaults
            # are 0, which would switch the local losses off.
            ixx_1, ixy_1, ixx_2, ixy_2 = LOSS_WEIGHTS.get(args.method, (0.0, 1.0, 0.0, 1.0))
            model(img=x, target=y, ixx_1=ixx_1, ixy_1=ixy_1, ixx_2=ixx_2, ixy_2=ixy_2)
            optimizer.step()
        model.eval()
        correct = total = 0
        with torch.no_grad():
            for x, y in DataLoader(test_set, batch_size=256):
                logits = model(img=x, target=y)[0]
                correct += int((logits.argmax(1) == y).sum())
                total += len(y)
        history.append(100.0 * correct / total)
    return history


# ----------------------------------------------------------------------------- driver


def _launch(args: argparse.Namespace, impl: str, method: str, d: int, seed: int, workdir: Path) -> dict:
    """Train one run in a subprocess; its result, or RuntimeError with the reason it failed."""
    cmd = [sys.executable, __file__, "--worker", impl, method, str(d), str(seed), str(workdir),
           "--epochs", str(args.epochs), "--train-subset", str(args.train_subset),
           "--test-subset", str(args.test_subset), "--image-size", str(args.image_size),
           "--warmup-epochs", str(args.warmup_epochs)]
    if args.reference:
        cmd += ["--reference", args.reference]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines() or [f"exit code {proc.returncode}"]
        raise RuntimeError(tail[-1].strip())
    result = json.loads((workdir / "result.json").read_text())
    print(f"  {_run_name(impl, method, d, seed)}: {result['test_acc']:.2f}% in {result['seconds']:.0f} s",
          flush=True)
    return result


def _run_key(args: argparse.Namespace, impl: str, method: str, d: int, seed: int) -> dict:
    """Everything that makes a run's result (``_cache``): recipe, row, seed and the code."""
    key = {"recipe": _recipe(args), "impl": impl, "method": method, "d": d, "seed": seed,
           "code": code_identity()["source"]}
    if impl == "theirs":
        key["reference"] = reference_identity(args.reference)
    return key


def _std(values: List[float]) -> Optional[float]:
    """The sample standard deviation; None for one run."""
    return statistics.stdev(values) if len(values) > 1 else None


def _summary(results: List[dict], impls: List[str], methods=METHODS) -> List[dict]:
    rows = []
    bp_mean = {}
    for impl in impls:
        for method, d in methods:
            runs = [r for r in results
                    if r["impl"] == impl and r["method"] == method and (method != "auglocal" or r["d"] == d)]
            if not runs:
                continue
            accs = [r["test_acc"] for r in runs]
            mean = sum(accs) / len(accs)
            if method == "bp":
                bp_mean[impl] = mean
            rows.append({"impl": impl, "method": _label(method, d), "runs": len(accs), "accs": accs,
                         "mean": mean, "std": _std(accs),
                         "made_by": sorted({r.get("made_by", "unknown") for r in runs}),
                         "gap_to_bp": None if method == "bp" or impl not in bp_mean else bp_mean[impl] - mean})
    return rows


def _comparison(rows: List[dict], methods=METHODS) -> List[dict]:
    """Per method run by both: ours - theirs and its standard error sqrt(s1^2/n1 + s2^2/n2)."""
    pairs = []
    for method, d in methods:
        label = _label(method, d)
        ours = next((r for r in rows if r["impl"] == "ours" and r["method"] == label), None)
        theirs = next((r for r in rows if r["impl"] == "theirs" and r["method"] == label), None)
        if ours and theirs:
            se = None if ours["std"] is None or theirs["std"] is None else \
                math.sqrt(ours["std"] ** 2 / ours["runs"] + theirs["std"] ** 2 / theirs["runs"])
            pairs.append({"method": label, "ours": ours, "theirs": theirs,
                          "difference": ours["mean"] - theirs["mean"], "standard_error": se})
    return pairs


def _number(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


def _mean_std(row: dict, runs: bool = False) -> str:
    text = f"{row['mean']:.2f}" + ("" if row["std"] is None else f" +- {row['std']:.2f}")
    return text + (" (" + ", ".join(f"{a:.2f}" for a in row["accs"]) + ")" if runs else "")


def _print_table(rows: List[dict], methods=METHODS) -> None:
    print("\n| implementation | method | runs | test top-1 (%) mean +- std | gap to its BP | made by |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        gap = "" if row["gap_to_bp"] is None else f"{row['gap_to_bp']:.2f}"
        name = "auglocal-fx" if row["impl"] == "ours" else "authors' code"
        print(f"| {name} | {row['method']} | {row['runs']} | {_mean_std(row)} | {gap} | "
              f"{', '.join(row['made_by'])} |")
    pairs = _comparison(rows, methods)
    if pairs:
        print("\n| method | seeds | auglocal-fx (%) | authors' code (%) | ours - theirs (standard error) |")
        print("|---|---|---|---|---|")
        for pair in pairs:
            seeds = pair["ours"]["runs"] if pair["ours"]["runs"] == pair["theirs"]["runs"] else \
                f"{pair['ours']['runs']} / {pair['theirs']['runs']}"
            print(f"| {pair['method']} | {seeds} | {_mean_std(pair['ours'], True)} | "
                  f"{_mean_std(pair['theirs'], True)} | {pair['difference']:+.2f} ({_number(pair['standard_error'])}) |")


def _plot(rows: List[dict], path: Path, recipe: Dict[str, object], methods=METHODS) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [_label(m, d) for m, d in methods]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.38
    for k, (impl, name, color) in enumerate((("ours", "auglocal-fx", "tab:blue"),
                                             ("theirs", "authors' code", "tab:orange"))):
        for i, label in enumerate(labels):
            row = next((r for r in rows if r["impl"] == impl and r["method"] == label), None)
            if row is None:
                continue
            x = i + (k - 0.5) * width
            ax.bar(x, row["mean"], width, color=color, alpha=0.75, label=name if i == 0 else None)
            ax.scatter([x] * len(row["accs"]), row["accs"], color="black", s=12, zorder=3)
    ax.set_xticks(range(len(labels)), labels)
    lows = [min(r["accs"]) for r in rows]
    ax.set_ylim(min(lows) - 3 if lows else 0, max(max(r["accs"]) for r in rows) + 1.5 if rows else 100)
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"ResNet-32, Fashion-MNIST {recipe['image_size']}px, {recipe['train_subset']} train images, "
                 f"{recipe['epochs']} epochs", fontsize=9)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", default=os.environ.get("AUGLOCAL_REFERENCE"),
                        help="folder of the authors' code (ChenxiangMA/AugLocal); default $AUGLOCAL_REFERENCE")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--warmup-epochs", type=int, default=1)
    parser.add_argument("--train-subset", type=int, default=8192)
    parser.add_argument("--test-subset", type=int, default=4000)
    parser.add_argument("--image-size", type=int, default=32,
                        help="Fashion-MNIST is padded to 32 px, then resized to this side (the authors' "
                             "DGL, PredSim and InfoPro need 32 or 96)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--impl", choices=("ours", "theirs", "both"), default="both")
    parser.add_argument("--out", default="runs/accuracy")
    parser.add_argument("--json", default=None, help="summary JSON (default OUT/summary.json)")
    parser.add_argument("--plot", default="docs/accuracy.png")
    parser.add_argument("--rerun", action="store_true", help="train every run anew, ignoring the cache")
    parser.add_argument("--methods", nargs="+", choices=list(METHOD_CHOICES),
                        default=["bp", "auglocal2", "auglocal4"])
    parser.add_argument("--worker", nargs=5, metavar=("IMPL", "METHOD", "D", "SEED", "WORKDIR"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.impl, args.method, d, seed, args.workdir = args.worker
        args.d, args.seed = int(d), int(seed)
        _worker(args)
        return

    impls = ["ours", "theirs"] if args.impl == "both" else [args.impl]
    if "theirs" in impls and not (args.reference and Path(args.reference, "networks", "resnet.py").is_file()):
        print("no reference folder (--reference or $AUGLOCAL_REFERENCE with networks/resnet.py): "
              "running auglocal-fx only")
        impls = [i for i in impls if i != "theirs"] or ["ours"]
    if args.reference:
        args.reference = str(Path(args.reference).resolve())
    if "theirs" in impls and args.image_size not in (32, 96) and set(args.methods) & set(RULES):
        parser.error(f"the authors' {', '.join(RULES[m] for m in args.methods if m in RULES)} networks need "
                     f"--image-size 32 or 96 (their auxiliary networks assert it), not {args.image_size}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    methods = [METHOD_CHOICES[m] for m in args.methods]
    jobs = [(impl, method, d, seed) for seed in args.seeds for impl in impls for method, d in methods]

    def run(job):
        name = _run_name(*job)
        try:
            return cached_run(name, _run_key(args, *job), out, lambda workdir: _launch(args, *job, workdir),
                              rerun=args.rerun), None
        except RuntimeError as err:
            print(f"  {name} failed: {err}", flush=True)
            return None, f"{name}: {err}"

    print(f"{len(jobs)} runs ({args.jobs} at a time, one thread each; finished ones come from {out})", flush=True)
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        outcomes = list(pool.map(run, jobs))
    results = [result for result, _ in outcomes if result is not None]
    failures = [failure for _, failure in outcomes if failure is not None]
    rows = _summary(results, impls, methods)
    recipe = _recipe(args)
    _print_table(rows, methods)
    summary = {"recipe": recipe, "rows": rows, "comparison": _comparison(rows, methods), "runs": results,
               "missing": failures}
    json_path = Path(args.json) if args.json else out / "summary.json"
    json_path.write_text(json.dumps(summary, indent=1))
    if rows and args.plot:
        _plot(rows, Path(args.plot), recipe, methods)
    print(f"\nwrote {json_path}" + (f" and {args.plot}" if rows and args.plot else ""))
    if failures:
        for failure in failures:
            print(f"accuracy.py: missing row {failure}", file=sys.stderr)
        sys.exit(1)

if __name__ == "__main__":
    main()
