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
FLOPs ratio. The ``+recompute`` column is ``train_step`` with ``aux_checkpoint=True`` (each primary
block recomputed in backward), interleaved with the others; "recompute cost" is its time over
AugLocal's, minus 1 (target, issue 22: <= +20%).

``--reference DIR`` (the authors' code, a checkout of ChenxiangMA/AugLocal, or
``$AUGLOCAL_REFERENCE``) adds a second table: one AugLocal step of CIFAR ResNet-32 (16 local
modules, pyramid 0.5, depths ``--depths``) by our ``LocalNet.train_step`` against the authors'
``LocalResNet`` forward (which back-propagates every local loss itself), interleaved, medians.
Target (issue 22): ours <= 1.0x theirs. Both are forward + backward with zeroed gradients, no
optimizer update.

    python benchmarks/step_time.py --reference /work/authors --depths 2 4 --repeats 9
"""

import argparse
import os
import statistics
import sys
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


def _authors_resnet32(reference: str, d: int, batch_size: int):
    """The authors' AugLocal ResNet-32 as their run.sh and train.py build it.

    ``--local_module_num 16 --rule AugLocal --aux_net_depth d-1 --pyramid --pyramid_coeff 0.5``;
    their train.py then sets ``aux_net_config='unifSamp'`` and ``local_module_num = 16 - (d-1)``.
    """
    sys.path.insert(0, os.path.abspath(reference))
    import networks.resnet as theirs  # the authors' code

    return theirs.resnet32(local_module_num=16 - (d - 1), batch_size=batch_size, image_size=32,
                           dataset="cifar10", class_num=10, aux_net_config="unifSamp",
                           rule="AugLocal", aux_net_depth=d - 1, is_pyramid=True, paramid_coeff=0.5)


def _against_authors(reference: str, depths, batch_size: int, repeats: int, device) -> None:
    print(f"\npaper:resnet32 against the authors' LocalResNet (16 blocks, pyramid 0.5), "
          f"batch {batch_size}, median of {repeats} interleaved steps")
    header = f"{'d':>3}  {'ours s/step':>11}  {'authors s/step':>14}  {'ours / authors':>14}"
    print(header)
    print("-" * len(header))
    for d in depths:
        ours = to_local("paper:resnet32", d=d).to(device).train()
        theirs = _authors_resnet32(reference, d, batch_size).to(device).train()
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch_size, 3, 32, 32, generator=g).to(device)
        y = torch.randint(0, 10, (batch_size,), generator=g).to(device)
        steps = {"ours": (ours, lambda: ours.train_step(x, y)),
                 "theirs": (theirs, lambda: theirs(img=x, target=y, ixx_1=0.0, ixy_1=1.0,
                                                    ixx_2=0.0, ixy_2=1.0))}
        times = {name: [] for name in steps}
        for _, step in steps.values():  # warm-up
            _timed(step, device)
        for _ in range(repeats):
            for name, (model, step) in steps.items():
                model.zero_grad(set_to_none=False)
                times[name].append(_timed(step, device))
        a, b = statistics.median(times["ours"]), statistics.median(times["theirs"])
        print(f"{d:>3}  {a:>11.3f}  {b:>14.3f}  {a / b:>13.2f}x")
    print("Target (issue 22): ours / authors <= 1.00x.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["paper:resnet110"])
    parser.add_argument("--depths", nargs="+", type=int, default=[2, 3, 4, 5, 6])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--input-size", type=int, default=32, help="image side (default 32)")
    parser.add_argument("--reference", default=os.environ.get("AUGLOCAL_REFERENCE"),
                        help="the authors' code: time ResNet-32 steps against their LocalResNet")
    parser.add_argument("--reference-only", action="store_true",
                        help="only the table against the authors' code")
    args = parser.parse_args()
    size = (3, args.input_size, args.input_size)
    device = torch.device(args.device)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, "
          f"batch {args.batch_size}, median of {args.repeats} interleaved steps")
    if args.reference:
        _against_authors(args.reference, args.depths, args.batch_size, args.repeats, device)
    if args.reference_only:
        return
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
