"""The repairing interpreter: runs a copy on its new input shape (meta tensors), node by node.

Each layer that does not fit is re-created for its input (:mod:`~auglocal_fx.synthesis.channels`),
or gets a 1x1 conv + BatchNorm in front of it; a residual merge of two shapes that differ gets a
projection shortcut on its identity-derived operand (or, where a pointwise convolution upstream
can take the stride, that convolution is strided and the run starts again).
"""

from __future__ import annotations

import math
import operator
from typing import Any, Dict, Optional, Tuple

import torch
from torch import fx, nn

from ..errors import AugLocalError, first_line
from ..tracing import SHAPE_KEY, describe_node
from .channels import _NeedsAdapter, _projection, _refit_module
from .nodes import _activation_inputs, _dependent, _fetch_attr
from .strides import _set_conv_stride


class _Restart(Exception):
    """The graph changed upstream of values already computed: run the repair again."""


_MERGE_FUNCTIONS = {operator.add, operator.iadd, operator.mul, operator.imul, operator.sub,
                    operator.isub, torch.add, torch.mul, torch.sub}
_MERGE_METHODS = {"add", "add_", "mul", "mul_", "sub", "sub_"}
_CAT_FUNCTIONS = {torch.cat, torch.concat}


def _identity_derived(node: fx.Node, gm: fx.GraphModule, deps: set) -> bool:
    """Does ``node`` reach the input through weightless single-input operations only?"""
    while node.op != "placeholder":
        inputs = _activation_inputs(node, deps)
        if len(inputs) != 1:
            return False
        if node.op == "call_module" and any(True for _ in gm.get_submodule(node.target).parameters()):
            return False
        node = inputs[0]
    return True


def _upstream_pointwise_conv(node: fx.Node, gm: fx.GraphModule, deps: set) -> Optional[fx.Node]:
    """The nearest 1x1 stride-1 conv upstream of ``node`` on a single-input path, if any."""
    while node.op != "placeholder":
        inputs = _activation_inputs(node, deps)
        if len(inputs) != 1:
            return None
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if isinstance(mod, nn.modules.conv._ConvNd):
                ok = all(k == 1 for k in mod.kernel_size) and all(s == 1 for s in mod.stride)
                return node if ok else None
        node = inputs[0]
    return None


class _Repairer:
    """Runs the copy on an input of the new shape, re-creating what does not fit."""

    def __init__(self, gm: fx.GraphModule, in_shape: Tuple[int, ...]):
        self.gm = gm
        self.in_shape = in_shape
        self.count = 0

    def _add_module(self, module: nn.Module, stem: str) -> str:
        self.count += 1
        name = f"auglocal_{stem}_{self.count}"
        while hasattr(self.gm, name):
            self.count += 1
            name = f"auglocal_{stem}_{self.count}"
        self.gm.add_submodule(name, module)
        return name

    def _insert_before(self, user: fx.Node, source: fx.Node, module: nn.Module, stem: str,
                       env: Dict[fx.Node, Any]) -> fx.Node:
        name = self._add_module(module, stem)
        with self.gm.graph.inserting_before(user):
            new = self.gm.graph.call_module(name, (source,))
        module.to(env[source].device).eval()
        if env[source].numel() == 0:
            raise AugLocalError(f"internal: empty tensor reaches {describe_node(user)}")
        with torch.no_grad():
            env[new] = _run_meta(module, env[source])
        new.meta[SHAPE_KEY] = env[new].shape
        user.replace_input_with(source, new)
        return new

    def run(self) -> torch.Tensor:
        for _ in range(8):
            try:
                return self._run_once()
            except _Restart:
                continue
        raise AugLocalError("internal: the auxiliary copy did not settle; please report this model")

    def _run_once(self) -> torch.Tensor:
        gm, graph = self.gm, self.gm.graph
        deps = _dependent(graph)
        original = {n: n.meta.get("auglocal_original_shape", n.meta.get(SHAPE_KEY))
                    for n in graph.nodes}
        for n in graph.nodes:
            n.meta.setdefault("auglocal_original_shape", original[n])
        env: Dict[fx.Node, Any] = {}
        gm.eval()
        with torch.no_grad():
            for node in list(graph.nodes):
                if node.op == "placeholder":
                    env[node] = torch.empty(1, *self.in_shape, device="meta")
                elif node.op == "output":
                    return env[node.args[0]]
                elif node.op == "get_attr":
                    env[node] = _fetch_attr(gm, node.target)
                else:
                    if node in deps:
                        self._fix_merge(node, env, deps)
                    env[node] = self._run_node(node, env, original, deps)
                if isinstance(env[node], torch.Tensor):
                    node.meta[SHAPE_KEY] = env[node].shape
        raise AugLocalError("internal: graph without output")

    def _run_node(self, node: fx.Node, env, original, deps) -> Any:
        for attempt in range(2):
            tensors = _activation_inputs(node, deps)
            first = tensors[0] if tensors else None
            try:
                if node.op == "call_module" and first is not None \
                        and not str(node.target).startswith("auglocal_"):
                    _refit_module(self.gm, node, env[first], original.get(first))
                return _execute(self.gm, node, env)
            except (_NeedsAdapter, RuntimeError, ValueError, IndexError, TypeError,
                    AssertionError) as exc:  # AssertionError: torch._assert on a fixed size
                if attempt or first is None or not self._adapt_channels(node, first, env, original):
                    raise AugLocalError(
                        f"{describe_node(node)} cannot take the new input shape "
                        f"({type(exc).__name__}: {first_line(exc, '')})"
                    ) from exc
        raise AssertionError("unreachable")

    def _adapt_channels(self, node: fx.Node, source: fx.Node, env, original) -> bool:
        """Insert a 1x1 conv + BN restoring the channel count ``node`` was built for."""
        want = original.get(source)
        have = env[source]
        if want is None or not isinstance(have, torch.Tensor) or have.dim() != len(want) \
                or have.dim() not in (2, 4) or int(have.shape[1]) == int(want[1]):
            return False
        proj = _projection(int(have.shape[1]), int(want[1]), 1, have.dim())
        self._insert_before(node, source, proj, "adapter", env)
        return True

    def _fix_merge(self, node: fx.Node, env, deps) -> None:
        is_cat = node.op == "call_function" and node.target in _CAT_FUNCTIONS
        is_ew = (node.op == "call_function" and node.target in _MERGE_FUNCTIONS) or (
            node.op == "call_method" and node.target in _MERGE_METHODS)
        if not (is_cat or is_ew):
            return
        operands = [a for a in _activation_inputs(node, deps)
                    if isinstance(env.get(a), torch.Tensor) and env[a].dim() == 4]
        if len(operands) < 2:
            return
        if is_cat:
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            if dim not in (1, -3):
                return
            target_hw = min((tuple(env[a].shape[2:]) for a in operands), key=lambda s: s[0])
            for a in operands:
                if tuple(env[a].shape[2:]) != target_hw:
                    self._fix_operand(node, a, int(env[a].shape[1]), target_hw, env, deps)
            return
        a, b = operands[:2]
        ta, tb = env[a], env[b]
        if _broadcastable(ta.shape, tb.shape):
            return
        a_id, b_id = _identity_derived(a, self.gm, deps), _identity_derived(b, self.gm, deps)
        if a_id and not b_id:
            fix, ref = a, tb
        elif b_id and not a_id:
            fix, ref = b, ta
        elif ta.shape[2] > tb.shape[2] or (ta.shape[2] == tb.shape[2] and a_id):
            fix, ref = a, tb
        else:
            fix, ref = b, ta
        self._fix_operand(node, fix, int(ref.shape[1]), tuple(ref.shape[2:]), env, deps)

    def _fix_operand(self, node: fx.Node, source: fx.Node, channels: int,
                     hw: Tuple[int, ...], env, deps) -> None:
        value = env[source]
        have_hw = tuple(value.shape[2:])
        stride = 1
        if have_hw != hw:
            stride = int(round(have_hw[0] / hw[0]))
            if stride < 1 or tuple(math.ceil(h / stride) for h in have_hw) != hw:
                raise AugLocalError(
                    f"cannot match resolutions {have_hw} and {hw} at {describe_node(node)}"
                )
        if not _identity_derived(source, self.gm, deps) and stride > 1 and channels == value.shape[1]:
            conv = _upstream_pointwise_conv(source, self.gm, deps)
            if conv is not None:
                _set_conv_stride(self.gm.get_submodule(conv.target), stride)
                raise _Restart
        proj = _projection(int(value.shape[1]), channels, stride, 4)
        self._insert_before(node, source, proj, "shortcut", env)


def _broadcastable(a: torch.Size, b: torch.Size) -> bool:
    for x, y in zip(reversed(a), reversed(b)):
        if x != y and x != 1 and y != 1:
            return False
    return True


def _meta_batch_norm_fits(module: nn.Module, value: Any) -> bool:
    """Whether ``module`` is a batch norm that takes the meta tensor ``value`` as it is."""
    if not isinstance(module, nn.modules.batchnorm._BatchNorm) or not isinstance(value, torch.Tensor) \
            or not value.is_meta or value.dim() < 2 or value.shape[1] != module.num_features:
        return False
    try:
        module._check_input_dim(value)  # raises ValueError for the wrong number of dimensions
    except NotImplementedError:  # a batch norm of unknown dimensions: run it
        return False
    return True


def _run_meta(module: nn.Module, value: Any) -> Any:
    """``module(value)``, with the batch norms of a Sequential (a projection) shape-only."""
    if type(module) is nn.Sequential:
        for layer in module:
            value = _run_meta(layer, value)
        return value
    if _meta_batch_norm_fits(module, value):
        return torch.empty_like(value)
    return module(value)


def _execute(gm: fx.GraphModule, node: fx.Node, env: Dict[fx.Node, Any]) -> Any:
    args = fx.node.map_arg(node.args, lambda n: env[n])
    kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if not kwargs and len(args) == 1 and _meta_batch_norm_fits(module, args[0]):
            # Shape-preserving (timm's BatchNormAct2d adds an activation, shape-preserving too);
            # PyTorch's meta batch norm runs a Python decomposition that took a fifth of a
            # conversion.
            return torch.empty_like(args[0])
        return module(*args, **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        self_obj, *rest = args
        return getattr(self_obj, node.target)(*rest, **kwargs)
    raise AugLocalError(f"internal: unexpected operation {describe_node(node)}")
