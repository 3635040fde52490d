"""Pairing our layers with the authors' in order, refusing counts or shapes that differ
(``zip`` would stop at the shorter list and pair whatever happens to line up)."""

from __future__ import annotations

from typing import Callable, List, Sequence, Tuple, TypeVar

T = TypeVar("T")

__all__ = ["Mismatch", "pairs"]


class Mismatch(Exception):
    """Two sides that should pair up do not; the message is one line naming where."""


def pairs(ours: Sequence[T], theirs: Sequence[T], what: str,
          signature: Callable[[T], object] = lambda item: item) -> List[Tuple[T, T]]:
    """``(ours[i], theirs[i])`` for every ``i``.

    Raises:
        Mismatch: the two have different lengths, or a pair's ``signature`` (e.g. type and
            shapes) differ; the message names ``what`` and the first difference.
    """
    if len(ours) != len(theirs):
        raise Mismatch(f"{what}: ours has {len(ours)}, the authors' {len(theirs)}")
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if signature(a) != signature(b):
            raise Mismatch(f"{what} #{i}: ours {signature(a)}, the authors' {signature(b)}")
    return list(zip(ours, theirs))
