"""Loading a model and streaming a reply, timed in one place for every backend.

`stream_reply` reads a backend's RawTokens and yields TokenEvents, then one ReplyStats. Chat,
bench and serve all read this one stream, so their figures come from the code path users run.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from phi3cli.backends import get_backend
from phi3cli.backends.base import GenerationSettings, LoadedModel, LoadRequest, RawToken
from phi3cli.convert import runtime_folder
from phi3cli.errors import ContextOverflowError, DeviceUnavailableError
from phi3cli.progress import Progress, SilentProgress
from phi3cli.store import ModelStore


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


def load_model(
    request: LoadRequest,
    backend: str,
    store: ModelStore | None = None,
    progress: Progress | None = None,
    *,
    allow_fallback: bool = False,
) -> LoadedModel:
    """Load a model with the named backend, stamping its load time, and check where it really runs.

    convert.runtime_folder does what every backend shares first (route and format checks, building the variant);
    the load time stamped is the runtime's own load of the ready folder.

    If the runtime reports another device than the one asked, this raises DeviceUnavailableError, or with
    allow_fallback passes a notice to progress.note (the CLI prints it in yellow): never a silent fallback.
    """
    progress = progress or SilentProgress()
    impl = get_backend(backend)
    folder, request = runtime_folder(impl, request, store or ModelStore(), progress)
    start = time.perf_counter()
    model = impl.load(folder, request, progress)
    model.load_seconds = time.perf_counter() - start
    try:
        notice = check_executed_device(model, allow_fallback=allow_fallback)
    except DeviceUnavailableError:
        model.close()
        raise
    if notice:
        progress.note(notice)
    return model


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
    ids = model.encode(prompt) if isinstance(prompt, str) else list(prompt)
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
        else:
            finish = "stop" if len(times) < budget else "length"
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


def open_model(
    model: str | None,
    *,
    backend: str | None = None,
    device: str = "auto",
    format: str | None = None,
    threads: int | None = None,
    trust_remote_code: bool = False,
    options: dict | None = None,
    allow_fallback: bool = False,
    cache_reuse: bool = False,
    store: ModelStore | None = None,
    progress: Progress | None = None,
    convert: bool = False,
):
    """Resolve a model, route it to a backend and device, and load it: what chat, bench and serve share.

    Returns the LoadedModel and the Route taken (whose reason says why, for --device auto); load_model
    checks the device the runtime reports.
    """
    from phi3cli.devices import probe
    from phi3cli.routing import backends_to_probe, choose_route
    from phi3cli.sources import resolve_source

    store = store or ModelStore()
    progress = progress or SilentProgress()
    asked = dict(device=device, backend=backend, format=format, convert=convert)
    source = resolve_source(model, store, progress=progress, **asked)
    report = probe(backends_to_probe(device, backend or source.runtime))
    route = choose_route(report, device=device, backend=backend, runtime=source.runtime)
    request = LoadRequest(
        source=source,
        device=route.device,
        format=format,
        threads=threads,
        trust_remote_code=trust_remote_code,
        options=dict(options or {}),
        cache_reuse=cache_reuse,
    )
    return load_model(request, route.backend, store, progress, allow_fallback=allow_fallback), route


# Words in a runtime's device or provider name ("GPU.0", "DmlExecutionProvider", "cuda:0") -> phi3's devices.
_DEVICE_WORDS = {
    "cpu": "cpu",
    "gpu": "gpu",
    "dml": "gpu",
    "directml": "gpu",
    "cuda": "gpu",
    "tensorrt": "gpu",
    "rocm": "gpu",
    "migraphx": "gpu",
    "webgpu": "gpu",
    "xpu": "gpu",
    "mps": "gpu",
    "npu": "npu",
    "qnn": "npu",
    "vitisai": "npu",
}


def normalise_device(name: str) -> str | None:
    """cpu, gpu or npu for one device or provider name as a runtime reports it; None if unknown."""
    word = name.strip(" \t[]()'\"").lower().removesuffix("executionprovider")
    word = re.split(r"[.:(\s]", word, maxsplit=1)[0]
    return _DEVICE_WORDS.get(word)


def executed_devices(reported: str) -> list[str | None]:
    """The devices in what a runtime reports, which may list several ("GPU.0, CPU" when part of a graph fell back)."""
    parts = [p for p in re.split(r"[,;+]|\s{2,}", reported or "") if p.strip()]
    return [normalise_device(p) for p in parts]


def check_executed_device(model: LoadedModel, *, allow_fallback: bool = False) -> str | None:
    """Compare the device asked with what the runtime says it executes on; never let a fallback pass silently.

    Returns None when they agree, a notice when they differ and allow_fallback is set, else raises.
    """
    asked, reported = model.device, (model.executed_device or "").strip()
    found = executed_devices(reported)
    if found and all(d == asked for d in found):
        return None
    what = f"the {model.backend} runtime reports it executes on {reported or 'an unreported device'}"
    if not allow_fallback:
        raise DeviceUnavailableError(
            f"Asked for {asked}, but {what}; stopping instead of running on another device.",
            hint="Pass --allow-fallback to run anyway, or choose the device it has with --device.",
        )
    return f"Fallback: asked for {asked}, but {what}. Running anyway (--allow-fallback)."
