"""Auxiliary heads: a copy of the network's head (with the authors' BatchNorm1d for one-block
auxiliary networks) or the authors' slim MLP head where the head dominates the parameters."""

from __future__ import annotations

import math
import operator
from typing import Optional

import torch
from torch import fx, nn

from ..errors import AugLocalError
from ..initialization import InitReference
from ..partition import Partition
from ..tracing import SHAPE_KEY


AUX_HEADS = ("auto", "copy", "slim")
AUX_INITS = ("init", "copy")
SLIM_WIDTH = 512


def _insert_norm_before_classifier(head: fx.GraphModule) -> bool:
    """Put a BatchNorm1d in front of the head's classifier (the last Linear on ``(N, C)``).

    The authors' auxiliary networks with one copied block end in pool, flatten, BatchNorm1d,
    linear. Returns ``False`` where the head has no such classifier (a convolutional one).
    """
    for node in reversed(list(head.graph.nodes)):
        if node.op != "call_module" or not isinstance(head.get_submodule(node.target), nn.Linear):
            continue
        shape = node.args[0].meta.get(SHAPE_KEY) if isinstance(node.args[0], fx.Node) else None
        if shape is None or len(shape) != 2:
            return False
        linear = head.get_submodule(node.target)
        norm = nn.BatchNorm1d(linear.in_features, device=linear.weight.device,
                              dtype=linear.weight.dtype)
        head.add_submodule("auglocal_classifier_norm", norm)
        with head.graph.inserting_before(node):
            new = head.graph.call_module("auglocal_classifier_norm", (node.args[0],))
        new.meta[SHAPE_KEY] = shape
        node.replace_input_with(node.args[0], new)
        head.graph.lint()
        head.recompile()
        return True
    return False


def _materialize_selections(head: fx.GraphModule) -> None:
    """Copy each token selection (``x[:, 0]``) out of the tensor it views.

    A layer that keeps its input for backward (the classifier, a BatchNorm1d) would otherwise
    keep the selection's whole base alive: a ViT head's normed ``(N, T, C)`` tokens for one
    ``(N, C)`` row, about a twentieth of a ViT-S/16 auxiliary network's saved bytes. The copy
    gives the same values and gradients.
    """
    copied = False
    for node in list(head.graph.nodes):
        if node.op != "call_function" or node.target is not operator.getitem:
            continue
        base = node.args[0]
        shape = node.meta.get(SHAPE_KEY)
        base_shape = base.meta.get(SHAPE_KEY) if isinstance(base, fx.Node) else None
        if not isinstance(shape, torch.Size) or not isinstance(base_shape, torch.Size):
            continue
        if math.prod(shape) >= math.prod(base_shape):
            continue
        with head.graph.inserting_after(node):
            copy = head.graph.call_method("contiguous", (node,))
        copy.meta[SHAPE_KEY] = shape
        node.replace_all_uses_with(copy, delete_user_cb=lambda user: user is not copy)
        copied = True
    if copied:
        head.graph.lint()
        head.recompile()


def validate_aux_head(aux_head: str) -> None:
    """Raises AugLocalError for an unknown ``aux_head``."""
    if aux_head not in AUX_HEADS:
        raise AugLocalError(
            f"unknown auxiliary head {aux_head!r}: choose one of {', '.join(AUX_HEADS)} (auto: "
            "slim where the classifier head holds most of the network's parameters)"
        )


def validate_aux_init(aux_init: str) -> None:
    """Raises AugLocalError for an unknown ``aux_init``."""
    if aux_init not in AUX_INITS:
        raise AugLocalError(
            f"unknown auxiliary initialisation {aux_init!r}: choose one of {', '.join(AUX_INITS)} "
            "(copy: start the copies from the source blocks' weights; init: draw them afresh)"
        )


def choose_aux_head(partition: Partition, aux_head: str = "auto") -> str:
    """``"copy"`` or ``"slim"``: what ``aux_head`` means for this network.

    ``"auto"`` is ``"slim"`` where the head (with a ``pre_logits`` MLP) holds at least half of
    the network's parameters, as VGG's 120M-parameter classifier does: a copy per auxiliary
    network would multiply it; otherwise ``"copy"``, the method's own head.
    """
    validate_aux_head(aux_head)
    if aux_head != "auto":
        return aux_head
    head = sum(p.numel() for p in partition.head.eval_graph.parameters())
    body = sum(p.numel() for b in partition.blocks for p in b.eval_graph.parameters())
    return "slim" if head >= body else "copy"


def slim_head(num_classes: int, device: torch.device, dtype: torch.dtype = torch.float32,
              init: Optional[InitReference] = None) -> nn.Sequential:
    """The authors' auxiliary head for VGG on ImageNet (``exp_imagenet``'s ``AuxClassifier_VGG``).

    Flatten, average-pool the flat features to 512 values, two 512-wide Linear + BatchNorm1d +
    ReLU layers, then the classifier: about 0.8M parameters at 1000 classes, whatever the
    primary head's size. Works on any layout (maps or tokens are flattened).
    """
    head = nn.Sequential(
        nn.Flatten(),
        nn.AdaptiveAvgPool1d(SLIM_WIDTH),
        nn.Linear(SLIM_WIDTH, SLIM_WIDTH), nn.BatchNorm1d(SLIM_WIDTH), nn.ReLU(inplace=True),
        nn.Linear(SLIM_WIDTH, SLIM_WIDTH), nn.BatchNorm1d(SLIM_WIDTH), nn.ReLU(inplace=True),
        nn.Linear(SLIM_WIDTH, num_classes),
    ).to(device=device, dtype=dtype)
    if init is not None:
        with torch.no_grad():
            for module in head.modules():
                init.initialise_(module, {})
    return head


def _num_classes(partition: Partition) -> int:
    output = next(n for n in partition.head.eval_graph.graph.nodes if n.op == "output")
    return int(output.args[0].meta[SHAPE_KEY][-1])
