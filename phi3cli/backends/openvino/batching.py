"""Continuous batching: OpenVINO GenAI's ContinuousBatchingPipeline behind phi3's BatchEngine, for `phi3 serve`.

As OpenVINO Model Server drives it: requests join with add_request (one GenerationHandle each), one loop thread
calls step() while any request runs, and after every step reads each handle's new token ids into that request's
stream. A stream that is closed, or whose `cancelled` event is set, has its handle stopped before the next step,
which frees its KV blocks. The KV-cache pool has a fixed number of blocks, so a request that can never fit is
refused up front (BatchEngine.refusal) instead of waiting.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
import openvino_genai as ov_genai

from phi3cli.backends.base import BATCHING, BatchEngine, BatchingOptions, GenerationSettings, LoadRequest, RawToken
from phi3cli.backends.openvino.grammar import GrammarCheck
from phi3cli.backends.openvino.ir import context_length
from phi3cli.backends.openvino.kvcache import BLOCK_TOKENS
from phi3cli.backends.openvino.runtime import (
    OpenVINOModel,
    _compile_log,
    compile_properties,
    compiled_properties,
    execution_devices,
    generation_config,
    ov_device_for,
)
from phi3cli.backends.openvino.speculative import pipeline_properties, requested
from phi3cli.backends.streaming import IncrementalDecoder
from phi3cli.errors import ContextOverflowError, Phi3Error
from phi3cli.progress import Progress
from phi3cli.sizing import available_memory
from phi3cli.util import first_line

log = logging.getLogger("phi3.serve")

POOL_SHARE = 0.25  # the default pool takes at most this share of the memory available at start-up
_END = object()


@dataclass(frozen=True)
class PoolSize:
    """The KV-cache pool: a whole number of blocks, each holding block_tokens tokens of every layer."""

    blocks: int
    block_tokens: int
    estimated_bytes: int

    @property
    def tokens(self) -> int:
        return self.blocks * self.block_tokens


def kv_bytes_per_token(config: dict, device: str) -> int:
    """Bytes of KV cache one token takes: u8 with per-token and per-channel scales on the CPU, f16 on a GPU.

    Checked on the demo model: 30 layers, 3 KV heads of 64 give 13,680 bytes per token on the CPU, as measured.
    """
    layers = int(config["num_hidden_layers"])
    heads = int(config.get("num_key_value_heads") or config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // int(config["num_attention_heads"]))
    if device == "cpu":  # keys: u8 + per-channel scale/zero point per block; values: u8 + per-token scale/zero point
        per_head = 2 * head_dim + 8 * head_dim // BLOCK_TOKENS["cpu"] + 8
    else:
        per_head = 2 * head_dim * 2
    return layers * heads * per_head


def pool_size(options: BatchingOptions, config: dict, device: str, context: int, available: int) -> PoolSize:
    """Blocks for the pool: --kv-cache-gb if given, else room for every sequence's full context, capped at a
    quarter of the memory available (but never below one full context)."""
    per_token = kv_bytes_per_token(config, device)
    block_tokens = BLOCK_TOKENS.get(device, 32)
    per_block = per_token * block_tokens
    max_sequences = options.max_sequences
    if max_sequences < 1:
        raise Phi3Error(f"--max-sequences must be at least 1, not {max_sequences}.")
    if options.kv_cache_gb is not None:
        if options.kv_cache_gb <= 0:
            raise Phi3Error(f"--kv-cache-gb must be above 0, not {options.kv_cache_gb}.")
        blocks = int(options.kv_cache_gb * 2**30 // per_block)
        if blocks < 1:
            raise Phi3Error(
                f"--kv-cache-gb {options.kv_cache_gb} is less than one KV block ({per_block / 2**20:.1f} MiB).",
                hint="Give it more memory.",
            )
    else:
        wanted = max_sequences * context * per_token
        budget = max(int(available * POOL_SHARE), context * per_token)
        blocks = math.ceil(min(wanted, budget) / per_block)
    if blocks * per_block > available * 0.8:
        raise Phi3Error(
            f"A KV-cache pool of {blocks * block_tokens} tokens needs {blocks * per_block / 2**30:.1f} GiB; "
            f"{available / 2**30:.1f} GiB of memory is available.",
            hint="Lower --kv-cache-gb (or --max-sequences).",
        )
    return PoolSize(blocks, block_tokens, blocks * per_block)


class _Sequence:
    """One request in the batch: its handle, and the token ids the loop thread has read for it."""

    def __init__(self, handle, cancelled: threading.Event | None):
        self.handle = handle
        self.cancelled = cancelled
        self.items: queue.SimpleQueue = queue.SimpleQueue()
        self.closed = False  # the consumer stopped reading
        self.stopped = False  # handle.stop() was called

    @property
    def unwanted(self) -> bool:
        return self.closed or (self.cancelled is not None and self.cancelled.is_set())


class ContinuousBatchingEngine(BatchEngine):
    """Every running request advances one token per step() of one ContinuousBatchingPipeline."""

    def __init__(
        self, model: OpenVINOBatchedModel, pipe, pool: PoolSize, options: BatchingOptions, notes: dict, grammar=None
    ):
        self._model, self._pipe, self.pool = model, pipe, pool
        self.grammar: GrammarCheck | None = grammar  # compiles new schemas off the batch (see grammar.py)
        self.max_sequences = options.max_sequences
        self.prefix_caching = options.prefix_caching
        self.notes = notes  # what /health says about how it runs (threads, greedy invariance)
        self._cond = threading.Condition()
        self._sequences: dict[int, _Sequence] = {}
        self._ids = itertools.count()
        self._closed = False
        self.steps = 0
        self.failures = 0
        self._thread = threading.Thread(target=self._loop, name="phi3-batch-loop", daemon=True)
        self._thread.start()

    def refusal(self, prompt_tokens: int, max_new_tokens: int | None) -> str | None:
        pool = self.pool.tokens
        if prompt_tokens > pool:
            return (
                f"The prompt is {prompt_tokens} tokens; this server's KV-cache pool holds {pool}. "
                "Shorten the messages (the server's --kv-cache-gb sets the pool)."
            )
        if max_new_tokens is None or max_new_tokens <= self.room(prompt_tokens):
            return None
        return (
            f"This server's KV-cache pool holds {pool} tokens; this request needs {prompt_tokens + max_new_tokens - 1} "
            f"({prompt_tokens} in the prompt, {max_new_tokens} in the completion). Lower max_tokens or shorten the "
            "prompt (the server's --kv-cache-gb sets the pool)."
        )

    def room(self, prompt_tokens: int) -> int:
        return self.pool.tokens - prompt_tokens + 1  # the last token's keys and values are never stored

    def generate(
        self, prompt_ids: list[int], settings: GenerationSettings, cancelled: threading.Event | None = None
    ) -> Iterator[RawToken]:
        if why := self.refusal(len(prompt_ids), None):
            raise ContextOverflowError(why)
        room = self.room(len(prompt_ids))
        if settings.max_new_tokens > room:  # as stream_reply fits a reply to the context, fit it to the pool
            settings = GenerationSettings(**{**settings.__dict__, "max_new_tokens": room})
        if self.grammar is not None:
            self.grammar.check(settings)
        config = generation_config(self._pipe.get_config(), settings, self._model.speculation)
        return self._stream(prompt_ids, config, cancelled)

    def _stream(self, prompt_ids: list[int], config, cancelled: threading.Event | None) -> Iterator[RawToken]:
        with self._cond:
            if self._closed:
                raise Phi3Error("The batch engine is closed.")
            rid = next(self._ids)
            handle = self._pipe.add_request(rid, ov.Tensor(np.array([prompt_ids], dtype=np.int64)), config)
            sequence = self._sequences[rid] = _Sequence(handle, cancelled)
            self._cond.notify()
        decoder = IncrementalDecoder(self._model.decode, self._model.decode_pair)
        try:
            while (item := sequence.items.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                ids, t = item
                for token_id in ids:
                    yield RawToken(decoder.push(token_id), t=t, token_id=token_id)
        finally:
            sequence.closed = True  # the loop stops its handle before the next step
            with self._cond:
                self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._sequences and not self._pipe.has_non_finished_requests():
                    self._cond.wait()
                if self._closed:
                    break
                live = list(self._sequences.items())
            for _, sequence in live:
                if sequence.unwanted and not sequence.stopped:
                    sequence.handle.stop()  # freed by the next step
                    sequence.stopped = True
            try:
                self._pipe.step()  # holds the GIL: the streams are read in Python between steps
            except Exception as exc:  # every running request gets the error; the engine carries on
                log.error("continuous batching step failed", exc_info=exc)
                self.failures += 1
                self._finish_all(RuntimeError(f"OpenVINO GenAI's step failed: {first_line(exc)}"))
                continue
            self.steps += 1
            now = time.perf_counter()
            for rid, sequence in live:
                self._read(rid, sequence, now)
            time.sleep(0)  # let the streams' threads take the GIL before the next step

    def _read(self, rid: int, sequence: _Sequence, now: float) -> None:
        handle = sequence.handle
        while handle.can_read():
            for output in handle.read().values():
                if output.generated_ids:
                    sequence.items.put((list(output.generated_ids), now))
        status = handle.get_status()
        if status == ov_genai.GenerationStatus.RUNNING:
            return
        if status == ov_genai.GenerationStatus.IGNORED and not sequence.stopped:
            sequence.items.put(RuntimeError(f"The KV-cache pool ({self.pool.tokens} tokens) ran out of room."))
        sequence.items.put(_END)
        with self._cond:
            self._sequences.pop(rid, None)

    def _finish_all(self, error: BaseException | None) -> None:
        with self._cond:
            live, self._sequences = self._sequences, {}
        for sequence in live.values():
            if not sequence.stopped:
                sequence.handle.stop()
                sequence.stopped = True
            if error is not None:
                sequence.items.put(error)
            sequence.items.put(_END)
        if error is not None:  # let the pipeline drop what was stopped
            try:
                self._pipe.step()
            except Exception:  # noqa: BLE001 - already failing; the next request retries
                pass

    @property
    def running(self) -> int:
        return len(self._sequences)

    def healthy(self) -> bool:
        return self._thread.is_alive()

    def describe(self) -> dict[str, Any]:
        metrics = self._pipe.get_metrics()
        return {
            "engine": "OpenVINO GenAI ContinuousBatchingPipeline",
            "max_sequences": self.max_sequences,
            "running": self.running,
            "kv_cache_tokens": self.pool.tokens,
            "kv_cache_bytes": int(metrics.kv_cache_size_in_bytes) or self.pool.estimated_bytes,
            "kv_cache_usage": round(float(metrics.cache_usage), 1),
            "prefix_caching": self.prefix_caching,
            "steps": self.steps,
            "schemas_checked": self.grammar.checked if self.grammar else 0,
            "speculation": self._model.speculation.describe() if self._model.speculation else None,
            **self.notes,
        }

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(10)
        self._finish_all(None)
        if self.grammar is not None:
            self.grammar.close()
        self._pipe = None  # the compiled model and its KV-cache pool go with it, though the model object lives on


class OpenVINOBatchedModel(OpenVINOModel):
    """The openvino model `phi3 serve` loads: a ContinuousBatchingPipeline in place of the LLMPipeline.

    Its generate() is one sequence of the batch, so chat-style callers (warm-up, bench) still work on it.
    """

    engine: ContinuousBatchingEngine

    def generation_config(self, settings: GenerationSettings):
        return generation_config(self.pipe.get_config(), settings, self.speculation)

    def generate(self, prompt_ids: list[int], settings: GenerationSettings) -> Iterator[RawToken]:
        return self.engine.generate(prompt_ids, settings)

    def batch_engine(self) -> ContinuousBatchingEngine:
        return self.engine

    def close(self) -> None:
        if getattr(self, "engine", None) is not None:
            self.engine.close()
            self.engine = None
        super().close()


def batching_options(request: LoadRequest) -> BatchingOptions | None:
    value = request.options.get(BATCHING)
    if value is None or isinstance(value, BatchingOptions):
        return value
    return BatchingOptions(**value)


def load_batched(folder: Path, fmt: str, request: LoadRequest, progress: Progress) -> OpenVINOBatchedModel:
    """Compile an IR folder into a ContinuousBatchingPipeline with a fixed KV-cache pool, and start its loop."""
    options = batching_options(request) or BatchingOptions()
    device = ov_device_for(request.device, list(ov.Core().available_devices))
    properties = compile_properties(request)
    notes: dict[str, Any] = {}
    if request.device == "cpu":
        # With two or more threads the CPU plugin splits a step's work by the batch's shape, so a greedy answer can
        # change with the number of requests running beside it (docs/serve.md has the figures). One thread keeps
        # every answer the same as alone; --threads trades that for speed.
        properties.setdefault("INFERENCE_NUM_THREADS", 1)
        threads = int(properties["INFERENCE_NUM_THREADS"])
        notes = {"threads": threads, "greedy_invariant": threads == 1}
    context = context_length(folder)
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else None
    if config is None:
        raise Phi3Error(f"{folder} has no config.json, which sizing the KV-cache pool needs.")
    pool = pool_size(options, config, request.device, context, available_memory())  # a container's limit counts
    scheduler = ov_genai.SchedulerConfig()
    scheduler.num_kv_blocks = pool.blocks
    scheduler.max_num_seqs = options.max_sequences
    scheduler.enable_prefix_caching = options.prefix_caching
    speculation = requested(request)
    properties.update(pipeline_properties(speculation, device, properties))
    progress.phase(f"Loading {folder.name} on {device} with OpenVINO GenAI (continuous batching)")
    try:
        with _compile_log() as compile_lines:
            pipe = ov_genai.ContinuousBatchingPipeline(str(folder), scheduler, device, properties)
    except RuntimeError as exc:
        raise Phi3Error(
            f"OpenVINO GenAI could not load {folder} on {device} for continuous batching: {first_line(exc)}",
            hint="Run again with --debug for OpenVINO's full message.",
        ) from exc
    executed = execution_devices(compile_lines) or device
    model = OpenVINOBatchedModel(folder, pipe, fmt, request.device, executed, context, None)
    model.compiled_properties = compiled_properties(compile_lines)
    # The scoring pass (log-probabilities) at the pipeline's precision, not the CPU's default (bf16 where it has it).
    model.scorer_properties = {k: v for k, v in properties.items() if k in ("CACHE_DIR", "INFERENCE_PRECISION_HINT")}
    model.speculation = speculation
    grammar = GrammarCheck(folder, {k: v for k, v in properties.items() if k == "CACHE_DIR"})
    model.engine = ContinuousBatchingEngine(model, pipe, pool, options, notes, grammar)
    return model
