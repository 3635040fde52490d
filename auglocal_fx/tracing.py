"""Tracing with ``torch.fx``: a tracer aware of timm's and torchvision's no-trace rules.

The model is traced twice, in eval and in train mode (docs/method.md, rule 8), so that code reading
``self.training`` outside leaf modules keeps its behaviour in both modes; the eval graph gets the
shape of every value from one example input.
"""

from __future__ import annotations

import inspect
import math
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple, Type, Union

import torch
from torch import fx, nn

from ._meta_run import ShapeInterpreter, run_meta_or_real
from .errors import AugLocalError, first_line
from .shape_values import SHAPE_KEY, data_nodes, freeze_graph, preserved_state

__all__ = ["LocalTracer", "TracedModel", "trace_model", "register_leaf_module", "SHAPE_KEY"]


# Module types that are always leaves, each with the reason. Weight layers must stay modules so
# that the synthesizer can re-create them with other channel counts; stochastic layers must stay
# modules so that one graph serves train and eval mode.
_LEAF_MODULES: Dict[Type[nn.Module], str] = {
    nn.modules.conv._ConvNd: "subclasses (StdConv2d, Conv2dSame) would trace into F.conv2d",
    nn.Linear: "subclasses would trace into F.linear",
    nn.modules.batchnorm._NormBase: "BatchNormAct2d and friends would trace into F.batch_norm",
    nn.GroupNorm: "subclasses (GroupNorm1) would trace into F.group_norm",
    nn.LayerNorm: "LayerNorm2d permutes around F.layer_norm",
}


def register_leaf_module(module_type: Type[nn.Module], reason: str) -> Type[nn.Module]:
    """Treat every instance of ``module_type`` as one node (no cut inside it).

    Args:
        module_type: the class to keep whole.
        reason: why it cannot or should not be traced (kept for readers of the registry).
    """
    _LEAF_MODULES[module_type] = reason
    return module_type


def _stochastic_leaves() -> Dict[Type[nn.Module], str]:
    found: Dict[Type[nn.Module], str] = {}
    # A model can only hold timm's or torchvision's modules if the library is imported already.
    if "timm" in sys.modules:
        from timm.layers import DropBlock2d, DropPath

        found[DropPath] = "reads self.training; a leaf keeps one graph for both modes"
        found[DropBlock2d] = "reads self.training and draws random masks"
    if "torchvision" in sys.modules:
        from torchvision.ops import StochasticDepth

        found[StochasticDepth] = "reads self.training; a leaf keeps one graph for both modes"
    return found


def _third_party_leaves() -> Tuple[List[type], List[Callable]]:
    """timm's no-trace registries and torchvision's leaf ops."""
    modules: List[type] = []
    functions: List[Callable] = []
    if "timm" in sys.modules:
        from timm.layers import _fx as timm_fx

        modules += list(timm_fx.get_notrace_modules())
        functions += list(timm_fx.get_notrace_functions())
    if "torchvision" in sys.modules:
        from torchvision.models.feature_extraction import _get_leaf_modules_for_ops

        # Sequential-like compositions (Conv2dNormActivation) and the traceable
        # SqueezeExcitation must be traced into, so that their convolutions can be adapted.
        modules += [m for m in _get_leaf_modules_for_ops()
                    if not issubclass(m, nn.Sequential) and m.__name__ != "SqueezeExcitation"]
    return modules, functions


class LocalTracer(fx.Tracer):
    """An ``fx.Tracer`` with leaf modules by type or by qualified name.

    Leaves are: the built-in registry (weight layers, norms, stochastic layers), timm's no-trace
    modules, torchvision's op modules, and what the user passes. It also records which module
    was being traced when tracing failed, so the error (or the automatic leaf) can name it.

    Args:
        leaf_modules: module types or qualified names (``"layer1.0"``) to keep whole.
        autowrap_functions: functions to record as single calls instead of tracing into them.
    """

    def __init__(
        self,
        leaf_modules: Iterable[Union[type, str]] = (),
        autowrap_functions: Iterable[Callable] = (),
    ):
        extra_modules, extra_functions = _third_party_leaves()
        functions = tuple(dict.fromkeys(list(extra_functions) + list(autowrap_functions)))
        super().__init__(autowrap_modules=(math,), autowrap_functions=functions)
        types = list(_LEAF_MODULES) + list(_stochastic_leaves()) + extra_modules
        names: Set[str] = set()
        for leaf in leaf_modules:
            if isinstance(leaf, str):
                names.add(leaf)
            elif isinstance(leaf, type) and issubclass(leaf, nn.Module):
                types.append(leaf)
            else:
                raise AugLocalError(
                    f"leaf module {leaf!r} is neither an nn.Module class nor a module name"
                )
        self.leaf_types = tuple(dict.fromkeys(types))
        self.leaf_names = names
        self.failed_module: Optional[str] = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_names or isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_module is None:  # the innermost module sees the error first
                self.failed_module = self.path_of_module(m)
            raise


@dataclass
class TracedModel:
    """The two graphs of a model and the example input they were run on.

    Attributes:
        eval_graph: traced in eval mode, every node's ``meta[SHAPE_KEY]`` filled in.
        train_graph: traced in train mode (training-only outputs dropped), shapes filled in;
            ``None`` when its code is the same as the eval graph's.
        input_size: ``(C, H, W)`` of the example input.
        auto_leaves: qualified names of modules kept whole because they could not be traced.
        frozen: how many shape-only values became constants of the graphs (the converted
            network then takes inputs of ``input_size`` only).
    """

    eval_graph: fx.GraphModule
    train_graph: Optional[fx.GraphModule]
    input_size: Tuple[int, int, int]
    auto_leaves: Tuple[str, ...]
    frozen: int = 0


_MAX_AUTO_LEAVES = 32


def _defaulted_arguments(model: nn.Module) -> Dict[str, Any]:
    """Forward arguments after the image that have defaults (``attn_mask=None``, ...).

    They are traced at their default value: a ViT called with one image never receives them.
    """
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return {}
    found: Dict[str, Any] = {}
    for index, param in enumerate(signature.parameters.values()):
        if index == 0 or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if param.default is param.empty:
            return {}  # a second required input: reported as such by the partitioner
        found[param.name] = param.default
    return found


def _drop_specialized_inputs(graph: fx.Graph) -> None:
    """Remove the placeholders of defaulted arguments and fx's checks of their values.

    ``concrete_args`` leaves a placeholder per argument and an assertion that the caller passes
    the traced value; the converted network takes the image only, so both go.
    """
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for extra in placeholders[1:]:
        doomed: List[fx.Node] = []
        frontier = [extra]
        while frontier:
            node = frontier.pop()
            doomed.append(node)
            frontier.extend(u for u in node.users if u not in doomed)
        if any(placeholders[0] in node.all_input_nodes or node.op == "output" for node in doomed):
            continue  # the argument's value is really used: leave it, to be reported
        order = {n: i for i, n in enumerate(graph.nodes)}
        for node in sorted(set(doomed), key=order.__getitem__, reverse=True):
            graph.erase_node(node)


def _trace_once(model: nn.Module, leaves: Sequence[Union[type, str]],
                autowrap_functions: Sequence[Callable]) -> fx.GraphModule:
    tracer = LocalTracer(leaves, autowrap_functions)
    before = set(vars(model))
    try:
        graph = tracer.trace(model, concrete_args=_defaulted_arguments(model) or None)
        _drop_specialized_inputs(graph)
        return fx.GraphModule(tracer.root, graph, model.__class__.__name__)
    except Exception as exc:
        raise _TraceFailure(tracer.failed_module, exc) from exc
    finally:
        # fx stores tensor constants (Swin's plain-tensor index tables) on the model itself; the
        # GraphModule holds its own reference, so the user's model is left as it was, and the
        # train-mode trace numbers its constants as the eval-mode one did.
        for name in set(vars(model)) - before:
            delattr(model, name)


class _TraceFailure(Exception):
    def __init__(self, module: Optional[str], cause: Exception):
        super().__init__(str(cause))
        self.module = module
        self.cause = cause


def _trace_with_auto_leaves(
    model: nn.Module,
    leaf_modules: Sequence[Union[type, str]],
    autowrap_functions: Sequence[Callable],
    auto_leaves: List[str],
) -> fx.GraphModule:
    """Trace; a submodule that fails becomes a leaf (rule 9), with a warning naming it."""
    while True:
        try:
            return _trace_once(model, list(leaf_modules) + auto_leaves, autowrap_functions)
        except _TraceFailure as failure:
            cause = f"{type(failure.cause).__name__}: {first_line(failure.cause, '')}"
            if not failure.module or len(auto_leaves) >= _MAX_AUTO_LEAVES:
                where = f"in module {failure.module!r}" if failure.module else "in the model's own forward"
                raise AugLocalError(
                    f"cannot trace the model with torch.fx ({cause}) {where}: make the failing "
                    "piece a leaf with to_local(..., leaf_modules=[TheModuleClass or 'module.name']) "
                    "or wrap the failing function with autowrap_functions=[fn]"
                ) from failure.cause
            warnings.warn(
                f"auglocal-fx: module {failure.module!r} cannot be traced ({cause}); keeping it "
                "whole as a leaf (no block boundary inside it)",
                stacklevel=3,
            )
            auto_leaves.append(failure.module)


def _drop_training_outputs(gm: fx.GraphModule) -> None:
    """Keep only the logits of a graph that returns a tuple in train mode (Inception, GoogLeNet)."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    value = output.args[0]
    if isinstance(value, fx.Node) and value.op == "call_function" and isinstance(value.target, type) \
            and issubclass(value.target, tuple):
        value = value.args[0] if value.args else None  # a namedtuple built in the graph
    if isinstance(value, (tuple, list)):
        value = value[0] if value else None
    if value is output.args[0]:
        return
    if not isinstance(value, fx.Node):
        raise AugLocalError("the model's train-mode output has no logits tensor to keep")
    warnings.warn(
        "auglocal-fx: the train-mode model returns extra outputs (auxiliary logits); they are "
        "dropped, the local auxiliary networks replace them",
        stacklevel=3,
    )
    output.args = (value,)
    gm.graph.eliminate_dead_code()
    gm.recompile()


def describe_node(node: fx.Node) -> str:
    """How messages name the place of ``node``: its module, never the fx node."""
    if node.op == "call_module":
        return f"module {str(node.target)!r}"
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    what = getattr(node.target, "__name__", str(node.target))
    if stack:
        owner = stack[-1][0] if isinstance(stack[-1], tuple) else str(stack[-1])
        return f"the {what} in module {owner!r}"
    return f"the {what} in the model's own forward"


class _NodeFailure(Exception):
    """An operation failed while shapes were recorded: says which module ran it."""

    def __init__(self, node: fx.Node, cause: BaseException):
        message = first_line(cause, "")
        super().__init__(f"{type(cause).__name__}{': ' + message if message else ''} in "
                         f"{describe_node(node)}")


class _ShapeRecorder(ShapeInterpreter):
    # ShapeInterpreter turns fx's extra traceback off: our messages name the module, not the node

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except _NodeFailure:
            raise
        except Exception as exc:
            raise _NodeFailure(n, exc) from exc
        n.meta[SHAPE_KEY] = result.shape if isinstance(result, torch.Tensor) else None
        return result


def record_shapes(gm: fx.GraphModule, example: torch.Tensor) -> Any:
    """Run ``gm`` on ``example`` and store each node's output shape in ``meta[SHAPE_KEY]``.

    The values computed from the input's data are meta tensors (shapes only); where meta tensors
    cannot run the graph, it runs for real, whose error, if any, is the one raised.
    """
    out: List[Any] = []
    with torch.no_grad():
        run_meta_or_real(lambda on_meta: _ShapeRecorder(gm, on_meta), data_nodes(gm),
                         lambda fn: out.append(fn(example)))
    return out[-1]



def trace_model(
    model: nn.Module,
    input_size: Sequence[int],
    leaf_modules: Sequence[Union[type, str]] = (),
    autowrap_functions: Sequence[Callable] = (),
) -> TracedModel:
    """Trace ``model`` in eval and train mode and record the shapes of every value.

    Args:
        model: the network; its training mode is restored afterwards.
        input_size: ``(C, H, W)`` of one example.
        leaf_modules: module types or qualified names to keep whole.
        autowrap_functions: functions to keep as single calls.

    Raises:
        AugLocalError: untraceable model (naming the module or operation), input too small,
            or an output that is not ``(N, num_classes)`` logits.
    """
    size = tuple(int(v) for v in input_size)
    if len(size) != 3:
        raise AugLocalError(f"input size {size} is invalid: give C H W")
    was_training = model.training
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    auto_leaves: List[str] = []
    try:
        model.eval()
        eval_gm = _trace_with_auto_leaves(model, leaf_modules, autowrap_functions, auto_leaves)
        model.train()
        train_gm = _trace_with_auto_leaves(model, leaf_modules, autowrap_functions, auto_leaves)
        if len(auto_leaves) and _trace_needs_retrace(eval_gm, auto_leaves):
            model.eval()
            eval_gm = _trace_once(model, list(leaf_modules) + auto_leaves, autowrap_functions)
    finally:
        model.train(was_training)
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(1, *size, generator=generator).to(device)
    eval_gm.eval()
    try:
        out = record_shapes(eval_gm, example)
    except Exception as exc:
        reason = first_line(exc)
        if any(word in reason.lower() for word in ("too small", "output size", "kernel size")):
            advice = "the input is too small for this network; use a larger input size"
        else:
            advice = ("use an input size the model accepts (a transformer built for one size: "
                      "create it for this size, e.g. timm's img_size=)")
        raise AugLocalError(
            f"the model cannot run on an input of size {size} ({reason}): {advice}"
        ) from exc
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise AugLocalError(
            "no classifier head found: the model's eval output is "
            f"{'a tensor of shape ' + str(tuple(out.shape)) if isinstance(out, torch.Tensor) else type(out).__name__}"
            ", not (N, num_classes) logits; auglocal-fx converts classification networks"
        )
    _drop_training_outputs(train_gm)
    same_code = train_gm.code == eval_gm.code
    frozen = freeze_graph(model, eval_gm, example, (1, 2))
    if same_code:
        train = None
    else:
        train_gm.train()
        try:
            with preserved_state(model):
                record_shapes(train_gm, torch.cat([example, example]))
            # Batch 1 would fail in train-mode batch norm over one value per channel.
            frozen += freeze_graph(model, train_gm, example, (2, 3))
        except Exception as exc:
            raise AugLocalError(
                f"the model fails in train mode on an input of size {size} ({first_line(exc)})"
            ) from exc
        train = train_gm
    return TracedModel(eval_graph=eval_gm, train_graph=train, input_size=size,  # type: ignore[arg-type]
                       auto_leaves=tuple(auto_leaves), frozen=frozen)


def _trace_needs_retrace(eval_gm: fx.GraphModule, auto_leaves: List[str]) -> bool:
    """Leaves found while tracing in train mode must apply to the eval graph too."""
    traced = {n.target for n in eval_gm.graph.nodes if n.op == "call_module"}
    return any(name not in traced for name in auto_leaves)
