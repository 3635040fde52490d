"""Pipelined local training: samples/s of K pipeline workers against one process, side by side.

    python benchmarks/pipeline.py                                   # paper:resnet110 and timm:resnet18, CPU
    python benchmarks/pipeline.py --models paper:resnet32 --stages 1 2 4 --device cuda

Every configuration trains the same ``--steps`` steps (one epoch of ``steps x batch`` images of
``--dataset``, AugLocal d=2) through ``auglocal_fx.train``; samples/s is
``steps x batch / train_seconds``, where ``train_seconds`` is the training loop of the epoch as
the run records it in ``metrics.jsonl``: from the start of the epoch to the end of the last
worker's last step (every worker waits at a barrier before its clock stops, so fill and drain are
included; process start-up, conversion and evaluation are not). Rows:

- ``K=1, T threads``: the ordinary sequential run in one process with T CPU threads;
- ``K=k``: k pipeline workers (gloo on CPU, NCCL on CUDA), ``--threads-per-worker`` each.

Utilisation of a worker: the share of the training loop it spent in its own steps (forward,
backward, optimizer), the rest being waits for its predecessor's output or its successor.
On CUDA, each worker gets its own GPU (``cuda:rank``); K must not exceed the GPUs.
"""

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

from auglocal_fx.training import TrainConfig, default_dataset, train


def _run(spec, stages, threads, args, out):
    steps, batch = args.steps, args.batch_size
    cfg = TrainConfig(model=spec, dataset=args.dataset, input_size=args.input_size, d=args.d, epochs=1,
                      batch_size=batch, train_subset=steps * batch, test_subset=batch, warmup_epochs=0,
                      augment=False, device=args.device, threads=threads, pipeline=stages,
                      out=str(out), progress=False)
    record = train(cfg).history[-1]
    seconds = record["train_seconds"]
    pipe = record.get("pipeline") or {"busy": [1.0], "modules": None}
    return {"model": spec, "stages": stages, "threads": threads, "steps": record["step"], "batch": batch,
            "train_seconds": seconds, "samples_per_s": record["step"] * batch / seconds,
            "busy": pipe["busy"], "modules": pipe["modules"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["paper:resnet110", "timm:resnet18"])
    parser.add_argument("--stages", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--threads-per-worker", type=int, default=1)
    parser.add_argument("--sequential-threads", type=int, nargs="+", default=None,
                        help="thread counts of the K=1 rows [default: 1 and the CPU count]")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--d", type=int, default=2)
    parser.add_argument("--dataset", default=None, help="default: fashion-mnist if installed, else digits")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args()
    args.dataset = args.dataset or default_dataset()
    cores = os.cpu_count() or 1
    sequential_threads = args.sequential_threads or sorted({1, cores})
    print(f"torch {torch.__version__}, {cores} CPUs, device {args.device}, dataset {args.dataset} at "
          f"{args.input_size} px, batch {args.batch_size}, {args.steps} steps, AugLocal d={args.d}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.models:
            configs = [(1, t) for t in sequential_threads if 1 in args.stages]
            configs += [(k, args.threads_per_worker) for k in args.stages if k > 1]
            for n, (stages, threads) in enumerate(configs):
                row = _run(spec, stages, threads, args, Path(tmp) / f"{spec.replace(':', '_')}-{n}")
                rows.append(row)
                print(f"  {spec} K={stages} x {threads} thread(s): {row['samples_per_s']:.1f} samples/s",
                      file=sys.stderr)
    print()
    print("| model | workers x threads | samples/s | speed-up vs K=1, 1 thread | utilisation per worker | "
          "local modules per worker |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        base = next((r for r in rows if r["model"] == row["model"] and r["stages"] == 1 and r["threads"] == 1),
                    None)
        speedup = f"{row['samples_per_s'] / base['samples_per_s']:.2f}x" if base else "-"
        busy = " / ".join(f"{100 * b:.0f}%" for b in row["busy"]) if row["stages"] > 1 else "-"
        modules = " / ".join(f"{a}..{b - 1}" for a, b in row["modules"]) if row["modules"] else "all"
        print(f"| {row['model']} | K={row['stages']} x {row['threads']} | {row['samples_per_s']:.1f} | "
              f"{speedup} | {busy} | {modules} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
