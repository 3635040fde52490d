"""Accuracy across model families: BP, AugLocal d=2, AugLocal d=4 and DGL on one recipe.

Every run goes through ``auglocal_fx.train``, as a user calls it, on real Fashion-MNIST (the
Debian package ``dataset-fashion-mnist``) at 32 px: a fixed training subset, a fixed test
subset, the paper's crop + flip augmentation, batch 128, one thread per run. Each family is
trained the way its users train it:

* ``sgd`` (ResNet, MobileNetV3, EfficientNet, RegNet): the paper's recipe, SGD with Nesterov
  momentum 0.9, weight decay 1e-4, peak learning rate 0.1, the authors' per-epoch cosine with a
  linear warmup from 0.01.
* ``adamw`` (ConvNeXt, ViT, Swin, MLP-Mixer): AdamW, peak learning rate 1e-3, weight decay 0.05
  (none on norms and biases, timm's rule), timm's cosine schedule per step with a linear warmup
  from 1e-5. ConvNeXt is a ConvNet but its authors and timm train it with AdamW.

No mixup, cutmix or EMA: at a few epochs on a few thousand images they cost accuracy for every
method alike (they are options of ``train``).

Per run it reports the test top-1 of the primary network (and its gap to BP after each epoch), the mean time per training step (the
training loop's seconds over its steps), and the training memory of one step at batch 128
measured by ``auglocal_fx.memory.measure_memory``: the peak of bytes saved for backward
(saved_tensors_hooks) and the growth of the process's peak RSS (a fresh subprocess). The gap is
BP's mean minus the method's mean, in points. Where a gap is below one point after the first
seed, ``--confirm-seeds`` more seeds of that method and of BP run, so a close call rests on two
seeds.

Runs are cached in ``--out`` (``benchmarks/_cache.py``: one JSON file each), keyed by the
recipe, the family's and method's options and the package's source: a cached row is reused only
by the same code, a run resumes only its own checkpoints, and every row records the commit that
made it (``made_by``). ``--rerun`` trains every run anew.

    python benchmarks/zoo_accuracy.py --jobs 2
    python benchmarks/zoo_accuracy.py --families resnet18 vit --methods bp auglocal2
    python benchmarks/zoo_accuracy.py --families regnet --options aux_head=slim   # a variant

``--options KEY=VALUE`` passes more options to ``train`` for the local methods (BP's rows are
shared): those runs have their own cache entries and labels. Each run's record also holds the
final test top-1 of every auxiliary network (``aux_acc``).

Writes the table (markdown), ``--json`` (default ``docs/zoo_accuracy.json``) and ``--plot``
(default ``docs/zoo_accuracy.png``). Exits non-zero when a run fails: a missing row is a failure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from _cache import cached_result_exists, cached_run, code_identity

ROOT = Path(__file__).resolve().parents[1]

# family -> (spec, model_kwargs, recipe). Small-image settings as their users write them for
# CIFAR-sized inputs, sized for a 2-core CPU: the ViT and the Mixer take 8 px patches (16 tokens;
# 4 px patches cost 4x more per step), a shallower ViT and Swin.
FAMILIES: Dict[str, Tuple[str, Dict[str, Any], str]] = {
    "resnet18": ("timm:resnet18", {}, "sgd"),
    "mobilenetv3": ("timm:mobilenetv3_small_100", {}, "sgd"),
    "efficientnet": ("timm:efficientnet_b0", {}, "sgd"),
    "regnet": ("timm:regnetx_004", {}, "sgd"),
    "convnext": ("timm:convnext_atto", {}, "adamw"),
    "vit": ("timm:vit_tiny_patch16_224", {"patch_size": 8, "img_size": 32, "depth": 6}, "adamw"),
    "swin": ("timm:swin_tiny_patch4_window7_224",
             {"img_size": 32, "window_size": 4, "embed_dim": 48, "depths": (2, 2, 2), "num_heads": (3, 6, 12)},
             "adamw"),
    "mixer": ("benchmarks/zoo_models.py:mixer_32px", {}, "adamw"),
}
RECIPES: Dict[str, Dict[str, Any]] = {
    "sgd": {"opt": "sgd", "sched": "paper", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4},
    "adamw": {"opt": "adamw", "sched": "cosine", "lr": 1e-3, "weight_decay": 0.05, "warmup_lr": 1e-5,
              "sched_on_updates": True},
}
METHODS: Dict[str, Dict[str, Any]] = {
    "bp": {"method": "bp"},
    "auglocal2": {"method": "auglocal", "d": 2},
    "auglocal4": {"method": "auglocal", "d": 4},
    "dgl": {"method": "auglocal", "rule": "dgl"},
}
LABELS = {"bp": "BP", "auglocal2": "AugLocal d=2", "auglocal4": "AugLocal d=4", "dgl": "DGL"}
TARGETS = {"auglocal4": 1.0, "auglocal2": 2.0}  # largest gap to BP, points


def _recipe(args: argparse.Namespace) -> Dict[str, Any]:
    return {"dataset": "fashion-mnist", "input_size": 32, "train_subset": args.train_subset,
            "test_subset": args.test_subset, "epochs": args.epochs, "warmup_epochs": args.warmup_epochs,
            "batch_size": 128, "threads": 1, "memory_batch": args.memory_batch,
            **({"device": args.device} if args.device != "cpu" else {})}


# ----------------------------------------------------------------------------- one run (worker)


def _worker(family: str, method: str, seed: int, workdir: str, recipe: Dict[str, Any],
            extra: Dict[str, Any]) -> None:
    import torch

    from auglocal_fx.memory import measure_memory
    from auglocal_fx.options import ConversionOptions
    from auglocal_fx.training import train

    torch.set_num_threads(1)
    spec, model_kwargs, recipe_name = FAMILIES[family]
    options = {**METHODS[method], **(extra if method != "bp" else {})}
    out = Path(workdir) / "train"
    start = time.perf_counter()
    result = train(model=spec, model_kwargs=model_kwargs, dataset=recipe["dataset"],
                   input_size=recipe["input_size"], train_subset=recipe["train_subset"],
                   test_subset=recipe["test_subset"], epochs=recipe["epochs"],
                   warmup_epochs=recipe["warmup_epochs"], batch_size=recipe["batch_size"], seed=seed,
                   device=recipe.get("device", "cpu"), threads=1, out=str(out), progress=False, resume=True,
                   **RECIPES[recipe_name], **options)
    seconds = time.perf_counter() - start
    steps = result.history[-1]["step"]
    train_seconds = sum(h["train_seconds"] for h in result.history)
    conversion = {f.name for f in dataclasses.fields(ConversionOptions)} - {"d"}
    local_options = {k: v for k, v in options.items() if k in conversion}
    memory = measure_memory(spec, methods=("bp",) if method == "bp" else ("auglocal",),
                            d=options.get("d", 2), batch_size=recipe["memory_batch"],
                            input_size=(3, recipe["input_size"], recipe["input_size"]), num_classes=10,
                            device=recipe.get("device", "cpu"), options=ConversionOptions(**local_options),
                            to_local_kwargs={"model_kwargs": model_kwargs})
    row = memory.rows[0]
    record = {"family": family, "spec": spec, "model_kwargs": model_kwargs, "recipe_name": recipe_name,
              "method": method, "seed": seed, "test_acc": result.test_acc,
              "history": [h["test_acc"] for h in result.history], "aux_acc": list(result.aux_acc),
              "options": extra if method != "bp" else {}, "steps": steps,
              "step_seconds": train_seconds / max(1, steps), "seconds": round(seconds, 1),
              "saved_bytes": row.saved_peak, "rss_bytes": row.rss_peak, "recipe": recipe}
    (Path(workdir) / "result.json").write_text(json.dumps(record, indent=1))


# ----------------------------------------------------------------------------- driver


class RunFailed(RuntimeError):
    """A run's subprocess exited non-zero; the message is the end of its output."""


def _train_in_subprocess(args: argparse.Namespace, family: str, method: str, seed: int, workdir: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", family, method, str(seed), str(workdir), json.dumps(_recipe(args)),
           json.dumps(args.options)]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RunFailed("\n    ".join((proc.stderr or proc.stdout).strip().splitlines()[-5:]))
    return json.loads((workdir / "result.json").read_text())


def _run(args: argparse.Namespace, family: str, method: str, seed: int) -> Optional[dict]:
    """One run, from the cache when the same code and recipe made it, else trained (resuming
    only its own checkpoints); ``None`` when it failed or, with ``--report-only``, is not cached."""
    name = f"{family}-{method}-seed{seed}"
    key = {"family": family, "method": method, "seed": seed, "recipe": _recipe(args),
           "model": FAMILIES[family], "options": METHODS[method], "optimizer": RECIPES[FAMILIES[family][2]],
           "code": code_identity()["source"]}
    if args.options and method != "bp":  # a variant; without --options the key is the one it always was
        key["extra_options"] = args.options
        name += "-" + "-".join(f"{k}{v}" for k, v in sorted(args.options.items()))
    if args.report_only and not cached_result_exists(name, key, Path(args.out)):
        print(f"  {name}: not cached (--report-only)", flush=True)
        return None
    start = time.perf_counter()
    try:
        result = cached_run(name, key, Path(args.out),
                            lambda workdir: _train_in_subprocess(args, family, method, seed, workdir),
                            rerun=args.rerun)
    except RunFailed as err:
        print(f"  {name} FAILED:\n    {err}", flush=True)
        return None
    fresh = time.perf_counter() - start > 1.0
    print(f"  {name}: {result['test_acc']:.2f}% ({result['step_seconds']:.2f} s/step, "
          f"{'trained in ' + str(round(result['seconds'])) + ' s' if fresh else 'cached, made by ' + result['made_by']})",
          flush=True)
    return result


def _run_all(args: argparse.Namespace, jobs: List[Tuple[str, str, int]], results: List[dict],
             failures: List[str]) -> None:
    print(f"{len(jobs)} runs ({args.jobs} at a time, one thread each; cached ones are read back)", flush=True)
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for (family, method, seed), result in zip(jobs, pool.map(lambda job: _run(args, *job), jobs)):
            if result is None:
                failures.append(f"{family}-{method}-seed{seed}")
            else:
                results.append(result)


def _mean(results: List[dict], family: str, method: str) -> Optional[float]:
    accs = [r["test_acc"] for r in results if r["family"] == family and r["method"] == method]
    return statistics.fmean(accs) if accs else None


def _rows(results: List[dict], families: List[str], methods: List[str]) -> List[dict]:
    rows = []
    for family in families:
        bp = _mean(results, family, "bp")
        bp_saved = next((r["saved_bytes"] for r in results if r["family"] == family and r["method"] == "bp"), None)
        for method in methods:
            runs = [r for r in results if r["family"] == family and r["method"] == method]
            if not runs:
                continue
            accs = [r["test_acc"] for r in runs]
            mean = statistics.fmean(accs)
            saved = runs[0]["saved_bytes"]
            rows.append({
                "family": family, "spec": runs[0]["spec"], "model_kwargs": runs[0]["model_kwargs"],
                "recipe": runs[0]["recipe_name"], "method": method,
                "label": LABELS[method] + "".join(f" {k}={v}" for k, v in runs[0].get("options", {}).items()),
                "seeds": [r["seed"] for r in runs], "accs": accs, "mean": mean,
                "std": statistics.stdev(accs) if len(accs) > 1 else None,
                "gap_to_bp": None if method == "bp" or bp is None else bp - mean,
                "saved_mib": saved / 2 ** 20, "saved_x_bp": saved / bp_saved if bp_saved else None,
                "rss_mib": None if runs[0]["rss_bytes"] is None else runs[0]["rss_bytes"] / 2 ** 20,
                "step_seconds": statistics.fmean(r["step_seconds"] for r in runs),
                "made_by": sorted({r["made_by"] for r in runs}),
            })
    return rows


def _table(rows: List[dict]) -> str:
    lines = ["| family (recipe) | method | seeds | test top-1 (%) | gap to BP | saved MiB (x BP) | "
             "peak RSS MiB | s/step | made by |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = f"{r['mean']:.2f}" + (f" +- {r['std']:.2f}" if r["std"] is not None else "")
        gap = "" if r["gap_to_bp"] is None else f"{r['gap_to_bp']:+.2f}"
        ratio = "" if r["saved_x_bp"] is None or r["method"] == "bp" else f" ({r['saved_x_bp']:.2f}x)"
        rss = "-" if r["rss_mib"] is None else f"{r['rss_mib']:.0f}"
        lines.append(f"| {r['family']} ({r['recipe']}) | {r['label']} | {len(r['seeds'])} | {acc} | {gap} | "
                     f"{r['saved_mib']:.1f}{ratio} | {rss} | {r['step_seconds']:.2f} | {', '.join(r['made_by'])} |")
    return "\n".join(lines)


def _epoch_gaps(results: List[dict], families: List[str], methods: List[str]) -> List[str]:
    """Per family and local method, BP's mean test top-1 minus the method's after each epoch
    (the runs' ``history``): whether a gap closes with training, not only where it ends."""
    out = []
    for family in families:
        bp = [r["history"] for r in results if r["family"] == family and r["method"] == "bp"]
        for method in methods:
            runs = [r["history"] for r in results if r["family"] == family and r["method"] == method]
            if method == "bp" or not bp or not runs:
                continue
            epochs = min(len(h) for h in bp + runs)
            gaps = [statistics.fmean(h[e] for h in bp) - statistics.fmean(h[e] for h in runs) for e in range(epochs)]
            out.append(f"{family} {LABELS[method]}: " + " ".join(f"{g:+.2f}" for g in gaps))
    return out


def _verdicts(rows: List[dict], families: List[str]) -> List[str]:
    """Each target of the benchmark, met or not, per family."""
    out = []
    for family in families:
        by = {r["method"]: r for r in rows if r["family"] == family}
        for method, limit in TARGETS.items():
            if method in by and by[method]["gap_to_bp"] is not None:
                gap = by[method]["gap_to_bp"]
                out.append(f"{family}: {LABELS[method]} gap {gap:+.2f} "
                           f"{'within' if gap <= limit else 'OUTSIDE'} {limit:.1f}")
        augmented = [by[m]["mean"] for m in ("auglocal2", "auglocal4") if m in by]
        if "dgl" in by and augmented:
            above = min(augmented) > by["dgl"]["mean"]
            out.append(f"{family}: AugLocal {'above' if above else 'NOT above'} DGL")
        if "auglocal2" in by and by["auglocal2"]["saved_x_bp"] is not None:
            ratio = by["auglocal2"]["saved_x_bp"]
            out.append(f"{family}: AugLocal d=2 saved bytes {ratio:.2f}x BP ({'below' if ratio < 1 else 'NOT below'})")
    return out


def _plot(rows: List[dict], families: List[str], path: Path, recipe: Dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in METHODS if m != "bp" and any(r["method"] == m for r in rows)]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / max(1, len(methods))
    for k, method in enumerate(methods):
        for i, family in enumerate(families):
            row = next((r for r in rows if r["family"] == family and r["method"] == method), None)
            if row is None or row["gap_to_bp"] is None:
                continue
            ax.bar(i + (k - (len(methods) - 1) / 2) * width, -row["gap_to_bp"], width,
                   color=f"C{k}", label=LABELS[method] if i == 0 else None)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.axhline(-1, color="grey", linewidth=0.6, linestyle="--")
    ax.set_xticks(range(len(families)), families)
    ax.set_ylabel("test top-1 minus BP's (points)")
    ax.set_title(f"Fashion-MNIST {recipe['input_size']} px, {recipe['train_subset']} training images, "
                 f"{recipe['epochs']} epochs (dashed: 1 point below BP)", fontsize=9)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--confirm-seeds", type=int, nargs="*", default=[1],
                        help="seeds added where a gap to BP is below one point after --seeds")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--warmup-epochs", type=int, default=1)
    parser.add_argument("--train-subset", type=int, default=4096)
    parser.add_argument("--test-subset", type=int, default=2000)
    parser.add_argument("--memory-batch", type=int, default=128, help="batch of the memory measurement")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (a CPU run's cache key has no device)")
    parser.add_argument("--out", default="runs/zoo")
    parser.add_argument("--json", default="docs/zoo_accuracy.json")
    parser.add_argument("--plot", default="docs/zoo_accuracy.png")
    parser.add_argument("--rerun", action="store_true", help="train every run anew, ignoring the cache")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: the table of the cached runs, the missing ones listed as failures")
    parser.add_argument("--options", nargs="+", default=[], metavar="KEY=VALUE",
                        help="more train() options for the local methods (not BP), e.g. aux_head=slim "
                             "aux_init=copy: a variant with its own cache entries")
    parser.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        family, method, seed, path, recipe, extra = args.worker
        _worker(family, method, int(seed), path, json.loads(recipe), json.loads(extra))
        return 0
    from auglocal_fx.specs import parse_model_kwargs

    args.options = parse_model_kwargs(args.options) or {}
    if "bp" not in args.methods:
        parser.error("--methods must include bp: every gap is measured against it")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    results: List[dict] = []
    failures: List[str] = []
    _run_all(args, [(f, m, s) for s in args.seeds for f in args.families for m in args.methods], results, failures)
    close = sorted({(r["family"], r["method"]) for r in _rows(results, args.families, args.methods)
                    if r["gap_to_bp"] is not None and abs(r["gap_to_bp"]) < 1.0})
    extra = [(f, m, s) for s in args.confirm_seeds for f, m in close + sorted({(f, "bp") for f, _ in close})
             if s not in args.seeds]
    if extra:
        print(f"gaps below one point: {', '.join(f'{f} {LABELS[m]}' for f, m in close)}; more seeds", flush=True)
        _run_all(args, extra, results, failures)
    rows = _rows(results, args.families, args.methods)
    recipe = _recipe(args)
    print("\n" + _table(rows))
    print("\nGap to BP after each epoch (points):\n"
          + "\n".join(f"  {g}" for g in _epoch_gaps(results, args.families, args.methods)))
    print("\nTargets:\n" + "\n".join(f"  {v}" for v in _verdicts(rows, args.families)))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"recipe": recipe, "recipes": RECIPES, "rows": rows,
                                           "runs": results, "failures": failures}, indent=1))
    if rows and args.plot:
        _plot(rows, args.families, Path(args.plot), recipe)
    print(f"\nwrote {args.json}" + (f" and {args.plot}" if rows and args.plot else ""))
    if failures:
        print(f"FAILED: {len(failures)} run(s) did not finish: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
