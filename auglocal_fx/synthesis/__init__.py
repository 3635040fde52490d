"""Synthesis of auxiliary networks from fresh copies of later blocks (docs/method.md, rule 5).

``aux_j`` is a fresh-initialised copy of each block in ``S_j``, in order, then a fresh copy of
the head. Each copy is the block's traced subgraph, adapted to what actually reaches it:

* stride: a copy reduces the resolution by exactly the factor the plan gives (1 or 2). Strides
  of the original's reducing convolutions and poolings are lowered (a removed 2x pooling becomes
  nothing), or the first spatial operation on each path from the input gets stride 2; a copy
  with no spatial operation (only 1x1 convolutions, as MobileNetV3's last block) gets a 2x2
  average pooling of its input instead, since a strided 1x1 convolution would drop three of every
  four positions unseen (the same size and memory, every position read);
* channels: a weight layer or norm that receives another channel count is re-created for it
  (same class, same options, new width); where the changed input reaches a residual merge
  through no weight layer (an identity shortcut), that shortcut becomes a projection
  (1x1 conv with the block's stride + BatchNorm), as a residual block with different in/out
  shapes is normally built;
* anything else that cannot take the new shape (a depthwise convolution, a hard-coded split)
  gets a 1x1 conv + BatchNorm in front of it that restores the channel count it was built for;
* a copy that cannot be re-strided or re-widened at all (attention windows, a channel shuffle,
  attention built for one feature size), and a token or channels-last copy whose input is not
  its own, keeps its strides and widths and takes its original input shape through a
  :class:`~auglocal_fx.layouts.ShapeAdapter` (rule 11).

Resolution (``aux_resolution``): ``"paper"`` (the default) runs each copy at the planned
resolution, at most one 2x reduction per copy, as the authors' code does for ResNets;
``"source"`` first average-pools each channels-first copy's input to the resolution its source
block's input has in the primary network and keeps the source's strides (pooling rather than
larger strides keeps the copy's structure), so a copy of a late block runs at that block's
resolution and its activations shrink as the primary network's do.

The head is a fresh copy of the network's head, or the authors' slim MLP head where the head
holds most of the parameters (``aux_head``, rule 12).

Weights (``aux_init``): ``"init"`` draws every copy afresh by the source model's init rule (the
paper's and the authors' choice); ``"copy"`` starts each copy from the weights its source
block (or head) holds now, for fine-tuning a pretrained network: every parameter and buffer
whose shape the adaptation kept (a re-strided convolution, the norms after a widened one, the
classifier) takes the source's value, and the rest (a widened layer's weight, projection
shortcuts and input adapters added by the adaptation, the BatchNorm1d before a one-block
auxiliary classifier, a slim head) is drawn by the init rule.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..initialization import InitReference
from ..layouts import NCHW, resolution
from ..partition import Partition
from ..planning import AuxPlan
from .copies import CopyTemplates, adapt_copy, warn_adapters
from .strides import AUX_RESOLUTIONS, source_pooling, validate_aux_resolution
from .tuples import adapt_tuple_copy, element_layouts, tuple_head
# Re-exported: the rest of the package imports these names from here (SLIM_WIDTH: the tests).
from .heads import (AUX_HEADS, AUX_INITS, SLIM_WIDTH, _insert_norm_before_classifier,  # noqa: F401
                    _materialize_selections, _num_classes, choose_aux_head, slim_head, validate_aux_head,
                    validate_aux_init)

__all__ = ["AUX_HEADS", "AUX_INITS", "AUX_RESOLUTIONS", "AuxNet", "CopyTemplates", "synthesize_aux_net",
           "adapt_copy", "warn_adapters", "slim_head", "choose_aux_head", "validate_aux_head", "validate_aux_init",
           "validate_aux_resolution"]


class AuxNet(nn.Sequential):
    """An auxiliary network: adapted block copies followed by a head copy.

    Attributes:
        plan: the :class:`~auglocal_fx.planning.AuxPlan` it was built from.
        reductions: per copied block, the factor by which the copy divides the height of its
            input, pooling and strides together (``round(input height / output height)``: a
            stride 2 on 7 px gives 4 px, a reduction of 2). Under ``aux_resolution="paper"``
            these are the plan's strides unless a copy had to keep its own; under ``"source"``
            they include the pooling to the source block's resolution.
    """

    def __init__(self, modules: Sequence[nn.Module], plan: AuxPlan, reductions: Sequence[int]):
        super().__init__(*modules)
        self.plan = plan
        self.reductions: Tuple[int, ...] = tuple(int(r) for r in reductions)

    def forward(self, *x: torch.Tensor) -> torch.Tensor:
        # A boundary carrying a tuple: each copy takes its elements as arguments.
        h = x if len(x) > 1 else x[0]
        for module in self:
            h = module(*h) if isinstance(h, tuple) else module(h)
        return h


def _reduction(before: int, after: int) -> int:
    """The factor a copy divides the height by (at least 1; flat features have height 1)."""
    return max(1, round(before / after)) if after > 0 else 1


def _module_list(names: Sequence[str], most: int = 3) -> str:
    shown = ", ".join(names[:most]) or "no modules"
    return shown + (f", ... ({len(names)} modules)" if len(names) > most else "")


def synthesize_aux_net(partition: Partition, plan: AuxPlan,
                       init: Optional[InitReference] = None,
                       notes: Optional[List[Tuple[str, str, str]]] = None,
                       aux_head: str = "auto", aux_init: str = "init",
                       aux_resolution: str = "paper",
                       templates: Optional[CopyTemplates] = None) -> AuxNet:
    """Build the auxiliary network of block ``plan.block`` (docs/method.md, rules 5 and 10).

    Args:
        partition: the primary network's blocks and head, with recorded shapes.
        plan: which blocks to copy and each copy's stride.
        init: initial-value statistics of the source model (see
            :class:`~auglocal_fx.initialization.InitReference`); ``None``: PyTorch's defaults.
        notes: collects input adapters (see :func:`adapt_copy`); ``None``: warn here.
        aux_head: ``"copy"`` (a fresh copy of the network's head), ``"slim"`` (see
            :func:`slim_head`) or ``"auto"`` (see :func:`choose_aux_head`).
        aux_init: ``"init"`` (every copy drawn afresh) or ``"copy"`` (copies start from the
            source's weights where the shape was kept; see the module docstring).
        aux_resolution: ``"paper"`` (the planned strides: at most one 2x reduction per copy,
            as the authors' code) or ``"source"`` (each channels-first copy's input is first
            average-pooled to its source block's input resolution and the copy keeps its
            source's strides, so its activations shrink as the primary network's do).
        templates: the conversion's adaptations so far (:class:`CopyTemplates`), which this
            call adds to; give every call of one conversion the same one. ``None``: a new one
            for this network alone.

    Returns:
        An :class:`AuxNet` mapping block ``j``'s output to ``(N, num_classes)`` logits. With one
        copied block, the head copy has a BatchNorm1d before its linear classifier, as the
        authors' code builds it.
    """
    validate_aux_init(aux_init)
    validate_aux_resolution(aux_resolution)
    copy_weights = aux_init == "copy"
    templates = templates if templates is not None else CopyTemplates()
    if any(partition.output_arity(k) > 1 for k in (plan.block, *plan.selected)):
        return _synthesize_tuple(partition, plan, init, notes, aux_head, copy_weights, templates)
    shape = partition.block_shapes[plan.block]
    layout = partition.output_layout(plan.block)
    planned = resolution(shape, layout)
    modules: List[nn.Module] = []
    reductions: List[int] = []
    for k, stride in zip(plan.selected, plan.strides):
        label = f"block {k} ({_module_list(partition.block_names[k])})"
        current = resolution(shape, layout)
        if current != planned:
            # An earlier copy kept its own resolution (input adapter): reduce while this copy's
            # input is finer than the original block's output.
            target = partition.resolutions[k]
            stride = 2 if current > 0 and target > 0 and round(math.log2(current / target)) >= 1 else 1
        pool_to = None
        if aux_resolution == "source":
            pool_to, stride = source_pooling(partition.blocks[k].eval_graph, shape, layout == NCHW, stride)
        copy_gm, shape = adapt_copy(partition.blocks[k].eval_graph, shape, stride,
                                    f"Aux{plan.block}CopyOfBlock{k}", init, label, layout, notes,
                                    copy_weights, pool_to, templates)
        # Under "source" the plan no longer says where the copies are: follow what they give.
        planned = resolution(shape, partition.output_layout(k)) if stride is None else math.ceil(planned / stride)
        layout = partition.output_layout(k)
        modules.append(copy_gm)
        # What the copy does, read from the shapes it gives, not from the plan it was built to.
        reductions.append(_reduction(current, resolution(shape, layout)))
    if choose_aux_head(partition, aux_head) == "slim":
        reference = next(partition.head.eval_graph.parameters())
        head: nn.Module = slim_head(_num_classes(partition), reference.device, reference.dtype,
                                    init)
    else:
        head, _ = adapt_copy(partition.head.eval_graph, shape, None, f"Aux{plan.block}Head", init,
                             f"the head ({_module_list(partition.head_names)})", layout, notes,
                             copy_weights, templates=templates)
        _materialize_selections(head)
        if len(plan.selected) == 1:
            _insert_norm_before_classifier(head)
    modules.append(head)
    return AuxNet(modules, plan, reductions)


def _note_adapters(label: str, adapted: Sequence[int], shapes: Sequence[Tuple[int, ...]],
                   own: Sequence[Tuple[int, ...]], notes: Optional[List[Tuple[str, str, str]]]) -> None:
    """Record (or warn) that element ``adapted[0]`` of a tuple reaches a copy in another shape."""
    if not adapted:
        return
    note = (label, "shape", f"input {adapted[0]} has shape {shapes[adapted[0]]}, it takes {own[adapted[0]]}")
    if notes is None:
        warn_adapters([note], stacklevel=4)
    else:
        notes.append(note)


def _synthesize_tuple(partition: Partition, plan: AuxPlan, init: Optional[InitReference],
                      notes: Optional[List[Tuple[str, str, str]]], aux_head: str,
                      copy_weights: bool, templates: CopyTemplates) -> AuxNet:
    """:func:`synthesize_aux_net` where a boundary on the way carries a tuple (see ``tuples``)."""
    shapes = partition.output_shapes[plan.block]
    layouts = element_layouts(shapes, partition.output_layout(plan.block))
    modules: List[nn.Module] = []
    reductions: List[int] = []
    for k in plan.selected:
        source = partition.blocks[k].eval_graph
        own = partition.output_shapes[k - 1]
        own_layouts = element_layouts(own, partition.input_layouts[k])
        label = f"block {k} ({_module_list(partition.block_names[k])})"
        copy_gm, out, adapted = adapt_tuple_copy(source, shapes, layouts, own_layouts,
                                                 f"Aux{plan.block}CopyOfBlock{k}", init, copy_weights)
        _note_adapters(label, adapted, shapes, own, notes)
        modules.append(copy_gm)
        # The newest stream (the last element) stands for the copy's reduction, as it stands for
        # the boundary's shape in ``Partition.block_shapes``.
        before = resolution(shapes[-1], layouts[-1])
        shapes, layouts = out, element_layouts(out, partition.output_layout(k))
        reductions.append(_reduction(before, resolution(shapes[-1], layouts[-1])))
    slim = choose_aux_head(partition, aux_head) == "slim"
    reference = next(partition.head.eval_graph.parameters())
    head: nn.Module
    if len(shapes) > 1 and not slim and partition.head.arity == len(shapes):
        # The network's head takes a tuple too (CrossViT's streams): copy it, as a block.
        head_layouts = element_layouts(partition.output_shapes[-1], partition.input_layouts[-1])
        head, _, adapted = adapt_tuple_copy(partition.head.eval_graph, shapes, layouts, head_layouts,
                                            f"Aux{plan.block}Head", init, copy_weights)
        _note_adapters(f"the head ({_module_list(partition.head_names)})", adapted, shapes,
                       partition.output_shapes[-1], notes)
    elif len(shapes) > 1 or partition.head.arity > 1:
        head = tuple_head(shapes, layouts, _num_classes(partition), slim,
                          reference.device, reference.dtype, init)
    elif slim:
        head = slim_head(_num_classes(partition), reference.device, reference.dtype, init)
    else:
        head, _ = adapt_copy(partition.head.eval_graph, shapes[0], None, f"Aux{plan.block}Head", init,
                             f"the head ({_module_list(partition.head_names)})", layouts[0], notes,
                             copy_weights, templates=templates)
        _materialize_selections(head)
        if len(plan.selected) == 1:
            _insert_norm_before_classifier(head)
    modules.append(head)
    return AuxNet(modules, plan, reductions)
