"""Partition a traced network into indivisible local blocks and the classifier head.

docs/method.md, rule 1: a *cut point* is a node after which the only value the rest of the graph
still needs is that node's output. Segments between consecutive cut points are indivisible; a
segment without a weight layer (conv / linear) joins the block before it. The head starts at
the last global spatial reduction before the classifier, or at the classifier itself where it
is a convolution applied before pooling (SqueezeNet).
"""

from __future__ import annotations

import operator
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn.functional as F
from torch import fx, nn

from .errors import AugLocalError
from .graph_blocks import (GraphBlock, extract_graph, inside_unit, is_boundary_value, merge_shared,
                           repeated_classes, weight_keys)
from .heads import StreamsReachHead, has_weight_layer, head_start, is_norm
from .layouts import input_layout, layout_of, resolution
from .tracing import SHAPE_KEY, TracedModel
from .tuple_cuts import (boundary_values, head_gap, later_head_gap, split_large_blocks,
                         split_large_units)

__all__ = ["GraphBlock", "Partition", "partition_blocks", "find_cut_points"]


@dataclass
class _GraphPartition:
    """Blocks and head of one graph, as lists of nodes."""

    input_node: fx.Node
    blocks: List[List[fx.Node]]
    head: List[fx.Node]
    head_inputs: Tuple[fx.Node, ...]  # the values the head takes (several streams: a tuple)
    inputs: List[Tuple[fx.Node, ...]] = field(default_factory=list)  # each block's input values


@dataclass
class Partition:
    """The local blocks and the head of a network.

    Attributes:
        blocks: ``L`` primary blocks, in order.
        head: global pooling + classifier.
        output_shapes: the shapes of the tensors each block returns, for one example: one
            shape ``(C, H, W)`` (or ``(C,)``, ``(T, C)``), several where its boundary carries a
            tuple.
        block_names: the module names each block covers.
        head_names: the module names of the head.
        input_layouts: the layout each block and the head take (see :mod:`auglocal_fx.layouts`).
    """

    blocks: List[GraphBlock]
    head: GraphBlock
    output_shapes: List[Tuple[Tuple[int, ...], ...]]
    block_names: List[List[str]]
    head_names: List[str] = field(default_factory=list)
    input_layouts: List[str] = field(default_factory=list)

    @property
    def block_shapes(self) -> List[Tuple[int, ...]]:
        """Each block's output shape for one example; of the last element where the block
        returns a tuple (the newest stream)."""
        return [shapes[-1] for shapes in self.output_shapes]

    def boundary_shape(self, j: int) -> Union[Tuple[int, ...], Tuple[Tuple[int, ...], ...]]:
        """Block ``j``'s output as a module after it takes it: one shape, or a tuple of shapes."""
        shapes = self.output_shapes[j]
        return shapes if len(shapes) > 1 else shapes[0]

    def output_arity(self, j: int) -> int:
        """How many tensors block ``j`` returns (1 unless its boundary carries a tuple)."""
        return len(self.output_shapes[j])

    def input_arity(self, j: int) -> int:
        """How many tensors block ``j`` takes."""
        return 1 if j == 0 else self.output_arity(j - 1)

    def output_layout(self, j: int) -> str:
        """The layout of block ``j``'s output (see :mod:`auglocal_fx.layouts`)."""
        if self.input_layouts:
            return self.input_layouts[j + 1]
        return layout_of(self.block_shapes[j])

    @property
    def resolutions(self) -> List[int]:
        """Spatial height of each block's output (1 for non-spatial outputs; token grids count
        their side, without class tokens)."""
        return [resolution(s, self.output_layout(j)) for j, s in enumerate(self.block_shapes)]


def _single_input(graph: fx.Graph) -> fx.Node:
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise AugLocalError(
            f"the model's forward takes {len(placeholders)} inputs; auglocal-fx converts "
            "networks with a single image input"
        )
    return placeholders[0]


def _dependent_nodes(graph: fx.Graph, input_node: fx.Node) -> List[fx.Node]:
    """Nodes computed from the input, in graph order (the input first, no output node)."""
    dependent: Set[fx.Node] = {input_node}
    order = [input_node]
    for node in graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if any(arg in dependent for arg in node.all_input_nodes):
            dependent.add(node)
            order.append(node)
    return order


def find_cut_points(graph: fx.Graph) -> List[fx.Node]:
    """Nodes after which only their own output, a map, tokens or features, is still needed (the
    input counts as one)."""
    input_node = _single_input(graph)
    order = _dependent_nodes(graph, input_node)
    index = {n: i for i, n in enumerate(order)}
    end = len(order)
    last_use = [max((index.get(u, end) for u in n.users), default=i) for i, n in enumerate(order)]
    cuts = [input_node]
    furthest = last_use[0]  # max last use over nodes before position i
    for i in range(1, len(order)):
        if furthest <= i and is_boundary_value(order[i]):
            cuts.append(order[i])
        furthest = max(furthest, last_use[i])
    return cuts


def _split_segments(order_cuts: List[fx.Node], order: List[fx.Node]) -> List[List[fx.Node]]:
    index = {n: i for i, n in enumerate(order)}
    bounds = [index[c] for c in order_cuts]
    return [order[a + 1:b + 1] for a, b in zip(bounds[:-1], bounds[1:])]


def _boundary_cuts(gm: fx.GraphModule, cuts: List[fx.Node], order: List[fx.Node],
                   boundaries: Sequence[str]) -> List[fx.Node]:
    """The cut points after the named modules (user override of the block boundaries)."""
    chosen = [cuts[0]]
    cut_set = set(cuts)
    for name in boundaries:
        inside = [n for n in order if n.op == "call_module" and
                  (n.target == name or str(n.target).startswith(name + "."))]
        inside += [n for n in order if any(k == name or k.startswith(name + ".")
                                           for k in _module_stack(n))]
        if not inside:
            raise AugLocalError(
                f"block boundary {name!r} names no module the traced graph calls; use "
                "`auglocal-fx blocks SPEC` to see the module names"
            )
        last = max(inside, key=order.index)
        if last not in cut_set:
            raise AugLocalError(
                f"the output of module {name!r} is not a block boundary: other values computed "
                "before it are still used after it; choose a module whose output carries everything"
            )
        chosen.append(last)
    return sorted(set(chosen), key=order.index)


def _module_stack(node: fx.Node) -> List[str]:
    stack = node.meta.get("nn_module_stack") or {}
    names = []
    for key, value in stack.items():
        names.append(value[0] if isinstance(value, tuple) else str(key))
    return names


# Operations that keep a function linear in its input (with the weight layers and norms).
_LINEAR_MODULES = (nn.modules.conv._ConvNd, nn.Linear, nn.Identity, nn.Dropout, nn.Flatten,
                   nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
_LINEAR_FUNCTIONS = {operator.add, operator.mul, operator.getitem, getattr, torch.cat,
                     torch.flatten, torch.reshape, torch.permute, torch.transpose, F.pad}
_LINEAR_METHODS = {"flatten", "transpose", "reshape", "view", "permute", "expand", "contiguous",
                   "size", "add", "mul", "unsqueeze", "squeeze"}


def _is_linear_module(module: nn.Module) -> bool:
    # timm's BatchNormAct2d is a norm with an activation inside
    return (isinstance(module, _LINEAR_MODULES) or is_norm(module)) \
        and all(_is_linear_module(child) for child in module.children())


def _has_nonlinearity(gm: fx.GraphModule, nodes: Sequence[fx.Node]) -> bool:
    """Is anything in ``nodes`` other than weight layers, norms and reshaping (conservative)?"""
    for node in nodes:
        if node.meta.get(SHAPE_KEY) is None:
            continue  # size arithmetic, not a function of the features
        if node.op == "call_module":
            if not _is_linear_module(gm.get_submodule(node.target)):
                return True
        elif node.op == "call_function":
            name = getattr(node.target, "__name__", "")
            if node.target not in _LINEAR_FUNCTIONS and not name.startswith("_assert"):
                return True
        elif node.op == "call_method" and node.target not in _LINEAR_METHODS:
            return True
    return False


def _module_cuts(cuts: List[fx.Node], order: List[fx.Node]) -> List[fx.Node]:
    """Drop cut points inside one module's own code (docs/method.md, rule 1).

    A transformer block adds two residuals in its own ``forward`` (attention, then MLP): the
    value between them is a cut point of the graph, but the module is the unit its author
    wrote, so it stays one block. Only modules of a class the network repeats count; a cut
    made by a container (Sequential, ModuleList), by the model's (or a wrapped model's) own
    forward, or one that ends a module, is kept.
    """
    index = {n: i for i, n in enumerate(order)}
    repeated = repeated_classes(order)
    return [cuts[0]] + [cut for cut in cuts[1:]
                        if not inside_unit(cut, order, index[cut], repeated)]


def _join_linear(gm: fx.GraphModule, blocks: List[List[fx.Node]]) -> List[List[fx.Node]]:
    """A linear piece joins the block after it.

    A ViT's patch embedding, Swin's patch merging, a linear bottleneck's projection: trained
    alone it would be a linear map under a classifier; with the next block it is that block's
    downsampling or input projection.
    """
    merged: List[List[fx.Node]] = []
    carry: List[fx.Node] = []
    for k, nodes in enumerate(blocks):
        if k < len(blocks) - 1 and not _has_nonlinearity(gm, nodes):
            carry += nodes
        else:
            merged.append(carry + nodes)
            carry = []
    return merged


def _partition_graph(gm: fx.GraphModule, boundaries: Optional[Sequence[str]],
                     shared_parameters: str = "sum") -> _GraphPartition:
    graph = gm.graph
    input_node = _single_input(graph)
    order = _dependent_nodes(graph, input_node)
    index = {n: i for i, n in enumerate(order)}
    cuts = find_cut_points(graph)
    try:
        head_input = cuts[head_start(gm, cuts, order)]
    except StreamsReachHead as streams:
        # Several streams reach the head: it starts where they cross a gap as one tuple, and
        # the body before it, with no single cut, is split at tuple gaps.
        gap = head_gap(gm, order, streams.reduction)
        if gap is None:
            raise
        if boundaries:
            raise AugLocalError(
                "block boundaries (block_boundaries=) cannot be given for a network whose streams "
                "run side by side from the input to the head; convert without them") from None
        head_input = order[gap]
        body = order[1:gap + 1]
        if not has_weight_layer(gm, body):
            raise AugLocalError("the network has no weight layer before its head")
        blocks = _join_linear(gm, split_large_blocks(gm, [body], order))
    else:
        blocks = _single_cut_blocks(gm, cuts, order, head_input, boundaries)
        gap = None if boundaries else later_head_gap(gm, cuts, order, head_input)
        if gap is not None:
            # Streams that leave the last single cut and meet again as one tuple before the
            # head's token selections (CoaT's stages 3-4 and parallel blocks): the head starts
            # at that tuple gap, and what lies between is split at tuple gaps as a large block.
            rest = order[index[head_input] + 1:gap + 1]
            blocks = _join_linear(gm, blocks[:-1] + split_large_blocks(gm, [blocks[-1], rest], order))
            head_input = order[gap]
    if shared_parameters == "merge":
        blocks, head_input = merge_shared(gm, blocks, order[index[head_input] + 1:], head_input,
                                           input_node)
    head = order[index[head_input] + 1:]
    if not blocks:
        raise AugLocalError(
            "the network has no block before its classifier head: nothing to train locally"
        )
    # The head takes the values live before it: one tensor, or the tuple of several streams
    # (also where blocks sharing parameters with it joined it).
    inputs = boundary_values(order, blocks + [head], input_node)
    return _GraphPartition(input_node=input_node, blocks=blocks, head=head,
                           head_inputs=inputs[-1], inputs=inputs[:-1])


def _single_cut_blocks(gm: fx.GraphModule, cuts: List[fx.Node], order: List[fx.Node],
                       head_input: fx.Node, boundaries: Optional[Sequence[str]]) -> List[List[fx.Node]]:
    """The blocks before a head that takes one tensor: at single cuts, then large ones at tuples."""
    start = cuts.index(head_input)
    body_cuts = cuts[:start + 1] if boundaries else _module_cuts(cuts[:start + 1], order)
    if body_cuts[-1] is not head_input:
        body_cuts.append(head_input)
    if boundaries:
        chosen = _boundary_cuts(gm, body_cuts, order, boundaries)
        if chosen[-1] is not head_input:
            chosen.append(head_input)
        return _split_segments(chosen, order)
    blocks: List[List[fx.Node]] = []
    pending: List[fx.Node] = []
    for segment in _split_segments(body_cuts, order):
        if has_weight_layer(gm, segment):
            blocks.append(pending + segment)
            pending = []
        elif blocks:
            blocks[-1].extend(segment)
        else:
            pending.extend(segment)  # weightless prefix (input scaling): joins block 0
    if pending:
        raise AugLocalError("the network has no weight layer before its head")
    # A block over a third of the parameters is cut where a tuple is live (several streams),
    # then, where still over, at single cuts inside its unit; the pieces join as the blocks do.
    blocks = _join_linear(gm, split_large_blocks(gm, _join_linear(gm, blocks), order))
    return _join_linear(gm, split_large_units(gm, blocks, cuts[:start + 1]))


def _module_targets(nodes: Sequence[fx.Node]) -> List[str]:
    return list(dict.fromkeys(str(n.target) for n in nodes if n.op == "call_module"))


def _block_names(groups: List[List[str]]) -> List[List[str]]:
    """Name each block by the largest modules it holds whole (no other block uses a part)."""
    users: Dict[str, Set[int]] = defaultdict(set)  # module path -> blocks using it or a part of it
    for i, targets in enumerate(groups):
        for target in targets:
            for prefix in _prefixes(target):
                users[prefix].add(i)
    names = []
    for i, targets in enumerate(groups):
        chosen: List[str] = []
        for target in targets:
            prefix = next((p for p in _prefixes(target) if users[p] == {i}), target)
            if prefix not in chosen:
                chosen.append(prefix)
        names.append(chosen)
    return names


def _prefixes(target: str) -> List[str]:
    """``"a.b.c"`` -> ``["a", "a.b", "a.b.c"]``: the module and the modules holding it."""
    parts = target.split(".")
    return [".".join(parts[:depth]) for depth in range(1, len(parts) + 1)]


def partition_blocks(traced: TracedModel, block_boundaries: Optional[Sequence[str]] = None,
                     shared_parameters: str = "sum") -> Partition:
    """Cut a traced model into local blocks and the head.

    Args:
        traced: from :func:`auglocal_fx.tracing.trace_model`.
        block_boundaries: optional module names whose outputs end a block (override).
        shared_parameters: ``"sum"`` keeps blocks that share a parameter apart; ``"merge"``
            merges them (:func:`~auglocal_fx.graph_blocks.merge_shared`).

    Raises:
        AugLocalError: no classifier head, no blocks, or a boundary that is not a cut point.
    """
    eval_part = _partition_graph(traced.eval_graph, block_boundaries, shared_parameters)
    train_part = None
    if traced.train_graph is not None:
        try:
            train_part = _partition_graph(traced.train_graph, block_boundaries, shared_parameters)
        except AugLocalError:
            train_part = None
        if train_part is not None and not _same_blocks(traced, eval_part, train_part):
            train_part = None
        if train_part is None:
            warnings.warn(
                "auglocal-fx: the train-mode graph does not split into the same blocks as the "
                "eval-mode graph; the eval-mode graph is used in both modes (training-only code "
                "outside leaf modules is not applied)",
                stacklevel=2,
            )
    blocks = []
    e_outs = eval_part.inputs[1:] + [eval_part.head_inputs]
    t_outs = [] if train_part is None else train_part.inputs[1:] + [train_part.head_inputs]
    for j, nodes in enumerate(eval_part.blocks):
        eval_gm = extract_graph(traced.eval_graph, nodes, eval_part.inputs[j], f"Block{j}", e_outs[j])
        train_gm = None
        if train_part is not None:
            train_gm = extract_graph(traced.train_graph, train_part.blocks[j], train_part.inputs[j],
                                     f"Block{j}Train", t_outs[j])
            if train_gm.code == eval_gm.code:
                train_gm = None
        fixed = traced.input_size if j == 0 and traced.frozen else None
        blocks.append(GraphBlock(eval_gm, train_gm, fixed))
    head_eval = extract_graph(traced.eval_graph, eval_part.head, eval_part.head_inputs, "Head")
    head_train = None
    if train_part is not None:
        head_train = extract_graph(traced.train_graph, train_part.head, train_part.head_inputs,
                                   "HeadTrain")
        if head_train.code == head_eval.code:
            head_train = None
    head = GraphBlock(head_eval, head_train)
    names = _block_names([_module_targets(n) for n in eval_part.blocks + [eval_part.head]])
    return Partition(
        blocks=blocks,
        head=head,
        output_shapes=[tuple(tuple(n.meta[SHAPE_KEY][1:]) for n in out) for out in e_outs],
        block_names=names[:-1],
        head_names=names[-1],
        input_layouts=[input_layout(b.eval_graph) for b in blocks + [head]],
    )


def _same_blocks(traced: TracedModel, a: _GraphPartition, b: _GraphPartition) -> bool:
    if len(a.blocks) != len(b.blocks) or [len(v) for v in a.inputs + [a.head_inputs]] \
            != [len(v) for v in b.inputs + [b.head_inputs]]:
        return False
    for nodes_a, nodes_b in zip(a.blocks + [a.head], b.blocks + [b.head]):
        if weight_keys(traced.eval_graph, nodes_a) != weight_keys(traced.train_graph, nodes_b):
            return False
    return True
