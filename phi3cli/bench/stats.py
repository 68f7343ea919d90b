"""Mean and standard deviation over repetitions, the way every figure is reported; interleaved rounds and medians."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


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


def rotation(items: Sequence[T], round_index: int) -> list[T]:
    """The order of one interleaved round: each round starts one item later, so none always runs first or last."""
    shift = round_index % len(items) if items else 0
    return [*items[shift:], *items[:shift]]


def median_ratio(rounds: Sequence[Sequence[float]], base_rounds: Sequence[Sequence[float]]) -> float | None:
    """The median over rounds of (this round's mean / the baseline's mean in the same round), rounds where either
    has no value left out: on a shared machine a slow round slows both sides of its ratio."""
    ratios = [
        statistics.fmean(own) / statistics.fmean(base)
        for own, base in zip(rounds, base_rounds, strict=False)
        if own and base and statistics.fmean(base) > 0
    ]
    return statistics.median(ratios) if ratios else None
