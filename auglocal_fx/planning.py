"""The paper's planning formulas as pure functions (docs/method.md, rules 2-5).

Notation follows docs/method.md: the primary network has ``L`` local blocks, ``d`` counts the
trainable layers of an auxiliary network including the classifier, ``n = d - 1`` is the number of
sampled blocks, ``K = L - n_max`` is the number of local modules; blocks ``0 .. K-2`` get an
auxiliary network and blocks ``K-1 .. L-1`` form the output module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Sequence, Tuple

from .errors import AugLocalError

__all__ = [
    "SELECTIONS",
    "AuxPlan",
    "num_local_modules",
    "pyramid_depths",
    "uniform_selection",
    "sequential_selection",
    "repetitive_selection",
    "select_blocks",
    "stride_plan",
    "plan_aux_nets",
    "match_arity",
    "validate_options",
]

SELECTIONS = ("uniform", "sequential", "repetitive")


@dataclass(frozen=True)
class AuxPlan:
    """What the auxiliary network of block ``block`` is made of.

    Attributes:
        block: index ``j`` of the primary block the auxiliary network is attached to.
        selected: indices of the primary blocks whose architectures are copied, in order.
        strides: per selected block, the resolution reduction of its copy (1 or 2).
    """

    block: int
    selected: Tuple[int, ...]
    strides: Tuple[int, ...] = field(default=())

    @property
    def depth(self) -> int:
        """The paper's ``d`` of this auxiliary network: sampled blocks plus the classifier."""
        return len(self.selected) + 1


def validate_options(d: int, tau: float, selection: str) -> None:
    """Check the user-facing planning options.

    Raises:
        AugLocalError: if ``d < 2``, ``tau`` is outside ``[0, 1]`` or the selection is unknown.
    """
    if isinstance(d, bool) or not isinstance(d, int) or d < 2:
        raise AugLocalError(
            f"auxiliary depth d={d!r} is invalid: d counts the auxiliary network's layers "
            "including its classifier, so it must be an integer >= 2 (the paper uses 2 to 6)"
        )
    if not (isinstance(tau, (int, float)) and 0.0 <= float(tau) <= 1.0):
        raise AugLocalError(
            f"pyramid decay tau={tau!r} is outside [0, 1]: use e.g. 0.5 (the paper's default), "
            "or 0 / pyramid=False for a constant depth"
        )
    if selection not in SELECTIONS:
        raise AugLocalError(
            f"unknown selection strategy {selection!r}: choose one of {', '.join(SELECTIONS)}"
        )


def num_local_modules(num_blocks: int, d: int) -> int:
    """``K = L - n_max`` (rule 2); blocks ``0 .. K-2`` get an auxiliary network.

    Raises:
        AugLocalError: if ``K < 2``, i.e. nothing would be trained locally.
    """
    n_max = d - 1
    k = num_blocks - n_max
    if k < 2 and num_blocks < 3:
        raise AugLocalError(
            f"the network has only {num_blocks} local block{'s' if num_blocks != 1 else ''}: "
            "AugLocal needs at least 3 (two trained locally, the last with the head); a block "
            "ends where one tensor carries everything, so give block_boundaries=[...] to cut "
            "a large block (see `auglocal-fx blocks SPEC`)"
        )
    if k < 2:
        raise AugLocalError(
            f"d={d} is too large for a network of {num_blocks} blocks: the output module would "
            f"take every block and no block would be trained locally; use d <= {num_blocks - 1}"
        )
    return k


def pyramid_depths(num_blocks: int, d: int, tau: float = 0.5, pyramid: bool = True) -> List[int]:
    """Number of sampled blocks ``n_j`` per auxiliary network, ``j = 0 .. K-2`` (rule 3).

    ``n_j = max(n_min, round(n_max * (1 - j*tau/(K-2)) + n_min * j*tau/(K-2)))`` with
    ``n_min = 1`` and Python's round-half-to-even, as the authors' code does.
    """
    n_max, n_min = d - 1, 1
    k = num_local_modules(num_blocks, d)
    if not pyramid or k == 2:
        return [n_max] * (k - 1)
    depths = []
    for j in range(k - 1):
        frac = j * tau / (k - 2)
        depths.append(max(n_min, round(n_max * (1 - frac) + n_min * frac)))
    return depths


def uniform_selection(j: int, n: int, num_blocks: int) -> List[int]:
    """Uniformly sample ``n`` of the blocks after ``j`` (rule 4); the last block is always in."""
    later = num_blocks - 1 - j
    if n >= later:
        return list(range(j + 1, num_blocks))
    return [round(j + later / n * i) for i in range(1, n + 1)]


def sequential_selection(j: int, n: int, num_blocks: int) -> List[int]:
    """The ``n`` blocks right after ``j`` (the paper's ablation)."""
    return list(range(j + 1, min(j + n, num_blocks - 1) + 1))


def repetitive_selection(j: int, n: int, num_blocks: int) -> List[int]:
    """Block ``j`` itself, ``n`` times (the paper's ablation)."""
    del num_blocks  # same signature as the other strategies
    return [j] * n


_SELECTORS = {
    "uniform": uniform_selection,
    "sequential": sequential_selection,
    "repetitive": repetitive_selection,
}


def select_blocks(j: int, n: int, num_blocks: int, selection: str = "uniform") -> List[int]:
    """Dispatch to the named selection strategy."""
    return _SELECTORS[selection](j, n, num_blocks)


def stride_plan(start_resolution: int, resolutions: Sequence[int]) -> List[int]:
    """Per copied block, the reduction (1 or 2) its copy applies (rule 5, stride adaptation).

    Args:
        start_resolution: spatial size of the primary block ``j``'s output.
        resolutions: primary output resolutions of the selected blocks, in order.

    A count of pending 2x reductions grows by ``log2(res_prev / res_k)`` before each copy; a copy
    reduces by exactly 2x when the count is at least 1, so reductions that do not fit carry over.
    """
    pending = 0
    strides = []
    prev = start_resolution
    for res in resolutions:
        if prev > 0 and res > 0:
            # Rounded: ceil-mode reductions give ratios like 15/8 that still mean one 2x step.
            pending += round(math.log2(prev / res))
        if pending >= 1:
            strides.append(2)
            pending -= 1
        else:
            strides.append(1)
        prev = res
    return strides


def plan_aux_nets(
    resolutions: Sequence[int],
    d: int,
    tau: float = 0.5,
    pyramid: bool = True,
    selection: str = "uniform",
) -> List[AuxPlan]:
    """Plan every auxiliary network of a network whose blocks output ``resolutions``.

    Args:
        resolutions: spatial size (height) of each primary block's output, ``L`` entries.
        d: the paper's auxiliary depth (>= 2).
        tau: pyramid decay in ``[0, 1]``.
        pyramid: ``False`` gives every auxiliary network depth ``d``.
        selection: ``"uniform"`` (the paper's method), ``"sequential"`` or ``"repetitive"``.

    Returns:
        One ``AuxPlan`` per block ``j = 0 .. K-2``.
    """
    validate_options(d, tau, selection)
    num_blocks = len(resolutions)
    plans = []
    for j, n in enumerate(pyramid_depths(num_blocks, d, tau, pyramid)):
        selected = select_blocks(j, n, num_blocks, selection)
        strides = stride_plan(resolutions[j], [resolutions[k] for k in selected])
        plans.append(AuxPlan(block=j, selected=tuple(selected), strides=tuple(strides)))
    return plans


def match_arity(plan: AuxPlan, arities: Sequence[int], resolutions: Sequence[int]) -> AuxPlan:
    """``plan`` with each selected block that cannot take what reaches it replaced.

    Where block boundaries carry tuples (several streams), a copy of block ``k`` takes the
    tuple block ``k`` takes (``arities[k - 1]`` tensors; ``arities[k]``: how many it returns),
    so it can follow only block ``j`` or a copy returning as many. A block that cannot is
    replaced by the nearest one that can, later first, then earlier (after the previous
    choice); none left, it is dropped. The strides are planned again (rule 5).
    """
    current = arities[plan.block]
    kept: List[int] = []
    for k in plan.selected:
        after = kept[-1] if kept else plan.block
        candidates = list(range(k, len(arities))) + list(range(k - 1, after, -1))
        found = next((c for c in candidates if c not in kept and arities[c - 1] == current), None)
        if found is not None:
            kept.append(found)
            current = arities[found]
    if tuple(kept) == plan.selected:
        return plan
    strides = stride_plan(resolutions[plan.block], [resolutions[k] for k in kept])
    return AuxPlan(block=plan.block, selected=tuple(kept), strides=tuple(strides))
