"""Adapted copies of a block or head: a meta-device copy adapted to its input, then materialized.

The adaptation (strides, channels, repair) runs on the meta device, shapes only; the copy is then
allocated on the source's device and each parameter initialised once, by the source model's init
rule (``aux_init="init"``) or from the source's weights where the shape was kept
(``aux_init="copy"``); see :mod:`auglocal_fx.synthesis`.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..errors import AugLocalError, first_line
from ..initialization import InitReference
from ..layouts import FLAT, NCHW, ShapeAdapter, grid_size, input_layout, layout_of
from ..tracing import SHAPE_KEY
from .channels import _NeedsAdapter, _projection
from .nodes import _fetch_attr
from .repair import _Repairer
from .strides import _adapt_stride


# What adapting a copy to a new input shape can raise: our own errors, and the shape errors of
# running a layer on the new shape (meta tensors). Anything else is a bug and propagates.
_ADAPTATION_ERRORS = (AugLocalError, _NeedsAdapter, RuntimeError, ValueError, IndexError, TypeError,
                      AssertionError)


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
                memo[id(param)] = nn.Parameter(_empty_like(param, "meta"),
                                               requires_grad=param.requires_grad)
        for buf in module._buffers.values():
            if buf is not None and id(buf) not in memo:
                memo[id(buf)] = _empty_like(buf, "meta")
    # The source's tracer class goes with the graph: a pickled copy is traced again with it.
    graph = fx.Graph(tracer_cls=source.graph._tracer_cls, tracer_extras=source.graph._tracer_extras)
    graph._codegen = copy.deepcopy(source.graph._codegen)
    values: Dict[fx.Node, fx.Node] = {}
    attrs: Dict[str, Any] = {}
    for node in source.graph.nodes:
        values[node] = graph.node_copy(node, lambda n: values[n])
        if node.op in ("call_module", "get_attr") and node.target not in attrs:
            value = _fetch_attr(source, node.target)
            attrs[node.target] = (_clone_module(value, memo) if isinstance(value, nn.Module)
                                  else copy.deepcopy(value, memo))
    return fx.GraphModule(attrs, graph, name)


def _empty_like(tensor: torch.Tensor, device: Union[str, torch.device]) -> torch.Tensor:
    """``torch.empty_like(tensor, device=device)``, without PyTorch's Python path for meta inputs.

    From a meta tensor, ``empty_like`` runs a Python reference (100 us against 5 us): copies of
    templates and materializing meta copies allocate thousands of tensors.
    """
    if tensor.is_contiguous() or tensor.is_contiguous(memory_format=torch.channels_last):
        # dense: empty_like keeps these strides
        return torch.empty_strided(tensor.size(), tensor.stride(), dtype=tensor.dtype,
                                   device=device)
    return torch.empty_like(tensor, device=device)


def _clone_module(module: nn.Module, memo: Dict[int, Any]) -> nn.Module:
    """``copy.deepcopy(module, memo)`` without the pickling protocol for each module and dict.

    ``copy.deepcopy`` reduces every module and each of its dozen (mostly empty) hook dicts
    through ``__reduce_ex__``: most of a copy's time. This builds the same state directly and
    hands it to the class's own ``__setstate__``, as ``copy.deepcopy`` does (convolutions have
    one); a module whose class gets its state, copies or pickles itself its own way goes to
    ``copy.deepcopy``.
    """
    done = memo.get(id(module))
    if done is not None:
        return done
    cls = type(module)
    if (cls.__getstate__ is not nn.Module.__getstate__
            or cls.__reduce_ex__ is not object.__reduce_ex__ or cls.__reduce__ is not object.__reduce__
            or getattr(cls, "__deepcopy__", None) is not None):
        return copy.deepcopy(module, memo)
    clone = cls.__new__(cls)
    memo[id(module)] = clone
    state = {}
    for key, value in module.__getstate__().items():
        if key == "_modules":
            state[key] = type(value)((name, None if child is None else _clone_module(child, memo))
                                     for name, child in value.items())
        elif type(value) is OrderedDict and not value:
            state[key] = OrderedDict()
        else:
            state[key] = copy.deepcopy(value, memo)
    clone.__setstate__(state)
    return clone


class CopyTemplates:
    """The adaptations one conversion has made, kept as templates its identical copies clone.

    Adapting a copy depends only on its source and on (input shape, stride, adapter, layout,
    pooling), and the auxiliary networks copy the same block onto the same input many times
    (RegNetX-400MF at d=6: 85 copies, 24 distinct); adapting was half of a conversion (the repair
    runs every node on meta tensors). The first adaptation is kept on the meta device as the
    template the others are cloned from. One conversion makes one and hands it to every
    :func:`adapt_copy` it calls, and drops it with the conversion: two conversions share nothing.
    """

    def __init__(self) -> None:
        # per source graph (the key keeps it alive as long as its templates): key -> (template,
        # output) or the error adapting raised
        self._done: Dict[fx.GraphModule, Dict[Tuple, Any]] = {}

    def adapted(self, source: fx.GraphModule, in_shape: Tuple[int, ...], stride: Optional[int],
                adapter: Optional[str], in_layout: str, name: str,
                pool_to: Optional[Tuple[int, int]] = None) -> Tuple[fx.GraphModule, torch.Tensor]:
        """``_adapt``, cloned from the template where the same adaptation was done before."""
        key = (in_shape, stride, adapter, in_layout, pool_to)
        templates = self._done.setdefault(source, {})
        done = templates.get(key)
        if done is None:
            rng = torch.random.get_rng_state()
            try:
                done = _adapt(source, in_shape, stride, adapter, in_layout, name, pool_to)
            except _ADAPTATION_ERRORS as exc:
                done = exc
            if not torch.equal(rng, torch.random.get_rng_state()):
                # A ShapeAdapter draws its projection when built: such copies are adapted each
                # time, so the random stream, hence every later draw, stays as it was.
                if isinstance(done, BaseException):
                    raise done
                return done
            templates[key] = done
        if isinstance(done, BaseException):
            raise done.with_traceback(None)
        template, out = done
        return _clone_template(template, name), out


def _clone_template(template: fx.GraphModule, name: str) -> fx.GraphModule:
    """A meta copy of ``template`` whose modules, parameters and buffers are in its order.

    ``fx.GraphModule`` registers a copy's modules in the order of the graph's nodes; an adapted
    template registered the modules the adaptation added last. The order is the state dict's
    and the order parameters are drawn in, so it is put back.
    """
    gm = _meta_copy(template, name)
    for prefix, module in gm.named_modules():
        twin = template.get_submodule(prefix)
        for attr in ("_modules", "_parameters", "_buffers"):
            mine, theirs = getattr(module, attr), getattr(twin, attr)
            if list(mine) != list(theirs):
                module.__dict__[attr] = type(mine)((key, mine[key]) for key in theirs)
    return gm


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
    gm._apply(lambda t: _empty_like(t, device))  # what gm.to_empty(device) does, faster
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


def _insert_source_pool(gm: fx.GraphModule, size: Tuple[int, int]) -> None:
    """Average-pool the copy's input to ``size`` first (``aux_resolution="source"``)."""
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    gm.add_submodule("auglocal_source_pool", nn.AdaptiveAvgPool2d(size))
    with gm.graph.inserting_after(placeholder):
        node = gm.graph.call_module("auglocal_source_pool", (placeholder,))
    placeholder.replace_all_uses_with(node, delete_user_cb=lambda user: user is not node)


def _adapt(source: fx.GraphModule, in_shape: Tuple[int, ...], stride: Optional[int],
           adapter: Optional[str], in_layout: str, name: str,
           pool_to: Optional[Tuple[int, int]] = None) -> Tuple[fx.GraphModule, torch.Tensor]:
    """Adapt a meta copy of ``source``, named ``name``, to ``in_shape``.

    ``adapter``: ``None`` (layer by layer), ``"channels"`` (a 1x1 conv + BN restores the input
    width, strides still adapted) or ``"shape"`` (a :class:`ShapeAdapter` restores the whole
    input shape; the copy keeps its own strides). ``pool_to``: average-pool the input to this
    ``(H, W)`` before anything else (not with ``"shape"``, which pools to the copy's own size).
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
    if pool_to is not None and adapter != "shape":
        _insert_source_pool(gm, pool_to)  # inserted last, so it runs first: adapters see less
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
               pool_to: Optional[Tuple[int, int]] = None,
               templates: Optional[CopyTemplates] = None,
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
        pool_to: average-pool the input to this ``(H, W)`` first (``aux_resolution="source"``;
            ``stride`` is then ``None``, the copy keeps its source's strides).
        templates: the conversion's earlier adaptations (see :class:`CopyTemplates`); ``None``:
            this copy is adapted afresh.

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
    templates = templates if templates is not None else CopyTemplates()
    errors: List[BaseException] = []
    for adapter in attempts:
        try:
            gm, out = templates.adapted(source, shape, stride, adapter, layout, name, pool_to)
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
