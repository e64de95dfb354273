"""How many significant digits tell a set of scores apart (the report, the rule's reasons)."""

from __future__ import annotations

import math
from typing import Iterable

LEAST, MOST = 4, 12


def digits(values: Iterable[float]) -> int:
    """The fewest significant digits (at least 4, at most 12) at which every two different finite
    values of `values` read differently."""
    found = sorted({v for v in values if isinstance(v, (int, float)) and math.isfinite(v)})
    for n in range(LEAST, MOST):
        if len({f"{v:.{n}g}" for v in found}) == len(found):
            return n
    return MOST


def fmt(value: float, *others: float) -> str:
    """`value` with enough digits to differ from each of `others` that it differs from."""
    return f"{value:.{digits((value, *others))}g}"
