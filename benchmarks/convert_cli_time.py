"""How long `auglocal-fx convert timm:regnetx_004 --d 6` takes, and where the time goes.

Usage::

    python benchmarks/convert_cli_time.py [--repeats 3] [--spec timm:regnetx_004] [--d 6]

1. Whole process: the CLI as a user runs it (subprocess, wall clock, ``--repeats`` runs).
2. Stages: the same work in a fresh process, each stage timed with ``time.perf_counter``:
   imports, resolve (create the model), trace (fx, eval and train graphs, shapes), partition,
   plan, synthesis (the auxiliary networks), assembly (``LocalNet``), FLOPs counting (fvcore),
   save. Conversion and counting run on one thread, as the CLI does. The whole process also
   pays for the interpreter's start and exit and for Python's cycle collections, which the CLI
   pauses while converting; at exit it runs the exit functions, flushes its output and ends
   without Python's teardown (``cli.main.main``). The stages pay for none of these.

Target: at most 6 s for the whole process (issue 22; 10 s before).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _stages(spec: str, d: int, out: str) -> dict:
    """Run every stage of ``convert`` in this (fresh) process and time each."""
    times = {}
    t = time.perf_counter()
    import warnings

    warnings.simplefilter("ignore")
    import torch

    times["import torch"] = time.perf_counter() - t
    t = time.perf_counter()
    import timm  # noqa: F401

    times["import timm"] = time.perf_counter() - t
    t = time.perf_counter()
    import fvcore.nn  # noqa: F401

    from auglocal_fx.flops import count_flops
    from auglocal_fx.initialization import InitReference
    from auglocal_fx.local import LocalNet
    from auglocal_fx.partition import partition_blocks
    from auglocal_fx.planning import plan_aux_nets
    from auglocal_fx.specs import resolve_model
    from auglocal_fx.synthesis import synthesize_aux_net
    from auglocal_fx.tracing import trace_model

    times["import auglocal_fx, fvcore"] = time.perf_counter() - t
    torch.set_num_threads(1)

    t = time.perf_counter()
    resolved = resolve_model(spec)
    times["resolve (create model)"] = time.perf_counter() - t
    t = time.perf_counter()
    traced = trace_model(resolved.model, resolved.input_size)
    times["trace (fx + shapes)"] = time.perf_counter() - t
    t = time.perf_counter()
    partition = partition_blocks(traced)
    times["partition"] = time.perf_counter() - t
    t = time.perf_counter()
    plans = plan_aux_nets(partition.resolutions, d)
    times["plan"] = time.perf_counter() - t
    t = time.perf_counter()
    init = InitReference.from_model(resolved.model, resolved.initial_parameters)
    times["init statistics"] = time.perf_counter() - t
    t = time.perf_counter()
    aux = [synthesize_aux_net(partition, p, init) for p in plans]  # drawn by the init rule, as the CLI
    times["synthesis (aux nets)"] = time.perf_counter() - t
    t = time.perf_counter()
    options = {"d": d, "tau": 0.5, "pyramid": True, "selection": "uniform",
               "input_size": tuple(resolved.input_size), "num_classes": resolved.num_classes,
               "block_boundaries": None}
    local = LocalNet(resolved.model, partition, aux, plans, options, spec)
    times["assemble LocalNet"] = time.perf_counter() - t
    t = time.perf_counter()
    flops = count_flops(local)
    total = flops.total
    times["FLOPs (fvcore)"] = time.perf_counter() - t
    t = time.perf_counter()
    local.save(out)
    times["save checkpoint"] = time.perf_counter() - t
    return {"times": times, "blocks": len(local.blocks), "aux": len(local.aux), "total": total,
            "input_size": list(resolved.input_size)}


def _table(rows, headers) -> str:
    widths = [max(len(str(r[i])) for r in rows + [headers]) for i in range(len(headers))]
    line = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
                               for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(headers), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="timm:regnetx_004")
    parser.add_argument("--d", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stages-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.stages_only:
        print(json.dumps(_stages(args.spec, args.d, args.out)))
        return

    exe = shutil.which("auglocal-fx") or os.path.join(os.path.dirname(sys.executable),
                                                       "auglocal-fx")
    work = tempfile.mkdtemp(prefix="auglocal-bench-")
    cmd = [exe, "convert", args.spec, "--d", str(args.d), "-o", os.path.join(work, "x.pt")]
    walls = []
    for _ in range(args.repeats):
        if os.path.exists(cmd[-1]):  # convert refuses to overwrite its output without --force
            os.remove(cmd[-1])
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=work)
        walls.append(time.perf_counter() - t)
        if proc.returncode:
            sys.exit(f"convert failed: {proc.stderr.strip().splitlines()[-1]}")

    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--stages-only", "--spec",
                           args.spec, "--d", str(args.d), "--out", os.path.join(work, "y.pt")],
                          capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(f"stage timing failed: {proc.stderr.strip().splitlines()[-1]}")
    stages = json.loads(proc.stdout.strip().splitlines()[-1])
    shutil.rmtree(work, ignore_errors=True)

    print(f"`auglocal-fx {' '.join(cmd[1:5])}` "
          f"({stages['blocks']} blocks, {stages['aux']} auxiliary networks, input "
          f"{'x'.join(map(str, stages['input_size']))}, {stages['total'] / 1e9:.2f} GFLOPs "
          f"total, 1 multiply-add = 1 FLOP), {os.cpu_count()} CPU cores")
    print()
    print(_table([[f"run {i + 1}", f"{w:.2f} s"] for i, w in enumerate(walls)]
                 + [["median", f"{statistics.median(walls):.2f} s"]],
                 ["whole process (subprocess, wall clock)", "time"]))
    print()
    times = stages["times"]
    total = sum(times.values())
    print(_table([[k, f"{v:.2f} s", f"{100 * v / total:.0f}%"] for k, v in times.items()]
                 + [["sum of stages", f"{total:.2f} s", "100%"]],
                 ["stage (fresh process, in-process timers)", "time", "share"]))
    verdict = "meets" if statistics.median(walls) <= 6 else "MISSES"
    print(f"\nmedian whole-process time {statistics.median(walls):.2f} s {verdict} the 6 s target")


if __name__ == "__main__":
    main()
