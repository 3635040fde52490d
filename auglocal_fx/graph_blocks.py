"""The primary network's pieces: a traced subgraph, with its train-mode twin, as a module.

:mod:`auglocal_fx.partition` decides where the blocks are; this module cuts a block's nodes out
of the traced graph (:func:`extract_graph`) and wraps them (:class:`GraphBlock`), and, where
asked (``shared_parameters="merge"``), merges blocks that use the same parameters
(:func:`merge_shared`).
"""

from __future__ import annotations

import warnings
from typing import Dict, Iterator, List, Optional, Sequence, Set, Tuple, Union

import torch
from torch import fx, nn

from .errors import AugLocalError
from .shape_values import SHAPE_KEY, check_input_size

__all__ = ["GraphBlock", "Boundary", "detach", "as_tuple", "extract_graph", "merge_shared",
           "SHARED_PARAMETERS", "validate_shared_parameters", "parameter_ids", "weight_keys",
           "repeated_classes", "inside_unit", "enters_unit_list", "module_path", "is_boundary_value"]

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)

# How a parameter used by several blocks is trained (docs/method.md, rule 1): by the sum of its
# users' local losses' gradients, or by one loss, the blocks between its uses merged.
SHARED_PARAMETERS = ("sum", "merge")

# What crosses a block boundary: one tensor, or a fixed tuple of them (several streams).
Boundary = Union[torch.Tensor, Tuple[torch.Tensor, ...]]

# Each tensor of a boundary is a map (N, C, H, W), tokens (N, T, C) or features (N, C): what
# auxiliary networks, their input adapters and heads take. A value with more dimensions
# (csatv2's DCT stem, (N, 3, 64, 64, 64)) stays inside a block.
_MAX_BOUNDARY_DIMS = 4


def is_boundary_value(node: fx.Node) -> bool:
    """May ``node``'s value cross a block boundary (alone or in a tuple)?

    Only a tensor (a traced value with a recorded shape, not size arithmetic) of at most
    four dimensions, batch included.
    """
    shape = node.meta.get(SHAPE_KEY)
    return shape is not None and len(shape) <= _MAX_BOUNDARY_DIMS


def validate_shared_parameters(value: str) -> None:
    """Raise :class:`AugLocalError` unless ``value`` is one of :data:`SHARED_PARAMETERS`."""
    if value not in SHARED_PARAMETERS:
        raise AugLocalError(f"shared_parameters must be 'sum' (each user's local loss trains a shared "
                            f"parameter) or 'merge' (the blocks sharing it merge), not {value!r}")


def as_tuple(h: Boundary) -> Tuple[torch.Tensor, ...]:
    """The elements of a boundary value (one tensor is a tuple of one)."""
    return h if isinstance(h, tuple) else (h,)


def detach(h: Boundary) -> Boundary:
    """``h`` cut from its graph: every element detached, so no gradient crosses the boundary."""
    if isinstance(h, tuple):
        return tuple(t.detach() for t in h)
    return h.detach()


class GraphBlock(nn.Module):
    """One piece of the primary network: a traced subgraph, with its train-mode twin.

    In eval mode the eval graph runs; in train mode the train graph (when the model's train
    mode has different code outside leaf modules), so each block behaves like the original in
    both modes. Both graphs share the original model's modules and parameters. A first block
    given ``input_size`` refuses inputs of another size (its network holds values computed for
    that size, see :mod:`auglocal_fx.shape_values`). A block taking several tensors (a boundary
    carrying a tuple) is called ``block(*h)``, or ``block(h)`` with the tuple.
    """

    def __init__(self, eval_graph: fx.GraphModule, train_graph: Optional[fx.GraphModule] = None,
                 input_size: Optional[Tuple[int, ...]] = None):
        super().__init__()
        self.eval_graph = eval_graph
        self.train_graph = train_graph
        self.input_size = None if input_size is None else tuple(int(v) for v in input_size)
        if train_graph is not None:
            self._register_state_dict_hook(_drop_shared_train_keys)
            self._register_load_state_dict_pre_hook(_restore_shared_train_keys)

    def forward(self, *x: Boundary) -> Boundary:
        if len(x) == 1 and isinstance(x[0], tuple):
            x = x[0]
        if self.input_size is not None:
            check_input_size(x[0], self.input_size)
        graph = self.train_graph if (self.training and self.train_graph is not None) else self.eval_graph
        return graph(*x)

    @property
    def arity(self) -> int:
        """How many tensors the block takes."""
        return sum(1 for n in self.eval_graph.graph.nodes if n.op == "placeholder")


def _owner(node: fx.Node) -> Tuple[str, Optional[type]]:
    """The module whose own ``forward`` code runs ``node`` (``""`` for the model's)."""
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    entries = [v if isinstance(v, tuple) else (str(v), None) for v in stack]
    if node.op == "call_module" and entries:
        entries = entries[:-1]  # the called module itself
    return entries[-1] if entries else ("", None)


def _inside(name: str, owner: str) -> bool:
    return name == owner or name.startswith(owner + ".")


def module_path(node: fx.Node) -> List[str]:
    """The names of the modules ``node`` runs in, outermost first (a called module included)."""
    stack = node.meta.get("nn_module_stack") or {}
    path = [v[0] if isinstance(v, tuple) else str(k) for k, v in stack.items()]
    if node.op == "call_module" and (not path or path[-1] != str(node.target)):
        path.append(str(node.target))
    return path


def repeated_classes(order: Sequence[fx.Node]) -> Dict[type, Set[str]]:
    """Per module class the nodes run in, the names of its instances."""
    instances: Dict[type, Set[str]] = {}
    for node in order:
        for value in (node.meta.get("nn_module_stack") or {}).values():
            if isinstance(value, tuple) and isinstance(value[1], type):
                instances.setdefault(value[1], set()).add(value[0])
    return instances


def inside_unit(node: fx.Node, order: Sequence[fx.Node], position: int,
                instances: Dict[type, Set[str]]) -> bool:
    """Does the gap after ``order[position]`` (``node``) lie inside one module's own code?

    Only modules of a class the network repeats count (the units its author wrote, such as
    residual blocks); a gap made by a container, by the model's own forward, or one that ends
    a module, does not (docs/method.md, rule 1).
    """
    owner, kind = _owner(node)
    if position + 1 >= len(order) or not owner or kind is None \
            or issubclass(kind, _CONTAINERS) or len(instances.get(kind, ())) <= 1:
        return False
    following = order[position + 1]
    where = str(following.target) if following.op == "call_module" else _owner(following)[0]
    return _inside(where, owner)


def enters_unit_list(node: fx.Node, following: fx.Node) -> bool:
    """Does the gap after ``node`` leave its unit's own code for the first of a list of units?

    A stage whose own code computes a value beside the features and hands both to each of its
    blocks (GCViT's global query) has its gap before the first block inside its own code; the
    blocks are elements of a module list or ``Sequential`` of modules with code of their own
    (not ``torch.nn`` layers). A residual unit's children are attributes of their own, so the
    gaps between them never qualify.
    """
    owner, _ = _owner(node)
    if not owner:
        return False
    entries = [v for v in (following.meta.get("nn_module_stack") or {}).values() if isinstance(v, tuple)]
    below = [(name, kind) for name, kind in entries if name.startswith(owner + ".")]
    if below and isinstance(below[0][1], type) and issubclass(below[0][1], _CONTAINERS):
        below = below[1:]  # a Sequential the unit calls: its first element is the unit listed
    elif not below or not below[0][0].rsplit(".", 1)[-1].isdigit():
        return False  # an attribute of the unit's own, not an element of a list
    if not below:
        return False
    kind = below[0][1]
    return isinstance(kind, type) and not kind.__module__.startswith("torch.nn")


def _drop_shared_train_keys(module, state_dict, prefix, local_metadata):
    # The train graph's tensors are the eval graph's: save them once.
    for key in list(state_dict):
        if key.startswith(prefix + "train_graph."):
            twin = prefix + "eval_graph." + key[len(prefix + "train_graph."):]
            if twin in state_dict and state_dict[twin].data_ptr() == state_dict[key].data_ptr():
                del state_dict[key]
    return state_dict


def _restore_shared_train_keys(state_dict, prefix, local_metadata, strict, missing_keys,
                               unexpected_keys, error_msgs):
    for key in list(state_dict):
        if key.startswith(prefix + "eval_graph."):
            twin = prefix + "train_graph." + key[len(prefix + "eval_graph."):]
            if twin not in state_dict:
                state_dict[twin] = state_dict[key]


def extract_graph(gm: fx.GraphModule, nodes: List[fx.Node],
                  input_node: Union[fx.Node, Sequence[fx.Node]], name: str,
                  outputs: Optional[Sequence[fx.Node]] = None) -> fx.GraphModule:
    """A GraphModule computing ``nodes`` from ``input_node``; free values are copied in.

    ``input_node`` may be several nodes (one placeholder each, in order); ``outputs``, given
    more than one node, makes the module return their tuple (default: the last node's value).
    """
    graph = fx.Graph()
    env: Dict[fx.Node, fx.Node] = {}
    inputs = [input_node] if isinstance(input_node, fx.Node) else list(input_node)
    for k, node in enumerate(inputs):
        placeholder = graph.placeholder("x" if len(inputs) == 1 else f"x{k}")
        placeholder.meta = dict(node.meta)
        env[node] = placeholder
    member = set(nodes)

    def copy_free(node: fx.Node) -> fx.Node:
        if node not in env:
            if node in member or node.op == "placeholder":
                raise AugLocalError(f"internal: node {node.name} used before it is computed")
            env[node] = graph.node_copy(node, lambda a: copy_free(a))
        return env[node]

    for node in nodes:
        for arg in node.all_input_nodes:
            if arg not in env:
                copy_free(arg)
        env[node] = graph.node_copy(node, lambda a: env[a])
    if outputs is None or len(outputs) == 1:
        graph.output(env[nodes[-1] if outputs is None else outputs[0]])
    else:
        graph.output(tuple(env[n] for n in outputs))
    return fx.GraphModule(gm, graph, name)


def weight_keys(gm: fx.GraphModule, nodes: Sequence[fx.Node]) -> Set[str]:
    """Names of the modules with parameters and the attributes that ``nodes`` use."""
    keys: Set[str] = set()
    for node in nodes:
        if node.op == "call_module" and any(True for _ in gm.get_submodule(node.target).parameters()):
            keys.add(node.target)
        for arg in node.all_input_nodes:
            if arg.op == "get_attr":
                keys.add(arg.target)
    return keys


def _used_parameters(gm: fx.GraphModule, nodes: Sequence[fx.Node]) -> Iterator[Tuple[str, nn.Parameter]]:
    """``(module or attribute name, parameter)`` for each parameter ``nodes`` use, in node order."""
    for key in weight_keys(gm, nodes):
        value = _find(gm, key)
        for tensor in value.parameters() if isinstance(value, nn.Module) else [value]:
            if isinstance(tensor, nn.Parameter):
                yield key, tensor


def parameter_ids(gm: fx.GraphModule, nodes: Sequence[fx.Node]) -> Dict[int, int]:
    """``{id: number of values}`` of the parameters ``nodes`` use."""
    return {id(tensor): tensor.numel() for _, tensor in _used_parameters(gm, nodes)}


def _parameters(gm: fx.GraphModule, nodes: Sequence[fx.Node]) -> Dict[int, str]:
    """``{id: module or attribute name}`` of the parameters ``nodes`` use (the first name of each)."""
    found: Dict[int, str] = {}
    for key, tensor in _used_parameters(gm, nodes):
        found.setdefault(id(tensor), key)
    return found


def _find(gm: fx.GraphModule, target: str):
    value = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


def merge_shared(gm: fx.GraphModule, blocks: List[List[fx.Node]], head: List[fx.Node],
                 head_input: fx.Node, input_node: fx.Node) -> Tuple[List[List[fx.Node]], fx.Node]:
    """Merge the blocks between two uses of one parameter (``shared_parameters="merge"``).

    So that a parameter is trained by one loss: used by blocks ``i`` and ``k`` (CoaT's shared
    position encodings), blocks ``i .. k`` become one; used by a block and the head, that block
    and every later one join the head. With ``"sum"`` the blocks stay, and each user's local
    loss trains the parameter (its gradient is the sum over the users, as in backprop).
    """
    uses: Dict[int, List[int]] = {}
    names: Dict[int, str] = {}
    for j, nodes in enumerate(blocks + [head]):
        for key, name in _parameters(gm, nodes).items():
            uses.setdefault(key, []).append(j)
            names.setdefault(key, name)
    spans = sorted((u[0], u[-1], names[k]) for k, u in uses.items() if u[0] != u[-1])
    if not spans:
        return blocks, head_input
    merged: List[List[fx.Node]] = []
    shared: List[str] = []
    j = 0
    while j < len(blocks):
        end = j
        grown = True
        while grown:  # a span that starts inside the group stretches it to its last use
            grown = False
            for first, last, name in spans:
                if j <= first <= end < last:
                    end, grown = last, True
        shared += [name for first, last, name in spans if j <= first <= end]
        if end == len(blocks):  # the group reaches the head: it joins the head
            head_input = merged[-1][-1] if merged else input_node
            break
        merged.append([n for b in blocks[j:end + 1] for n in b])
        j = end + 1
    warnings.warn(
        "auglocal-fx: blocks that use the same parameters were merged, so that each parameter "
        f"is trained by one loss ({', '.join(dict.fromkeys(shared))}); shared_parameters='sum' keeps "
        "them apart",
        stacklevel=3,
    )
    return merged, head_input
