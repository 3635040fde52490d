"""Running a traced graph for its shapes: the values computed from the input's data on meta tensors.

Recording every value's shape (``tracing``) and the shape-only values (``shape_values``) needs
shapes where a value follows the input's data, and real values only where it follows the input's
shape alone. Running the data on the meta device skips every multiply-add: the three real runs of
a 412M-parameter ViT at 546 px were 80 of its 99 s of conversion on one core. A run that is
quick for real stays real: there the meta kernels cost more than the real ones.
"""

from __future__ import annotations

import contextlib
from time import perf_counter
from typing import Any, Callable, Dict, Iterator, Optional, Set, Tuple

import torch
from torch import fx, nn

__all__ = ["ShapeInterpreter", "run_meta_or_real", "REAL_SECONDS", "META_SECONDS_PER_NODE"]


# When a run goes on with meta tensors: after REAL_SECONDS, and only if its nodes took longer
# than META_SECONDS_PER_NODE on average so far. The meta kernels of norms and activations are
# Python decompositions (4-8 ms a BatchNorm, about 1 ms a node over MobileNetV3-Small): a small
# network at 224 px runs faster for real (MobileNetV3-Small 17 ms, 151 ms on meta tensors), a
# large one far slower (a 412M-parameter ViT at 546 px: 20 s, 8 ms a node, against 2 s).
REAL_SECONDS = 0.05
META_SECONDS_PER_NODE = 0.002


class ShapeInterpreter(fx.Interpreter):
    """Runs a graph with the values of the ``on_meta`` nodes on the meta device.

    The data nodes run on meta tensors (shapes only, nothing computed) once the run has taken
    ``REAL_SECONDS`` and its nodes more than ``META_SECONDS_PER_NODE`` on average, before that
    for real; the shape-only and constant ones always run for real, so the values they give are
    those of a real run; a node reading the device of a meta tensor gets the input's real
    device. What meta tensors cannot run (an operation without a
    meta kernel, code that reads a tensor's values) raises: the caller then runs the graph for
    real (:func:`run_meta_or_real`). Subclasses record what they need in ``run_node``.
    """

    def __init__(self, gm: fx.GraphModule, on_meta: Set[fx.Node]):
        super().__init__(gm)
        self.extra_traceback = False
        self.on_meta = on_meta
        self._states: Dict[str, Dict[str, torch.Tensor]] = {}
        self._device: Optional[torch.device] = None
        self._start = 0.0
        self._late = False
        self._count = 0

    def run(self, *args: Any, **kwargs: Any) -> Any:
        self._start, self._late, self._count = perf_counter(), False, 0
        return super().run(*args, **kwargs)

    def _meta_now(self, n: fx.Node) -> bool:
        self._count += 1
        if n not in self.on_meta:
            return False
        if not self._late:  # once late, the rest of the run stays on meta tensors
            elapsed = perf_counter() - self._start
            self._late = elapsed >= max(REAL_SECONDS, self._count * META_SECONDS_PER_NODE)
        return self._late

    def run_node(self, n: fx.Node) -> Any:
        meta = self._meta_now(n)
        if not meta and not (self._device is not None and _reads_device(n)):
            result = super().run_node(n)
            if n.op == "placeholder" and isinstance(result, torch.Tensor):
                self._device = result.device
            return result
        with self._set_current_node(n):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            if not meta:  # the real device, read from a stand-in of that device
                args, kwargs = _map_tensors((args, kwargs), self._stand_in)
                return getattr(self, n.op)(n.target, args, kwargs)
            args, kwargs = _map_tensors((args, kwargs), _to_meta)
            if n.op == "call_module":
                return self._call_on_meta(n.target, args, kwargs)
            result = getattr(self, n.op)(n.target, args, kwargs)
            if n.op == "placeholder" and isinstance(result, torch.Tensor):
                self._device = result.device
            return _map_tensors(result, _to_meta)

    def _call_on_meta(self, target: str, args: Tuple, kwargs: Dict[str, Any]) -> Any:
        module = self.fetch_attr(target)
        state = self._states.get(target)
        if state is None:
            # Meta views of the module's own tensors: nothing is allocated or copied.
            state = {name: t.to("meta") for name, t in (*module.named_parameters(),
                                                        *module.named_buffers())}
            self._states[target] = state
        with _attributes_kept(module):
            if not state:
                return module(*args, **kwargs)
            return torch.func.functional_call(module, state, args, kwargs)

    def _stand_in(self, tensor: torch.Tensor) -> torch.Tensor:
        if not tensor.is_meta:
            return tensor
        return torch.empty((), dtype=tensor.dtype, device=self._device).expand(tensor.shape)


# A module's own registries: functional_call swaps their tensors and puts them back itself.
_REGISTRIES = ("_parameters", "_buffers", "_modules")


@contextlib.contextmanager
def _attributes_kept(module: nn.Module) -> Iterator[None]:
    """Put back every attribute the call sets on ``module`` and its submodules.

    A module that caches a table built for the input's size (``self.table = ...`` on its first
    call) would otherwise keep a meta tensor, and the real network would then fail on it.
    """
    saved = [(m, {k: v for k, v in vars(m).items() if k not in _REGISTRIES}) for m in module.modules()]
    try:
        yield
    finally:
        for m, attrs in saved:
            state = vars(m)
            for key in [k for k in state if k not in attrs and k not in _REGISTRIES]:
                del state[key]
            state.update(attrs)


def _reads_device(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in ("device", "is_cuda")
    return node.op == "call_method" and node.target == "get_device"


def _to_meta(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to("meta")


def _map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``fn`` applied to the tensors in tuples, lists and dicts (fx's immutable ones too);
    ``torch.Size`` and named tuples are kept as they are, what the code expects."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if type(value) is tuple:
        return tuple(_map_tensors(v, fn) for v in value)
    if isinstance(value, list):
        return [_map_tensors(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    return value


def run_meta_or_real(make: Callable[[Set[fx.Node]], fx.Interpreter], data: Set[fx.Node],
                     run: Callable[[Callable[..., Any]], Any]) -> fx.Interpreter:
    """``run(interpreter.run)`` with the ``data`` nodes on meta tensors, or, where that fails,
    with every node real; returns the interpreter that ran to the end.

    Args:
        make: builds the interpreter from the set of nodes to run on meta tensors.
        data: the nodes whose values follow the input's data (``shape_values.data_nodes``).
        run: calls the interpreter's ``run`` on the example input.
    """
    interpreter = make(data)
    try:
        run(interpreter.run)
        return interpreter
    except Exception:  # noqa: BLE001 - any failure on meta tensors: the real run decides
        pass
    interpreter = make(set())
    run(interpreter.run)
    return interpreter
