"""Mean and standard deviation over repetitions, the way every figure is reported."""

from __future__ import annotations

import math
from collections.abc import Sequence


def summarize(values: Sequence[float]) -> dict:
    """{mean, std, min, max, n, values}; std is the sample standard deviation (0 for a single value)."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0, "values": []}
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "n": n, "values": values}


def fmt_figure(figure: dict | None, digits: int = 1) -> str:
    if not figure or figure.get("mean") is None:
        return ""
    return f"{figure['mean']:.{digits}f} ± {figure['std']:.{digits}f}"
