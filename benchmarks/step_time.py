"""Time per training step, AugLocal / BP, next to the FLOPs ratio, measured in one run.

    python benchmarks/step_time.py                            # paper:resnet110, d=2..6, batch 128, CPU
    python benchmarks/step_time.py --models paper:resnet32 --depths 2 4 --repeats 5
    python benchmarks/step_time.py --models timm:vit_small_patch16_224 --input-size 224 --batch-size 32 --depths 2

A step is forward + backward on one batch (no optimizer update): BP runs the primary network
(``local.blocks`` then ``local.head``) with one loss; AugLocal runs ``LocalNet.train_step``.
BP and AugLocal steps are interleaved (BP, AugLocal, BP, AugLocal, ...) after one warm-up each,
so that load from other processes hits both alike; the table shows medians.
FLOPs: forward FLOPs of one image counted by fvcore's FlopCountAnalysis through
``auglocal_fx.flops.count_flops`` (one fused multiply-add counted as one FLOP); the FLOPs
ratio is (primary + all auxiliary networks) / primary. Target (issue 3): time ratio <= 1.1 x
FLOPs ratio. The ``+recompute`` column is ``train_step`` with ``aux_checkpoint=True`` (auxiliary
forwards recomputed in backward), interleaved with the others; "recompute cost" is its time over
AugLocal's, minus 1 (target, issue 22: <= +20%).
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from auglocal_fx import to_local
from auglocal_fx.flops import count_flops


def _bp_step(local, x, y):
    h = x
    for block in local.blocks:
        h = block(h)
    F.cross_entropy(local.head(h), y).backward()


def _timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["paper:resnet110"])
    parser.add_argument("--depths", nargs="+", type=int, default=[2, 3, 4, 5, 6])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--input-size", type=int, default=32, help="image side (default 32)")
    args = parser.parse_args()
    size = (3, args.input_size, args.input_size)
    device = torch.device(args.device)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, "
          f"batch {args.batch_size}, median of {args.repeats} interleaved steps")
    for spec in args.models:
        print(f"\n{spec}")
        header = f"{'d':>3}  {'BP s/step':>9}  {'AugLocal s/step':>15}  {'time ratio':>10}  " \
                 f"{'FLOPs ratio':>11}  {'time/FLOPs':>10}  {'BP GFLOPs':>9}  {'AugLocal GFLOPs':>15}  " \
                 f"{'+recompute s/step':>17}  {'recompute cost':>14}"
        print(header)
        print("-" * len(header))
        for d in args.depths:
            local = to_local(spec, d=d, input_size=size).to(device).train()
            flops = count_flops(local)
            g = torch.Generator().manual_seed(0)
            x = torch.randn(args.batch_size, *size, generator=g).to(device)
            y = torch.randint(0, local.num_classes, (args.batch_size,), generator=g).to(device)
            times = {"bp": [], "al": [], "rc": []}

            def recomputed():
                local.aux_checkpoint = True
                try:
                    local.train_step(x, y)
                finally:
                    local.aux_checkpoint = False

            steps = {"bp": lambda: _bp_step(local, x, y), "al": lambda: local.train_step(x, y), "rc": recomputed}
            for name in steps:  # warm-up
                _timed(steps[name], device)
            for _ in range(args.repeats):
                for name in steps:
                    local.zero_grad(set_to_none=False)
                    times[name].append(_timed(steps[name], device))
            bp, al, rc = (statistics.median(times[name]) for name in ("bp", "al", "rc"))
            time_ratio, flops_ratio = al / bp, flops.total / flops.primary
            print(f"{d:>3}  {bp:>9.3f}  {al:>15.3f}  {time_ratio:>10.2f}  {flops_ratio:>11.2f}  "
                  f"{time_ratio / flops_ratio:>10.2f}  {flops.primary / 1e9:>9.3f}  {flops.total / 1e9:>15.3f}  "
                  f"{rc:>17.3f}  {rc / al - 1:>+14.0%}")
    print("\nFLOPs: fvcore FlopCountAnalysis, forward pass of one image, one multiply-add = one FLOP.")
    print("Target: time/FLOPs <= 1.10 (no overhead beyond the arithmetic).")


if __name__ == "__main__":
    main()
