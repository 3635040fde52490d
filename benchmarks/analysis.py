"""Representation analysis on real Fashion-MNIST: CKA to BP per block and linear probes.

The paper's section 4.3 (Figures 3 and 4): the linear CKA of each block of a locally trained
network to the same block of the network trained by backprop, averaged over blocks, rises with
the auxiliary depth ``d``; the linear separability of each block approaches BP's.

One recipe for every run, as a user would train them (``auglocal_fx.train``): CIFAR ResNet-32
(``paper:resnet32``) on real Fashion-MNIST (the Debian package ``dataset-fashion-mnist``)
resized to 16x16, a fixed 4096-image training subset, 6 epochs, batch 128, SGD Nesterov 0.9,
weight decay 1e-4, lr 0.1 with the paper's per-epoch cosine and a 1-epoch warmup, the paper's
crop + flip, seed 0, one thread. Methods: BP, AugLocal d=2, 4, 6 and DGL (``rule="dgl"``).

Then, on 2000 test images (a seeded subset): ``auglocal_fx.block_cka`` of each method (and of
the untrained network every run starts from: ``train`` seeds the weights, so all runs share them) to BP
(flattened block outputs, minibatch unbiased HSIC, batches of 250), and
``auglocal_fx.linear_probe`` of every network (global-average-pooled block outputs of 4096
training images, standardised, L-BFGS logistic regression; accuracy on the 2000 test images).
Prints a markdown table, writes ``--json`` and ``--plot``::

    python benchmarks/analysis.py                       # runs cached in runs/analysis
    python benchmarks/analysis.py --train-only          # just the training runs

Finished runs are cached in ``--out`` (``OUT/<method>/model.pt``); a killed run resumes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name -> (method, rule, d); BP first: every other network is compared with it.
RUNS: Dict[str, Tuple[str, str, int]] = {
    "bp": ("bp", "auglocal", 2),
    "auglocal-d2": ("auglocal", "auglocal", 2),
    "auglocal-d4": ("auglocal", "auglocal", 4),
    "auglocal-d6": ("auglocal", "auglocal", 6),
    "dgl": ("auglocal", "dgl", 2),
}
LABELS = {"bp": "BP", "auglocal-d2": "AugLocal d=2", "auglocal-d4": "AugLocal d=4",
          "auglocal-d6": "AugLocal d=6", "dgl": "DGL"}
RECIPE = dict(model="paper:resnet32", dataset="fashion-mnist", input_size=16, train_subset=4096,
              test_subset=2000, epochs=6, warmup_epochs=1, batch_size=128, lr=0.1, seed=0,
              device="cpu")


def train_runs(out: Path, names: List[str]) -> Dict[str, Dict[str, object]]:
    """Train (or find cached) every run; returns test accuracy and seconds per run."""
    from auglocal_fx.training import train

    done = {}
    for name in names:
        method, rule, d = RUNS[name]
        folder = out / name
        info = folder / "run.json"
        if not info.exists():
            start = time.perf_counter()
            result = train(**RECIPE, method=method, rule=rule, d=d, out=str(folder), progress=False,
                           resume=True)
            info.write_text(json.dumps({"test_acc": result.test_acc,
                                        "seconds": round(time.perf_counter() - start, 1)}))
        done[name] = json.loads(info.read_text())
        print(f"{LABELS[name]}: test accuracy {done[name]['test_acc']:.2f}% "
              f"({done[name]['seconds']} s)", flush=True)
    return done


def analyse(out: Path, names: List[str], runs: Dict[str, Dict[str, object]], batch_size: int,
            probe_train: int) -> Dict[str, object]:
    """CKA of every run to BP, and the linear probe of every run."""
    import torch

    from auglocal_fx import to_local
    from auglocal_fx.analysis import analysis_data, block_cka, linear_probe, load_trained

    nets = {name: load_trained(out / name) for name in names}
    data = analysis_data(RECIPE["dataset"], nets["bp"].input_size, test_subset=RECIPE["test_subset"],
                         probe_train_subset=probe_train, seed=RECIPE["seed"])
    results: Dict[str, object] = {"recipe": RECIPE, "cka_batch_size": batch_size,
                                  "probe_train_subset": probe_train, "methods": {}}
    for name in names:
        start = time.perf_counter()
        cka = block_cka(nets["bp"], nets[name], data.test, batch_size=batch_size, progress=False)
        probe = linear_probe(nets[name], data.train, data.test, progress=False)
        results["methods"][name] = {
            "label": LABELS[name], "test_acc": runs[name]["test_acc"],
            "train_seconds": runs[name]["seconds"], "cka": cka.values, "mean_cka": cka.mean,
            "probe": probe.accuracy, "analysis_seconds": round(time.perf_counter() - start, 1)}
        print(f"{LABELS[name]}: mean CKA to BP {cka.mean:.4f}, probe of the last block "
              f"{probe.accuracy[-1]:.2f}%", flush=True)
    # Every run starts from the same primary weights (train seeds them before building the model),
    # so part of any similarity is inherited: the untrained network measures that part.
    torch.manual_seed(RECIPE["seed"])
    init = to_local(RECIPE["model"], input_size=nets["bp"].input_size, num_classes=10)
    cka = block_cka(nets["bp"], init, data.test, batch_size=batch_size, progress=False)
    probe = linear_probe(init, data.train, data.test, progress=False)
    results["methods"]["init"] = {"label": "untrained (common init)", "test_acc": None, "train_seconds": 0,
                                  "cka": cka.values, "mean_cka": cka.mean, "probe": probe.accuracy}
    print(f"untrained: mean CKA to BP {cka.mean:.4f}, probe of the last block {probe.accuracy[-1]:.2f}%", flush=True)
    results["block_names"] = cka.names
    return results


def markdown(results: Dict[str, object]) -> str:
    methods = results["methods"]
    rows = ["| method | test top-1 (%) | mean CKA to BP | CKA per block (first .. last) | "
            "probe top-1 per block (%, first .. last) |", "|---|---|---|---|---|"]
    for entry in methods.values():
        cka = " ".join(f"{v:.2f}" for v in entry["cka"])
        probe = " ".join(f"{v:.0f}" for v in entry["probe"])
        acc = "-" if entry["test_acc"] is None else f"{entry['test_acc']:.2f}"
        rows.append(f"| {entry['label']} | {acc} | {entry['mean_cka']:.3f} | {cka} | "
                    f"{probe} |")
    return "\n".join(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "runs" / "analysis"), help="run cache folder")
    parser.add_argument("--methods", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--train-only", action="store_true", help="train the runs, analyse nothing")
    parser.add_argument("--batch-size", type=int, default=250, help="CKA minibatch size")
    parser.add_argument("--probe-train-subset", type=int, default=4096)
    parser.add_argument("--json", default=str(ROOT / "docs" / "analysis.json"))
    parser.add_argument("--plot", default=str(ROOT / "docs" / "analysis.png"))
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    names = ["bp"] + [n for n in args.methods if n != "bp"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = train_runs(out, names)
    if args.train_only:
        return
    results = analyse(out, names, runs, args.batch_size, args.probe_train_subset)
    print(markdown(results))
    Path(args.json).write_text(json.dumps(results, indent=1))
    from auglocal_fx.plots import plot_analysis

    plot_analysis({m["label"]: m["cka"] for k, m in results["methods"].items() if k != "bp"},
                  {m["label"]: m["probe"] for m in results["methods"].values()}, args.plot,
                  title="paper:resnet32, Fashion-MNIST 16x16, 6 epochs on 4096 images")
    print(f"wrote {args.json} and {args.plot}")


if __name__ == "__main__":
    main()
