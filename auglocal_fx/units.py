"""Numbers in words: FLOPs, parameter counts and bytes as the tables and sentences print them.

The base layer (docs/layering.md): counting modules that need a figure in a sentence (the
budget's reason) and the tables both use these, so counting never imports formatting.
"""

from __future__ import annotations

import math
from typing import Optional

__all__ = ["format_flops", "format_count", "format_bytes"]


def format_flops(flops: Optional[float]) -> str:
    """``1127000000 -> '1.13G'``, ``629e6 -> '629.0M'`` (one multiply-add = one FLOP)."""
    if flops is None or (isinstance(flops, float) and math.isnan(flops)):
        return "-"
    for scale, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(flops) >= scale:
            digits = 2 if unit in "TG" else 1
            return f"{flops / scale:.{digits}f}{unit}"
    return str(int(flops))


def format_count(count: Optional[float]) -> str:
    """Parameter counts: ``1730714 -> '1.73M'``, ``4810 -> '4.8K'``."""
    if count is None:
        return "-"
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(count) >= scale:
            return f"{count / scale:.{2 if unit != 'K' else 1}f}{unit}"
    return str(int(count))


def format_bytes(num: Optional[float]) -> str:
    """``1.5e9 -> '1.40 GiB'``; ``None -> '-'``."""
    if num is None:
        return "-"
    for scale, unit in ((2 ** 30, "GiB"), (2 ** 20, "MiB"), (2 ** 10, "KiB")):
        if abs(num) >= scale:
            return f"{num / scale:.2f} {unit}"
    return f"{int(num)} B"
