"""Conversion time of ``to_local`` over the model sweep at 224 px (issue 2's benchmark).

Run: ``python benchmarks/convert_time.py [--d 2] [--size 224] [--repeat 1]``; one large model:
``python benchmarks/convert_time.py --models timm:deepseek_vit_412m --size 546 --model-kwargs '{"depth": 8}'``

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

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from auglocal_fx import resolve_model, to_local  # noqa: E402
from tests.test_sweep import SWEEP  # noqa: E402  (one list of models, shared with the tests)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeat", type=int, default=1, help="best of N conversions")
    parser.add_argument("--models", nargs="*", default=SWEEP)
    parser.add_argument("--model-kwargs", type=json.loads, default=None,
                        help="builder arguments for every model, as JSON, e.g. '{\"depth\": 8}'")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    # Warm-up: the first conversion pays one-off import and allocator costs.
    to_local("paper:resnet32", d=2)
    rows = []
    for spec in args.models:
        resolved = resolve_model(spec, num_classes=1000, input_size=(3, args.size, args.size),
                                 model_kwargs=args.model_kwargs)
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            local = to_local(resolved.model, d=args.d, input_size=resolved.input_size)
            times.append(time.perf_counter() - start)
        rows.append((spec, len(local.blocks), len(local.aux), min(times)))
        print(f"{spec:34s} blocks {rows[-1][1]:3d}  aux {rows[-1][2]:3d}  {rows[-1][3]:7.3f} s",
              flush=True)
    median = statistics.median(r[3] for r in rows)
    print(f"\n{len(rows)} models, d={args.d}, {args.size} px, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads: median conversion time {median:.3f} s "
          f"(max {max(r[3] for r in rows):.3f} s)")


if __name__ == "__main__":
    main()
