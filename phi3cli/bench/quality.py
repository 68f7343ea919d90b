"""Quality beside speed: perplexity, KL divergence and top-1 agreement on a fixed text, and free-running agreement.

Under teacher forcing every configuration scores the same token ids of the shipped text, so its next-token
distributions can be compared position by position with the reference's (as quantizers compare them).

The prompts and the text ship inside the package (phi3cli/bench/data/), so every install measures the same thing.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Sequence
from functools import cache
from pathlib import Path

from phi3cli.util import log_softmax, write_atomically

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


def kl_per_position(ref_logprobs, logprobs):
    """KL(reference || candidate) of the next-token distribution at each position (nats), as a float64 array.

    Both are (positions x vocabulary) log-probabilities over the same token ids. A vocabulary wider on one side
    (a runtime's padded rows) is cut to the narrower one and both are renormalised over it.
    """
    import numpy as np

    ref, cand = np.asarray(ref_logprobs), np.asarray(logprobs)
    if ref.ndim != 2 or cand.ndim != 2 or ref.shape[0] != cand.shape[0]:
        raise ValueError(f"log-probabilities of shapes {ref.shape} and {cand.shape} do not cover the same positions")
    if ref.shape[1] != cand.shape[1]:
        width = min(ref.shape[1], cand.shape[1])
        ref, cand = log_softmax(ref[:, :width]), log_softmax(cand[:, :width])
    ref64 = ref.astype(np.float64)
    return np.maximum((np.exp(ref64) * (ref64 - cand.astype(np.float64))).sum(axis=-1), 0.0)


def next_token_divergence(ref_logprobs, logprobs) -> tuple[float, float]:
    """(mean KL divergence, top-1 agreement) of a candidate's next-token distributions against the reference's.

    Teacher forcing: both scored the same token ids, row i being the distribution of the token after ids[i].
    Mean KL(reference || candidate) in nats, and the share of positions where both put the same token first;
    what llama.cpp's perplexity tool reports with --kl-divergence. A model against itself gives (0.0, 1.0).
    """
    import numpy as np

    kld = kl_per_position(ref_logprobs, logprobs)
    width = min(np.shape(ref_logprobs)[1], np.shape(logprobs)[1])
    top1 = np.asarray(ref_logprobs)[:, :width].argmax(axis=-1) == np.asarray(logprobs)[:, :width].argmax(axis=-1)
    return float(kld.mean()), float(top1.mean())


def reference_path(cache: Path, model: Path, ids: Sequence[int]) -> Path:
    """Where the reference's next-token log-probabilities of these token ids of this model are kept (.npy).

    Keyed by the model's files (names, sizes, modification times) and the ids, so another model, a rebuilt
    one or another text gets its own entry.
    """
    digest = hashlib.sha256(",".join(map(str, ids)).encode())
    files = [model] if model.is_file() else sorted(f for f in model.iterdir() if f.is_file())
    for f in files:
        stat = f.stat()
        digest.update(f"\0{f.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return cache / f"{model.name}-{digest.hexdigest()[:20]}.npy"


def save_reference(path: Path, logprobs) -> None:
    """Keep the reference's log-probabilities (written beside their place and renamed, never half-written)."""
    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, np.asarray(logprobs, dtype=np.float32))
    write_atomically(path, buffer.getvalue())


def load_reference(path: Path):
    """The cached reference log-probabilities, or None when there are none for this model and text."""
    import numpy as np

    try:
        return np.load(path)
    except (OSError, ValueError):
        return None
