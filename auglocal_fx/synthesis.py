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

import copy
import math
import operator
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn

from .errors import AugLocalError, first_line
from .initialization import InitReference
from .layouts import FLAT, NCHW, ShapeAdapter, grid_size, input_layout, layout_of, resolution
from .partition import Partition
from .planning import AuxPlan
from .tracing import SHAPE_KEY, describe_node

__all__ = ["AUX_HEADS", "AUX_INITS", "AuxNet", "synthesize_aux_net", "adapt_copy", "warn_adapters",
           "slim_head", "choose_aux_head", "validate_aux_head", "validate_aux_init"]

AUX_HEADS = ("auto", "copy", "slim")
AUX_INITS = ("init", "copy")
SLIM_WIDTH = 512


class AuxNet(nn.Sequential):
    """An auxiliary network: adapted block copies followed by a head copy.

    Attributes:
        plan: the :class:`~auglocal_fx.planning.AuxPlan` it was built from.
    """

    def __init__(self, modules: Sequence[nn.Module], plan: AuxPlan):
        super().__init__(*modules)
        self.plan = plan


class _NeedsAdapter(Exception):
    """A module that cannot be re-created for the new channel count."""


# What adapting a copy to a new input shape can raise: our own errors, and the shape errors of
# running a layer on the new shape (meta tensors). Anything else is a bug and propagates.
_ADAPTATION_ERRORS = (AugLocalError, _NeedsAdapter, RuntimeError, ValueError, IndexError, TypeError,
                      AssertionError)


class _Restart(Exception):
    """The graph changed upstream of values already computed: run the repair again."""


_MERGE_FUNCTIONS = {operator.add, operator.iadd, operator.mul, operator.imul, operator.sub,
                    operator.isub, torch.add, torch.mul, torch.sub}
_MERGE_METHODS = {"add", "add_", "mul", "mul_", "sub", "sub_"}
_CAT_FUNCTIONS = {torch.cat, torch.concat}
_POOL_FUNCTIONS = {F.max_pool2d, F.avg_pool2d, torch.max_pool2d}
_POOL_MODULES = (nn.MaxPool2d, nn.AvgPool2d)


def _replace_module(gm: fx.GraphModule, target: str, new: nn.Module) -> None:
    parent_name, _, name = target.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    setattr(parent, name, new)


def _resolution(shape: Optional[torch.Size]) -> Optional[int]:
    return int(shape[2]) if shape is not None and len(shape) >= 4 else None


def _tensor_inputs(node: fx.Node) -> List[fx.Node]:
    return [a for a in node.all_input_nodes if a.meta.get(SHAPE_KEY) is not None
            and a.op != "get_attr"]


def _activation_inputs(node: fx.Node, dependent: set) -> List[fx.Node]:
    return [a for a in node.all_input_nodes if a in dependent]


def _dependent(graph: fx.Graph) -> set:
    deps = set()
    for node in graph.nodes:
        if node.op == "placeholder" or any(a in deps for a in node.all_input_nodes):
            deps.add(node)
    return deps


# ---------------------------------------------------------------------------------------------
# stride adaptation


def _set_conv_stride(conv: nn.modules.conv._ConvNd, stride: int) -> None:
    dims = len(conv.kernel_size)
    conv.stride = (stride,) * dims
    if type(conv).__name__.endswith("Same") or getattr(conv, "same_pad", False):
        return  # timm's 'same' convolutions pad for their stride at run time
    eff = [d * (k - 1) for k, d in zip(conv.kernel_size, conv.dilation)]
    if stride == 1 and any(e % 2 for e in eff):
        conv.padding = "same"  # even kernels: asymmetric padding keeps the size
    else:
        conv.padding = tuple(e // 2 for e in eff)


def _is_spatial_op(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A convolution with a kernel larger than 1, or a pooling window."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if isinstance(mod, nn.modules.conv._ConvNd):
            return any(k > 1 for k in mod.kernel_size)
        return isinstance(mod, _POOL_MODULES)
    return node.op == "call_function" and node.target in _POOL_FUNCTIONS


def _set_stride(gm: fx.GraphModule, node: fx.Node, stride: int) -> None:
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if isinstance(mod, nn.modules.conv._ConvNd):
            _set_conv_stride(mod, stride)
            return
        if isinstance(mod, _POOL_MODULES):
            if stride == 1:
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
            else:
                mod.stride = stride
                # Floor mode and half-kernel padding give ceil(H/2), as strided convs do.
                mod.ceil_mode = False
                if isinstance(mod.kernel_size, int) and mod.kernel_size > 1 and mod.padding == 0 \
                        and mod.kernel_size % 2:
                    mod.padding = mod.kernel_size // 2
            return
    if node.op == "call_function" and node.target in _POOL_FUNCTIONS:
        if stride == 1:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
        else:
            args = list(node.args)
            kwargs = dict(node.kwargs)
            if len(args) > 2:
                args[2] = stride
            else:
                kwargs["stride"] = stride
            node.args, node.kwargs = tuple(args), kwargs
        return
    raise AugLocalError(
        f"cannot change the stride of {describe_node(node)}"
    )


def _adapt_stride(gm: fx.GraphModule, stride: int) -> None:
    """Make the copy reduce its input resolution by ``stride`` (1 or 2) exactly."""
    graph = gm.graph
    placeholder = next(n for n in graph.nodes if n.op == "placeholder")
    r0 = _resolution(placeholder.meta.get(SHAPE_KEY))
    if r0 is None:
        return
    want = int(round(math.log2(stride)))
    output = next(n for n in graph.nodes if n.op == "output")
    r_out = _resolution(output.args[0].meta.get(SHAPE_KEY)) if isinstance(output.args[0], fx.Node) else None
    has = int(round(math.log2(r0 / r_out))) if r_out else 0
    reducing = []
    for node in graph.nodes:
        res_out = _resolution(node.meta.get(SHAPE_KEY))
        ins = [_resolution(a.meta.get(SHAPE_KEY)) for a in _tensor_inputs(node)]
        ins = [r for r in ins if r is not None]
        if res_out is None or not ins or node.op == "output":
            continue
        res_in = max(ins)
        if res_out < res_in and (res_out > 1 or _has_stride(gm, node)):
            # (a reduction to 1x1 by a stride-less op is a global pooling, as in SE modules)
            level_in = int(round(math.log2(r0 / res_in)))
            level_out = int(round(math.log2(r0 / res_out)))
            reducing.append((node, level_in, level_out))
    for node, level_in, level_out in reducing:
        new = 2 ** (min(level_out, want) - min(level_in, want))
        if new != 2 ** (level_out - level_in):
            _set_stride(gm, node, new)
    if has < want:
        _add_first_strides(gm, placeholder)
    graph.lint()


def _has_stride(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        stride = getattr(mod, "stride", 1)
        return any(v > 1 for v in (stride if isinstance(stride, tuple) else (stride,)))
    return node.op == "call_function" and node.target in _POOL_FUNCTIONS


def _add_first_strides(gm: fx.GraphModule, placeholder: fx.Node) -> None:
    """Stride 2 at the first spatial op of every path from the input (merges are repaired)."""
    deps = _dependent(gm.graph)
    marked: List[fx.Node] = []
    pointwise = False
    seen = set()
    stack = list(placeholder.users)
    while stack:
        node = stack.pop()
        if node in seen or node.op == "output":
            continue
        seen.add(node)
        if len(_activation_inputs(node, deps)) > 1:
            continue
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.modules.conv._ConvNd):
            pointwise = True
        if _is_spatial_op(gm, node):
            marked.append(node)
            continue
        stack.extend(node.users)
    if not marked and pointwise:
        # Only 1x1 convolutions: pool the input 2x2 rather than stride a 1x1 convolution past
        # three of every four positions (ceil mode gives ceil(H/2), as that stride would).
        gm.add_submodule("auglocal_input_pool", nn.AvgPool2d(2, ceil_mode=True))
        with gm.graph.inserting_after(placeholder):
            pool = gm.graph.call_module("auglocal_input_pool", (placeholder,))
        placeholder.replace_all_uses_with(pool, delete_user_cb=lambda user: user is not pool)
    # Nothing to stride otherwise (a leaf module): the copy is pooled to the planned size afterwards.
    for node in marked:
        _set_stride(gm, node, 2)


# ---------------------------------------------------------------------------------------------
# channel adaptation


def _resize_conv(conv: nn.modules.conv._ConvNd, in_channels: int) -> nn.Module:
    new = copy.deepcopy(conv)
    groups = conv.groups
    if groups > 1 and in_channels % groups:
        raise _NeedsAdapter
    new.in_channels = in_channels
    shape = (new.out_channels, in_channels // groups, *conv.kernel_size)
    if conv.transposed:
        shape = (in_channels, new.out_channels // groups, *conv.kernel_size)
    new.weight = nn.Parameter(torch.empty(shape, device=conv.weight.device, dtype=conv.weight.dtype))
    new.reset_parameters()
    return new


def _resize_linear(linear: nn.Linear, in_features: int) -> nn.Module:
    new = copy.deepcopy(linear)
    new.in_features = in_features
    new.weight = nn.Parameter(torch.empty(linear.out_features, in_features,
                                          device=linear.weight.device, dtype=linear.weight.dtype))
    new.reset_parameters()
    return new


def _feature_count(module: nn.Module) -> Optional[int]:
    for attr in ("num_features", "num_channels"):
        if isinstance(getattr(module, attr, None), int):
            return getattr(module, attr)
    shape = getattr(module, "normalized_shape", None)
    if shape:
        return int(shape[-1])
    return None


def _resize_norm(norm: nn.Module, old: int, new_count: int) -> nn.Module:
    new = copy.deepcopy(norm)
    for module in new.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.dim() == 1 and param.shape[0] == old:
                module._parameters[name] = nn.Parameter(
                    torch.ones(new_count, dtype=param.dtype, device=param.device))
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.dim() == 1 and buf.shape[0] == old:
                module._buffers[name] = torch.zeros(new_count, dtype=buf.dtype, device=buf.device)
        if getattr(module, "num_features", None) == old:
            module.num_features = new_count
        if getattr(module, "num_channels", None) == old:
            module.num_channels = new_count
            groups = getattr(module, "num_groups", 1)
            module.num_groups = math.gcd(groups, new_count)
        shape = getattr(module, "normalized_shape", None)
        if shape and shape[-1] == old:
            module.normalized_shape = (*shape[:-1], new_count)
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
        elif hasattr(module, "reset_running_stats"):
            module.reset_running_stats()
    return new


def _is_norm_like(module: nn.Module) -> bool:
    params = list(module.parameters()) + list(module.buffers())
    return bool(params) and all(t.dim() <= 1 for t in params) and _feature_count(module) is not None


def _refit_module(gm: fx.GraphModule, node: fx.Node, value: torch.Tensor,
                  original: Optional[torch.Size]) -> None:
    """Re-create the module at ``node`` for the channel count of ``value`` if it differs."""
    module = gm.get_submodule(node.target)
    if isinstance(module, nn.modules.conv._ConvNd):
        if value.dim() >= 3 and value.shape[1] != module.in_channels:
            if module.groups > 1 and module.groups == module.in_channels:
                raise _NeedsAdapter  # depthwise: keep the block's own width
            _replace_module(gm, node.target, _resize_conv(module, int(value.shape[1])))
    elif isinstance(module, nn.Linear):
        if value.shape[-1] != module.in_features:
            _replace_module(gm, node.target, _resize_linear(module, int(value.shape[-1])))
    elif _is_norm_like(module):
        old = _feature_count(module)
        if original is None or len(original) != value.dim():
            return
        for dim in (1, -1):
            if original[dim] == old and value.shape[dim] != old:
                _replace_module(gm, node.target, _resize_norm(module, old, int(value.shape[dim])))
                return
    elif any(True for _ in module.parameters()):
        if original is not None and tuple(value.shape[1:2]) != tuple(original[1:2]):
            raise _NeedsAdapter


def _projection(in_channels: int, out_channels: int, stride: int, dims: int) -> nn.Module:
    # On the meta device: it is initialised once, when the copy is materialized.
    if dims == 2:
        return nn.Sequential(nn.Linear(in_channels, out_channels, bias=False, device="meta"),
                             nn.BatchNorm1d(out_channels, device="meta"))
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False, device="meta"),
        nn.BatchNorm2d(out_channels, device="meta"),
    )


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
            env[new] = module(env[source])
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


def _fetch_attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


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


def _meta_copy(source: fx.GraphModule, name: str) -> fx.GraphModule:
    """A copy named ``name`` whose tensors live on the meta device: nothing is computed or copied.

    Only the modules and attributes the graph uses are copied, and the graph node by node
    (each node's recorded shapes with it); a deep copy of the whole GraphModule pickles its graph
    through ``copy.deepcopy`` and generates its code twice, a sixth of a conversion.
    """
    memo: Dict[int, Any] = {}
    for module in source.modules():
        for param in module._parameters.values():
            if param is not None and id(param) not in memo:
                memo[id(param)] = nn.Parameter(torch.empty_like(param, device="meta"),
                                               requires_grad=param.requires_grad)
        for buf in module._buffers.values():
            if buf is not None and id(buf) not in memo:
                memo[id(buf)] = torch.empty_like(buf, device="meta")
    graph = fx.Graph()
    graph._codegen = copy.deepcopy(source.graph._codegen)
    values: Dict[fx.Node, fx.Node] = {}
    attrs: Dict[str, Any] = {}
    for node in source.graph.nodes:
        values[node] = graph.node_copy(node, lambda n: values[n])
        if node.op in ("call_module", "get_attr") and node.target not in attrs:
            attrs[node.target] = copy.deepcopy(_fetch_attr(source, node.target), memo)
    return fx.GraphModule(attrs, graph, name)


def _materialize(gm: fx.GraphModule, source: fx.GraphModule, device: torch.device,
                 init: Optional[InitReference], copy_weights: bool = False) -> None:
    """Allocate the copy's tensors on ``device`` and initialise them afresh.

    Parameters are drawn as the source model initialised the parameters they copy (``init``,
    see :mod:`auglocal_fx.initialization`); without ``init``, modules with a
    ``reset_parameters`` get PyTorch's default. Running statistics start anew; other buffers
    take the source's value where the shape is unchanged (constant buffers), else ones for
    norm weights and zeros otherwise. With ``copy_weights``, every parameter and buffer whose
    shape the adaptation kept then takes the source's current value (``aux_init="copy"``).
    """
    gm.to_empty(device=device)
    source_modules = dict(source.named_modules())
    twins = dict(source.named_parameters())
    twins.update(dict(source.named_buffers()))
    with torch.no_grad():
        for prefix, module in gm.named_modules():
            sources: Dict[str, nn.Parameter] = {}
            if init is not None and not prefix.startswith("auglocal_"):  # added modules: no twin
                twin_module = source_modules.get(prefix)
                if twin_module is not None:
                    sources = dict(twin_module.named_parameters(recurse=False))
            resets = hasattr(module, "reset_parameters")
            # Initialise each parameter once: PyTorch's default draw is skipped where the init
            # rule draws every parameter anyway (a leaf: its reset touches its own tensors only).
            # It was a quarter of a ResNet-50 conversion at d=6; the init rule's draws are unchanged.
            drawn = init is not None and not any(True for _ in module.children()) \
                and init.draws_all(module, sources)
            if resets and not drawn:
                module.reset_parameters()
            if hasattr(module, "reset_running_stats"):
                module.reset_running_stats()
            else:
                tensors = list(module._buffers.items())
                if not resets and not drawn:
                    tensors += list(module._parameters.items())
                for name, tensor in tensors:
                    if tensor is None:
                        continue
                    twin = twins.get(f"{prefix}.{name}" if prefix else name)
                    if twin is not None and twin.shape == tensor.shape:
                        tensor.copy_(twin)
                    elif name.endswith("weight") or name.endswith("running_var"):
                        tensor.fill_(1.0)
                    else:
                        tensor.zero_()
            if init is not None:
                init.initialise_(module, sources)
            if copy_weights and not prefix.startswith("auglocal_"):  # modules the adaptation added
                for name, tensor in list(module._parameters.items()) + list(module._buffers.items()):
                    twin = twins.get(f"{prefix}.{name}" if prefix else name)
                    if tensor is not None and twin is not None and twin.shape == tensor.shape:
                        tensor.copy_(twin)


def _insert_input_adapter(gm: fx.GraphModule, adapter: nn.Module, want: torch.Size) -> None:
    """Run ``adapter`` on the copy's input first; the copy then sees the shape ``want``."""
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    gm.add_submodule("auglocal_input_adapter", adapter.to("meta"))
    with gm.graph.inserting_after(placeholder):
        node = gm.graph.call_module("auglocal_input_adapter", (placeholder,))
    placeholder.replace_all_uses_with(node, delete_user_cb=lambda user: user is not node)
    node.meta["auglocal_original_shape"] = want


def _adapt(source: fx.GraphModule, in_shape: Tuple[int, ...], stride: Optional[int],
           adapter: Optional[str], in_layout: str, name: str) -> Tuple[fx.GraphModule, torch.Tensor]:
    """Adapt a meta copy of ``source``, named ``name``, to ``in_shape``.

    ``adapter``: ``None`` (layer by layer), ``"channels"`` (a 1x1 conv + BN restores the input
    width, strides still adapted) or ``"shape"`` (a :class:`ShapeAdapter` restores the whole
    input shape; the copy keeps its own strides).
    """
    gm = _meta_copy(source, name)
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    want = placeholder.meta.get(SHAPE_KEY)
    if adapter == "shape":
        stride = None
        if tuple(want[1:]) != in_shape:
            _insert_input_adapter(gm, ShapeAdapter(in_shape, in_layout, tuple(want[1:]),
                                                   input_layout(source)), want)
    if stride is not None:
        _adapt_stride(gm, stride)
    if adapter == "channels" and want is not None and len(want) == 4 and int(want[1]) != in_shape[0]:
        _insert_input_adapter(gm, _projection(in_shape[0], int(want[1]), 1, 4), want)
    out = _Repairer(gm, in_shape).run()  # runs node by node: no code generation needed yet
    if stride is not None and out.dim() == 4 and len(in_shape) == 3:
        expected = tuple(math.ceil(v / stride) for v in in_shape[1:])
        if any(o > e for o, e in zip(out.shape[2:], expected)):
            # A reduction that is not a stride (a valid convolution, a leaf module): pool to the
            # planned resolution. (A smaller output comes from an adaptive pooling to a fixed
            # size, as VGG's before its classifier, and is kept.)
            output = next(n for n in gm.graph.nodes if n.op == "output")
            gm.add_submodule("auglocal_resize", nn.AdaptiveAvgPool2d(expected))
            with gm.graph.inserting_before(output):
                node = gm.graph.call_module("auglocal_resize", (output.args[0],))
            output.args = (node,)
            out = F.adaptive_avg_pool2d(out, expected)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.delete_all_unused_submodules()  # a pooling made stride 1, a dead branch's layers
    gm.recompile()
    return gm, out



def adapt_copy(source: fx.GraphModule, in_shape: Sequence[int], stride: Optional[int],
               name: str, init: Optional[InitReference] = None,
               label: Optional[str] = None,
               in_layout: Optional[str] = None,
               notes: Optional[List[Tuple[str, str, str]]] = None,
               copy_weights: bool = False,
               ) -> Tuple[fx.GraphModule, Tuple[int, ...]]:
    """A fresh copy of ``source`` that takes ``in_shape`` and reduces by ``stride``.

    The adaptation runs on the meta device (shapes only), then the copy is allocated and
    freshly initialised on the source's device. Channels-first copies (ConvNets) are adapted
    layer by layer (docs/method.md, rule 5); blocks whose code hard-codes their channel counts
    (DPN's slicing, MixNet's splits) get a 1x1 conv + BN at their input instead. Where neither
    works (a stride inside attention windows, a channel shuffle, a fixed-size attention), and
    for token and channels-last copies whose input differs from their own, a
    :class:`~auglocal_fx.layouts.ShapeAdapter` (average pooling + linear projection) gives the
    copy its original input shape (rule 11), with a warning naming the copied modules.

    Args:
        source: a block's (or the head's) eval-mode subgraph with recorded shapes.
        in_shape: the shape (no batch) that will reach the copy.
        stride: 1 or 2 for block copies; ``None`` for the head (no stride change).
        name: class name of the resulting GraphModule.
        init: initial-value statistics of the source model; ``None``: PyTorch's defaults.
        label: how messages name the copied block (its modules); default ``name``.
        in_layout: the layout of ``in_shape`` (see :mod:`auglocal_fx.layouts`); default: read
            from the shape.
        notes: given, an input adapter is recorded here as ``(label, adapter, reason)``
            instead of warned about (:func:`warn_adapters` says it once per conversion).
        copy_weights: start from ``source``'s current weights where the shape was kept
            (``aux_init="copy"``, see the module docstring); the rest is drawn by ``init``.

    Returns:
        The adapted copy (training mode, fresh weights) and its output shape without batch.
    """
    device = next((t.device for t in source.parameters()), torch.device("cpu"))
    shape = tuple(int(v) for v in in_shape)
    layout = in_layout or layout_of(shape)
    own_shape = tuple(next(n for n in source.graph.nodes if n.op == "placeholder").meta[SHAPE_KEY][1:])
    own_layout = input_layout(source)
    if layout == own_layout and layout in (NCHW, FLAT):
        attempts: List[Optional[str]] = [None, "channels", "shape"]
    elif shape == own_shape or (layout == own_layout and
                                grid_size(shape, layout) == grid_size(own_shape, own_layout)):
        attempts = [None, "shape"]
    else:
        attempts = ["shape"]
    errors: List[BaseException] = []
    for adapter in attempts:
        try:
            gm, out = _adapt(source, shape, stride, adapter, layout, name)
            break
        except _ADAPTATION_ERRORS as exc:
            errors.append(exc)
    else:
        raise AugLocalError(
            f"cannot build {label or name}: {first_line(errors[0])}; "
            + (f"with an input adapter: {first_line(errors[-1])}; " if len(errors) > 1 else "")
            + "give other block boundaries (block_boundaries=) or another selection"
        ) from errors[-1]
    if adapter == "channels" or (adapter == "shape" and shape != own_shape):
        reason = first_line(errors[0]) if errors else (
            f"it takes {own_layout} features of shape {own_shape}")
        note = (label or name, adapter, reason)
        if notes is None:
            warn_adapters([note], stacklevel=3)
        else:
            notes.append(note)
    _materialize(gm, source, device, init, copy_weights)
    gm.train()
    return gm, tuple(out.shape[1:])


def warn_adapters(notes: Sequence[Tuple[str, str, str]], stacklevel: int = 2) -> None:
    """One warning for the copies that got an input adapter (see :func:`adapt_copy`)."""
    if not notes:
        return
    by_kind: Dict[str, Dict[str, str]] = {}
    for label, kind, reason in notes:
        by_kind.setdefault(kind, {}).setdefault(label, reason)
    for kind, copies in by_kind.items():
        first, reason = next(iter(copies.items()))
        listed = "; ".join(list(copies)[:4]) + (f"; and {len(copies) - 4} more" if len(copies) > 4 else "")
        if kind == "channels":
            action = ("a 1x1 conv + BatchNorm input adapter restores the channels they were "
                      "built for")
        else:
            action = ("they keep their own strides and widths and take their original input "
                      "shape through average pooling + a linear projection (docs/method.md, rule 11)")
        warnings.warn(
            f"auglocal-fx: auxiliary copies of {listed} cannot be adapted layer by layer "
            f"({first}: {reason}); {action}",
            stacklevel=stacklevel + 1,
        )


def _module_list(names: Sequence[str], most: int = 3) -> str:
    shown = ", ".join(names[:most]) or "no modules"
    return shown + (f", ... ({len(names)} modules)" if len(names) > most else "")


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


def synthesize_aux_net(partition: Partition, plan: AuxPlan,
                       init: Optional[InitReference] = None,
                       notes: Optional[List[Tuple[str, str, str]]] = None,
                       aux_head: str = "auto", aux_init: str = "init") -> AuxNet:
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

    Returns:
        An :class:`AuxNet` mapping block ``j``'s output to ``(N, num_classes)`` logits. With one
        copied block, the head copy has a BatchNorm1d before its linear classifier, as the
        authors' code builds it.
    """
    validate_aux_init(aux_init)
    copy_weights = aux_init == "copy"
    shape = partition.block_shapes[plan.block]
    layout = partition.output_layout(plan.block)
    planned = resolution(shape, layout)
    modules: List[nn.Module] = []
    for k, stride in zip(plan.selected, plan.strides):
        label = f"block {k} ({_module_list(partition.block_names[k])})"
        current = resolution(shape, layout)
        if current != planned:
            # An earlier copy kept its own resolution (input adapter): reduce while this copy's
            # input is finer than the original block's output.
            target = partition.resolutions[k]
            stride = 2 if current > 0 and target > 0 and round(math.log2(current / target)) >= 1 else 1
        copy_gm, shape = adapt_copy(partition.blocks[k].eval_graph, shape, stride,
                                    f"Aux{plan.block}CopyOfBlock{k}", init, label, layout, notes,
                                    copy_weights)
        planned = math.ceil(planned / stride)
        layout = partition.output_layout(k)
        modules.append(copy_gm)
    if choose_aux_head(partition, aux_head) == "slim":
        reference = next(partition.head.eval_graph.parameters())
        head: nn.Module = slim_head(_num_classes(partition), reference.device, reference.dtype,
                                    init)
    else:
        head, _ = adapt_copy(partition.head.eval_graph, shape, None, f"Aux{plan.block}Head", init,
                             f"the head ({_module_list(partition.head_names)})", layout, notes,
                             copy_weights)
        if len(plan.selected) == 1:
            _insert_norm_before_classifier(head)
    modules.append(head)
    return AuxNet(modules, plan)
