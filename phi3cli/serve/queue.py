"""The generation queue: one model, one worker thread, one request at a time in arrival order.

The backends are blocking and not safe to share between threads, so everything that touches the
model (templating, tokenizing, generating) runs on the worker. Each request is a Job whose events
the web side awaits; cancelling a job (the client went away) closes its stream_reply, which stops
the runtime, and the worker moves on to the next job.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from phi3cli.backends.base import GenerationSettings, LoadedModel
from phi3cli.generation import ReplyStats, TokenEvent, stream_reply

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


class Job:
    """One request's generation; its items arrive on the event loop in order."""

    def __init__(self, prepare: Callable[[LoadedModel], list[int]], settings: GenerationSettings, loop):
        self.prepare = prepare  # runs on the worker: the prompt's token ids, or raises ApiError
        self.settings = settings
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
    """Serializes generations on one model."""

    def __init__(self, model: LoadedModel):
        self.model = model
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._worker: threading.Thread | None = None
        self.active: Job | None = None
        self.served = 0
        self.stopping = False

    def start(self) -> None:
        self._worker = threading.Thread(target=self._run, name="phi3-serve-worker", daemon=True)
        self._worker.start()

    def submit(self, prepare: Callable[[LoadedModel], list[int]], settings: GenerationSettings) -> Job:
        job = Job(prepare, settings, asyncio.get_running_loop())
        if self.stopping:
            job.cancel()
            job.deliver(FINISHED)
        else:
            self._jobs.put(job)
        return job

    @property
    def waiting(self) -> int:
        return self._jobs.qsize()

    def cancel_all(self) -> None:
        """Cancel what is running and waiting (the server is stopping); does not block."""
        self.stopping = True
        if job := self.active:
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
        """Cancel everything and stop the worker."""
        self.cancel_all()
        self._jobs.put(None)
        if self._worker:
            self._worker.join(timeout)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            if job.cancelled.is_set():
                job.deliver(FINISHED)
                continue
            self.active = job
            try:
                self._generate(job)
            except BaseException as exc:  # delivered to the request; the worker carries on
                job.deliver(exc)
            finally:
                self.active = None
                self.served += 1
                job.deliver(FINISHED)

    def _generate(self, job: Job) -> None:
        ids = job.prepare(self.model)
        job.deliver(Started(len(ids), time.perf_counter() - job.submitted))
        events = stream_reply(self.model, ids, job.settings)
        try:
            for event in events:
                if job.cancelled.is_set():
                    break
                if isinstance(event, TokenEvent):
                    job.tokens += 1
                job.deliver(event)
        finally:
            events.close()  # stops the runtime if the client went away mid-reply
