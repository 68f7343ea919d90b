"""Running an IR: OpenVINO GenAI's LLMPipeline with phi3's own prompt ids, streaming one RawToken per token.

Keeping the KV cache between generates: on the CPU the pipeline runs on PagedAttention (GenAI's continuous-batching
engine under LLMPipeline) with prefix caching, so every prompt is passed whole and the engine itself finds the
blocks of keys and values it already holds for the prompt's leading tokens (by a hash of their content) and
prefills only the rest. Reuse is right by construction: a trimmed or reset history, another system prompt or an
interrupted answer simply shares a shorter prefix. (The stateful SDPA pipeline's chat mode can keep its state
too, but its prefill of a new message grows with the state it attends to: CHANGELOG.md has the figures.)
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
import openvino_genai as ov_genai

from phi3cli.backends.adapters import ADAPTERS
from phi3cli.backends.base import GenerationSettings, LoadedModel, LoadRequest, PromptCache, RawToken
from phi3cli.backends.openvino import SPEC
from phi3cli.backends.openvino.ir import context_length
from phi3cli.backends.openvino.kvcache import BLOCK_TOKENS, decode_properties, kv_cache_properties
from phi3cli.backends.openvino.speculative import assist, pipeline_properties, requested
from phi3cli.backends.streaming import IncrementalDecoder, pull_from_push
from phi3cli.errors import ConstraintError, DeviceUnavailableError, Phi3Error
from phi3cli.progress import Progress
from phi3cli.speculation import Speculation
from phi3cli.templates import ChatTemplate, load_chat_template
from phi3cli.util import first_line, log_softmax

OV_DEVICES = {"cpu": "CPU", "gpu": "GPU", "npu": "NPU"}
# NPU pipeline properties (static shapes), by the option names the spec declares (their defaults are the spec's).
NPU_PROPERTIES = {
    "max_prompt_len": "MAX_PROMPT_LEN",
    "min_response_len": "MIN_RESPONSE_LEN",
    "generate_hint": "GENERATE_HINT",
    "prefill_hint": "PREFILL_HINT",
}


def ov_device_for(device: str, available: list[str]) -> str:
    """The OpenVINO device name for cpu/gpu/npu, or a clear error listing what OpenVINO sees here."""
    wanted = OV_DEVICES.get(device)
    if wanted is None:
        raise DeviceUnavailableError(f"OpenVINO runs on cpu, gpu or npu, not {device}.", hint="Use --device cpu.")
    matches = [d for d in available if d.split(".")[0] == wanted]
    if matches:
        return wanted if wanted in matches else matches[0]
    seen = ", ".join(available) or "no device"
    fallback = next((d for d in ("gpu", "cpu") if OV_DEVICES[d] in {a.split(".")[0] for a in available}), None)
    raise DeviceUnavailableError(
        f"OpenVINO sees no {wanted} on this machine (it lists: {seen}).",
        hint=(f"Run on it with --device {fallback}, or --device auto." if fallback else "Check the OpenVINO drivers.")
        + (" An NPU needs Intel Core Ultra and the NPU driver." if device == "npu" else ""),
    )


def npu_properties(options: dict[str, Any]) -> dict[str, Any]:
    """LLMPipeline properties for the NPU (static shapes), from the checked options, else the spec's defaults."""
    defaults = {o.name: o.default for o in SPEC.options}
    props: dict[str, Any] = {}
    for option, prop in NPU_PROPERTIES.items():
        value = options.get(option, defaults[option])
        if value is not None:
            props[prop] = value if isinstance(value, int) else str(value).upper()
    return props


def precision_properties(device: str, options: dict[str, Any]) -> dict[str, Any]:
    """INFERENCE_PRECISION_HINT: f32 by default on the CPU, so answers match the reference on CPUs with bf16.

    OpenVINO computes in bf16 by default on CPUs that have it (Xeon, Zen 4), which changes the greedy answers of
    small models; "auto" leaves OpenVINO's choice, bf16/f16 trade accuracy for speed. Other devices keep theirs.
    """
    value = str(options.get("inference_precision") or ("f32" if device == "cpu" else "auto")).lower()
    return {} if value == "auto" else {"INFERENCE_PRECISION_HINT": value}


def attention_properties(device: str, options: dict[str, Any]) -> dict[str, Any]:
    """ATTENTION_BACKEND: PagedAttention by default on the CPU (what keeps the KV cache between turns, see above).

    It costs about a second more at start than the stateful SDPA pipeline, since it rebuilds the model rather than
    loading the compiled one from the cache. "sdpa" asks for the stateful pipeline (every prompt then read whole).
    """
    value = str(options.get("attention_backend") or ("pa" if device == "cpu" else "auto")).lower()
    return {} if value == "auto" else {"ATTENTION_BACKEND": value.upper()}


def compile_properties(request: LoadRequest) -> dict[str, Any]:
    """What every pipeline of this backend is compiled with: the cache folder, threads and precision."""
    properties: dict[str, Any] = {}
    if request.cache_dir:
        properties["CACHE_DIR"] = str(request.cache_dir)
    if request.threads:
        properties["INFERENCE_NUM_THREADS"] = int(request.threads)
    properties.update(precision_properties(request.device, request.options))
    if hint := request.options.get("performance_hint"):
        properties["PERFORMANCE_HINT"] = str(hint).upper()
    return properties


@contextlib.contextmanager
def _compile_log() -> Iterator[list[str]]:
    """Capture what OpenVINO GenAI prints about the models it compiles (it logs their EXECUTION_DEVICES)."""
    lines: list[str] = []
    if "OPENVINO_LOG_LEVEL" in os.environ:  # the user asked for the log: leave it on their terminal
        yield lines
        return
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 1)
        os.environ["OPENVINO_LOG_LEVEL"] = "2"
        try:
            yield lines
        finally:
            del os.environ["OPENVINO_LOG_LEVEL"]
            os.dup2(saved, 1)
            os.close(saved)
            tmp.seek(0)
            lines.extend(tmp.read().decode(errors="replace").splitlines())


def compiled_properties(log: list[str]) -> dict[str, str]:
    """The properties OpenVINO compiled the LLM with (KV_CACHE_PRECISION, EXECUTION_DEVICES...), from GenAI's compile
    log; the tokenizers' models are left out (where GenAI compiles several, the last one's value of each)."""
    model = None
    found: dict[str, str] = {}
    for line in log:
        if line.startswith("Model:"):
            model = line.split(":", 1)[1].strip()
        elif line.startswith("  ") and ":" in line and model and "okenizer" not in model:
            key, _, value = line.strip().partition(":")
            if key.isupper() and value.strip():
                found[key] = value.strip()
    return found


def execution_devices(log: list[str]) -> str | None:
    """The EXECUTION_DEVICES of the LLM's compiled model, from GenAI's compile log (not the tokenizers')."""
    return compiled_properties(log).get("EXECUTION_DEVICES")


class TokenStreamer(ov_genai.StreamerBase):
    """Receives each generated token id from LLMPipeline and pushes it, decoded, to the consumer."""

    def __init__(self, decoder: IncrementalDecoder, emit: Callable[[RawToken], bool]):
        super().__init__()
        self._decoder, self._emit = decoder, emit
        self.ids: list[int] = []  # every id GenAI wrote

    def write(self, token) -> ov_genai.StreamingStatus:
        status = ov_genai.StreamingStatus.RUNNING
        t = time.perf_counter()  # the tokens of one write came from one pass of the model (speculation counts them)
        for token_id in [token] if isinstance(token, int) else token:
            self.ids.append(token_id)
            if not self._emit(RawToken(self._decoder.push(token_id), t=t, token_id=token_id)):
                status = ov_genai.StreamingStatus.CANCEL
        return status

    def end(self) -> None:
        pass


def generation_config(config, settings: GenerationSettings, speculation: Speculation | None = None):
    """One request's settings on the pipeline's GenerationConfig (LLMPipeline and continuous batching share it).

    A constraint becomes the request's StructuredOutputConfig (XGrammar), so each request of a batch has its own.
    """
    assist(config, speculation, settings)
    config.max_new_tokens = settings.max_new_tokens
    if settings.constraint is not None:
        config.structured_output_config = ov_genai.StructuredOutputConfig(json_schema=settings.constraint.schema_text)
    config.apply_chat_template = False
    config.ignore_eos = settings.ignore_eos
    config.do_sample = not settings.greedy
    for name in settings.sampling.asked():  # the others keep the model's generation_config.json
        setattr(config, name, getattr(settings.sampling, name))
    if not settings.greedy:
        config.temperature = settings.temperature
        config.top_p = settings.top_p
        if settings.top_k:
            config.top_k = settings.top_k
        config.rng_seed = settings.seed if settings.seed is not None else random.getrandbits(31)
    return config


@contextlib.contextmanager
def grammar_errors(settings: GenerationSettings) -> Iterator[None]:
    """A constrained generation that OpenVINO GenAI refuses: a ConstraintError quoting XGrammar's reason."""
    try:
        yield
    except RuntimeError as exc:
        if settings.constraint is None:
            raise
        raise ConstraintError(
            f"OpenVINO GenAI's grammar engine (XGrammar) refused the schema: {engine_reason(exc)}"
        ) from exc


def engine_reason(exc: BaseException) -> str:
    """The grammar engine's own words from a runtime error (OpenVINO adds its source location before them)."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    text = re.sub(r"^\[[\d:]+\]\s+\S+:\d+:\s*", "", text)  # "[11:46:51] /path/json_schema_converter.cc:898: "
    return re.sub(r"^Check failed: \(.*?\) is false:\s*", "", text)[:500]


class OpenVINOModel(LoadedModel):
    backend = "openvino"
    sampling_controls = frozenset({"repetition_penalty", "presence_penalty", "frequency_penalty", "min_p"})

    def __init__(
        self,
        path: Path,
        pipe,
        fmt: str,
        device: str,
        executed: str,
        context: int,
        prompt_limit: int | None,
        reuse: bool = False,
    ):
        self.path, self.pipe, self.format, self.device = path, pipe, fmt, device
        self.executed_device = executed
        self.context_length = context
        self.max_prompt_tokens = prompt_limit
        self.tokenizer = pipe.get_tokenizer()
        self.chat_template = _chat_template(path, self.tokenizer)
        self.last_perf = None  # openvino_genai.PerfMetrics of the last generate, for cross-checking our timings
        self.scorer_properties: dict[str, Any] = {}  # how token_logprobs compiles the IR (on the CPU)
        self.compiled_properties: dict[str, str] = {}  # what OpenVINO compiled the LLM with, read from its log
        self._scorer = None
        self.adapters = None  # an OpenVINOAdapters when loaded with LoRA adapters
        self._scored_adapters: dict[str, float] = {}  # the adapters the scorer was compiled with
        # What the paged KV cache holds for this conversation, kept (and counted) only with prefix caching on.
        self.prompt_cache = PromptCache(enabled=reuse, block=BLOCK_TOKENS["cpu"])

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).input_ids.data[0].tolist()

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def decode_pair(self, first: list[int], second: list[int]) -> tuple[str, str]:
        """Both windows in one detokenizer call: it costs about as much as one."""
        a, b = self.tokenizer.decode([first, second], skip_special_tokens=True)
        return a, b

    def generation_config(self, settings: GenerationSettings):
        config = generation_config(self.pipe.get_generation_config(), settings, self.speculation)
        if self.adapters is not None:  # the active adapters, switched per generate
            config.adapters = self.adapters.runtime_config()
        return config

    def constraint_refusal(self) -> str | None:
        if self.device == "npu":
            return "structured output has not been tried on OpenVINO GenAI's NPU pipeline by phi3; use --device cpu"
        return None

    def generate(self, prompt_ids: list[int], settings: GenerationSettings) -> Iterator[RawToken]:
        config = self.generation_config(settings)
        decoder = IncrementalDecoder(self.decode, self.decode_pair)

        def produce(emit: Callable[[RawToken], bool]) -> None:
            # The whole prompt every time: the engine's prefix caching finds what it already holds.
            cache = self.prompt_cache
            cache.keep(prompt_ids)
            cache.hold([])  # until this generate ends, what the engine holds is unknown
            streamer = TokenStreamer(decoder, emit)
            with grammar_errors(settings):
                result = self.pipe.generate(ov.Tensor(np.array([prompt_ids], dtype=np.int64)), config, streamer)
            self.last_perf = result.perf_metrics
            # Read back into the cache: the prompt and every answer token but the last (written, never read).
            cache.hold(prompt_ids + streamer.ids[:-1])

        return pull_from_push(produce)

    def next_token_logprobs(self, ids: list[int]) -> np.ndarray:
        """One forward pass of the IR over ids with a fresh KV state (compiled on first use, on the CPU)."""
        active = dict(self.adapters.active) if self.adapters is not None else {}
        if self._scorer is None or self._scored_adapters != active:
            core = ov.Core()
            model = core.read_model(str(self.path / "openvino_model.xml"))
            if active:  # the active LoRA adapters as branches in the graph (GenAI applies them only in generate)
                from phi3cli.backends.openvino.adapters import with_lora_branches

                model = with_lora_branches(model, self.adapters)
            self._scorer = core.compile_model(model, "CPU", self.scorer_properties)
            self._scored_adapters = active
        request = self._scorer.create_infer_request()
        request.reset_state()
        n = len(ids)
        inputs = {
            "input_ids": np.array([ids], dtype=np.int64),
            "attention_mask": np.ones((1, n), dtype=np.int64),
            "position_ids": np.arange(n, dtype=np.int64)[None, :],
            "beam_idx": np.zeros(1, dtype=np.int32),
        }
        names = {p.get_any_name() for p in self._scorer.inputs}
        return log_softmax(request.infer({k: v for k, v in inputs.items() if k in names})["logits"][0, :-1])

    def close(self) -> None:
        self.pipe = None
        self._scorer = None


def _chat_template(folder: Path, tokenizer) -> ChatTemplate:
    """The folder's Hugging Face chat template, else the one the OpenVINO tokenizer carries."""
    has_hf = (folder / "chat_template.jinja").is_file()
    if not has_hf and (folder / "tokenizer_config.json").is_file():
        with contextlib.suppress(OSError, ValueError):
            has_hf = bool(json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template"))
    if not has_hf and tokenizer.chat_template:
        return ChatTemplate(tokenizer.chat_template, tokenizer.get_bos_token(), tokenizer.get_eos_token())
    return load_chat_template(folder)


def load_ir(folder: Path, fmt: str, request: LoadRequest, progress: Progress) -> OpenVINOModel:
    """Compile an IR folder into an LLMPipeline on the device asked, and read back where it runs."""
    device = ov_device_for(request.device, list(ov.Core().available_devices))
    properties = compile_properties(request)
    properties.update(attention_properties(request.device, request.options))
    properties.update(decode_properties(request.device))
    properties.update(kv_cache_properties(request.options))
    context = context_length(folder)
    prompt_limit = None
    if request.device == "npu":
        npu = npu_properties(request.options)
        properties.update(npu)
        prompt_limit = npu["MAX_PROMPT_LEN"]
        context = min(context, npu["MAX_PROMPT_LEN"] + npu["MIN_RESPONSE_LEN"])

    # The KV cache is kept between generates by PagedAttention's prefix caching, checked on the CPU only (the NPU's
    # static shapes and the GPU read the whole conversation every turn).
    reuse = request.cache_reuse and request.device == "cpu" and properties.get("ATTENTION_BACKEND") == "PA"
    adapters = None
    if request.options.get(ADAPTERS):
        from phi3cli.backends.openvino.adapters import attach

        adapters = attach(folder, request.options[ADAPTERS], properties)
        reuse = False  # prefix caching finds KV blocks by tokens alone, whichever adapter computed them
    if properties.get("ATTENTION_BACKEND") == "PA":
        scheduler = ov_genai.SchedulerConfig()
        scheduler.enable_prefix_caching = reuse
        properties["scheduler_config"] = scheduler
    speculation = requested(request)
    properties.update(pipeline_properties(speculation, device, properties))
    progress.phase(f"Loading {folder.name} on {device} with OpenVINO GenAI")
    try:
        with _compile_log() as log:
            pipe = ov_genai.LLMPipeline(str(folder), device, **properties)
    except RuntimeError as exc:
        raise Phi3Error(
            f"OpenVINO GenAI could not load {folder} on {device}: {first_line(exc)}",
            hint="Run again with --debug for OpenVINO's full message.",
        ) from exc
    executed = execution_devices(log) or device
    model = OpenVINOModel(folder, pipe, fmt, request.device, executed, context, prompt_limit, reuse=reuse)
    model.compiled_properties = compiled_properties(log)
    model.adapters = adapters
    model.speculation = speculation
    scorer = {"CACHE_DIR": properties["CACHE_DIR"]} if "CACHE_DIR" in properties else {}
    model.scorer_properties = {**scorer, **precision_properties("cpu", request.options)}
    return model
