"""CUDA peak memory of BP, gradient checkpointing and each AugLocal option, in one run.

    python benchmarks/cuda_memory.py                                   # paper:resnet110, batch 64, d=2
    python benchmarks/cuda_memory.py --models timm:vit_small_patch16_224 --input-size 224 --batch-size 32
    python benchmarks/cuda_memory.py --optimizer adamw --depths 2 4

For each method (bp, checkpoint, auglocal d=D with and without recomputed auxiliary networks)
one training step runs on the GPU through ``auglocal_fx.measure_memory``, and the table
shows, side by side, ``torch.cuda.max_memory_allocated`` (CUDA max: this network, its
gradients, its optimizer state and the batch alone on the device; transient buffers included)
and the whole count computed exactly from the tensors (parameters + optimizer state + saved
activations and .grad tensors at their joint peak; transients not included), so the two can be
compared. The ratios to gradient checkpointing are the issue-22 targets (AugLocal d=2: 0.5x on
ResNet-110 batch 64, 0.8x on ViT-S/16 batch 32). Needs a CUDA device; refuses otherwise.
"""

import argparse
import sys
import time

import torch

from auglocal_fx.memory import OPTIMIZERS, measure_memory

_MIB = 2 ** 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["paper:resnet110"])
    parser.add_argument("--depths", nargs="+", type=int, default=[2])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--input-size", type=int, default=None, help="image side (default: the spec's)")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("cuda_memory.py needs a CUDA device and none is available; run benchmarks/memory.py on CPU")

    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(args.device)}, optimizer {args.optimizer}")
    for spec in args.models:
        start = time.perf_counter()
        size = None if args.input_size is None else (3, args.input_size, args.input_size)
        report = measure_memory(spec, d=tuple(args.depths), batch_size=args.batch_size, device=args.device,
                                input_size=size, rss=False, optimizer=args.optimizer,
                                aux_checkpoint=(False, True))
        print(report)
        gc_row = report.row("checkpoint")
        print(f"{'method':<26}{'CUDA max MiB':>14}{'x GC':>7}{'whole MiB':>11}{'x GC':>7}{'CUDA max / whole':>18}")
        for row in report.rows:
            print(f"{row.label:<26}{row.cuda_max_allocated / _MIB:>14.1f}"
                  f"{row.cuda_max_allocated / gc_row.cuda_max_allocated:>7.2f}"
                  f"{row.whole_peak / _MIB:>11.1f}{row.whole_peak / gc_row.whole_peak:>7.2f}"
                  f"{row.cuda_max_allocated / row.whole_peak:>18.2f}")
        print(f"({spec} measured in {time.perf_counter() - start:.0f} s)\n")


if __name__ == "__main__":
    main()
