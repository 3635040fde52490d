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
same rule, for scale.

    python benchmarks/reference_structures.py --reference ../AugLocal
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

import torch
from torch import nn

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
    failures = 0
    for arch, blocks in _DEPTH_BLOCKS.items():
        for d in args.depths:
            torch.manual_seed(d)
            ours = to_local(f"paper:{arch}", d=d)
            theirs_model = getattr(reference, arch)(
                local_module_num=blocks - (d - 1), batch_size=2, image_size=32, dataset="cifar10",
                class_num=10, aux_net_config="unifSamp", rule="AugLocal", aux_net_depth=d - 1,
                is_pyramid=True, paramid_coeff=0.5)
            theirs = [getattr(theirs_model, f"aux_classifier_{a}_{b}").head for a, b, _ in theirs_model.net_config]
            same = const_ok = 0
            ratios = []
            for j, aux in enumerate(theirs):
                x = torch.randn(2, *ours.block_shapes[j])
                a, b = _layers(aux, x), _layers(ours.aux[j], x)
                if [r[:3] for r in a] != [r[:3] for r in b]:
                    continue
                same += 1
                ok = True
                for ra, rb in zip(a, b):
                    for pa, pb in zip(ra[3].parameters(recurse=False), rb[3].parameters(recurse=False)):
                        ca, cb = bool((pa == pa.flatten()[0]).all()), bool((pb == pb.flatten()[0]).all())
                        if ca or cb:
                            ok &= ca and cb and bool(pa.flatten()[0] == pb.flatten()[0])
                        elif pa.numel() >= 256:
                            rule = _authors_std(ra[3], pa)
                            ratios.append((pb.std().item() / rule, pa.std().item() / rule))
                const_ok += ok
            ours_r, theirs_r = [r[0] for r in ratios], [r[1] for r in ratios]
            failures += (same != len(theirs)) + (const_ok != len(theirs)) + any(abs(r - 1) > 0.1 for r in ours_r)
            print(f"| {arch} | {d} | {len(theirs)} (ours {len(ours.aux)}) | {same} | {const_ok} | "
                  f"{len(ratios)} | {min(ours_r):.3f}..{max(ours_r):.3f} | {min(theirs_r):.3f}..{max(theirs_r):.3f} |")
    print("\nall equal" if not failures else f"\n{failures} differences")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
