"""The generation queue: one model, its requests in arrival order, run one at a time or batched.

Everything that touches the model (templating, tokenizing, generating) runs on worker threads, never on the
event loop. A model without a batch engine gets one worker: one request at a time (the backends are blocking and
not safe to share between threads). A model with one (LoadedModel.batch_engine) gets as many workers as the
engine runs sequences, each driving stream_reply over the engine's generate, so every request is timed by the
same code as `phi3 chat` while the engine steps them all together. Each request is a GenerationJob whose events the web
side awaits; cancelling a job (the client went away) stops its generation and frees its place at once.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from phi3cli.backends.base import GenerationSettings, LoadedModel
from phi3cli.generation import ReplyStats, TokenEvent, stream_reply
from phi3cli.serve.sampling import reply_logprobs

log = logging.getLogger("phi3.serve")


@dataclass
class Started:
    """The prompt was accepted and generation begins."""

    prompt_tokens: int
    queue_s: float  # from submission to the start of generation: waiting, templating and tokenizing


class Finished:
    """The last item of every job."""


FINISHED = Finished()
JobItem = Started | TokenEvent | ReplyStats | BaseException | Finished


class GenerationJob:
    """One request's generation; its items arrive on the event loop in order."""

    def __init__(
        self, prepare: Callable[[LoadedModel], list[int]], settings: GenerationSettings, loop, logprobs: int | None
    ):
        self.prepare = prepare  # runs on the worker: the prompt's token ids, or raises ApiError
        self.settings = settings
        self.logprobs = logprobs  # None, or how many alternatives to list per token
        self.scored: list[dict] | None = None  # the reply's log-probabilities, set before its ReplyStats arrives
        self.submitted = time.perf_counter()
        self.cancelled = threading.Event()
        self.tokens = 0  # TokenEvents delivered so far
        self._loop = loop
        self._items: collections.deque[JobItem] = collections.deque()
        self._ready = asyncio.Event()

    def cancel(self) -> None:
        """Stop generating (at the next token) or skip the job if it has not started."""
        self.cancelled.set()

    def deliver(self, item: JobItem) -> None:
        """Called on the worker thread."""
        try:
            self._loop.call_soon_threadsafe(self._push, item)
        except RuntimeError:  # the event loop is gone (server shutting down)
            self.cancel()

    def unread(self, item: JobItem) -> None:
        """Give back an item taken with next(): the next call returns it first (on the event loop)."""
        self._items.appendleft(item)
        self._ready.set()

    def _push(self, item: JobItem) -> None:
        self._items.append(item)
        self._ready.set()

    async def next(self, timeout: float | None = None) -> JobItem | None:
        """The next item; None if none came within timeout seconds."""
        while not self._items:
            self._ready.clear()
            try:
                await asyncio.wait_for(self._ready.wait(), timeout)
            except asyncio.TimeoutError:
                return None
        return self._items.popleft()


class GenerationQueue:
    """Runs the generations of one model: serially, or up to its batch engine's max_sequences at once."""

    def __init__(self, model: LoadedModel):
        self.model = model
        self.engine = model.batch_engine()
        self.workers = self.engine.max_sequences if self.engine else 1
        self._jobs: queue.Queue[GenerationJob | None] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._scoring = threading.Lock()  # one teacher-forced scoring pass at a time (its scorer is made on first use)
        self.active: set[GenerationJob] = set()
        self.served = 0
        self.stopping = False
        self.on_reply: Callable[[ReplyStats], None] | None = None  # told of every finished reply (serve's metrics)

    def start(self) -> None:
        for n in range(self.workers):
            worker = threading.Thread(target=self._run, name=f"phi3-serve-worker-{n}", daemon=True)
            worker.start()
            self._threads.append(worker)

    def submit(
        self, prepare: Callable[[LoadedModel], list[int]], settings: GenerationSettings, logprobs: int | None = None
    ) -> GenerationJob:
        job = GenerationJob(prepare, settings, asyncio.get_running_loop(), logprobs)
        if self.stopping:
            job.cancel()
            job.deliver(FINISHED)
        else:
            self._jobs.put(job)
        return job

    @property
    def waiting(self) -> int:
        return self._jobs.qsize()

    @property
    def running(self) -> int:
        return len(self.active)

    def describe(self) -> dict:
        """How requests are run, for /health."""
        if self.engine is None:
            return {"mode": "serial", "max_sequences": 1, "reason": self.model.serial_reason}
        return {"mode": "continuous", **self.engine.describe()}

    def healthy(self) -> bool:
        """Every worker (and the batch engine) still running."""
        return all(t.is_alive() for t in self._threads) and (self.engine is None or self.engine.healthy())

    def cancel_all(self) -> None:
        """Cancel what is running and waiting (the server is stopping); does not block."""
        self.stopping = True
        with self._lock:
            for job in self.active:
                job.cancel()
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job:
                job.cancel()
                job.deliver(FINISHED)

    def close(self, timeout: float = 10.0) -> None:
        """Cancel everything and stop the workers."""
        self.cancel_all()
        for _ in self._threads:
            self._jobs.put(None)
        deadline = time.monotonic() + timeout
        for worker in self._threads:
            worker.join(max(0.0, deadline - time.monotonic()))

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            if job.cancelled.is_set():
                job.deliver(FINISHED)
                continue
            with self._lock:
                self.active.add(job)
            try:
                self._generate(job)
            except BaseException as exc:  # delivered to the request; the worker carries on
                job.deliver(exc)
            finally:
                with self._lock:
                    self.active.discard(job)
                    self.served += 1
                job.deliver(FINISHED)

    def _generate(self, job: GenerationJob) -> None:
        ids = job.prepare(self.model)
        started = Started(len(ids), time.perf_counter() - job.submitted)
        settings, generate = job.settings, None
        if self.engine:
            generate = partial(self.engine.generate, cancelled=job.cancelled)
            room = self.engine.room(len(ids))
            if room is not None and settings.max_new_tokens > room:  # what the KV-cache pool leaves ("length")
                settings = GenerationSettings(**{**settings.__dict__, "max_new_tokens": room})
        events = stream_reply(self.model, ids, settings, generate)
        try:
            items = iter(events)
            if settings.constraint is not None:
                # The grammar engine compiles the constraint before the first token: read that token first, so a
                # refusal is answered as an HTTP error rather than in the middle of a stream.
                items = itertools.chain([next(events)], events)
            job.deliver(started)
            for event in items:
                if job.cancelled.is_set():
                    break
                if isinstance(event, TokenEvent):
                    job.tokens += 1
                elif isinstance(event, ReplyStats):
                    if job.logprobs is not None:
                        with self._scoring:
                            job.scored = reply_logprobs(self.model, ids, event.token_ids, job.logprobs)
                    if self.on_reply is not None:
                        self.on_reply(event)
                job.deliver(event)
        finally:
            events.close()  # stops the runtime if the client went away mid-reply
