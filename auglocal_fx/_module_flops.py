"""Forward FLOPs of one module on a batch-1 input, counted with fvcore, and their cache.

One fused multiply-add counts as one FLOP (fvcore's convention). :class:`FlopCache` keeps counts
per (module architecture, input shape), so identical modules are traced once; the analyses of
``auglocal_fx.flops`` own one each, or share one that is handed to them.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ._device import random_input
from ._threads import old_objects_frozen, single_thread
from .errors import AugLocalError, first_line
from .synthesis import AuxNet

__all__ = ["FlopCache", "count_module_flops", "shape_elements"]

Shape = Tuple[int, ...]


def _arch_key(module: nn.Module) -> Tuple:
    """A hashable description of ``module``'s architecture (not its weights).

    Two modules with the same key compute the same operators on the same shapes: the key holds
    every submodule's class, ``extra_repr`` (kernel sizes, channels, strides, ...), its plain
    attributes (numbers, strings, tuples of them), its own parameter and buffer shapes, and, for
    fx ``GraphModule``s, the generated code.
    """
    parts = []
    for name, sub in module.named_modules():
        cls = type(sub)
        # fx generates one class per GraphModule (named after the traced module); its code is
        # what matters, so the class name is left out.
        is_graph = isinstance(sub, torch.fx.GraphModule)
        parts.append((
            name,
            "GraphModule" if is_graph else f"{cls.__module__}.{cls.__qualname__}",
            sub.extra_repr(),
            sub.code if is_graph else None,
            _plain_attributes(sub),
            tuple((n, tuple(p.shape)) for n, p in sub.named_parameters(recurse=False)),
            tuple((n, tuple(b.shape)) for n, b in sub.named_buffers(recurse=False)
                  if b is not None),
        ))
    return tuple(parts)


_PLAIN = (bool, int, float, str, type(None))


def _plain_attributes(module: nn.Module) -> Tuple:
    """Attributes a forward may read besides submodules and tensors (``self.scale = 0.5``)."""
    items = []
    for name, value in vars(module).items():
        if name.startswith("_") or name == "training":
            continue
        if isinstance(value, _PLAIN) or (
                isinstance(value, tuple) and all(isinstance(v, _PLAIN) for v in value)):
            items.append((name, value))
    return tuple(sorted(items, key=lambda item: item[0]))


@contextlib.contextmanager
def _quiet():
    """Silence fvcore's logger and the jit tracer's warnings; we collect what they say."""
    logger = logging.getLogger("fvcore")
    level = logger.level
    # setLevel clears the cache of every logger (PyTorch has hundreds): set it once per query,
    # not once per counted module (nested calls find it set).
    if level != logging.ERROR:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        if logger.level != level:
            logger.setLevel(level)


@contextlib.contextmanager
def _eval_mode(module: nn.Module):
    """Put ``module`` in eval mode (batch-1 BatchNorm needs it) and restore every flag after."""
    modes = [(m, m.training) for m in module.modules() if m.training]
    for m, _ in modes:
        m.training = False
    try:
        yield module
    finally:
        for m, mode in modes:
            m.training = mode


def _is_tuple_shape(shape) -> bool:
    """Whether ``shape`` is the shapes of a tuple of tensors (a boundary carrying several)."""
    return bool(shape) and isinstance(shape[0], tuple)


def shape_elements(shape) -> int:
    """Values of one example of ``shape``, over every element of a tuple shape."""
    shapes = shape if _is_tuple_shape(shape) else (shape,)
    return sum(math.prod(int(v) for v in s) for s in shapes)


def _example(module: nn.Module, shape) -> Tuple[torch.Tensor, ...]:
    """The batch-1 inputs of ``module``: one tensor, or one per element of a tuple shape."""
    param = next(iter(module.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    shapes = shape if _is_tuple_shape(shape) else (shape,)
    return tuple(random_input(s, 1, device, dtype) for s in shapes)


def _shape_of(out) -> Optional[Shape]:
    """The shape (no batch) of a module's output; a tuple of them for a tuple of tensors."""
    if isinstance(out, torch.Tensor):
        return tuple(int(v) for v in out.shape[1:])
    if isinstance(out, tuple) and len(out) > 1 and all(isinstance(t, torch.Tensor) for t in out):
        return tuple(tuple(int(v) for v in t.shape[1:]) for t in out)
    return None


@dataclass(frozen=True)
class _Count:
    """What counting one module on one input shape gives (cached per architecture and shape)."""

    flops: int
    unsupported: Tuple[Tuple[str, int], ...]
    output_shape: Optional[Shape]  # without the batch dimension (one per element of a tuple); None: neither


class FlopCache:
    """Counts per (module architecture, input shape), kept by the analyses that share it.

    Each :class:`LocalFlops` makes its own and drops it with itself; give several analyses of
    one model the same one (``count_flops(local, cache=)``, ``count_module_flops(..., cache=)``)
    to trace each distinct module once across them.
    """

    def __init__(self) -> None:
        self._counts: Dict[Tuple, _Count] = {}

    def __len__(self) -> int:
        return len(self._counts)


def count_module_flops(module: nn.Module, input_shape: Sequence[int],
                       cache: Optional[FlopCache] = None) -> Tuple[int, Counter]:
    """Count one module's forward FLOPs on a batch-1 input with fvcore.

    Args:
        module: any module taking one tensor (or a tuple of tensors: a block or auxiliary
            network where a boundary carries several).
        input_shape: the input shape without the batch dimension, e.g. ``(3, 32, 32)``; for a
            tuple, one shape per element.
        cache: counts to reuse and add to (per architecture and input shape); ``None``: a
            new one for this call (identical children of a ``Sequential`` are traced once).

    Returns:
        ``(flops, unsupported)``: FLOPs of one example (one multiply-add = one FLOP), and a
        ``Counter`` of the operators fvcore did not count (name -> occurrences).

    Raises:
        AugLocalError: if fvcore cannot trace the module.
    """
    if _is_tuple_shape(input_shape):
        shape = tuple(tuple(int(v) for v in s) for s in input_shape)
    else:
        shape = tuple(int(s) for s in input_shape)
    count = _count_module(module, shape, cache if cache is not None else FlopCache())
    return count.flops, Counter(dict(count.unsupported))


def _count_module(module: nn.Module, shape, cache: FlopCache) -> _Count:
    if not (_chains_children(module) and len(module) > 1):
        return _count_one(module, shape, cache)
    # Count child by child: identical children (block copies in many auxiliary networks) then
    # hit the cache, and each child's input shape is the previous child's output shape, taken
    # from its count: no forward pass besides fvcore's own trace of an uncached child.
    total, unsupported = 0, Counter()
    with _quiet():
        for i, child in enumerate(module):
            count = _count_one(child, _one_tensor(shape, f"{type(module).__name__}[{i - 1}]"), cache)
            total += count.flops
            unsupported.update(dict(count.unsupported))
            shape = count.output_shape
    return _Count(total, tuple(sorted(unsupported.items())), shape)


def _one_tensor(shape: Optional[Shape], what: str) -> Shape:
    if shape is None:
        raise AugLocalError(
            f"cannot count FLOPs past {what}: it returns something other than tensors; "
            "count its modules by hand")
    return shape


def _chains_children(module: nn.Module) -> bool:
    """A Sequential feeding each child's output to the next (an auxiliary network's copies too)."""
    return isinstance(module, AuxNet) or (
        isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward)


def _count_one(module: nn.Module, shape: Shape, cache: FlopCache) -> _Count:
    key = (_arch_key(module), shape)
    hit = cache._counts.get(key)
    if hit is not None:
        return hit
    outputs: List[object] = []
    # fvcore's trace runs the module once; the hook keeps its output, so the output shape
    # needs no forward pass of its own (it only stores the tensor: nothing enters the trace).
    handle = module.register_forward_hook(lambda _m, _i, out: outputs.append(out))
    try:
        with _quiet(), _eval_mode(module), single_thread(), old_objects_frozen(), torch.no_grad():
            from fvcore.nn import FlopCountAnalysis  # importing it warns: torch.jit.script

            analysis = FlopCountAnalysis(module, _example(module, shape))
            analysis.unsupported_ops_warnings(False)
            analysis.uncalled_modules_warnings(False)
            analysis.tracer_warnings("none")
            try:
                total = int(analysis.total())
            except Exception as exc:  # jit tracing failures come in many types
                first = first_line(exc)
                raise AugLocalError(
                    f"fvcore could not count the FLOPs of a {type(module).__name__} on input "
                    f"{shape} ({first}); count it by hand or report the model"
                ) from None
            unsupported = tuple(sorted(analysis.unsupported_ops().items()))
    finally:
        handle.remove()
    out_shape = _shape_of(outputs[0]) if len(outputs) == 1 else None
    hit = cache._counts[key] = _Count(total, unsupported, out_shape)
    return hit
