"""Values that depend on the input only through its shape become constants of the graph.

A grid size computed once from the patch embedding (PVT-v2, XCiT, GCViT, MViT-v2), rotary
embeddings or masks built for the input's size (EVA / DINOv3-style ViTs, NaFlexViT) are passed
to every later block: each keeps the tensor whose ``.shape`` was read alive until the last
block, so no cut point lies between them (docs/method.md, rule 1). Such values are fixed once
the input size is: they are evaluated at the traced size and put into the graph, a tensor as a
buffer of the graph (moved with the model, saved and loaded), anything else (ints, tuples) as
a literal argument. Only values that keep a tensor alive beyond its last use as data are
replaced, so a block that reshapes its own input still follows the size it is given; a value
that changes with the batch size (``x.shape[0]``) is kept as computed.
"""

from __future__ import annotations

import contextlib
import operator
from typing import Any, Callable, Dict, Iterator, List, Optional, Set, Tuple

import torch
from torch import fx, nn

from ._meta_run import ShapeInterpreter, run_meta_or_real
from .errors import AugLocalError

__all__ = ["freeze_shape_values", "freeze_graph", "preserved_state", "check_input_size",
           "data_nodes", "CONSTANT_PREFIX", "SHAPE_KEY"]

# node.meta key holding a value's shape (torch.Size for tensors, None for anything else);
# tracing fills it in, every later step reads it.
SHAPE_KEY = "auglocal_shape"

# Buffers holding frozen tensors are named CONSTANT_PREFIX + a number on the traced graph.
CONSTANT_PREFIX = "auglocal_shape_constant_"

_DATA, _SHAPE, _CONST = 2, 1, 0
# Attributes and methods of a tensor that read its metadata, never its values.
_SIZE_ATTRIBUTES = {"shape", "ndim", "dtype", "device", "is_cuda", "layout"}
_SIZE_METHODS = {"size", "dim", "ndimension", "numel", "nelement", "get_device"}
# Values that are never put into the graph: they follow the model (``.to(device)``).
_UNFROZEN_TYPES = (torch.device, torch.dtype, torch.layout)


def _reads_size(node: fx.Node, kinds: Dict[fx.Node, int], opaque: Set[fx.Node] = frozenset()) -> bool:
    """Does ``node`` read only the metadata of a data tensor (``x.shape``, ``x.size(1)``)?

    ``opaque``: nodes taken to be sizes returned beside a tensor by a function that is not
    traced into (MViT-v2's ``reshape_post_pool`` returns the pooled grid size).
    """
    if not node.args or not isinstance(node.args[0], fx.Node) or kinds.get(node.args[0]) != _DATA:
        return False
    if node in opaque:
        return True
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in _SIZE_ATTRIBUTES
    if node.op == "call_function" and node.target is len:
        return True
    return node.op == "call_method" and node.target in _SIZE_METHODS


def _classify(gm: fx.GraphModule, opaque: Set[fx.Node]
              ) -> Tuple[Dict[fx.Node, int], Set[fx.Node], Dict[fx.Node, Set[fx.Node]]]:
    """Each node's kind (data, shape-only, constant), the trainable ones, and for shape-only
    nodes the data tensors whose metadata they read."""
    kinds: Dict[fx.Node, int] = {}
    trainable: Set[fx.Node] = set()
    sources: Dict[fx.Node, Set[fx.Node]] = {}
    params = {name for name, _ in gm.named_parameters()}
    for node in gm.graph.nodes:
        inputs = node.all_input_nodes
        if node.op == "placeholder":
            kinds[node] = _DATA
            continue
        if node.op == "output":
            continue
        if _reads_size(node, kinds, opaque):
            kinds[node] = _SHAPE
            sources[node] = {node.args[0]}
            continue
        kinds[node] = max((kinds.get(a, _CONST) for a in inputs), default=_CONST)
        # A value computed from a parameter (a position embedding resampled to the grid)
        # must follow training: never a constant.
        if (node.op == "get_attr" and node.target in params) or any(a in trainable for a in inputs) \
                or (node.op == "call_module"
                    and any(True for _ in gm.get_submodule(node.target).parameters())):
            trainable.add(node)
        if kinds[node] == _SHAPE:
            sources[node] = set().union(*(sources.get(a, set()) for a in inputs))
    return kinds, trainable, sources


def _last_data_use(node: fx.Node, kinds: Dict[fx.Node, int], index: Dict[fx.Node, int]) -> int:
    """Position of the last user of ``node`` that reads its values (not only its shape)."""
    uses = [index[u] for u in node.users if kinds.get(u) != _SHAPE]
    return max(uses, default=index[node])


def data_nodes(gm: fx.GraphModule) -> Set[fx.Node]:
    """The nodes whose values follow the input's data, not only its shape."""
    kinds = _classify(gm, set())[0]
    return {n for n, k in kinds.items() if k == _DATA}


class _ValueRecorder(ShapeInterpreter):
    """Records the values of ``wanted`` nodes and the shapes of the ``sized`` tensors."""

    def __init__(self, gm: fx.GraphModule, wanted: Set[fx.Node], sized: Set[fx.Node],
                 on_meta: Set[fx.Node]):
        super().__init__(gm, on_meta)
        self.wanted, self.sized = wanted, sized
        self.values: Dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if n in self.wanted:
            self.values[n] = result
        elif n in self.sized:
            # A tensor's shape; for a tuple of results, the sizes of the tensors in it.
            self.values[n] = tuple(result.shape) if isinstance(result, torch.Tensor) else tuple(
                d for t in _leaves(result) if isinstance(t, torch.Tensor) for d in t.shape)
        return result


def _leaves(value: Any) -> List[Any]:
    if isinstance(value, (tuple, list)):
        return [leaf for v in value for leaf in _leaves(v)]
    return [value]


def _batch_dim(node: fx.Node, user: fx.Node, kinds: Dict[fx.Node, int],
               values: List[Dict[fx.Node, Any]]) -> Optional[Tuple[fx.Node, int]]:
    """A tensor ``user`` reads and a dimension of it equal to ``node``'s value at both batch
    sizes: ``node`` (an int that changes with the batch size) can be read from it instead."""
    if not all(type(v.get(node)) is int for v in values):
        return None
    for tensor in user.all_input_nodes:
        if kinds.get(tensor) != _DATA or tensor.meta.get(SHAPE_KEY) is None \
                or not all(tensor in v for v in values):
            continue
        for dim in range(len(values[0][tensor])):
            if all(dim < len(v[tensor]) and v[tensor][dim] == v[node] for v in values):
                return tensor, dim
    return None


def _opaque_sizes(gm: fx.GraphModule) -> Set[fx.Node]:
    """Items of a non-tensor result that are not tensors either: maybe sizes (see
    :func:`_reads_size`), confirmed only if they are numbers, equal at both batch sizes."""
    return {n for n in gm.graph.nodes
            if n.op == "call_function" and n.target is operator.getitem and n.meta.get(SHAPE_KEY) is None
            and isinstance(n.args[0], fx.Node) and n.args[0].op != "placeholder"
            and n.args[0].meta.get(SHAPE_KEY) is None}


def _is_size(node: fx.Node, values: List[Dict[fx.Node, Any]]) -> bool:
    """Is an item of an untraced function's result a size: ints, equal at both batch sizes,
    each a size of a tensor the function takes or returns (a number computed from the data
    is not)?"""
    call = node.args[0]
    found = [v.get(node) for v in values]
    for value, v in zip(found, values):
        tensors = [a for a in call.all_input_nodes if a.meta.get(SHAPE_KEY) is not None]
        sizes = set(v.get(call, ())).union(*(v.get(a, ()) for a in tensors))
        if not all(type(leaf) is int and leaf in sizes for leaf in _leaves(value)):
            return False
    return _same(found[0], found[1])


def _same(a: Any, b: Any) -> bool:
    """Equal values of a type that can be put into the graph."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) \
            and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (bool, int, float, str, slice, type(None))):
        return type(a) is type(b) and a == b
    return False  # devices, dtypes and anything else stay computed


def _as_argument(gm: fx.GraphModule, value: Any, before: fx.Node, count: List[int]) -> Any:
    """``value`` as an fx argument: tensors become buffers read by ``get_attr`` nodes."""
    if isinstance(value, torch.Tensor):
        name = f"{CONSTANT_PREFIX}{count[0]}"
        count[0] += 1
        gm.register_buffer(name, value.detach().clone())
        with gm.graph.inserting_before(before):
            node = gm.graph.get_attr(name)
        node.meta.update(before.meta)
        return node
    if isinstance(value, torch.Size):
        return torch.Size(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_as_argument(gm, v, before, count) for v in value)
    return value


def freeze_shape_values(gm: fx.GraphModule, run: Callable[[Callable[[torch.Tensor], Any], int], None],
                        batches: Tuple[int, int] = (1, 2)) -> int:
    """Replace shape-only values that keep a tensor alive across the graph by constants.

    Args:
        gm: a traced graph; changed in place and recompiled.
        run: ``run(fn, batch)`` calls ``fn`` on an example input of ``batch`` images at the
            traced size (the caller keeps the model's buffers and random state as they were).
        batches: the two batch sizes compared: a value that differs between them is kept.

    Returns:
        How many values were replaced or shape checks dropped (0: the graph is unchanged).
    """
    order = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(order)}
    opaque = _opaque_sizes(gm)
    values: List[Dict[fx.Node, Any]] = []
    while True:
        kinds, trainable, sources = _classify(gm, opaque)
        shape_only = {n for n, k in kinds.items() if k == _SHAPE and n not in trainable}

        def extends(node: fx.Node, position: int) -> bool:
            # Used at ``position``, ``node`` keeps one of its data tensors alive past its last use.
            return any(position > _last_data_use(d, kinds, index) for d in sources.get(node, ()))

        edges = [(n, u) for n in shape_only for u in n.users
                 if u not in shape_only and extends(n, index[u])]
        dead_ends = [n for n in shape_only if not n.users and extends(n, index[n])]  # checks
        if not edges and not dead_ends:
            return 0
        if not values:
            tensors = {n for n in order if n.meta.get(SHAPE_KEY) is not None}
            tensors |= {n.args[0] for n in opaque}
            data = {n for n, k in kinds.items() if k == _DATA}
            for batch in batches:
                with torch.no_grad():
                    recorder = run_meta_or_real(
                        lambda on_meta: _ValueRecorder(gm, shape_only, tensors, on_meta), data,
                        lambda fn: run(fn, batch))
                values.append(recorder.values)
        wrong = {n for n in opaque & shape_only if not _is_size(n, values)}
        if not wrong:
            break
        opaque -= wrong
    frozen = {n for n in shape_only if n in values[0] and n in values[1]
              and not isinstance(values[0][n], _UNFROZEN_TYPES) and _same(values[0][n], values[1][n])}
    # An edge from a value that changes with the batch size: read it from a tensor the user
    # holds anyway, or else replace the last frozen values before it.
    pending = list(edges)
    replaced: List[Tuple[fx.Node, fx.Node]] = []
    seen: Set[Tuple[fx.Node, fx.Node]] = set()
    rebased = 0
    while pending:
        n, u = pending.pop()
        if (n, u) in seen:
            continue
        seen.add((n, u))
        read = None if n in frozen else _batch_dim(n, u, kinds, values)
        if n in frozen:
            replaced.append((n, u))
        elif read is not None:
            with gm.graph.inserting_before(u):
                size = gm.graph.call_method("size", read)
            # The user's module runs it: partition keeps no cut inside that module's code.
            size.meta.update({k: v for k, v in u.meta.items() if k != SHAPE_KEY})
            size.meta[SHAPE_KEY] = None
            u.replace_input_with(n, size)
            rebased += 1
        elif not _reads_size(n, kinds):
            pending += [(a, n) for a in n.all_input_nodes if a in shape_only]
    count = [sum(1 for name, _ in gm.named_buffers() if name.startswith(CONSTANT_PREFIX))]
    constants: Dict[fx.Node, Any] = {}
    for n, u in sorted(replaced, key=lambda e: (index[e[1]], index[e[0]])):
        if n not in constants:
            constants[n] = _as_argument(gm, values[0][n], n, count)
        value = constants[n]
        u.args = fx.node.map_arg(u.args, lambda a: value if a is n else a)
        u.kwargs = fx.node.map_arg(u.kwargs, lambda a: value if a is n else a)
    dropped = [n for n in dead_ends if n in frozen]
    for node in reversed(order):
        if node in shape_only and not node.users and (node in dropped or not node.is_impure()):
            gm.graph.erase_node(node)
    gm.recompile()
    return len(constants) + len(dropped)


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Leave the model's buffers and the random state as they were (train-mode runs)."""
    buffers = {name: buf.detach().clone() for name, buf in model.named_buffers()}
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        with torch.no_grad():
            for name, buf in model.named_buffers():
                buf.copy_(buffers[name])


def freeze_graph(model: nn.Module, gm: fx.GraphModule, example: torch.Tensor,
            batches: Tuple[int, int]) -> int:
    """:func:`freeze_shape_values` on ``gm``, traced from ``model``, run on random images of
    ``example``'s size; the model's buffers and the random state are left as they were."""

    def run(fn: Callable[[torch.Tensor], Any], batch: int) -> None:
        # Other images than the traced one: a size computed from the data does not repeat.
        images = torch.randn(batch, *example.shape[1:], generator=torch.Generator().manual_seed(batch))
        with preserved_state(model):
            fn(images.to(example.device))

    return freeze_shape_values(gm, run, batches)


def check_input_size(x: torch.Tensor, size: Tuple[int, ...]) -> None:
    """Refuse an input of another size than the one shape-only values were frozen for."""
    if tuple(x.shape[1:]) != size:
        raise AugLocalError(
            f"this network was converted for inputs of size {size} and holds values computed for "
            f"that size; got {tuple(x.shape[1:])}: convert the model again at that size "
            f"(to_local(..., input_size={tuple(x.shape[1:])}))"
        )
