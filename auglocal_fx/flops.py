"""Forward FLOPs of a :class:`~auglocal_fx.LocalNet`, counted with fvcore, and FLOPs budgeting.

Convention (fvcore's, and the paper's Table 7): **one fused multiply-add counts as one FLOP**;
the figures are the forward pass of **one** example (batch 1) at the network's input size.
Operators fvcore has no formula for (elementwise ``aten::add`` of residual connections, for
instance) are not counted, as in the paper, but they are listed by
:meth:`LocalFlops.unsupported_ops`, never silently dropped.

The analysis object is thin, lazy and cached, like fvcore's ``FlopCountAnalysis``: nothing runs
until the first query, and every primary block, the head and every auxiliary network is counted
once, on a batch-1 input of the shape it sees in the network (the primary runs once to find each
block's input). Counts are also cached per (module architecture, input shape) across analyses, so
sweeping ``d`` or ``tau`` (see :func:`solve_budget`) never recounts a primary block, and identical
auxiliary networks (common in ResNets) are traced once. Formatting lives apart, in
:mod:`auglocal_fx.tables`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ._threads import single_thread
from .errors import AugLocalError, first_line
from .options import ConversionOptions
from .rules import get_rule, rule_names
from .local import to_local
from .planning import plan_aux_nets
from .synthesis import synthesize_aux_net
from .units import format_flops

__all__ = [
    "BlockCost",
    "AuxCost",
    "LocalFlops",
    "count_flops",
    "count_module_flops",
    "parse_budget",
    "BudgetChoice",
    "solve_budget",
]

Shape = Tuple[int, ...]

_CACHE_LIMIT = 4096
_CACHE: Dict[Tuple, Tuple[int, Tuple[Tuple[str, int], ...]]] = {}


@dataclass(frozen=True)
class BlockCost:
    """Forward cost of one primary block (or of the head, ``index == -1``).

    Attributes:
        index: block index ``j`` (``-1`` for the classifier head).
        names: module names the block is made of.
        input_shape: ``(C, H, W)`` of its input.
        output_shape: shape of its output without the batch dimension.
        flops: forward FLOPs of one example (one multiply-add = one FLOP).
        params: number of parameters.
    """

    index: int
    names: Tuple[str, ...]
    input_shape: Shape
    output_shape: Shape
    flops: int
    params: int


@dataclass(frozen=True)
class AuxCost:
    """Forward cost of the auxiliary network attached to primary block ``block``.

    Attributes:
        block: index ``j`` of the primary block it is attached to.
        selected: primary blocks whose architectures it copies, in order.
        strides: reduction (1 or 2) applied by each copy.
        depth: the paper's ``d`` of this auxiliary network (copies + classifier).
        flops: forward FLOPs of one example (one multiply-add = one FLOP).
        params: number of parameters.
    """

    block: int
    selected: Tuple[int, ...]
    strides: Tuple[int, ...]
    depth: int
    flops: int
    params: int


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
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _eval_mode(module: nn.Module):
    """Put ``module`` in eval mode (batch-1 BatchNorm needs it) and restore every flag after."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, mode in modes:
            m.training = mode


def _example(module: nn.Module, shape: Shape) -> torch.Tensor:
    param = next(iter(module.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    gen = torch.Generator().manual_seed(0)
    return torch.randn((1,) + tuple(shape), generator=gen).to(device=device, dtype=dtype)


def count_module_flops(module: nn.Module, input_shape: Sequence[int]) -> Tuple[int, Counter]:
    """Count one module's forward FLOPs on a batch-1 input with fvcore.

    Args:
        module: any module taking one tensor.
        input_shape: the input shape without the batch dimension, e.g. ``(3, 32, 32)``.

    Returns:
        ``(flops, unsupported)``: FLOPs of one example (one multiply-add = one FLOP), and a
        ``Counter`` of the operators fvcore did not count (name -> occurrences). Results are
        cached per (architecture, input shape).

    Raises:
        AugLocalError: if fvcore cannot trace the module.
    """
    shape = tuple(int(s) for s in input_shape)
    if _is_plain_sequential(module) and len(module) > 1:
        # Count child by child: identical children (block copies in many auxiliary networks)
        # then hit the cache.
        total, unsupported = 0, Counter()
        example = _example(module, shape)
        with _eval_mode(module), single_thread(), torch.no_grad():
            for child in module:
                flops, ops = count_module_flops(child, tuple(example.shape[1:]))
                total += flops
                unsupported.update(ops)
                example = child(example)
        return total, unsupported
    return _count_one(module, shape)


def _is_plain_sequential(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _count_one(module: nn.Module, shape: Shape) -> Tuple[int, Counter]:
    with _quiet():  # importing fvcore warns that torch.jit.script is deprecated
        from fvcore.nn import FlopCountAnalysis

    key = (_arch_key(module), shape)
    hit = _CACHE.get(key)
    if hit is None:
        with _quiet(), _eval_mode(module), single_thread(), torch.no_grad():
            analysis = FlopCountAnalysis(module, (_example(module, shape),))
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
        if len(_CACHE) >= _CACHE_LIMIT:
            _CACHE.clear()
        hit = _CACHE[key] = (total, unsupported)
    return hit[0], Counter(dict(hit[1]))


def _num_params(modules: Iterable[nn.Module]) -> int:
    seen, total = set(), 0
    for module in modules:
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


class LocalFlops:
    """Lazy, cached forward FLOPs and parameter counts of a ``LocalNet``.

    One fused multiply-add counts as one FLOP (fvcore's convention); all figures are for one
    example at ``local.input_size``. Nothing is traced until the first query.

    Example:
        >>> flops = LocalFlops(to_local("paper:resnet32", d=2))
        >>> flops.total, flops.primary, flops.aux_total        # doctest: +SKIP

    Args:
        local: the converted network.
    """

    def __init__(self, local: nn.Module):
        self.local = local
        self._blocks: Optional[List[BlockCost]] = None
        self._head: Optional[BlockCost] = None
        self._aux: Optional[List[AuxCost]] = None
        self._unsupported: Counter = Counter()

    # -- counting ---------------------------------------------------------------------------
    def _count_primary(self) -> None:
        local = self.local
        names = list(getattr(local, "block_names", [[] for _ in local.blocks]))
        shape = tuple(local.input_size)
        inputs: List[Shape] = []
        outputs: List[Shape] = []
        with _eval_mode(local), single_thread(), torch.no_grad():
            h = _example(local, shape)
            for block in local.blocks:
                inputs.append(tuple(h.shape[1:]))
                h = block(h)
                outputs.append(tuple(h.shape[1:]))
            head_in = tuple(h.shape[1:])
            head_out = tuple(local.head(h).shape[1:])
        blocks = []
        for j, block in enumerate(local.blocks):
            flops, unsupported = count_module_flops(block, inputs[j])
            self._unsupported.update(unsupported)
            blocks.append(BlockCost(j, tuple(names[j]) if j < len(names) else (), inputs[j],
                                    outputs[j], flops, _num_params([block])))
        flops, unsupported = count_module_flops(local.head, head_in)
        self._unsupported.update(unsupported)
        self._head = BlockCost(-1, ("head",), head_in, head_out, flops, _num_params([local.head]))
        self._blocks = blocks

    def _count_aux(self) -> None:
        blocks = self.blocks
        aux = []
        for plan, net in zip(self.local.plan, self.local.aux):
            j = plan.block
            flops, unsupported = count_module_flops(net, blocks[j].output_shape)
            self._unsupported.update(unsupported)
            aux.append(AuxCost(j, tuple(plan.selected), tuple(plan.strides), len(plan.selected) + 1,
                               flops, _num_params([net])))
        self._aux = aux

    # -- queries ----------------------------------------------------------------------------
    @property
    def blocks(self) -> List[BlockCost]:
        """Per primary block: shapes, forward FLOPs and parameters."""
        if self._blocks is None:
            self._count_primary()
        return self._blocks

    @property
    def head(self) -> BlockCost:
        """The classifier head's cost (``index == -1``)."""
        if self._head is None:
            self._count_primary()
        return self._head

    @property
    def aux(self) -> List[AuxCost]:
        """Per auxiliary network (blocks ``0 .. K-2``): forward FLOPs and parameters."""
        if self._aux is None:
            self._count_aux()
        return self._aux

    @property
    def primary(self) -> int:
        """Forward FLOPs of the primary network (= the original model, what BP runs)."""
        return sum(b.flops for b in self.blocks) + self.head.flops

    @property
    def aux_total(self) -> int:
        """Forward FLOPs of all auxiliary networks together."""
        return sum(a.flops for a in self.aux)

    @property
    def total(self) -> int:
        """Forward FLOPs of an AugLocal training step's forward: primary plus all auxiliaries."""
        return self.primary + self.aux_total

    @property
    def ratio(self) -> float:
        """``total / primary``: AugLocal's forward FLOPs as a multiple of BP's."""
        return self.total / self.primary if self.primary else math.nan

    @property
    def params_primary(self) -> int:
        """Parameters of the primary network (blocks and head)."""
        return _num_params(list(self.local.blocks) + [self.local.head])

    @property
    def params_aux(self) -> int:
        """Parameters of all auxiliary networks (thrown away after training)."""
        return _num_params(self.local.aux)

    def unsupported_ops(self) -> Counter:
        """Operators fvcore did not count (name -> occurrences over every counted module).

        Runs the counts if no query has yet (fvcore's ``unsupported_ops()`` is only valid after
        ``total()``; this one always is).
        """
        if self._blocks is None:
            self._count_primary()
        if self._aux is None:
            self._count_aux()
        return Counter(self._unsupported)

    def as_dict(self) -> dict:
        """A JSON-ready summary; FLOPs are integers (one multiply-add = one FLOP, batch 1)."""
        local = self.local
        return {
            "model": getattr(local, "spec", None),
            "input_size": list(local.input_size),
            "num_classes": getattr(local, "num_classes", None),
            "options": dict(getattr(local, "options", {}) or {}),
            "flops_convention": "fvcore: one fused multiply-add = one FLOP, one example",
            "blocks": [
                {"index": b.index, "names": list(b.names), "input_shape": list(b.input_shape),
                 "output_shape": list(b.output_shape), "flops": b.flops, "params": b.params}
                for b in self.blocks
            ],
            "head": {"flops": self.head.flops, "params": self.head.params,
                     "input_shape": list(self.head.input_shape)},
            "num_local": getattr(local, "num_local", None),
            "aux_nets": [
                {"block": a.block, "selected": list(a.selected), "strides": list(a.strides),
                 "depth": a.depth, "flops": a.flops, "params": a.params}
                for a in self.aux
            ],
            "flops": {"primary": self.primary, "aux": self.aux_total, "total": self.total,
                      "ratio": round(self.ratio, 4)},
            "params": {"primary": self.params_primary, "aux": self.params_aux},
            "unsupported_ops": dict(sorted(self.unsupported_ops().items())),
        }


def count_flops(local: nn.Module) -> LocalFlops:
    """Forward FLOPs and parameters of a ``LocalNet``, per block and per auxiliary network.

    One fused multiply-add counts as one FLOP (fvcore's convention, as in the paper's Table 7),
    for one example at ``local.input_size``. The returned object is lazy: counting runs on the
    first query and is cached.

    Args:
        local: a network returned by :func:`auglocal_fx.to_local`.

    Returns:
        A :class:`LocalFlops` analysis.

    Raises:
        AugLocalError: if ``local`` is not a converted network.
    """
    for attr in ("blocks", "head", "aux", "plan", "input_size"):
        if not hasattr(local, attr):
            raise AugLocalError(
                f"count_flops needs a network from auglocal_fx.to_local (no {attr!r} attribute "
                f"on {type(local).__name__}); convert the model first"
            )
    return LocalFlops(local)


# -- budgeting ------------------------------------------------------------------------------

_SUFFIX = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_BUDGET_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*(x|[kmgt]?)\s*(?:flops?)?\s*$",
                        re.IGNORECASE)


def parse_budget(budget: Union[str, int, float]) -> Tuple[str, float]:
    """Parse a FLOPs budget.

    Args:
        budget: a multiple of BP's forward FLOPs (``"2.5x"``), an absolute figure with an
            optional SI suffix (``"1.1G"``, ``"800M"``, ``"1.5e9"``) or a number.

    Returns:
        ``("ratio", 2.5)`` or ``("flops", 1.1e9)``.

    Raises:
        AugLocalError: if the budget cannot be parsed or is not positive.
    """
    if isinstance(budget, bool):
        match = None
    elif isinstance(budget, (int, float)):
        match = _BUDGET_RE.match(repr(float(budget))) if budget > 0 else None
    else:
        match = _BUDGET_RE.match(str(budget))
    value = float(match.group(1)) if match else 0.0
    if not match or not math.isfinite(value) or value <= 0:
        raise AugLocalError(
            f"cannot read the FLOPs budget {budget!r}: give a multiple of BP's forward FLOPs "
            "like '2.5x' or an absolute figure like '1.1G', '800M' or 1100000000"
        )
    unit = match.group(2).lower()
    if unit == "x":
        return "ratio", value
    return "flops", value * _SUFFIX[unit]


@dataclass(frozen=True)
class BudgetChoice:
    """What :func:`solve_budget` picked, and why.

    Attributes:
        d: the chosen auxiliary depth.
        tau: the chosen pyramid decay (``0`` means constant depth ``d``).
        pyramid: whether the pyramid is on.
        flops: total forward FLOPs of the choice (one multiply-add = one FLOP, one example).
        budget: the budget in FLOPs.
        bp_flops: forward FLOPs of the primary network (BP).
        tried: every ``(d, tau, total FLOPs)`` evaluated, in order.
        reason: one human-readable sentence.
    """

    d: int
    tau: float
    pyramid: bool
    flops: int
    budget: int
    bp_flops: int
    tried: Tuple[Tuple[int, float, int], ...] = field(default=())
    reason: str = ""

    def as_dict(self) -> dict:
        """A JSON-ready summary."""
        return {"d": self.d, "tau": self.tau, "pyramid": self.pyramid, "flops": self.flops,
                "budget": self.budget, "bp_flops": self.bp_flops, "reason": self.reason,
                "tried": [list(t) for t in self.tried]}


def _tau_grid(step: float) -> List[float]:
    n = int(round(1.0 / step))
    return [round(i * step, 6) for i in range(n + 1)]


def solve_budget(
    model_or_spec,
    budget: Union[str, int, float],
    *,
    min_d: int = 2,
    max_d: int = 6,
    tau_step: float = 0.05,
    pyramid: Optional[bool] = None,
    selection: Optional[str] = None,
    options: Optional[ConversionOptions] = None,
    **to_local_kwargs,
) -> BudgetChoice:
    """Pick the largest ``d``, then the smallest ``tau``, whose total forward FLOPs fit a budget.

    Totals are primary plus every auxiliary network, one fused multiply-add = one FLOP, one
    example. For each ``d`` from ``max_d`` (capped at ``L - 1``) down to ``min_d``, the taus of
    the grid ``0, tau_step, ..., 1`` are tried in increasing order (``tau = 0`` is constant depth
    ``d``) and the first that fits is returned: the deepest auxiliary networks the budget allows.
    With ``pyramid=False`` only ``d`` is chosen. The model is traced once; each distinct
    auxiliary network (block, copied blocks, strides) is synthesized and counted once.

    Args:
        model_or_spec: an ``nn.Module`` or a spec string such as ``"paper:resnet110"``.
        budget: ``"2.5x"`` (a multiple of BP's forward FLOPs) or an absolute figure
            (``"1.1G"``, ``"800M"``, an int).
        min_d: smallest depth considered.
        max_d: largest depth considered (default 6, the largest in the paper).
        tau_step: spacing of the tau grid.
        pyramid: ``False`` to keep every auxiliary network at depth ``d`` (default: the
            options', ``True``).
        selection: ``"uniform"``, ``"sequential"`` or ``"repetitive"`` (default: the options').
        options: the :class:`~auglocal_fx.ConversionOptions` to plan within (``d`` and ``tau``
            are what this chooses).
        **to_local_kwargs: passed to :func:`auglocal_fx.to_local` (``input_size``,
            ``num_classes``, ``leaf_modules``, ...).

    Returns:
        A :class:`BudgetChoice` whose ``reason`` says what was picked and why.

    Raises:
        AugLocalError: if the budget cannot be parsed or is too small for any ``d``.
    """
    rule = to_local_kwargs.get("rule") or (options.rule if options is not None else "auglocal")
    if not get_rule(rule).uses_depth:
        raise AugLocalError(f"a FLOPs budget chooses AugLocal's d and tau; the {rule} rule has neither: drop "
                            f"the budget, or plan a rule with a depth ({', '.join(n for n in rule_names() if get_rule(n).uses_depth)})")
    kind, value = parse_budget(budget)
    if not (isinstance(tau_step, (int, float)) and 0 < tau_step <= 1):
        raise AugLocalError(f"tau_step={tau_step!r} must be in (0, 1]; use e.g. 0.05")
    if isinstance(min_d, bool) or not isinstance(min_d, int) or min_d < 2:
        raise AugLocalError(f"min_d={min_d!r} is invalid: the smallest auxiliary depth is 2")
    if isinstance(max_d, bool) or not isinstance(max_d, int) or max_d < min_d:
        raise AugLocalError(f"max_d={max_d!r} is invalid: give an integer >= {min_d}")

    base = to_local(model_or_spec, d=min_d, tau=0.5, pyramid=pyramid, selection=selection,
                    options=options, **to_local_kwargs)
    pyramid, selection = base.conversion.pyramid, base.conversion.selection
    bp = count_flops(base).primary
    partition = base.partition
    aux_cache: Dict = {}

    def aux_flops(plan) -> int:
        if plan not in aux_cache:
            with single_thread():
                net = synthesize_aux_net(partition, plan, aux_head=base.conversion.resolved_aux_head)
            aux_cache[plan] = count_module_flops(net, base.block_shapes[plan.block])[0]
        return aux_cache[plan]

    limit = int(value * bp) if kind == "ratio" else int(value)
    resolutions = partition.resolutions
    top_l = len(base.blocks) - 1
    top = min(max_d, top_l)
    taus = _tau_grid(tau_step) if pyramid else [0.0]
    tried: List[Tuple[int, float, int]] = []
    what = f"{value:g}x BP ({format_flops(limit)})" if kind == "ratio" else format_flops(limit)

    for d in range(top, min_d - 1, -1):
        seen = set()
        # Every tau is tried: fewer copied blocks are not always cheaper (a second copy that
        # halves the resolution can make the head's input, and so the whole, cheaper).
        for tau in taus:
            plans = tuple(plan_aux_nets(resolutions, d, tau, pyramid, selection))
            if plans in seen:
                continue
            seen.add(plans)
            total = bp + sum(aux_flops(p) for p in plans)
            tried.append((d, tau, total))
            if total <= limit:
                if d == top:
                    larger = f"d={d} is the largest depth tried (max_d={max_d}, L-1={top_l}); "
                else:
                    over = f"d={d + 1}" if d + 1 == top else f"d={d + 1}..{top}"
                    verb = "does" if d + 1 == top else "do"
                    larger = f"{over} {verb} not fit{' at any tau' if pyramid else ''}; "
                if pyramid:
                    why = (f"{larger}tau={tau:g} is the smallest pyramid decay (the deepest "
                           f"auxiliary networks) that fits at d={d}")
                else:
                    why = f"{larger}d={d} fits (no pyramid)"
                picked = f"d={d}, tau={tau:g}" if pyramid else f"d={d} (no pyramid)"
                reason = (f"picked {picked}: total forward FLOPs {format_flops(total)} = "
                          f"{total / bp:.2f}x BP ({format_flops(bp)}) fit the budget {what}; {why} "
                          "(1 multiply-add = 1 FLOP, one example)")
                return BudgetChoice(d, float(tau), pyramid, total, limit, bp, tuple(tried), reason)
    cheapest = min(t[2] for t in tried) if tried else bp
    raise AugLocalError(
        f"the FLOPs budget {what} is too small for any d in {min_d}..{top}: the cheapest "
        f"AugLocal network needs {format_flops(cheapest)} ({cheapest / bp:.2f}x BP); raise the "
        "budget to at least that"
    )
