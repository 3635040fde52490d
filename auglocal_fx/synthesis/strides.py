"""Stride adaptation: a copy reduces its input resolution by exactly the planned factor (1 or 2).

Strides of the original's reducing convolutions and poolings are lowered (a removed 2x pooling
becomes nothing), or the first spatial operation on each path from the input gets stride 2; a copy
with no spatial operation (only 1x1 convolutions) gets a 2x2 average pooling of its input instead
(see :mod:`auglocal_fx.synthesis`).

``aux_resolution="source"`` replaces that plan for channels-first copies: each copy's input is
first average-pooled to the resolution its source block's input has in the primary network,
and the copy keeps its source's own strides, so it sees its source's shapes (``source_pooling``).
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..errors import AugLocalError
from ..tracing import SHAPE_KEY, describe_node
from .nodes import _activation_inputs, _dependent, _resolution, _tensor_inputs


AUX_RESOLUTIONS = ("paper", "source")

_POOL_FUNCTIONS = {F.max_pool2d, F.avg_pool2d, torch.max_pool2d}
_POOL_MODULES = (nn.MaxPool2d, nn.AvgPool2d)


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


def validate_aux_resolution(aux_resolution: str) -> None:
    """Raises AugLocalError for an unknown ``aux_resolution``."""
    if aux_resolution not in AUX_RESOLUTIONS:
        raise AugLocalError(
            f"unknown auxiliary resolution {aux_resolution!r}: choose one of "
            f"{', '.join(AUX_RESOLUTIONS)} (source: each copy runs at its source block's "
            "resolution; paper: at most one 2x reduction per copy)"
        )


def source_pooling(source: fx.GraphModule, in_shape: Sequence[int], channels_first: bool,
                   planned: Optional[int]) -> Tuple[Optional[Tuple[int, int]], Optional[int]]:
    """How a copy of ``source`` meets ``in_shape`` under ``aux_resolution="source"``.

    Returns ``(pool_to, stride)``: the ``(H, W)`` to average-pool the input to first (``None``:
    no pooling) and the stride for :func:`_adapt_stride` (``None``: the copy keeps its source's
    strides). A channels-first input at least as fine as the source's own input is pooled to
    it (where coarser) and the copy keeps its strides, so it sees its source's shapes; any other
    input (a coarser one, other layouts, whose copies take their own input shape through a
    ``ShapeAdapter`` anyway) keeps the ``planned`` stride.
    """
    own = next(n for n in source.graph.nodes if n.op == "placeholder").meta.get(SHAPE_KEY)
    if not channels_first or own is None or len(own) != 4 or len(in_shape) != 3:
        return None, planned
    target = (int(own[2]), int(own[3]))
    size = (int(in_shape[1]), int(in_shape[2]))
    if size[0] < target[0] or size[1] < target[1]:
        return None, planned
    return (target if size != target else None), None
