"""Block boundaries that carry a small tuple of tensors (several streams, cells, trees).

A single-tensor cut point (:func:`auglocal_fx.partition.find_cut_points`) is a gap between two
nodes where one value is live. NASNet's cells read the two previous cells, TNT carries pixel and
patch embeddings, DLA's trees keep their earlier outputs: such networks have few single cuts,
and one block holds most of the parameters. This module finds the gaps where at most
:data:`MAX_ARITY` tensors are live and splits an over-large block there, so a boundary carries
that tuple (docs/models.md, "Several streams").

Single cuts stay preferred: only a block holding over a third of the parameters is split, at
the gaps of the shallowest module level first (between cells before inside them), and a piece
that is still over a third is split one level deeper. A gap qualifies only where the values
crossing it are handed down to later modules (the next cell, the next block of a stage) and
it lies inside no repeated unit's own code, so a residual block, which merges its shortcut in
its own ``forward``, is never cut. The one gap inside a unit's code that qualifies is where the
code enters a list of units it runs: a stage that computes a value beside the features (GCViT's
global query) and hands both to each of its blocks is cut before its first block too.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

from torch import fx

from .errors import AugLocalError
from .graph_blocks import (enters_unit_list, inside_unit, is_boundary_value, module_path, parameter_ids,
                           repeated_classes)
from .heads import has_weight_layer, is_norm, selection_reduction

__all__ = ["MAX_ARITY", "boundary_values", "head_gap", "later_head_gap", "live_values", "split_large_blocks",
           "split_large_units"]

MAX_ARITY = 3

# A block over this share of the parameters is split at tuple gaps, or inside its unit.
_LARGEST_SHARE = 1 / 3


def live_values(order: Sequence[fx.Node]) -> List[Optional[Tuple[fx.Node, ...]]]:
    """Per position ``i`` of ``order``, the values live across the gap after it, in graph order.

    A value is live when computed at or before ``i`` and used after it (the output node counts
    as a use after every position). ``None`` where more than :data:`MAX_ARITY` values are live,
    or one of them may not cross a boundary
    (:func:`~auglocal_fx.graph_blocks.is_boundary_value`: a size computed from the features, a
    value wider than a map).
    """
    index = {n: i for i, n in enumerate(order)}
    end = len(order)
    last_use = [max((index.get(u, end) for u in n.users), default=i) for i, n in enumerate(order)]
    ending: Dict[int, List[fx.Node]] = {}
    for node, last in zip(order, last_use):
        ending.setdefault(last, []).append(node)
    live: Dict[fx.Node, None] = {}  # insertion order is graph order
    result: List[Optional[Tuple[fx.Node, ...]]] = []
    for i, node in enumerate(order):
        if last_use[i] > i:
            live[node] = None
        for done in ending.get(i, ()):
            live.pop(done, None)
        if len(live) <= MAX_ARITY and all(is_boundary_value(n) for n in live):
            result.append(tuple(live))
        else:
            result.append(None)
    return result


def _common_depth(before: fx.Node, after: fx.Node) -> int:
    """How deep in the module tree the gap between two nodes lies: the levels they share.

    A called module counts as a level, so the gap after a cell's last module call and before
    the next cell's first lies at the level of the cells' parent.
    """
    depth = 0
    for x, y in zip(module_path(before), module_path(after)):
        if x != y:
            break
        depth += 1
    return depth


def _handed_down(values: Sequence[fx.Node], position: int, index: Dict[fx.Node, int],
                 depth: int) -> bool:
    """Are the values live across a gap used after it only inside modules below the gap's level?

    Cells, trees and stages hand the values to their children (the next cell, the next block);
    a residual block merges its shortcut in its own code: a gap there is no boundary.
    """
    for value in values:
        for user in value.users:
            if index.get(user, len(index)) > position and len(module_path(user)) <= depth:
                return False
    return True


def _largest_allowed(gm: fx.GraphModule) -> float:
    """Parameters a block may hold before it is split: a third of the network's."""
    return sum(p.numel() for p in gm.parameters()) * _LARGEST_SHARE


def _parameter_count(gm: fx.GraphModule, nodes: Sequence[fx.Node]) -> int:
    return sum(numel for numel in parameter_ids(gm, nodes).values())


def _split(gm: fx.GraphModule, nodes: List[fx.Node], gaps: Dict[fx.Node, int],
           limit: float, force: bool = False) -> List[List[fx.Node]]:
    """Split ``nodes`` at its tuple gaps of the shallowest level, then deeper where still large.

    ``force``: split even when not over ``limit`` (the network's only block).
    """
    inside = [(k, gaps[n]) for k, n in enumerate(nodes[:-1]) if n in gaps]
    if not inside or (_parameter_count(gm, nodes) <= limit and not force):
        return [nodes]
    shallowest = min(depth for _, depth in inside)
    pieces: List[List[fx.Node]] = []
    start = 0
    for k, depth in inside:
        if depth == shallowest:
            pieces.append(nodes[start:k + 1])
            start = k + 1
    pieces.append(nodes[start:])
    # A piece without a weight layer (an activation, a concatenation) joins the one before it.
    joined: List[List[fx.Node]] = []
    for piece in pieces:
        if joined and not has_weight_layer(gm, piece):
            joined[-1] = joined[-1] + piece
        elif joined and not has_weight_layer(gm, joined[-1]):
            joined[-1] = joined[-1] + piece
        else:
            joined.append(piece)
    if len(joined) == 1:
        # Every gap of this level was inside a weightless piece: try the next level down.
        deeper = {n: d for n, d in gaps.items() if d > shallowest}
        return _split(gm, nodes, deeper, limit, force) if deeper != gaps else [nodes]
    result: List[List[fx.Node]] = []
    for piece in joined:
        deeper = {n: d for n, d in gaps.items() if d > shallowest}
        result.extend(_split(gm, piece, deeper, limit) if deeper else [piece])
    return result


def split_large_blocks(gm: fx.GraphModule, blocks: List[List[fx.Node]],
                       order: Sequence[fx.Node]) -> List[List[fx.Node]]:
    """Split each block holding over a third of ``gm``'s parameters at its tuple gaps.

    A network without any single cut (one block) is split however its parameters lie.

    Args:
        gm: the traced network.
        blocks: the blocks found at single cuts, as node lists in graph order.
        order: the nodes computed from the input, in graph order.

    Returns:
        The blocks, the large ones split where at most :data:`MAX_ARITY` tensors are live.
    """
    limit = _largest_allowed(gm)
    alone = len(blocks) == 1
    if not alone and not any(_parameter_count(gm, b) > limit for b in blocks):
        return blocks
    live = live_values(order)
    index = {n: i for i, n in enumerate(order)}
    repeated = repeated_classes(order)
    gaps: Dict[fx.Node, int] = {}
    for i, values in enumerate(live[:-1]):
        if not values or len(values) < 2:
            continue
        # The list exception is for tuple gaps only: at single cuts it would split units that
        # call a Sequential of conv layers (HGNetV2's aggregation) and move stage code across
        # boundaries (NesT's blockify, FastViT's positional convs), with no block too large.
        if inside_unit(order[i], order, i, repeated) and not enters_unit_list(order[i], order[i + 1]):
            continue
        depth = _common_depth(order[i], order[i + 1])
        if _handed_down(values, i, index, depth):
            gaps[order[i]] = depth
    result: List[List[fx.Node]] = []
    for nodes in blocks:
        result.extend(_split(gm, nodes, gaps, limit, force=alone))
    return result


def split_large_units(gm: fx.GraphModule, blocks: List[List[fx.Node]],
                      cuts: Sequence[fx.Node]) -> List[List[fx.Node]]:
    """Cut each block holding over a third of ``gm``'s parameters at its single cuts.

    Rule 1 keeps a unit its author wrote whole. Where one unit holds over a third of the
    parameters (PVT-v2-B0's last blocks: attention, then an MLP eight times wider), the value
    between its two residual sums is still a single cut: everything after it needs that value
    alone. Such a block is cut there into as few pieces as keep each at most a third (pieces
    joined from the left while they fit); a piece without a weight layer joins its neighbour.

    Args:
        gm: the traced network.
        blocks: the blocks, as node lists in graph order.
        cuts: every single cut point of the graph, those inside units included.

    Returns:
        The blocks, the large ones cut at their inner single cuts.
    """
    limit = _largest_allowed(gm)
    cut_set = set(cuts)
    result: List[List[fx.Node]] = []
    for nodes in blocks:
        inner = [k for k, n in enumerate(nodes[:-1]) if n in cut_set]
        if not inner or _parameter_count(gm, nodes) <= limit:
            result.append(nodes)
            continue
        pieces: List[List[fx.Node]] = []
        for a, b in zip([-1] + inner, inner + [len(nodes) - 1]):
            piece = nodes[a + 1:b + 1]
            if pieces and (not has_weight_layer(gm, piece) or not has_weight_layer(gm, pieces[-1])
                           or _parameter_count(gm, pieces[-1] + piece) <= limit):
                pieces[-1] = pieces[-1] + piece
            else:
                pieces.append(piece)
        result.extend(pieces)
    return result


def boundary_values(order: Sequence[fx.Node], blocks: Sequence[Sequence[fx.Node]],
                    input_node: fx.Node) -> List[Tuple[fx.Node, ...]]:
    """The values each block takes: the input, then the values live after each block.

    Raises:
        AugLocalError: a gap between blocks carries more than :data:`MAX_ARITY` values (internal).
    """
    live = live_values(order)
    index: Dict[fx.Node, int] = {n: i for i, n in enumerate(order)}
    inputs: List[Tuple[fx.Node, ...]] = [(input_node,)]
    for nodes in blocks[:-1]:
        values = live[index[nodes[-1]]]
        if not values:
            raise AugLocalError(f"internal: the gap after {nodes[-1].name} carries more than {MAX_ARITY} values")
        inputs.append(values)
    return inputs



def head_gap(gm: fx.GraphModule, order: Sequence[fx.Node], reduction: fx.Node) -> Optional[int]:
    """Where a head reached by several streams starts (CrossViT's two class-token heads).

    The last gap before ``reduction`` (the first token selection the classifier reads) that
    carries a tuple of at most :data:`MAX_ARITY` tensors and lies inside no repeated unit; as
    for a head taking one tensor, the final norms before it join the head (the gap moves back
    over weightless pieces to before the earliest holding a norm).

    Returns:
        The position in ``order`` of the node after which the head starts, or None.
    """
    live = live_values(order)
    index = {n: i for i, n in enumerate(order)}
    repeated = repeated_classes(order)
    gaps = [i for i in range(1, index[reduction])
            if live[i] and len(live[i]) > 1 and not inside_unit(order[i], order, i, repeated)]
    if not gaps:
        return None
    start = gaps[-1]
    for earlier, later in zip(reversed(gaps[:-1]), reversed(gaps)):
        piece = order[earlier + 1:later + 1]
        if has_weight_layer(gm, piece):
            break
        if any(n.op == "call_module" and is_norm(gm.get_submodule(n.target)) for n in piece):
            start = earlier
    return start


def later_head_gap(gm: fx.GraphModule, cuts: List[fx.Node], order: List[fx.Node],
                   head_input: fx.Node) -> Optional[int]:
    """Where a head that is no cut point starts when streams meet again before it (CoaT).

    ``head_input`` is the last single cut before the head's first token selection; where the
    streams leaving it cross a later gap as one tuple (:func:`head_gap`) with weight layers in
    between, the head starts at that gap instead.

    Returns:
        The position of that gap in ``order``, or None.
    """
    reduction = selection_reduction(gm, cuts, order)
    if reduction is None:
        return None
    gap = head_gap(gm, order, reduction)
    start = order.index(head_input)
    if gap is None or gap <= start or not has_weight_layer(gm, order[start + 1:gap + 1]):
        return None
    return gap
