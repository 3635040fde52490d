"""Why a family trails BP in ``zoo_accuracy.py``: diagnostic runs and what the trained nets hold.

Three subcommands, on the zoo's recipe (Fashion-MNIST 32 px, 4096 / 2000 images, batch 128,
one thread, the family's optimizer from ``zoo_accuracy.RECIPES``):

``train FAMILY METHOD SEED [--variant V] [--epochs N]`` trains one run through ``train(...)`` into
``runs/diag/NAME`` and appends its test top-1, per-epoch history and the final test top-1 of
every auxiliary network to ``runs/diag/results.jsonl``. ``METHOD`` is ``bp``, ``d2``, ``d4`` or
``dgl``. The variants change how auxiliary copies are built, by patching the library for this
process only (they are experiments, not options of the tool):

* ``base``: the tool as it is.
* ``avgdown``: a projection shortcut that halves the resolution averages 2x2 and then applies
  its 1x1 convolution (ResNet-D), instead of a stride-2 1x1 convolution that reads one position
  of four.
* ``scaleX``: residual-branch scales that the source model initialises at (nearly) zero (timm's
  ``zero_init_last`` BatchNorm weight 0, ConvNeXt's layer scale 1e-6) start at ``X`` in copies,
  as the authors' blocks (which have neither) do.

``branches RUN [RUN ...]`` loads the runs' ``last.pt`` and prints, for each residual block of
the primary network (and, for AugLocal, of each auxiliary copy), ``|branch| / |shortcut|`` at
the residual sum over 256 test images: about 0 means the block is still the identity.

``memory FAMILY [FAMILY ...] [--d D] [--options KEY=VALUE ...]`` measures the bytes one training
step saves for backward (``measure_memory``, batch 128 at 32 px, no RSS) of BP, AugLocal ``d``
as converted by default, and AugLocal ``d`` with the conversion options given, side by side.
``--whole`` prints the whole count instead (parameters + the family's optimizer state + the
peak of saved bytes and gradients), with each local module's gradients freed after its
backward as the trainer does, for BP, gradient checkpointing, AugLocal ``d``, AugLocal ``d``
with recomputed blocks (``aux_checkpoint``) and AugLocal ``d`` with the options given.

    python benchmarks/zoo_diagnose.py train regnet d2 0
    python benchmarks/zoo_diagnose.py memory regnet mobilenetv3 --options aux_resolution=source
    python benchmarks/zoo_diagnose.py memory resnet18 regnet --whole --options aux_resolution=source
    python benchmarks/zoo_diagnose.py branches regnet-bp-base-s0 regnet-d2-base-s0
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from zoo_accuracy import FAMILIES, RECIPES  # noqa: E402

OUT = Path("runs/diag")
_PLAIN = None  # the library's own functions the variants replace, set by main()
METHODS = {"bp": {"method": "bp"}, "d2": {"method": "auglocal", "d": 2}, "d4": {"method": "auglocal", "d": 4},
           "dgl": {"method": "auglocal", "rule": "dgl"}}


def _patch_avgdown() -> None:
    from auglocal_fx.synthesis import repair

    plain = repair._projection

    def projection(in_channels: int, out_channels: int, stride: int, dims: int) -> nn.Module:
        if dims == 2 or stride == 1:
            return plain(in_channels, out_channels, stride, dims)
        return nn.Sequential(nn.AvgPool2d(stride, ceil_mode=True, count_include_pad=False),
                             nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))

    repair._projection = projection  # where the repair builds projection shortcuts


def _patch_scale(value: float) -> None:
    from auglocal_fx.initialization import InitReference

    drawn = InitReference.initialise_

    def initialise_(self, module: nn.Module, sources) -> None:
        drawn(self, module, sources)
        for name, param in module.named_parameters(recurse=False):
            source = sources.get(name)
            init = self.by_param.get(id(source)) if source is not None else None
            # Only scales: a layer scale ("gamma") or a norm's weight, that started at ~0.
            is_scale = name == "gamma" or (name == "weight" and "norm" in type(module).__name__.lower())
            if init is not None and init.family == "constant" and abs(init.mean) < 1e-3 and is_scale:
                with torch.no_grad():
                    param.fill_(value)

    InitReference.initialise_ = initialise_


def _apply(variant: str) -> None:
    """Patch the library for ``variant`` (the plain library first: one process may load several)."""
    from auglocal_fx import initialization
    from auglocal_fx.synthesis import repair

    repair._projection, initialization.InitReference.initialise_ = _PLAIN
    for part in variant.split("+"):
        if part == "avgdown":
            _patch_avgdown()
        elif part.startswith("scale"):
            _patch_scale(float(part[len("scale"):]))
        elif part != "base":
            raise SystemExit(f"unknown variant {part!r}: base, avgdown, scaleX (joined with +)")


def train_one(family: str, method: str, seed: int, variant: str, epochs: int) -> dict:
    """One run of the zoo's recipe with a variant; its record is appended to results.jsonl."""
    torch.set_num_threads(1)
    _apply(variant)
    from auglocal_fx.training import train

    spec, model_kwargs, recipe = FAMILIES[family]
    name = f"{family}-{method}-{variant}-s{seed}" + ("" if epochs == 5 else f"-e{epochs}")
    start = time.perf_counter()
    result = train(model=spec, model_kwargs=model_kwargs, dataset="fashion-mnist", input_size=32,
                   train_subset=4096, test_subset=2000, epochs=epochs, warmup_epochs=1, batch_size=128,
                   seed=seed, threads=1, out=str(OUT / name), progress=False, resume=False,
                   **RECIPES[recipe], **METHODS[method])
    record = {"name": name, "acc": result.test_acc, "hist": [h["test_acc"] for h in result.history],
              "aux": [round(a, 1) for a in result.aux_acc], "seconds": round(time.perf_counter() - start)}
    with open(OUT / "results.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    return record


def _trained(run: str) -> nn.Module:
    """The run's trained network: the model for BP, the LocalNet (variant applied) otherwise."""
    from auglocal_fx import to_local
    from auglocal_fx.data import dataset_normalization
    from auglocal_fx.specs import resolve_model

    family, method, variant = run.split("-")[:3]
    _apply(variant)
    spec, model_kwargs, _ = FAMILIES[family]
    state = torch.load(OUT / run / "last.pt", map_location="cpu", weights_only=False)["model"]
    if method == "bp":
        net = resolve_model(spec, num_classes=10, input_size=(3, 32, 32), model_kwargs=model_kwargs).model
    else:
        net = to_local(spec, input_size=(3, 32, 32), num_classes=10, model_kwargs=model_kwargs,
                       normalization=dataset_normalization("fashion-mnist"), **{
                           k: v for k, v in METHODS[method].items() if k != "method"})
    net.load_state_dict(state)
    return net.eval()


def _residual_sums(module: nn.Module, prefix: str, seen: Dict[str, list]) -> None:
    """Hooks on each residual block's branch end and shortcut (timm RegNet / ResNet / ConvNeXt).

    In an auxiliary copy whose shortcut the adaptation made a projection, the projection's output
    is the shortcut (the block's own ``downsample`` / ``shortcut`` then only passes its input on).
    """
    projection = next((m for n, m in module.named_children() if n.startswith("auglocal_shortcut")), None)
    for name, block in module.named_modules():
        if hasattr(block, "conv3") and hasattr(block, "downsample"):  # RegNet / ResNet bottleneck
            # conv3's norm: a traced copy calls the leaves, never the ConvNormAct container
            branch, shortcut = getattr(block.conv3, "bn", block.conv3), block.downsample
        elif hasattr(block, "bn2") and hasattr(block, "downsample"):  # ResNet basic block
            branch, shortcut = block.bn2, block.downsample
        elif hasattr(block, "mlp") and hasattr(block, "conv_dw"):  # ConvNeXt: drop_path(gamma * branch)
            branch, shortcut = block.drop_path, block.shortcut
        else:
            continue
        key = f"{prefix}{name.replace('eval_graph.', '')}"
        seen[key] = [None, None]
        shortcut = projection if projection is not None else shortcut
        branch.register_forward_hook(lambda m, i, o, k=key: seen[k].__setitem__(
            0, i[0] if isinstance(m, nn.Identity) else o))
        shortcut.register_forward_hook(lambda m, i, o, k=key: seen[k].__setitem__(1, o))


def branches(runs: List[str]) -> None:
    """Print |branch| / |shortcut| per residual block of each run's trained network."""
    from auglocal_fx.data import build_datasets

    torch.set_num_threads(1)
    test = build_datasets("fashion-mnist", input_size=32)[1]
    images = torch.stack([test[i][0] for i in range(256)])
    for run in runs:
        net = _trained(run)
        seen: Dict[str, list] = {}
        if hasattr(net, "aux"):
            _residual_sums(net.export(), "", seen)
            for j, aux in enumerate(net.aux):
                _residual_sums(aux[0], f"aux{j}:", seen)
        else:
            _residual_sums(net, "", seen)
        with torch.no_grad():
            if hasattr(net, "aux"):
                net.export()(images)  # the primary network as the original model runs it
                h = images
                for j, block in enumerate(net.blocks):
                    h = block(h)
                    if j < len(net.aux):
                        net.aux[j](h)
            else:
                net(images)
        ratios = [f"{n}:{float(b.norm() / s.norm()):.2f}"
                  for n, (b, s) in seen.items() if b is not None and s is not None]
        print(f"{run}: " + " ".join(ratios), flush=True)


def _memory_reports(family: str, d: int, options: Dict[str, object], batch: int):
    """One step of ``family`` at 32 px, measured by ``measure_memory``: BP, checkpointing and
    AugLocal ``d`` plain and recomputed (``base``), and AugLocal ``d`` with ``options``
    (``varied``); each local module's gradients freed after its backward, as the trainer does."""
    from auglocal_fx import ConversionOptions
    from auglocal_fx.memory import measure_memory

    spec, model_kwargs, recipe = FAMILIES[family]
    common = dict(d=d, batch_size=batch, input_size=(3, 32, 32), num_classes=10, rss=False,
                  optimizer=RECIPES[recipe]["opt"], step_each_module=True,
                  to_local_kwargs={"model_kwargs": model_kwargs})
    base = measure_memory(spec, methods=("bp", "checkpoint", "auglocal"), aux_checkpoint=(False, True), **common)
    # conversion options go as options: to_local refuses some as keywords (aux_tie)
    varied = measure_memory(spec, methods=("auglocal",), options=ConversionOptions(**options), **common)
    return base, varied


def memory(families: List[str], d: int, options: Dict[str, object], batch: int) -> None:
    """Saved bytes of BP, AugLocal ``d`` and AugLocal ``d`` with ``options``, one row per family."""
    torch.set_num_threads(1)
    variant = " ".join(f"{k}={v}" for k, v in options.items())
    print(f"| family | BP MiB | AugLocal d={d} MiB (x BP) | d={d} {variant} MiB (x BP) |")
    print("|---|---|---|---|")
    for family in families:
        base, varied = _memory_reports(family, d, options, batch)
        saved = [base.row("bp").saved_peak,
                 base.row("auglocal", d, aux_checkpoint=False, step_each_module=True).saved_peak,
                 varied.rows[0].saved_peak]
        mib = [s / 2 ** 20 for s in saved]
        print(f"| {family} | {mib[0]:.1f} | {mib[1]:.1f} ({saved[1] / saved[0]:.2f}x) | "
              f"{mib[2]:.1f} ({saved[2] / saved[0]:.2f}x) |", flush=True)


def whole_memory(families: List[str], d: int, options: Dict[str, object], batch: int) -> None:
    """The whole count of BP, checkpointing and AugLocal ``d`` (plain, recomputed, ``options``)."""
    torch.set_num_threads(1)
    variant = " ".join(f"{k}={v}" for k, v in options.items()) or "(no options)"
    print(f"whole count, MiB (x BP): parameters + optimizer state + peak of saved bytes and "
          f"gradients; batch {batch}, 32 px; each local module's gradients freed after its backward")
    print(f"| family (optimizer) | BP | checkpointing | d={d} | d={d} recompute | d={d} {variant} |")
    print("|---|---|---|---|---|---|")
    for family in families:
        base, varied = _memory_reports(family, d, options, batch)
        bp = base.row("bp").whole_peak
        cells = [base.row("bp"), base.row("checkpoint"),
                 base.row("auglocal", d, aux_checkpoint=False, step_each_module=True),
                 base.row("auglocal", d, aux_checkpoint=True, step_each_module=True), varied.rows[0]]
        text = [f"{c.whole_peak / 2 ** 20:.1f} ({c.whole_peak / bp:.2f}x)" for c in cells]
        optimizer = RECIPES[FAMILIES[family][2]]["opt"]
        print(f"| {family} ({optimizer}) | " + " | ".join(text) + " |", flush=True)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("train")
    one.add_argument("family", choices=list(FAMILIES))
    one.add_argument("method", choices=list(METHODS))
    one.add_argument("seed", type=int)
    one.add_argument("--variant", default="base")
    one.add_argument("--epochs", type=int, default=5)
    look = sub.add_parser("branches")
    look.add_argument("runs", nargs="+")
    mem = sub.add_parser("memory")
    mem.add_argument("families", nargs="+", choices=list(FAMILIES))
    mem.add_argument("--d", type=int, default=2)
    mem.add_argument("--batch", type=int, default=128)
    mem.add_argument("--options", nargs="+", default=[], metavar="KEY=VALUE")
    mem.add_argument("--whole", action="store_true",
                     help="the whole count (parameters, optimizer state, saved bytes, gradients)")
    args = parser.parse_args(argv)
    global _PLAIN
    from auglocal_fx import initialization
    from auglocal_fx.synthesis import repair

    _PLAIN = (repair._projection, initialization.InitReference.initialise_)
    if args.command == "train":
        print(json.dumps(train_one(args.family, args.method, args.seed, args.variant, args.epochs)))
    elif args.command == "memory":
        from auglocal_fx.specs import parse_model_kwargs

        measure = whole_memory if args.whole else memory
        measure(args.families, args.d, parse_model_kwargs(args.options) or {}, args.batch)
    else:
        branches(args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
