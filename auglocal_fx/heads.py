"""Where the classifier head starts in a traced network (docs/method.md, rule 1).

The head is the classifier part: it starts at the last global spatial reduction before the
classifier (a pooling, token pooling such as ``x[:, 0]``, or a flatten where the classifier
reads a whole map), or at the classifier itself where it is a convolution applied before
pooling (SqueezeNet); a final norm and a conv-MLP written before the pooling join it. Where no
pooling is a cut point (VOLO's auxiliary token head, CoaT's aggregated streams), it starts at
the last cut point before the first token selection that the classifier reads.
:mod:`auglocal_fx.partition` cuts the rest into blocks.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Set

import torch
import torch.nn.functional as F
from torch import fx, nn

from .errors import AugLocalError
from .shape_values import SHAPE_KEY

__all__ = ["StreamsReachHead", "head_start", "selection_reduction", "has_weight_layer", "is_norm"]

_WEIGHT_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d, F.linear, torch.conv2d, torch.conv1d,
                     torch.conv3d, F.conv_transpose2d}



class StreamsReachHead(AugLocalError):
    """No single tensor starts the head: several streams run from the input to it (CrossViT).

    :mod:`auglocal_fx.partition` catches it and starts the head where a tuple is live instead.

    Attributes:
        reduction: the first token selection or pooling that the classifier reads.
    """

    def __init__(self, message: str, reduction: fx.Node):
        super().__init__(message)
        self.reduction = reduction


def has_weight_layer(gm: fx.GraphModule, nodes: Sequence[fx.Node]) -> bool:
    for node in nodes:
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if isinstance(mod, (nn.modules.conv._ConvNd, nn.Linear)):
                return True
            if any(p.dim() >= 2 for p in mod.parameters()):
                return True
        elif node.op == "call_function" and node.target in _WEIGHT_FUNCTIONS:
            return True
    return False


def _spatial(shape: Optional[torch.Size]) -> int:
    if shape is None or len(shape) <= 2:
        return 1
    return math.prod(shape[2:])



_GLOBAL_POOL_MODULES = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_REDUCE_METHODS = {"mean", "amax", "sum", "max", "logsumexp"}
_FLATTEN_FUNCTIONS = {torch.flatten}
_FLATTEN_METHODS = {"flatten", "view", "reshape"}


def _is_global_pool(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Does ``node`` reduce a feature map to one value per channel (global pooling)?"""
    shape = node.meta.get(SHAPE_KEY)
    if shape is None or len(shape) < 2 or _spatial(shape) != 1:
        return False
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if isinstance(mod, _GLOBAL_POOL_MODULES):
            size = mod.output_size
            return all(v == 1 for v in (size if isinstance(size, tuple) else (size,)))
        return "globalpool" in type(mod).__name__.lower().replace("_", "")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        if "adaptive" in name and "pool" in name:
            size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
            return size in (1, (1, 1), [1, 1])
        if node.target in (torch.mean, torch.amax, torch.sum):
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            return _covers_spatial(dims)
    if node.op == "call_method" and node.target in _REDUCE_METHODS:
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if _covers_spatial(dims):
            return True
    return _reduces_positions(gm, node)


def _reduces_positions(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A weightless operation from a map or token sequence to ``(N, C)`` that drops values.

    Covers token pooling (``x[:, 0]``, ``x[:, 1:].mean(1)``) and channels-last pooling
    (``x.mean((1, 2))`` on NHWC) without naming each form; a flatten keeps every value.
    """
    shape = node.meta.get(SHAPE_KEY)
    if shape is None or len(shape) != 2 or node.op not in ("call_function", "call_method"):
        return False
    inputs = [a for a in node.all_input_nodes if a.meta.get(SHAPE_KEY) is not None]
    if len(inputs) != 1 or len(inputs[0].meta[SHAPE_KEY]) < 3:
        return False
    if inputs[0].meta[SHAPE_KEY][0] != shape[0]:
        return False  # not per example: a mean over stacked logits (CrossViT's two heads)
    if math.prod(shape) < math.prod(inputs[0].meta[SHAPE_KEY]):
        return True
    # One position left (a 1x1 map, one token): a reduction still, but not a reshape.
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return name in _REDUCE_METHODS or name == "getitem"


def _covers_spatial(dims) -> bool:
    if not isinstance(dims, (tuple, list)):
        return False
    return set(dims) in ({2, 3}, {-2, -1})


def _is_flatten(gm: fx.GraphModule, node: fx.Node) -> bool:
    shape = node.meta.get(SHAPE_KEY)
    if shape is None or len(shape) != 2:
        return False
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), nn.Flatten)
    if node.op == "call_function":
        return node.target in _FLATTEN_FUNCTIONS
    return node.op == "call_method" and node.target in _FLATTEN_METHODS


def _all_pool(gm: fx.GraphModule, cut: fx.Node, test) -> bool:
    users = [u for u in cut.users if u.meta.get(SHAPE_KEY) is not None]
    return len(users) > 1 and all(test(gm, u) for u in users)


def head_start(gm: fx.GraphModule, cuts: List[fx.Node], order: List[fx.Node]) -> int:
    """Index into ``cuts`` of the cut point whose output is the head's input.

    The head begins at the first cut point fed to a global pooling; failing that, to a flatten
    (VGG's classifier on a 7x7 map); failing that, at the last cut point before a token
    selection that the classifier reads (VOLO, CoaT); a convolutional classifier before it
    moves it earlier.
    """
    output = next(n for n in gm.graph.nodes if n.op == "output")
    final = output.args[0]
    if not isinstance(final, fx.Node) or final.meta.get(SHAPE_KEY) is None \
            or len(final.meta[SHAPE_KEY]) != 2:
        raise AugLocalError(
            "no classifier head found: the model must return (N, num_classes) logits"
        )
    start = _pool_start(gm, cuts)
    if start is None:
        start = _selection_start(gm, cuts, order, final)
    index = {n: i for i, n in enumerate(order)}
    weights = [n for n in order if has_weight_layer(gm, [n])]
    if not weights:
        raise AugLocalError("no classifier head found: the model has no conv or linear layer")
    classifier = index[weights[-1]]
    if classifier <= index[cuts[start]]:
        # A convolutional classifier before the pooling (SqueezeNet): the head starts there.
        start = max(k for k in range(len(cuts)) if index[cuts[k]] < classifier)
    head_nodes = order[index[cuts[start]] + 1:]
    if not has_weight_layer(gm, head_nodes):
        raise AugLocalError(
            "no classifier head found: nothing with weights follows the global pooling"
        )
    start = _absorb_dense_layers(gm, cuts, order, start)
    return _absorb_final_norm(gm, cuts, order, start)


def _pool_start(gm: fx.GraphModule, cuts: List[fx.Node]) -> Optional[int]:
    """Index of the first cut point fed to a global pooling (else a flatten); None if none is."""
    cut_set = set(cuts)
    for test in (_is_global_pool, _is_flatten):
        # The pooling must itself be a cut point: an SE module pools too, but then reuses
        # the pooled tensor's input.
        # (Distilled models pool twice from one cut: a class and a distillation token.)
        found = [k for k, c in enumerate(cuts)
                 if k > 0 and (any(u in cut_set and test(gm, u) for u in c.users)
                               or _all_pool(gm, c, test))]
        if found:
            return found[0]
    return None


def selection_reduction(gm: fx.GraphModule, cuts: List[fx.Node], order: List[fx.Node]) -> Optional[fx.Node]:
    """The first token selection of a head that is no cut point (VOLO, CoaT); None where a
    global pooling or a flatten is a cut point, or where there is no such selection."""
    if _pool_start(gm, cuts) is not None:
        return None
    final = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    feeds_output = _ancestors(final)
    return next((n for n in order if n in feeds_output and _is_global_pool(gm, n)
                 and _stays_reduced(n, feeds_output)), None)


def _selection_start(gm: fx.GraphModule, cuts: List[fx.Node], order: List[fx.Node],
                     final: fx.Node) -> int:
    """The last cut point before the first token selection that stays reduced to the output.

    Heads that are no cut point themselves: VOLO adds an auxiliary head on every token to
    the class-token head, CoaT selects the class token of three streams and aggregates them,
    CrossViT averages two class-token heads. Each starts with reductions (``x[:, 0]``) whose
    results, down to the logits, never again hold as many values per example as the tensor
    reduced (an SE module's pooling is multiplied back into its map). The head is everything
    after the last cut point before the first such reduction.
    """
    index = {n: i for i, n in enumerate(order)}
    feeds_output = _ancestors(final)
    reductions = [n for n in order if n in feeds_output and _is_global_pool(gm, n)
                  and _stays_reduced(n, feeds_output)]
    if not reductions:
        raise AugLocalError(
            "no classifier head found: no global pooling, flatten or token selection before "
            "the output; auglocal-fx needs a network that ends in pooling + classifier"
        )
    first = index[reductions[0]]
    before = [k for k, c in enumerate(cuts) if index[c] < first]
    if before[-1] == 0:
        raise StreamsReachHead(
            "no classifier head found: several tensors run side by side from the input to the "
            "classifier's token selection (streams such as CrossViT's), and no gap before it "
            "carries them as a tuple of at most 3 tensors", reductions[0])
    return before[-1]


def _ancestors(node: fx.Node) -> Set[fx.Node]:
    seen: Set[fx.Node] = {node}
    stack = [node]
    while stack:
        for arg in stack.pop().all_input_nodes:
            if arg not in seen:
                seen.add(arg)
                stack.append(arg)
    return seen


def _per_example(node: fx.Node) -> Optional[int]:
    shape = node.meta.get(SHAPE_KEY)
    return None if shape is None or len(shape) == 0 else math.prod(shape[1:])


def _stays_reduced(node: fx.Node, feeds_output: Set[fx.Node]) -> bool:
    """Does every value computed from ``node`` on the way to the output hold fewer values per
    example than the largest tensor ``node`` reduces?"""
    sizes = [_per_example(a) for a in node.all_input_nodes]
    bound = max((v for v in sizes if v is not None), default=None)
    if bound is None:
        return False
    seen: Set[fx.Node] = set()
    stack = [node]
    while stack:
        for user in stack.pop().users:
            if user in seen or user not in feeds_output:
                continue
            seen.add(user)
            size = _per_example(user)
            if size is not None and size >= bound:
                return False
            stack.append(user)
    return True


def _segment(cuts: List[fx.Node], order: List[fx.Node], index: Dict[fx.Node, int],
             k: int) -> List[fx.Node]:
    """The nodes after cut ``k - 1`` up to and including cut ``k``."""
    return order[index[cuts[k - 1]] + 1:index[cuts[k]] + 1]


def _convs(gm: fx.GraphModule, nodes: Sequence[fx.Node]) -> List[nn.modules.conv._ConvNd]:
    found = []
    for node in nodes:
        if node.op == "call_module":
            found += [m for m in gm.get_submodule(node.target).modules()
                      if isinstance(m, nn.modules.conv._ConvNd)]
    return found


def _absorb_dense_layers(gm: fx.GraphModule, cuts: List[fx.Node], order: List[fx.Node],
                         start: int) -> int:
    """Move a conv-MLP before the pooling (timm VGG's ``pre_logits``) into the head.

    Such an MLP starts with a valid convolution that covers the whole map (a fully connected
    layer written as a conv) and then works on ``1x1`` maps: it is the classifier's MLP, not
    a block. Recognised as the run of segments before the pooling whose outputs are ``1x1``
    and whose convolutions are unpadded, containing a convolution with a kernel above 1.
    """
    index = {n: i for i, n in enumerate(order)}
    k = start
    covering = False
    while k > 1:
        nodes = _segment(cuts, order, index, k)
        shape = cuts[k].meta.get(SHAPE_KEY)
        convs = _convs(gm, nodes)
        if shape is None or len(shape) != 4 or _spatial(shape) != 1 \
                or any(any(p != 0 for p in c.padding) if isinstance(c.padding, tuple) else c.padding != 0
                       for c in convs):
            break
        covering = covering or any(any(v > 1 for v in c.kernel_size) for c in convs)
        k -= 1
        if covering:
            start = k
    return start


def _absorb_final_norm(gm: fx.GraphModule, cuts: List[fx.Node], order: List[fx.Node],
                       start: int) -> int:
    """Move the network's final normalisation (ViT's ``norm``, DenseNet's ``norm5``) into the head.

    The weightless segments right before the head join it from the earliest one holding a
    norm layer, unless they directly follow a weight layer (VGG's last conv + BN stays a block).
    """
    index = {n: i for i, n in enumerate(order)}
    k = start
    earliest_norm = None
    while k > 1:
        nodes = _segment(cuts, order, index, k)
        if has_weight_layer(gm, nodes):
            break
        if any(node.op == "call_module" and is_norm(gm.get_submodule(node.target)) for node in nodes):
            earliest_norm = k - 1
        k -= 1
    if earliest_norm is None or has_weight_layer(gm, [cuts[k]]):
        return start
    return earliest_norm


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)) \
        or "norm" in type(module).__name__.lower() and not any(
            p.dim() >= 2 for p in module.parameters())
