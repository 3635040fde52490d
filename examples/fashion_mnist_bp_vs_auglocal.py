"""Train paper:resnet32 with BP, AugLocal d=2 and AugLocal d=4 for the same epochs; print test accuracy.

    python examples/fashion_mnist_bp_vs_auglocal.py                 # Fashion-MNIST subset, ~10 min on 2 cores
    python examples/fashion_mnist_bp_vs_auglocal.py --train-subset 60000 --test-subset 10000 --epochs 30

Fashion-MNIST comes from the Debian package ``dataset-fashion-mnist`` (read from
``/usr/share/datasets/fashion-mnist``; images zero-padded to 32x32 and repeated to RGB). To
finish in about 10 minutes on a quiet 2-core CPU, the default run uses a fixed random subset of
6000 training and 2000 test images and 3 epochs (batch 128, lr 0.1, the paper's per-epoch cosine
schedule with a 1-epoch warmup instead of the paper's 10, which suits 400 epochs): the accuracies
show the three methods side by side under the same budget, not the paper's converged numbers.
``benchmarks/accuracy.py`` runs the longer, multi-seed comparison, against the authors' code too.
"""

import argparse
import tempfile
import time

from auglocal_fx.training import train


def compare(dataset: str, epochs: int, train_subset, test_subset, batch_size: int, seed: int,
            warmup_epochs: int = 1) -> None:
    """Run the three trainings and print one line each."""
    runs = [("BP", dict(method="bp")), ("AugLocal d=2", dict(d=2)), ("AugLocal d=4", dict(d=4))]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, options in runs:
            start = time.perf_counter()
            result = train(model="paper:resnet32", dataset=dataset, epochs=epochs, batch_size=batch_size,
                           train_subset=train_subset, test_subset=test_subset, seed=seed,
                           warmup_epochs=warmup_epochs,
                           out=f"{tmp}/{name.replace(' ', '_')}", progress=False, **options)
            results.append((name, result.test_acc, time.perf_counter() - start))
            print(f"{name:<13} test top-1 {result.test_acc:6.2f}%  ({results[-1][2]:.0f} s)", flush=True)
    subset = f"{train_subset or 'all'} train / {test_subset or 'all'} test images"
    print(f"\npaper:resnet32 on {dataset} ({subset}, {epochs} epochs, warmup {warmup_epochs}, "
          f"batch {batch_size}, seed {seed})")
    for name, acc, seconds in results:
        print(f"  {name:<13} {acc:6.2f}%")


def main(dataset: str = "fashion-mnist", epochs: int = 3, train_subset=6000, test_subset=2000,
         batch_size: int = 128) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--train-subset", type=int, default=train_subset)
    parser.add_argument("--test-subset", type=int, default=test_subset)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup-epochs", type=int, default=1)
    args = parser.parse_args()
    compare(dataset, args.epochs, args.train_subset, args.test_subset, args.batch_size, args.seed,
            args.warmup_epochs)


if __name__ == "__main__":
    main()
