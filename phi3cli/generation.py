"""Streaming a reply, timed in one place for every backend (phi3cli.loading loads the model).

`stream_reply` reads a backend's RawTokens and yields TokenEvents, then one ReplyStats. Chat,
bench and serve all read this one stream, so their figures come from the code path users run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from phi3cli.backends.base import GenerationSettings, LoadedModel, RawToken
from phi3cli.backends.vision import ImagePrompt
from phi3cli.errors import ContextOverflowError
from phi3cli.speculation import Speculation, acceptance, steps_of


@dataclass
class TokenEvent:
    """A piece of the reply: the text one generated token added."""

    text: str
    index: int  # how many tokens have been generated so far
    elapsed: float  # seconds since the request started


@dataclass
class ReplyStats:
    """Figures for one reply, measured around the real runtime calls."""

    backend: str
    device: str
    executed_device: str
    prompt_tokens: int
    generated_tokens: int
    ttft_s: float  # request start to first token: tokenizing the prompt plus prefill
    total_s: float
    finish_reason: str  # stop | length | cancelled
    text: str
    token_times: list[float] = field(default_factory=list)  # seconds since request start, per token
    token_ids: list[int] = field(default_factory=list)  # the generated ids, where the backend reports them
    cached_tokens: int = 0  # prompt tokens taken from the KV cache kept since the last reply (not prefilled)
    images: int = 0  # images in the prompt (a vision model's)
    image_s: float | None = None  # the runtime's own time encoding them, part of ttft_s, where it reports one
    input_tokens: int | None = None  # the tokens the runtime read, images' included, where it counts them
    speculation: Speculation | None = None  # how the reply was decoded speculatively, if it was

    @property
    def read_tokens(self) -> int:
        """The prompt's size as the runtime read it: images' tokens included where it counts them."""
        return self.prompt_tokens if self.input_tokens is None else self.input_tokens

    @property
    def steps(self) -> int:
        """Passes of the model the reply took (fewer than its tokens when speculation was accepted)."""
        return steps_of(self.token_times)

    @property
    def acceptance(self) -> float | None:
        """The share of proposed tokens the model kept, counted from the stream (None without speculation)."""
        spec = self.speculation
        return acceptance(self.generated_tokens, self.steps, spec.num_assistant_tokens) if spec else None

    @classmethod
    def from_times(cls, prompt_tokens: int, token_times: list[float], **about) -> ReplyStats:
        """The figures of a reply timed elsewhere (seconds since the request started, per token), figured the same way:
        what benchmarks of bare runtime loops report beside phi3's own."""
        ttft = token_times[0] if token_times else 0.0
        total = token_times[-1] if token_times else 0.0
        fields = dict(backend="", device="", executed_device="", finish_reason="length", text="", **about)
        return cls(
            prompt_tokens=prompt_tokens,
            generated_tokens=len(token_times),
            ttft_s=ttft,
            total_s=total,
            token_times=list(token_times),
            **fields,
        )

    @property
    def decode_s(self) -> float:
        return self.token_times[-1] - self.token_times[0] if len(self.token_times) > 1 else 0.0

    @property
    def decode_tps(self) -> float:
        """Tokens per second after the first token (the runtime's steady decode rate)."""
        return (len(self.token_times) - 1) / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def tpot_ms(self) -> float:
        return 1000 * self.decode_s / (len(self.token_times) - 1) if len(self.token_times) > 1 else 0.0

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.ttft_s if self.ttft_s > 0 else 0.0

    @property
    def e2e_tps(self) -> float:
        return self.generated_tokens / self.total_s if self.total_s > 0 else 0.0


def prompt_budget(model: LoadedModel) -> int:
    """How many prompt tokens the model accepts (leaving room for at least one new token)."""
    limit = model.context_length - 1
    if model.max_prompt_tokens:
        limit = min(limit, model.max_prompt_tokens)
    return limit


def stream_reply(
    model: LoadedModel,
    prompt: str | list[int],
    settings: GenerationSettings,
    generate: Callable[[list[int], GenerationSettings], Iterator[RawToken]] | None = None,
) -> Iterator[TokenEvent | ReplyStats]:
    """Generate after a prompt (text already templated, or token ids); yield tokens, then the stats.

    generate is what produces the RawTokens, model.generate by default (serve passes its batch engine's, so a
    batched reply is timed by this same code). Closing the iterator early (Ctrl-C, a client that went away) stops
    the runtime and yields nothing more.
    """
    start = time.perf_counter()
    ids = (
        model.encode(prompt) if isinstance(prompt, str) else prompt if isinstance(prompt, ImagePrompt) else list(prompt)
    )
    if len(ids) > prompt_budget(model):
        raise ContextOverflowError(
            f"The prompt is {len(ids)} tokens; this model accepts at most {prompt_budget(model)}.",
            hint="Shorten the prompt" + (" or raise --max-prompt-len." if model.max_prompt_tokens else "."),
        )
    budget = min(settings.max_new_tokens, model.context_length - len(ids))
    run = GenerationSettings(**{**settings.__dict__, "max_new_tokens": budget})
    held = StopHoldback(settings.stop)
    times: list[float] = []
    token_ids: list[int] = []
    finish = "length"
    tokens = (generate or model.generate)(ids, run)
    try:
        for token in tokens:
            times.append(token.t - start)
            if token.token_id is not None:
                token_ids.append(token.token_id)
            if piece := held.push(token.text):
                yield TokenEvent(piece, len(times), times[-1])
            if held.stopped:
                finish = "stop"
                break
            if len(times) >= budget:
                break
        else:  # the runtime stopped by itself: at the end of its answer, or where the images left no more room
            read = ids.input_tokens if isinstance(ids, ImagePrompt) else None  # set by the runtime as it read them
            room = model.context_length - read if read else budget
            finish = "stop" if len(times) < min(budget, room) else "length"
    finally:
        tokens.close()
    if rest := held.finish():  # text held back for a stop sequence that never came
        yield TokenEvent(rest, len(times), times[-1])
    text = held.final_text
    cached = model.prompt_cache.reused if model.prompt_cache else 0
    yield ReplyStats(
        backend=model.backend,
        device=model.device,
        executed_device=model.executed_device,
        prompt_tokens=len(ids),
        generated_tokens=len(times),
        ttft_s=times[0] if times else time.perf_counter() - start,
        total_s=time.perf_counter() - start,
        finish_reason=finish,
        text=text,
        token_times=times,
        token_ids=token_ids,
        cached_tokens=cached,
        images=len(ids.images) if isinstance(ids, ImagePrompt) else 0,
        image_s=ids.image_seconds if isinstance(ids, ImagePrompt) else None,
        input_tokens=ids.input_tokens if isinstance(ids, ImagePrompt) else None,
        speculation=model.speculation if run.speculate else None,
    )


class StopHoldback:
    """Passes text on without ever passing a stop sequence: holds back a tail that may begin one.

    What push and finish return adds up to exactly final_text, the text before the first stop sequence.
    """

    def __init__(self, stops: Sequence[str] = ()):
        self.stops = [s for s in stops if s]
        self.text = ""
        self.sent = 0

    @property
    def cut(self) -> int | None:
        """Where the first stop sequence begins, once one has appeared."""
        found = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        return min(found) if found else None

    @property
    def stopped(self) -> bool:
        return self.cut is not None

    @property
    def final_text(self) -> str:
        cut = self.cut
        return self.text if cut is None else self.text[:cut]

    def push(self, piece: str) -> str:
        self.text += piece
        safe = len(self.text) if self.cut is None else self.cut
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(self.text)), 0, -1):
                if self.text.endswith(stop[:size]):
                    safe = min(safe, len(self.text) - size)
                    break
        return self._take(max(safe, self.sent))

    def finish(self) -> str:
        """The rest of final_text not passed on yet (a held-back tail that did not become a stop)."""
        return self._take(len(self.final_text))

    def _take(self, upto: int) -> str:
        piece = self.text[self.sent : upto]
        self.sent = max(self.sent, upto)
        return piece


def generate_text(model: LoadedModel, prompt: str | list[int], settings: GenerationSettings) -> ReplyStats:
    """Run stream_reply to the end and return its stats (the full text is in .text)."""
    stats = None
    for event in stream_reply(model, prompt, settings):
        if isinstance(event, ReplyStats):
            stats = event
    assert stats is not None
    return stats
