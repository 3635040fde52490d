"""One training step of each comparison rule, ours against the authors' code, with equal weights.

For CIFAR ResNet-32 (16 local modules) and each rule (DGL, PredSim, InfoPro), builds the
authors' ``LocalResNet`` (``--reference DIR``, a checkout of ChenxiangMA/AugLocal, or
``$AUGLOCAL_REFERENCE``) and ``to_local("paper:resnet32", rule=...)``, copies the authors'
weights into ours (primary network by name; each auxiliary network and decoder layer by layer,
in the order they run), runs one training step of both on the same batch (their forward, which
back-propagates every local loss with their ``run.sh`` weights; our ``LocalNet.train_step``)
and compares the gradient of every parameter, primary and auxiliary (the batch: the first
Fashion-MNIST test images). Equal gradients mean equal training: the accuracy difference
between the two implementations then comes from the random draws alone.

InfoPro's reconstruction target: given the dataset's statistics (as the trainer gives them), we
undo the normalisation as the authors do; the row ``infopro (their target)`` compares that (both
with Fashion-MNIST statistics). Without statistics we rescale each image to [0, 1] by its own
minimum and maximum (docs/method.md rule 13); the row ``infopro`` gives their
``_image_restore`` that fallback target.

Auxiliary networks, decoders, their layers and tensors are paired in order with counts and
shapes checked; a difference stops the script with one line naming it and exit status 1.

    python benchmarks/reference_steps.py --reference ../AugLocal
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

import torch
from torch import nn

from _authors import LOSS_WEIGHTS, rule_resnet32
from _pairs import Mismatch, pairs
from auglocal_fx import to_local
from auglocal_fx.data import dataset_normalization
from auglocal_fx.rules.base import reconstruction_target



def _leaves_in_run_order(module: nn.Module, run) -> List[nn.Module]:
    """Leaf modules with parameters or buffers, in the order a call of ``run()`` executes them."""
    order, hooks = [], []
    for m in module.modules():
        if not list(m.children()) and (list(m.parameters(recurse=False)) or list(m.buffers(recurse=False))):
            hooks.append(m.register_forward_hook(lambda mod, i, o: order.append(mod) if mod not in order else None))
    try:
        with torch.no_grad():
            run()
    finally:
        for hook in hooks:
            hook.remove()
    return order


def _tensors(module: nn.Module) -> List[torch.Tensor]:
    return list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))


def _copy_layers(src: List[nn.Module], dst: List[nn.Module], what: str) -> List[tuple]:
    """Copy ``src``'s (the authors') parameters and buffers into ``dst``, layer by layer, counts and
    shapes checked; the (ours, theirs) parameter pairs."""
    param_pairs = []
    with torch.no_grad():
        for b, a in pairs(dst, src, f"{what} layer", lambda m: type(m).__name__):
            for tb, ta in pairs(_tensors(b), _tensors(a), f"{what} {type(a).__name__} tensor",
                                lambda t: tuple(t.shape)):
                tb.copy_(ta)
            param_pairs += pairs(list(b.parameters(recurse=False)), list(a.parameters(recurse=False)),
                                 f"{what} {type(a).__name__} parameter", lambda t: tuple(t.shape))
    return param_pairs


def compare(reference, rule: str, their_target: bool, batch: int, seed: int) -> dict:
    torch.manual_seed(seed)
    theirs = rule_resnet32(reference, rule, batch, 32)
    stats = dataset_normalization("fashion-mnist") if rule == "infopro" and their_target else None
    ours = to_local("paper:resnet32", rule=rule, input_size=(3, 32, 32), num_classes=10, normalization=stats)
    if rule == "infopro":
        if not their_target:
            # Their decoder's target becomes ours: the image rescaled to [0, 1] per example.
            theirs._image_restore = reconstruction_target
    primary = ours.export().state_dict()
    missing = [k for k in primary if k not in theirs.state_dict()]
    if missing:
        raise Mismatch(f"{rule}: primary parameters the authors' network lacks: {missing[:3]}")
    ours.export().load_state_dict({k: theirs.state_dict()[k] for k in primary}, strict=True)
    aux_pairs = []
    for j, (our_aux, (stage, layer, _)) in enumerate(pairs(list(ours.aux), list(theirs.net_config),
                                                            f"{rule}: auxiliary networks", lambda _: None)):
        h = torch.randn(2, *ours.block_shapes[j])
        their_aux = getattr(theirs, f"aux_classifier_{stage}_{layer}")
        our_classifier = getattr(our_aux, "classifier", our_aux)
        aux_pairs += _copy_layers(_leaves_in_run_order(their_aux, lambda: their_aux(h, torch.zeros(2, dtype=torch.long))),
                     _leaves_in_run_order(our_classifier, lambda: our_classifier(h)), f"aux net {j}")
        if hasattr(our_aux, "decoder") != hasattr(theirs, f"decoder_{stage}_{layer}"):
            raise Mismatch(f"{rule}: aux net {j}: a decoder on one side only")
        if hasattr(our_aux, "decoder"):
            their_dec = getattr(theirs, f"decoder_{stage}_{layer}")
            target = torch.rand(2, 3, 32, 32) if rule == "infopro" else torch.zeros(2, dtype=torch.long)
            aux_pairs += _copy_layers(_leaves_in_run_order(their_dec, lambda: their_dec(h, target)),
                         _leaves_in_run_order(our_aux.decoder, lambda: our_aux.decoder(h)), f"decoder {j}")
    x, y = _batch(batch)
    theirs.train(), ours.train()
    ixx_1, ixy_1, ixx_2, ixy_2 = LOSS_WEIGHTS[rule]
    theirs(img=x, target=y, ixx_1=ixx_1, ixy_1=ixy_1, ixx_2=ixx_2, ixy_2=ixy_2)
    ours.train_step(x, y)
    # Gradients of the primary network by name, of the auxiliary networks in run order.
    their_grads = dict(theirs.named_parameters())
    worst, count, scale = 0.0, 0, 0.0
    for name, p in ours.export().named_parameters():
        q = their_grads[name]
        worst = max(worst, (p.grad - q.grad).abs().max().item())
        scale = max(scale, q.grad.abs().max().item())
        count += 1
    aux_worst = max((p.grad - q.grad).abs().max().item() for p, q in aux_pairs)
    return {"rule": rule + (" (their target)" if rule == "infopro" and their_target else ""),
            "primary tensors": count, "max |grad difference|": worst, "max |grad|": scale,
            "aux tensors": len(aux_pairs), "aux max |grad difference|": aux_worst}


def _batch(batch: int):
    """The first ``batch`` Fashion-MNIST test images at 32 px, normalised as training normalises them."""
    from auglocal_fx.data import build_datasets

    data = build_datasets("fashion-mnist", input_size=32, augment=False).test
    images, labels = zip(*(data[i] for i in range(batch)))
    return torch.stack(images), torch.tensor(labels)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", default=os.environ.get("AUGLOCAL_REFERENCE"))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.reference or not os.path.isfile(os.path.join(args.reference, "networks", "resnet.py")):
        print("no reference folder (--reference or $AUGLOCAL_REFERENCE with networks/resnet.py); nothing to compare")
        return 2
    sys.path.insert(0, os.path.abspath(args.reference))
    import networks.resnet as reference  # the authors' code

    print(f"paper:resnet32, 16 local modules, batch {args.batch_size}, seed {args.seed}, float32 CPU; "
          "gradients after one step")
    print("| rule | primary tensors | max abs gradient difference | max abs gradient | auxiliary tensors "
          "| max abs gradient difference |")
    print("|---|---|---|---|---|---|")
    for rule, their_target in (("dgl", False), ("predsim", False), ("infopro", False), ("infopro", True)):
        try:
            row = compare(reference, rule, their_target, args.batch_size, args.seed)
        except Mismatch as err:
            print(f"reference_steps.py: {err}", file=sys.stderr)
            return 1
        print(f"| {row['rule']} | {row['primary tensors']} | {row['max |grad difference|']:.2e} | "
              f"{row['max |grad|']:.2e} | {row['aux tensors']} | {row['aux max |grad difference|']:.2e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
