"""How a runtime streams tokens: text pieces from token ids as they come, and a push-style generate (a streamer
callback) turned into an iterator."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator

from phi3cli.backends.base import RawToken


class IncrementalDecoder:
    """Turns token ids into text pieces as they arrive, holding back incomplete UTF-8 sequences.

    Decodes a short window (from a few tokens back) per step, so the cost per token stays constant. A runtime
    whose decode call costs more than its work (OpenVINO's detokenizer is a model) can pass decode_pair, which
    decodes both windows of a step in one call.
    """

    def __init__(
        self,
        decode: Callable[[list[int]], str],
        decode_pair: Callable[[list[int], list[int]], tuple[str, str]] | None = None,
    ):
        self._decode = decode
        self._decode_pair = decode_pair or (lambda a, b: (decode(a), decode(b)))
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        before, after = self._decode_pair(self._ids[self._prefix : self._read], self._ids[self._prefix :])
        if after.endswith("\ufffd") or len(after) <= len(before):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return after[len(before) :]


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


_DONE = object()


def pull_from_push(producer: Callable[[Callable[[RawToken], bool]], None]) -> Iterator[RawToken]:
    """Run a push-style generate (a streamer callback) in a worker thread and yield what it pushes.

    The producer calls ``emit(token)`` for each token; emit returns False once the consumer has
    stopped (closed the iterator, or Ctrl-C), and the producer must then stop generating.
    """
    items: queue.Queue = queue.Queue()
    stopped = threading.Event()

    def emit(token: RawToken) -> bool:
        if stopped.is_set():
            return False
        items.put(token)
        return True

    def work() -> None:
        try:
            producer(emit)
        except BaseException as exc:  # re-raised in the consumer's thread
            items.put(_Failure(exc))
        finally:
            items.put(_DONE)

    worker = threading.Thread(target=work, name="phi3-generate", daemon=True)
    worker.start()
    try:
        while True:
            item = items.get()
            if item is _DONE:
                break
            if isinstance(item, _Failure):
                raise item.exc
            yield item
    finally:
        stopped.set()
        worker.join()
