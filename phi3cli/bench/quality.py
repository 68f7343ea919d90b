"""Quality beside speed: agreement with the reference's greedy tokens, and perplexity of a fixed text.

The prompts and the text ship inside the package (phi3cli/bench/data/), so every install measures the same thing.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from functools import cache
from pathlib import Path

DATA = Path(__file__).with_name("data")


@cache
def agreement_prompts() -> tuple[str, ...]:
    """The fixed user prompts whose greedy answers are compared across configurations."""
    return tuple(json.loads((DATA / "agreement_prompts.json").read_text(encoding="utf-8")))


@cache
def perplexity_text() -> str:
    """A few paragraphs of plain English prose (written for phi3) scored for perplexity."""
    return (DATA / "perplexity.txt").read_text(encoding="utf-8")


def agreement(reference: Sequence[Sequence[int]], candidate: Sequence[Sequence[int]], tokens: int) -> float | None:
    """Share of the first `tokens` greedy tokens, over all prompts, equal position by position to the reference.

    Answers end where the model ends them (end of text included), so an answer that stops early or runs on
    counts the positions it lacks or adds as mismatches. None when there is no reference.
    """
    if not reference or len(reference) != len(candidate):
        return None
    matched = total = 0
    for ref, cand in zip(reference, candidate, strict=True):
        ref = list(ref)[:tokens]
        cand = list(cand)[:tokens]
        matched += sum(a == b for a, b in zip(ref, cand, strict=False))
        total += max(len(ref), len(cand))
    return matched / total if total else None


def perplexity(logprobs: Sequence[float]) -> float:
    """exp of the mean negative log-likelihood per token."""
    return math.exp(-sum(logprobs) / len(logprobs))
