"""Feature layouts between blocks: ``NCHW`` maps, channels-last maps, token sequences.

ConvNets pass ``(N, C, H, W)`` maps between blocks; Swin passes ``(N, H, W, C)``; ViT, PVT and
LeViT pass ``(N, T, C)`` tokens, where ``T = P + H*W`` holds ``P`` prefix (class, distillation)
tokens before an ``H x W`` grid. docs/method.md, rule 11, says how auxiliary copies use this:
a copy that cannot be re-strided or re-widened gets its original input shape through a
``ShapeAdapter`` (average pooling on the grid + a linear projection of the channels).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn

from .errors import AugLocalError
from .tracing import SHAPE_KEY

__all__ = ["NCHW", "NHWC", "TOKENS", "FLAT", "layout_of", "input_layout", "grid_size",
           "resolution", "main_placeholder", "ShapeAdapter"]

NCHW, NHWC, TOKENS, FLAT = "NCHW", "NHWC", "tokens", "flat"

_MAX_PREFIX_TOKENS = 8


def layout_of(shape: Sequence[int]) -> str:
    """The layout of one example's feature shape (no batch dimension), from the shape alone.

    Rank 3 is ``NCHW`` unless the first two sizes are equal and the last differs (``H, W, C``).
    """
    if len(shape) == 1:
        return FLAT
    if len(shape) == 2:
        return TOKENS
    if len(shape) == 3 and shape[0] == shape[1] and shape[2] != shape[1]:
        return NHWC
    return NCHW


def main_placeholder(gm: fx.GraphModule) -> fx.Node:
    """The input a graph's layout is read from: its last placeholder (a tuple's newest stream)."""
    return [n for n in gm.graph.nodes if n.op == "placeholder"][-1]


def _first_layer(gm: fx.GraphModule) -> Optional[nn.Module]:
    """The first conv, linear or norm module the input reaches through shape-only operations."""
    placeholder = main_placeholder(gm)
    frontier = list(placeholder.users)
    seen = set()
    while frontier:
        node = frontier.pop(0)
        if node in seen:
            continue
        seen.add(node)
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear, nn.LayerNorm,
                                   nn.modules.batchnorm._NormBase, nn.GroupNorm)):
                return module
        if node.op == "call_method" and node.target in ("permute", "transpose", "flatten"):
            return None  # the block rearranges its input itself: trust the shape
        frontier.extend(node.users)
    return None


def input_layout(gm: fx.GraphModule) -> str:
    """The layout ``gm`` (a block or head subgraph) takes, from its recorded input shape.

    The shape decides unless ambiguous for a rank-3 shape, where the first layer the input
    reaches settles it: a convolution or BatchNorm2d reads channels first, a LayerNorm or Linear
    over the last size reads channels last.
    """
    placeholder = main_placeholder(gm)
    shape = tuple(placeholder.meta[SHAPE_KEY][1:])
    guess = layout_of(shape)
    if len(shape) != 3:
        return guess
    layer = _first_layer(gm)
    if isinstance(layer, (nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.GroupNorm)):
        return NCHW
    if isinstance(layer, nn.Linear) and layer.in_features == shape[-1] != shape[0]:
        return NHWC
    if isinstance(layer, nn.LayerNorm) and tuple(layer.normalized_shape) == (shape[-1],) \
            and shape[-1] != shape[0]:
        return NHWC
    return guess


def grid_size(shape: Sequence[int], layout: str) -> Tuple[int, int, int]:
    """``(P, H, W)``: prefix tokens and spatial grid of one example's shape.

    Tokens are taken as ``P`` prefix tokens before a square grid, with the smallest ``P`` that
    makes one (``T`` itself a square: no prefix).
    """
    if layout == NCHW:
        return 0, int(shape[1]), int(shape[2])
    if layout == NHWC:
        return 0, int(shape[0]), int(shape[1])
    if layout == TOKENS:
        tokens = int(shape[0])
        for prefix in range(min(_MAX_PREFIX_TOKENS, tokens - 1) + 1):
            side = math.isqrt(tokens - prefix)
            if side * side == tokens - prefix:
                return prefix, side, side
        return 0, tokens, 1
    return 0, 1, 1


def channels(shape: Sequence[int], layout: str) -> int:
    """The channel count of one example's shape in ``layout``."""
    return int(shape[0]) if layout in (NCHW, FLAT) else int(shape[-1])


def resolution(shape: Sequence[int], layout: Optional[str] = None) -> int:
    """The spatial height of a feature shape (1 for flat features)."""
    return grid_size(shape, layout or layout_of(shape))[1]


class ShapeAdapter(nn.Module):
    """Maps features of one shape and layout to another: pooled grid, projected channels.

    The grid is average-pooled (adaptive) to the target size; channels are projected by a
    bias-free linear map followed by the target layout's usual norm (BatchNorm2d for maps,
    LayerNorm for channels-last); prefix tokens are kept where both sides have as many, else
    the target's are the grid's mean. Nothing is learned where shapes agree.

    Args:
        in_shape: one example's input shape; ``in_layout`` its layout.
        out_shape: the shape to produce; ``out_layout`` its layout.
    """

    def __init__(self, in_shape: Sequence[int], in_layout: str, out_shape: Sequence[int],
                 out_layout: str):
        super().__init__()
        if FLAT in (in_layout, out_layout):
            raise AugLocalError(
                f"cannot adapt features of shape {tuple(in_shape)} to {tuple(out_shape)}: one "
                "side has no spatial grid")
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        self.in_layout, self.out_layout = in_layout, out_layout
        self.in_prefix, *_ = grid_size(in_shape, in_layout)
        self.out_prefix, self.out_h, self.out_w = grid_size(out_shape, out_layout)
        c_in, c_out = channels(in_shape, in_layout), channels(out_shape, out_layout)
        if c_in != c_out:
            self.proj: nn.Module = nn.Linear(c_in, c_out, bias=False)
            self.norm: nn.Module = nn.BatchNorm2d(c_out) if out_layout == NCHW else nn.LayerNorm(c_out)
        else:
            self.proj = nn.Identity()
            self.norm = nn.Identity()

    def extra_repr(self) -> str:
        return f"{self.in_shape} {self.in_layout} -> {self.out_shape} {self.out_layout}"

    def _to_grid(self, x: torch.Tensor) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
        """``(prefix tokens (N, P, C) or None, grid (N, C, H, W))``."""
        if self.in_layout == NCHW:
            return None, x
        if self.in_layout == NHWC:
            return None, x.permute(0, 3, 1, 2)
        _, h, w = grid_size(self.in_shape, self.in_layout)
        prefix = x[:, :self.in_prefix] if self.in_prefix else None
        grid = x[:, self.in_prefix:].transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)
        return prefix, grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        prefix, grid = self._to_grid(x)
        if tuple(grid.shape[-2:]) != (self.out_h, self.out_w):
            grid = F.adaptive_avg_pool2d(grid, (self.out_h, self.out_w))
        tokens = grid.flatten(2).transpose(1, 2)  # (N, H*W, C): project channels last
        if self.out_prefix:
            if prefix is None or prefix.shape[1] != self.out_prefix:
                prefix = tokens.mean(1, keepdim=True).expand(-1, self.out_prefix, -1)
            tokens = torch.cat([prefix, tokens], 1)
        tokens = self.proj(tokens)
        if self.out_layout == TOKENS:
            return self.norm(tokens)
        out = tokens.reshape(x.shape[0], self.out_h, self.out_w, -1)
        if self.out_layout == NHWC:
            return self.norm(out)
        return self.norm(out.permute(0, 3, 1, 2).contiguous())
