"""Running an ONNX Runtime GenAI folder: og.Model on the chosen providers, a Generator loop pulled token by token."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime_genai as og

from phi3cli.backends.base import (
    GenerationSettings,
    LoadedModel,
    LoadRequest,
    OutputConstraint,
    PromptCache,
    RawToken,
)
from phi3cli.backends.onnx.folder import read_genai_config
from phi3cli.backends.onnx.providers import (
    EXECUTED,
    apply_providers,
    available_providers,
    choose_providers,
    configured_providers,
)
from phi3cli.errors import ConstraintError, ContextOverflowError, UnsupportedModelError
from phi3cli.progress import Progress
from phi3cli.templates import load_chat_template
from phi3cli.util import first_line, log_softmax

# A kept Generator allocates its KV cache for max_length tokens up front (past_present_share_buffer): it is sized
# for twice what the first turn needs, at least this many tokens and at most the context, and rebuilt if outgrown.
KEPT_CAPACITY = 2048


def closed_objects(schema):
    """The schema with additionalProperties false wherever an object leaves it out (as OpenAI's strict mode and
    XGrammar read it; llguidance would otherwise let the model add keys without end)."""
    if isinstance(schema, list):
        return [closed_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed_objects(v) if k not in ("enum", "const", "default", "examples") else v for k, v in schema.items()}
    if "properties" in schema and isinstance(schema["properties"], dict):
        out["properties"] = {k: closed_objects(v) for k, v in schema["properties"].items()}
        out.setdefault("additionalProperties", False)
    return out


def guidance_schema(constraint: OutputConstraint) -> str:
    """The schema as llguidance is given it: objects closed, and compact separators where the constraint asks."""
    schema = closed_objects(constraint.json_schema)
    if constraint.compact:
        schema["x-guidance"] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
    return json.dumps(schema, ensure_ascii=False)


class OnnxModel(LoadedModel):
    backend = "onnx"
    sampling_controls = frozenset({"repetition_penalty"})  # ONNX Runtime GenAI's search options have no others

    def __init__(self, path: Path, model, fmt: str, device: str, genai: dict, reuse: bool = False):
        self.path, self.model, self.format, self.device = path, model, fmt, device
        self.tokenizer = og.Tokenizer(model)
        with contextlib.suppress(Exception):  # the chat template writes the special tokens itself
            self.tokenizer.update_options(add_special_tokens="false")
        self.executed_device = EXECUTED.get(model.device_type, model.device_type)
        self.context_length = int(genai["model"]["context_length"])
        self.chat_template = load_chat_template(path)
        # ONNX Runtime computes a token read alone (decoding) slightly differently from one read in a prefill of
        # two or more: the cache keeps only prompts, so each answer is read again with the next prompt, and every
        # prefill reads at least two tokens. Then the next answer is the one a full prefill gives, to the bit.
        # Only the CPU is kept: ONNX Runtime GenAI does not continue a Generator on DirectML.
        self.prompt_cache = PromptCache(enabled=reuse and model.device_type == "CPU", min_prefill=2)
        self._generator = None  # kept between generates, with the search options and capacity it was made for
        self._generator_for: tuple = ()

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self.tokenizer.encode(text)]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def _params(self, max_length: int, settings: GenerationSettings | None = None):
        params = og.GeneratorParams(self.model)
        options = {"max_length": max_length, "do_sample": False, "batch_size": 1}
        if settings is not None:
            if not settings.greedy:
                options.update(
                    do_sample=True, temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k
                )
            if settings.seed is not None:
                options["random_seed"] = settings.seed
            if settings.ignore_eos:
                options["min_length"] = max_length
            if settings.sampling.repetition_penalty != 1.0:
                options["repetition_penalty"] = settings.sampling.repetition_penalty
        params.set_search_options(**options)
        if settings is not None and settings.constraint is not None:
            try:
                params.set_guidance("json_schema", guidance_schema(settings.constraint))
            except RuntimeError as exc:
                raise ConstraintError(
                    f"ONNX Runtime GenAI's grammar engine (llguidance) refused the schema: {first_line(exc)}"
                ) from exc
        return params

    def constraint_refusal(self) -> str | None:
        return None

    def generate(self, prompt_ids: list[int], settings: GenerationSettings) -> Iterator[RawToken]:
        cache = self.prompt_cache
        reuse = cache.enabled and settings.constraint is None  # a grammar's state is not rewound with the tokens
        generator = self._generator_for_turn(len(prompt_ids) + settings.max_new_tokens, settings, reuse)
        keep = cache.keep(prompt_ids) if reuse else 0
        if not reuse:
            cache.reused = 0
        try:
            if keep < len(generator.get_sequence(0)):
                generator.rewind_to(keep)  # what follows the common prefix: an older turn, or the last answer
            cache.hold(prompt_ids[:keep])
            generator.append_tokens(prompt_ids[keep:])  # the prefill: inside the iterator, so it counts in TTFT
            cache.hold(prompt_ids)
            yield from self._tokens(generator, settings.max_new_tokens)
        except Exception:
            self._drop_generator()  # the runtime failed mid-call: its state is unknown (Ctrl-C or close keep it)
            raise
        finally:
            if not reuse:
                self._drop_generator()

    def _tokens(self, generator, max_new_tokens: int) -> Iterator[RawToken]:
        """The tokens a prefilled Generator produces, decoded as a stream."""
        stream = self.tokenizer.create_stream()
        produced = 0
        while produced < max_new_tokens and not generator.is_done():
            generator.generate_next_token()
            token_id = int(generator.get_next_tokens()[0])
            produced += 1
            yield RawToken(stream.decode(token_id), token_id=token_id)

    def _generator_for_turn(self, needed: int, settings: GenerationSettings, reuse: bool):
        """The kept Generator when it fits this turn and its search options; else a new one (an empty cache)."""
        options = self._search_options(settings)
        if reuse and self._generator is not None:
            kept_options, capacity = self._generator_for
            if kept_options == options and needed <= capacity:
                return self._generator
        self._drop_generator()
        capacity = min(self.context_length, max(2 * needed, KEPT_CAPACITY)) if reuse else needed
        try:
            self._generator = og.Generator(self.model, self._params(capacity, settings))
        except RuntimeError as exc:
            if settings.constraint is None:
                raise
            raise ConstraintError(
                f"ONNX Runtime GenAI's grammar engine (llguidance) refused the schema: {first_line(exc)}"
            ) from exc
        self._generator_for = (options, capacity)
        return self._generator

    @staticmethod
    def _search_options(settings: GenerationSettings) -> tuple:
        penalty = settings.sampling.repetition_penalty
        if settings.greedy:
            return ("greedy", settings.ignore_eos, penalty)
        return (settings.temperature, settings.top_p, settings.top_k, settings.seed, settings.ignore_eos, penalty)

    def _drop_generator(self) -> None:
        self._generator = None
        self._generator_for = ()
        self.prompt_cache.hold([])

    def next_token_logprobs(self, ids: list[int]) -> np.ndarray:
        if len(ids) >= self.context_length:
            raise ContextOverflowError(f"{len(ids)} tokens do not fit the context of {self.context_length}.")
        generator = og.Generator(self.model, self._params(len(ids) + 1))
        generator.append_tokens(ids)
        logits = np.asarray(generator.get_output("logits"), dtype=np.float32)
        logits = logits.reshape(-1, logits.shape[-1])
        del generator
        if logits.shape[0] != len(ids):
            raise NotImplementedError("this ONNX model returns logits for the last position only")
        return log_softmax(logits[:-1])

    def close(self) -> None:
        self._drop_generator()
        self.tokenizer = self.model = None


def open_folder(folder: Path, fmt: str, request: LoadRequest, progress: Progress) -> tuple[og.Model, dict]:
    """og.Model of a folder on the execution providers the device asks for (cpu clears a DirectML folder's), and
    its genai_config.json."""
    genai = read_genai_config(folder)
    choice = choose_providers(request.device, configured_providers(genai), available_providers(), sys.platform)
    if choice.note:
        progress.note(choice.note)
    progress.phase(f"Loading {folder.name} with ONNX Runtime GenAI ({fmt})")
    try:
        config = og.Config(str(folder))
        apply_providers(config, choice)
        if request.threads:
            session = {"intra_op_num_threads": request.threads}
            config.overlay(json.dumps({"model": {"decoder": {"session_options": session}}}))
        return og.Model(config), genai
    except RuntimeError as exc:
        raise UnsupportedModelError(
            f"ONNX Runtime GenAI cannot load {folder}: {first_line(exc)}",
            hint="Check its genai_config.json, or rebuild it with `phi3 convert MODEL --to onnx`.",
        ) from exc


def load_folder(folder: Path, fmt: str, request: LoadRequest, progress: Progress) -> OnnxModel:
    """Load a text model's folder."""
    model, genai = open_folder(folder, fmt, request, progress)
    return OnnxModel(folder, model, fmt, request.device, genai, reuse=request.cache_reuse)
