"""Auxiliary copies of blocks whose boundaries carry a tuple of tensors, and their heads.

A copy of block ``k`` takes the tuple block ``k`` takes (docs/models.md, "Several streams"):
the selection keeps only blocks of the right arity (:func:`auglocal_fx.planning.match_arity`).
Each element whose shape differs from the one its placeholder was built for goes through a
:class:`~auglocal_fx.layouts.ShapeAdapter` (grid average-pooled, channels projected), and the
copy keeps its source's strides and widths, as rule 11's copies do: a cell's inputs have
resolutions of their own, so no one stride factor fits them all. Where the copies end on a
tuple and the network's head takes one tensor, :class:`PoolConcat` pools each element and
concatenates, before a BatchNorm1d + linear classifier (or the slim head).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import fx, nn

from ..initialization import InitReference
from ..layouts import NCHW, NHWC, TOKENS, ShapeAdapter, channels, layout_of
from ..tracing import SHAPE_KEY
from .copies import _materialize, _meta_copy
from .heads import slim_head

__all__ = ["PoolConcat", "TupleHead", "adapt_tuple_copy", "element_layouts", "tuple_head"]

Shapes = Tuple[Tuple[int, ...], ...]


def element_layouts(shapes: Shapes, last: str) -> Tuple[str, ...]:
    """The layout of each element: read from its shape, the last (the main stream) given."""
    return tuple(layout_of(s) for s in shapes[:-1]) + (last,)


def _insert_adapters(gm: fx.GraphModule, adapters: Sequence[Optional[nn.Module]]) -> None:
    """Run ``adapters[k]`` (where not ``None``) on placeholder ``k`` before anything else."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for k, (placeholder, adapter) in enumerate(zip(placeholders, adapters)):
        if adapter is None:
            continue
        name = f"auglocal_input_adapter_{k}"
        gm.add_submodule(name, adapter.to("meta"))
        with gm.graph.inserting_after(placeholders[-1]):
            node = gm.graph.call_module(name, (placeholder,))
        placeholder.replace_all_uses_with(node, delete_user_cb=lambda user: user is not node)


def adapt_tuple_copy(source: fx.GraphModule, in_shapes: Shapes, in_layouts: Sequence[str],
                     own_layouts: Sequence[str], name: str, init: Optional[InitReference] = None,
                     copy_weights: bool = False) -> Tuple[fx.GraphModule, Shapes, List[int]]:
    """A fresh copy of ``source`` (a block taking or returning a tuple) for ``in_shapes``.

    Args:
        source: the block's eval-mode subgraph with recorded shapes.
        in_shapes: the shape (no batch) of each element that will reach the copy, in order.
        in_layouts: their layouts; ``own_layouts``: the layouts ``source`` takes.
        name: class name of the copy.
        init: initial-value statistics of the source model; ``None``: PyTorch's defaults.
        copy_weights: start from ``source``'s weights where the shape was kept.

    Returns:
        The copy (training mode, fresh weights), the shapes it returns, and the positions of
        the elements that got an adapter.
    """
    placeholders = [n for n in source.graph.nodes if n.op == "placeholder"]
    own = [tuple(p.meta[SHAPE_KEY][1:]) for p in placeholders]
    gm = _meta_copy(source, name)
    adapters: List[Optional[nn.Module]] = []
    for shape, layout, want, want_layout in zip(in_shapes, in_layouts, own, own_layouts):
        same = tuple(shape) == want and layout == want_layout
        adapters.append(None if same else ShapeAdapter(shape, layout, want, want_layout))
    _insert_adapters(gm, adapters)
    gm.graph.lint()
    gm.recompile()
    device = next((t.device for t in source.parameters()), torch.device("cpu"))
    _materialize(gm, source, device, init, copy_weights)
    gm.train()
    # Every element reaches the copy in the shape its source takes: its outputs are the source's.
    output = next(n for n in source.graph.nodes if n.op == "output").args[0]
    outputs = output if isinstance(output, tuple) else (output,)
    shapes = tuple(tuple(int(v) for v in n.meta[SHAPE_KEY][1:]) for n in outputs)
    return gm, shapes, [k for k, a in enumerate(adapters) if a is not None]


class PoolConcat(nn.Module):
    """Each element averaged over its grid (or tokens) to ``(N, C)``, then concatenated."""

    def __init__(self, layouts: Sequence[str]):
        super().__init__()
        self.layouts = tuple(layouts)

    def extra_repr(self) -> str:
        return ", ".join(self.layouts)

    def forward(self, *x: torch.Tensor) -> torch.Tensor:
        pooled = []
        for t, layout in zip(x, self.layouts):
            if layout == NCHW:
                t = t.mean((2, 3))
            elif layout == NHWC:
                t = t.mean((1, 2))
            elif layout == TOKENS:
                t = t.mean(1)
            pooled.append(t.flatten(1))
        return torch.cat(pooled, 1)


class TupleHead(nn.Module):
    """Logits from a tuple: :class:`PoolConcat`, then ``tail`` (BatchNorm1d + linear, or slim)."""

    def __init__(self, layouts: Sequence[str], tail: nn.Module):
        super().__init__()
        self.pool = PoolConcat(layouts)
        self.tail = tail

    def forward(self, *x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.pool(*x))


def tuple_head(shapes: Shapes, layouts: Sequence[str], num_classes: int, slim: bool,
               device: torch.device, dtype: torch.dtype,
               init: Optional[InitReference] = None) -> TupleHead:
    """The head of an auxiliary network whose copies end on a tuple (see :class:`TupleHead`)."""
    width = sum(channels(s, layout) for s, layout in zip(shapes, layouts))
    if slim:
        tail: nn.Module = slim_head(num_classes, device, dtype, init)
    else:
        tail = nn.Sequential(nn.BatchNorm1d(width), nn.Linear(width, num_classes)).to(device, dtype)
        if init is not None:
            with torch.no_grad():
                for module in tail.modules():
                    init.initialise_(module, {})
    return TupleHead(layouts, tail)
