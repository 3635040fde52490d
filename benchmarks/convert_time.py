"""Conversion time of ``to_local`` over the model sweep at 224 px (issue 2's benchmark).

Run: ``python benchmarks/convert_time.py [--d 2] [--size 224] [--repeat 1]``; one large model:
``python benchmarks/convert_time.py --models timm:deepseek_vit_412m --size 546 --model-kwargs '{"depth": 8}'``;
``--real-seconds inf 0.05`` times each model with the shape runs all real and as by default, in turn.

Each model is created first (not timed), then ``to_local`` is timed: tracing in both modes,
shape recording, partition, planning and synthesis of every auxiliary network. The median over
the sweep is printed last; the target is under 1 s on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from typing import List

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from auglocal_fx import _meta_run, resolve_model, to_local  # noqa: E402
from tests.test_sweep import SWEEP  # noqa: E402  (one list of models, shared with the tests)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeat", type=int, default=1, help="best of N conversions")
    parser.add_argument("--models", nargs="*", default=SWEEP)
    parser.add_argument("--model-kwargs", type=json.loads, default=None,
                        help="builder arguments for every model, as JSON, e.g. '{\"depth\": 8}'")
    parser.add_argument("--real-seconds", type=float, nargs="+", default=None,
                        help="one column per value of auglocal_fx._meta_run.REAL_SECONDS, timed "
                             "in turn (inf: the shape runs compute everything for real, as "
                             "before they ran on meta tensors)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    settings = args.real_seconds or [_meta_run.REAL_SECONDS]
    # Warm-up: the first conversion pays one-off import and allocator costs.
    to_local("paper:resnet32", d=2)
    rows = []
    for spec in args.models:
        resolved = resolve_model(spec, num_classes=1000, input_size=(3, args.size, args.size),
                                 model_kwargs=args.model_kwargs)
        times: List[List[float]] = [[] for _ in settings]
        for _ in range(args.repeat):
            for column, seconds in enumerate(settings):  # in turn: load changes hit all alike
                _meta_run.REAL_SECONDS = seconds
                start = time.perf_counter()
                local = to_local(resolved.model, d=args.d, input_size=resolved.input_size)
                times[column].append(time.perf_counter() - start)
        rows.append((spec, len(local.blocks), len(local.aux), [min(t) for t in times]))
        print(f"{spec:34s} blocks {rows[-1][1]:3d}  aux {rows[-1][2]:3d}  "
              + "  ".join(f"{t:7.3f} s" for t in rows[-1][3]), flush=True)
    for column, seconds in enumerate(settings):
        median = statistics.median(r[3][column] for r in rows)
        label = f" (REAL_SECONDS={seconds:g})" if args.real_seconds else ""
        print(f"\n{len(rows)} models, d={args.d}, {args.size} px, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads{label}: median conversion time {median:.3f} s "
              f"(max {max(r[3][column] for r in rows):.3f} s)")


if __name__ == "__main__":
    main()
