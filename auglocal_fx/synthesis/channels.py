"""Channel refitting: a layer that receives another channel count is re-created for it.

A weight layer or norm is re-created with the same class and options and the new width; what
cannot take the new width (a depthwise convolution, a module with hard-coded channels) raises
:class:`_NeedsAdapter`, and the repair puts a 1x1 projection in front of it
(:mod:`auglocal_fx.synthesis.repair`).
"""

from __future__ import annotations

import copy
import math
from typing import Optional

import torch
from torch import fx, nn

from .nodes import _replace_module


class _NeedsAdapter(Exception):
    """A module that cannot be re-created for the new channel count."""


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
