"""Measuring one configuration inside the current process, through the code path users run.

Loading goes through phi3cli.loading.load and every reply through stream_reply, so the
figures are those of `phi3 chat`. The bench runs this in a fresh subprocess per configuration
(phi3cli.bench.worker), so one runtime's memory and threads never touch another's.
"""

from __future__ import annotations

import gc
import random
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from phi3cli.backends import get_backend
from phi3cli.backends.base import GenerationSettings, LoadedModel
from phi3cli.chat import ChatSession, HistoryTrimmed
from phi3cli.context import full_context_kv_bytes
from phi3cli.errors import Phi3Error
from phi3cli.generation import ReplyStats, generate_text
from phi3cli.loading import load
from phi3cli.routing import given
from phi3cli.sources import resolve_source
from phi3cli.store import ModelStore
from phi3cli.util import dir_size

from .quality import (
    agreement_prompts,
    load_reference,
    next_token_divergence,
    perplexity,
    perplexity_text,
    reference_path,
    save_reference,
)
from .vision import measure_image


@dataclass
class MeasureJob:
    """What one bench subprocess measures (a configuration and the tests to run on it); sent to it as JSON."""

    model: str
    backend: str
    device: str
    format: str
    prompt_tokens: list[int]
    gen_tokens: int
    warmup: int
    repetitions: int
    threads: int | None = None
    measure_speed: bool = True
    quality: bool = True
    quality_tokens: int = 64
    reference: bool = False  # this is the reference: its log-probabilities are cached for the others
    turns: int = 0  # the multi-turn test: conversations of this many user messages (0: none)
    cache_reuse: bool = True
    options: dict = field(default_factory=dict)
    image: str | None = None  # the image test's file (None: a generated picture); run on vision models only
    convert: bool = False  # a catalogue name's source checkpoint, as the parent resolved it, not a ready-made variant


def step_count(job: MeasureJob) -> int:
    """How many progress reports measure_configuration makes for a job (for a progress bar); the image test,
    which only a loaded model can call for, adds its own with a MORE_STEPS report."""
    speed = 1 + len(job.prompt_tokens) * (job.warmup + job.repetitions) if job.measure_speed else 0
    if job.measure_speed and job.turns:
        speed += len(job.prompt_tokens) * (job.warmup + job.repetitions) * job.turns
    quality = len(agreement_prompts()) + 1 if job.quality else 0
    return 2 + speed + quality


def peak_rss_bytes() -> int | None:
    """The most resident memory this process has held so far.

    Linux: VmHWM, which starts afresh at exec (getrusage's ru_maxrss would carry the parent's peak over).
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource
    except ImportError:  # Windows
        import psutil

        return int(getattr(psutil.Process().memory_info(), "peak_wset", 0)) or None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def synthetic_prompt(
    encode: Callable[[str], list[int]], length: int, seed: int, avoid_first: set[int] = frozenset()
) -> list[int]:
    """Exactly `length` token ids of shuffled English words, different for each seed (encode: text -> ids).

    Each repetition gets a different prompt (starting with a different token where possible), since a
    runtime may reuse its KV cache for a prompt it has just seen (OpenVINO GenAI does).
    """
    words = perplexity_text().split()
    for attempt in range(50):
        rng = random.Random(f"{length}-{seed}-{attempt}")
        ids: list[int] = []
        while len(ids) < length:
            rng.shuffle(words)
            ids += encode(" ".join(words) + "\n")
        if ids[0] not in avoid_first:
            break
    return ids[:length]


def synthetic_message(model: LoadedModel, length: int, seed: int) -> str:
    """Shuffled English words, different for each seed, as many as fit in `length` tokens: a user message."""
    words = perplexity_text().split()
    rng = random.Random(f"message-{length}-{seed}")
    pool: list[str] = []
    while len(pool) < length:  # every word is at least one token
        rng.shuffle(words)
        pool += words
    low, high = 1, length  # the most words whose text fits: binary search on the token count
    while low < high:
        middle = (low + high + 1) // 2
        if len(model.encode(" ".join(pool[:middle]))) <= length:
            low = middle
        else:
            high = middle - 1
    return " ".join(pool[:low])


def reply_figures(stats: ReplyStats) -> dict:
    """The figures of one reply as bench records them (milliseconds and tokens per second)."""
    return {
        "ttft_ms": stats.ttft_s * 1000,
        "prefill_tps": stats.prefill_tps,
        "tpot_ms": stats.tpot_ms,
        "decode_tps": stats.decode_tps,
        "e2e_tps": stats.e2e_tps,
        "tokens": stats.generated_tokens,
        "prompt_tokens": stats.prompt_tokens,
    }


def measure_configuration(job: MeasureJob, store: ModelStore, report: Callable[[str], None] = lambda _: None) -> dict:
    """Load twice (cold, then warm), warm up, repeat, then measure quality; returns plain figures.

    The cold load starts with an empty runtime cache of its own (LoadRequest.cache_dir, for runtimes that keep
    compiled models there), not the store's shared one; the warm load reuses what the cold one wrote. Raises
    Phi3Error (or whatever the runtime raises) when the configuration cannot run; the caller shows that as a
    failure row.
    """
    with tempfile.TemporaryDirectory(prefix="phi3-bench-cache-") as cache:
        return _measure(job, store, report, Path(cache))


def _measure(job: MeasureJob, store: ModelStore, report: Callable[[str], None], cache: Path) -> dict:
    result: dict = {"threads": job.threads}
    report("resolving the model")
    source = resolve_source(job.model, store, convert=job.convert)
    how = dict(
        route=given(job.backend, job.device),  # planned by the parent: attempted as asked
        format=job.format,
        threads=job.threads,
        options=job.options,
        cache_dir=cache,
        cache_reuse=job.cache_reuse,
        store=store,
    )
    get_backend(job.backend)  # import the runtime first: load times are loading, not importing

    report("loading (cold)")
    model = load(source, **how)
    result["load_cold_s"] = model.load_seconds
    if job.measure_speed:
        model.close()
        del model
        gc.collect()
        report("loading (warm)")
        model = load(source, **how)
        result["load_warm_s"] = model.load_seconds
    else:
        result["load_warm_s"] = None
    try:
        result.update(
            executed_device=model.executed_device,
            path=str(model.path),
            size_bytes=dir_size(model.path),
            context_length=model.context_length,
            kv_cache_bytes=full_context_kv_bytes(model.path, model.context_length),
        )
        # One-prompt tests read every prompt whole, as before the cache was kept; the multi-turn test keeps it.
        kept = bool(model.prompt_cache and model.prompt_cache.enabled)
        _keep_cache(model, False)
        result["runs"] = _measure_speed(model, job, report) if job.measure_speed else []
        result["image"] = measure_image(model, job, report) if job.measure_speed else None
        _keep_cache(model, kept)
        result["multi_turn"] = _measure_turns(model, job, report) if job.measure_speed and job.turns else []
        _keep_cache(model, False)
        result["peak_rss_bytes"] = peak_rss_bytes()  # before quality: scoring a text is not inference
        if job.quality:
            result["quality"] = _measure_quality(model, job, report, store.cache_dir("reference"), source.path)
        else:
            result["quality"] = None
    finally:
        model.close()
    return result


def _measure_speed(model: LoadedModel, job: MeasureJob, report: Callable[[str], None]) -> list[dict]:
    settings = GenerationSettings(max_new_tokens=job.gen_tokens, temperature=0.0, ignore_eos=True)
    runs = []
    first_tokens: set[int] = set()
    seed = 0
    for length in job.prompt_tokens:
        if length + job.gen_tokens > model.context_length:
            raise Phi3Error(
                f"{length} prompt + {job.gen_tokens} generated tokens exceed this model's context "
                f"of {model.context_length}.",
                hint="Lower --prompt-tokens or --gen-tokens.",
            )
        reps = []
        total = job.warmup + job.repetitions
        for i in range(total):
            phase = f"warm-up {i + 1}/{job.warmup}" if i < job.warmup else f"run {i - job.warmup + 1}/{job.repetitions}"
            report(f"pp{length}+tg{job.gen_tokens} {phase}")
            seed += 1
            prompt = synthetic_prompt(model.encode, length, seed, first_tokens)
            first_tokens.add(prompt[0])
            stats = generate_text(model, prompt, settings)
            if i >= job.warmup:
                reps.append(reply_figures(stats))
        runs.append({"prompt_tokens": length, "gen_tokens": job.gen_tokens, "reps": reps})
    return runs


def _keep_cache(model: LoadedModel, on: bool) -> None:
    if model.prompt_cache:
        model.prompt_cache.enabled = on
        model.prompt_cache.clear()


def _measure_turns(model: LoadedModel, job: MeasureJob, report: Callable[[str], None]) -> list[dict]:
    """Conversations of job.turns user messages of each prompt length, through chat.ChatSession as `phi3 chat` runs
    them: the time to first token of every turn (which grows with the conversation unless the KV cache is kept).
    """
    settings = GenerationSettings(max_new_tokens=job.gen_tokens, temperature=0.0, ignore_eos=True)
    results = []
    for length in job.prompt_tokens:
        reps = []
        total = job.warmup + job.repetitions
        for i in range(total):
            phase = f"warm-up {i + 1}/{job.warmup}" if i < job.warmup else f"run {i - job.warmup + 1}/{job.repetitions}"
            session = ChatSession(model, settings)
            if model.prompt_cache:  # each conversation starts from an empty cache, as a new chat does
                model.prompt_cache.clear()
            turns = []
            for turn in range(job.turns):
                report(f"{job.turns} turns of pp{length}+tg{job.gen_tokens} {phase}, turn {turn + 1}")
                # A new text per message and per conversation: only what the conversation repeats can be reused.
                text = synthetic_message(model, length, 1000 * i + turn)
                stats = None
                for event in session.ask(text):
                    if isinstance(event, HistoryTrimmed):
                        raise Phi3Error(
                            f"{job.turns} turns of {length} + {job.gen_tokens} tokens outgrow this model's prompt "
                            f"budget (turn {turn + 1} had to drop history).",
                            hint="Lower --turns, --prompt-tokens or --gen-tokens.",
                        )
                    if isinstance(event, ReplyStats):
                        stats = event
                assert stats is not None
                turns.append(
                    {
                        "ttft_ms": stats.ttft_s * 1000,
                        "prompt_tokens": stats.prompt_tokens,
                        "cached_tokens": stats.cached_tokens,
                        "tokens": stats.generated_tokens,
                    }
                )
            if i >= job.warmup:
                reps.append(turns)
        results.append({"prompt_tokens": length, "gen_tokens": job.gen_tokens, "turns": job.turns, "reps": reps})
    return results


def _measure_quality(
    model: LoadedModel, job: MeasureJob, report: Callable[[str], None], cache: Path, source_path: Path
) -> dict:
    # The answers as users get them: greedy, ending at the end of text (its token included).
    settings = GenerationSettings(max_new_tokens=job.quality_tokens, temperature=0.0)
    tokens: list[list[int]] = []
    notes: list[str] = []
    for i, question in enumerate(agreement_prompts()):
        report(f"agreement prompt {i + 1}/{len(agreement_prompts())}")
        prompt = model.chat_template.render([{"role": "user", "content": question}])
        stats = generate_text(model, prompt, settings)
        if len(stats.token_ids) != stats.generated_tokens:
            notes.append(f"{job.backend} reports no token ids")
            tokens = []
            break
        tokens.append(stats.token_ids)

    report("perplexity and divergence from the reference")
    return {"tokens": tokens, "notes": notes, **_teacher_forced(model, job, cache, source_path, notes)}


def _teacher_forced(model: LoadedModel, job: MeasureJob, cache: Path, source_path: Path, notes: list[str]) -> dict:
    """Perplexity of the shipped text, and KL divergence and top-1 agreement with the reference on its ids.

    The reference's log-probabilities are computed once per model and text and kept in the store's cache;
    the others read them there (so the reference runs first).
    """
    import numpy as np

    ids = model.encode(perplexity_text())[: model.context_length]
    figures: dict = {"perplexity_tokens": len(ids), "perplexity": None, "kl_divergence": None, "top1": None}
    path = reference_path(cache, source_path, ids)
    cached = load_reference(path) if job.reference else None
    try:
        start = time.perf_counter()
        logprobs = cached if cached is not None else model.next_token_logprobs(ids)
        figures["scoring_s"] = time.perf_counter() - start
    except NotImplementedError as exc:
        notes.append(f"perplexity n/a: {exc}")
        return figures
    figures["perplexity"] = perplexity(logprobs[np.arange(len(ids) - 1), ids[1:]].tolist())
    if job.reference:
        if cached is None:
            save_reference(path, logprobs)
        reference = logprobs
    else:
        reference = load_reference(path)
    if reference is not None:  # else the runner says why
        figures["kl_divergence"], figures["top1"] = next_token_divergence(reference, logprobs)
    return figures
