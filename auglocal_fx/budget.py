"""FLOPs budgeting: the deepest auxiliary networks (largest ``d``, then smallest ``tau``) that fit.

A budget is a multiple of BP's forward FLOPs (``"2.5x"``) or an absolute figure (``"1.1G"``);
totals are counted by ``auglocal_fx.flops`` (one fused multiply-add = one FLOP, one example).
``solve_budget`` traces the model once and synthesizes and counts each distinct auxiliary
network once, however many ``(d, tau)`` it tries.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple, Union

from ._threads import single_thread
from .errors import AugLocalError
from .flops import FlopCache, count_flops, count_module_flops
from .local import to_local
from .options import ConversionOptions
from .planning import match_arity, plan_aux_nets
from .rules import get_rule, rule_names
from .synthesis import CopyTemplates, synthesize_aux_net
from .units import format_flops

__all__ = ["parse_budget", "BudgetChoice", "solve_budget"]

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
    """What ``solve_budget`` picked, and why.

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
    cache: Optional[FlopCache] = None,
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
        options: the ``ConversionOptions`` to plan within (``d`` and ``tau``
            are what this chooses).
        cache: FLOP counts to reuse and add to (:class:`~auglocal_fx.flops.FlopCache`), e.g.
            to count the chosen network afterwards without tracing its modules again;
            ``None``: a new one for this search.
        **to_local_kwargs: passed to ``auglocal_fx.to_local`` (``input_size``,
            ``num_classes``, ``leaf_modules``, ...).

    Returns:
        A ``BudgetChoice`` whose ``reason`` says what was picked and why.

    Raises:
        AugLocalError: if the budget cannot be parsed or is too small for any ``d``.
    """
    rule = to_local_kwargs.get("rule") or (options.rule if options is not None else "auglocal")
    if not get_rule(rule).uses_depth:
        with_depth = ", ".join(n for n in rule_names() if get_rule(n).uses_depth)
        raise AugLocalError(f"a FLOPs budget chooses AugLocal's d and tau; the {rule} rule has neither: drop "
                            f"the budget, or plan a rule with a depth ({with_depth})")
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
    counts = cache if cache is not None else FlopCache()  # each distinct module traced once
    bp = count_flops(base, counts).primary
    partition = base.partition
    aux_cache: Dict = {}
    templates = CopyTemplates()  # the networks below copy the same blocks onto the same inputs

    def aux_flops(plan) -> int:
        if plan not in aux_cache:
            with single_thread():
                net = synthesize_aux_net(partition, plan, aux_head=base.conversion.resolved_aux_head,
                                         aux_resolution=base.conversion.aux_resolution,
                                         templates=templates)
            aux_cache[plan] = count_module_flops(net, partition.boundary_shape(plan.block), counts)[0]
        return aux_cache[plan]

    limit = int(value * bp) if kind == "ratio" else int(value)
    resolutions = partition.resolutions
    arities = [partition.output_arity(j) for j in range(len(partition.blocks))]
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
            plans = tuple(match_arity(p, arities, resolutions)
                          for p in plan_aux_nets(resolutions, d, tau, pyramid, selection))
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
