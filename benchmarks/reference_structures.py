"""Auxiliary networks side by side with the authors' code: layers, shapes and initialisation.

For the paper's CIFAR ResNet-32 and ResNet-110 at d = 2..6 (pyramid 0.5), builds every
auxiliary network with ``to_local`` and with the authors' ``LocalResNet`` (``--reference DIR``,
a checkout of ChenxiangMA/AugLocal, or ``$AUGLOCAL_REFERENCE``), runs both on the same input
and compares, per auxiliary network, the layers with parameters (type, parameter shapes, output
shape; in a canonical order, since our copies run a projection shortcut where the source block
runs it) and their initial values: constants must be equal, and every other tensor of at least 256
values (smaller ones, such as a 10-way bias, are too few for a sample standard deviation to
say anything) must have the standard deviation of the authors' rule (He fan-out normal convs,
PyTorch's default linear layers) within 10%. The authors' own tensors are measured against the
same rule, for scale. Auxiliary networks are paired in order and must be as many on both
sides; layers and tensors are paired with their shapes checked. Every difference is a line after
the table and makes the exit status 1.

    python benchmarks/reference_structures.py --reference ../AugLocal
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

import torch
from torch import nn

from _pairs import Mismatch, pairs
from auglocal_fx import to_local

_DEPTH_BLOCKS = {"resnet32": 16, "resnet110": 55}


def _layers(module: nn.Module, x: torch.Tensor) -> List[tuple]:
    records, hooks = [], []
    for m in module.modules():
        if not list(m.children()) and list(m.parameters(recurse=False)):
            hooks.append(m.register_forward_hook(lambda mod, i, o: records.append(
                (type(mod).__name__, tuple(tuple(p.shape) for p in mod.parameters(recurse=False)),
                 tuple(o.shape), mod))))
    module.eval()
    with torch.no_grad():
        module(x)
    for hook in hooks:
        hook.remove()
    return sorted(records, key=lambda r: r[:3])


def _signature(record: tuple) -> tuple:
    return record[:3]  # type, parameter shapes, output shape


def _tensor_shape(tensor: torch.Tensor) -> tuple:
    return tuple(tensor.shape)


def _authors_std(module: nn.Module, param: torch.Tensor) -> float:
    """The std the authors' code draws ``param`` with: He fan-out convs, PyTorch's default linears."""
    if isinstance(module, nn.Conv2d):
        return (2.0 / (module.kernel_size[0] * module.kernel_size[1] * module.out_channels)) ** 0.5
    return (1.0 / (3.0 * module.in_features)) ** 0.5  # U(+-1/sqrt(fan_in)) for weight and bias


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", default=os.environ.get("AUGLOCAL_REFERENCE"))
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 3, 4, 5, 6])
    args = parser.parse_args(argv)
    if not args.reference or not os.path.isfile(os.path.join(args.reference, "networks", "resnet.py")):
        print("no reference folder (--reference or $AUGLOCAL_REFERENCE with networks/resnet.py); nothing to compare")
        return 2
    sys.path.insert(0, os.path.abspath(args.reference))
    import networks.resnet as reference  # the authors' code

    print("| network | d | aux nets | same layers | constants equal | tensors | ours: std / rule | theirs: std / rule |")
    print("|---|---|---|---|---|---|---|---|")
    problems: List[str] = []
    for arch, blocks in _DEPTH_BLOCKS.items():
        for d in args.depths:
            torch.manual_seed(d)
            ours = to_local(f"paper:{arch}", d=d)
            theirs_model = getattr(reference, arch)(
                local_module_num=blocks - (d - 1), batch_size=2, image_size=32, dataset="cifar10",
                class_num=10, aux_net_config="unifSamp", rule="AugLocal", aux_net_depth=d - 1,
                is_pyramid=True, paramid_coeff=0.5)
            theirs = [getattr(theirs_model, f"aux_classifier_{a}_{b}").head for a, b, _ in theirs_model.net_config]
            if len(ours.aux) != len(theirs):
                problems.append(f"{arch} d={d}: ours has {len(ours.aux)} auxiliary networks, the authors' {len(theirs)}")
            same = const_ok = 0
            ratios = []
            for j, (aux, our_aux) in enumerate(zip(theirs, ours.aux)):  # the counts are checked above
                x = torch.randn(2, *ours.block_shapes[j])
                try:
                    layers = pairs(_layers(our_aux, x), _layers(aux, x), f"{arch} d={d} aux net {j} layer", _signature)
                except Mismatch as err:
                    problems.append(str(err))
                    continue
                same += 1
                ok = True
                for rb, ra in layers:
                    for pb, pa in pairs(list(rb[3].parameters(recurse=False)), list(ra[3].parameters(recurse=False)),
                                        f"{arch} d={d} aux net {j} {ra[0]} tensor", _tensor_shape):
                        ca, cb = bool((pa == pa.flatten()[0]).all()), bool((pb == pb.flatten()[0]).all())
                        if ca or cb:
                            ok &= ca and cb and bool(pa.flatten()[0] == pb.flatten()[0])
                        elif pa.numel() >= 256:
                            rule = _authors_std(ra[3], pa)
                            ratios.append((pb.std().item() / rule, pa.std().item() / rule))
                if not ok:
                    problems.append(f"{arch} d={d} aux net {j}: constants differ from the authors'")
                const_ok += ok
            ours_r, theirs_r = [r[0] for r in ratios], [r[1] for r in ratios]
            off = [r for r in ours_r if abs(r - 1) > 0.1]
            if off:
                problems.append(f"{arch} d={d}: {len(off)} tensors' std off the authors' rule by more than 10%")
            print(f"| {arch} | {d} | {len(theirs)} (ours {len(ours.aux)}) | {same} | {const_ok} | "
                  f"{len(ratios)} | {_range(ours_r)} | {_range(theirs_r)} |")
    if problems:
        print(f"\n{len(problems)} differences:")
        for problem in problems:
            print(problem)
        return 1
    print("\nall equal")
    return 0


def _range(values: List[float]) -> str:
    return f"{min(values):.3f}..{max(values):.3f}" if values else "-"


if __name__ == "__main__":
    sys.exit(main())
