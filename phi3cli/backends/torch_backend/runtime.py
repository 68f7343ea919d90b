"""The torch backend's runtime: transformers generate() streamed through a worker thread, on the CPU."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.streamers import BaseStreamer

from phi3cli.backends.base import Backend, GenerationSettings, LoadedModel, LoadRequest, PromptCache, RawToken
from phi3cli.backends.streaming import IncrementalDecoder, pull_from_push
from phi3cli.errors import ConversionError
from phi3cli.progress import Progress
from phi3cli.sizing import GB, Estimate, model_config, parameter_count
from phi3cli.templates import load_chat_template

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# A load holds every parameter at the dtype it runs, beside torch itself: measured in memory cgroups at Phi-3-mini's
# widths (docs/results/2026-12-06-memory.md), 32 layers at bf16 ran in 8.6 GB and was killed in 8.0 GB (this
# estimate: 8.25 GB); 4 layers at fp32 ran in 3.5 and was killed in 3.2 (3.42).
TORCH_BYTES = int(0.4 * GB)


class _Streamer(BaseStreamer):
    """Receives each new token from generate() and pushes it, decoded, to the consumer."""

    def __init__(self, decoder: IncrementalDecoder, emit: Callable[[RawToken], bool], stop: list[bool]):
        self._decoder, self._emit, self._stop = decoder, emit, stop
        self._prompt_seen = False
        self.ids: list[int] = []  # every generated id

    def put(self, value):
        if not self._prompt_seen:  # generate() first puts the prompt
            self._prompt_seen = True
            return
        for token_id in value.reshape(-1).tolist():
            self.ids.append(token_id)
            if not self._emit(RawToken(self._decoder.push(token_id), token_id=token_id)):
                self._stop[0] = True

    def end(self):
        pass


class _StopWhenAsked(StoppingCriteria):
    def __init__(self, stop: list[bool]):
        self._stop = stop

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self._stop[0], dtype=torch.bool)


def transformers_generate(
    model,
    tokenizer,
    eos_ids: list[int],
    prompt_ids: list[int],
    settings: GenerationSettings,
    past=None,
    on_end: Callable[[list[int]], None] | None = None,
) -> Iterator[RawToken]:
    """Stream model.generate() of a transformers causal LM (torch, or the NPU library's compiled one).

    past: a Cache already holding the keys and values of a prefix of prompt_ids (generate() reads only the rest and
    extends it); on_end receives the generated ids once generate() has returned.
    """
    decoder = IncrementalDecoder(lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
    kwargs = dict(
        max_new_tokens=settings.max_new_tokens,
        do_sample=not settings.greedy,
        pad_token_id=eos_ids[0],
        eos_token_id=None if settings.ignore_eos else eos_ids,
    )
    if settings.ignore_eos:
        kwargs["min_new_tokens"] = settings.max_new_tokens
    if not settings.greedy:
        kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k or None)
        if settings.sampling.min_p:
            kwargs["min_p"] = settings.sampling.min_p
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    if settings.sampling.repetition_penalty != 1.0:
        kwargs["repetition_penalty"] = settings.sampling.repetition_penalty
    if _OpenAIPenalties.needed(settings.sampling):
        kwargs["logits_processor"] = LogitsProcessorList([_OpenAIPenalties(len(prompt_ids), settings.sampling)])

    def produce(emit: Callable[[RawToken], bool]) -> None:
        stop = [False]
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        streamer = _Streamer(decoder, emit, stop)
        if past is not None:
            kwargs["past_key_values"] = past
        with torch.inference_mode():
            model.generate(
                input_ids=torch.tensor([prompt_ids]),
                attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                streamer=streamer,
                stopping_criteria=StoppingCriteriaList([_StopWhenAsked(stop)]),
                **kwargs,
            )
        if on_end is not None:
            on_end(streamer.ids)

    return pull_from_push(produce)


class _OpenAIPenalties(LogitsProcessor):
    """OpenAI's presence and frequency penalties (over the tokens generated so far) and logit_bias."""

    def __init__(self, prompt_tokens: int, sampling):
        self.prompt_tokens, self.sampling = prompt_tokens, sampling

    @staticmethod
    def needed(sampling) -> bool:
        return bool(sampling.presence_penalty or sampling.frequency_penalty or sampling.logit_bias)

    def __call__(self, input_ids, scores):
        sampling = self.sampling
        generated = input_ids[:, self.prompt_tokens :]
        if generated.shape[1] and (sampling.presence_penalty or sampling.frequency_penalty):
            counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
            scores = scores - sampling.frequency_penalty * counts - sampling.presence_penalty * (counts > 0)
        for token, bias in sampling.logit_bias:
            scores[:, token] += bias
        return scores


def transformers_logprobs(model, ids: list[int]):
    """Log-probabilities of every next token after each of ids[:-1], from one forward pass (a numpy array)."""
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0, :-1].double()
        return torch.log_softmax(logits, dim=-1).float().numpy()


class TorchModel(LoadedModel):
    backend = "torch"
    sampling_controls = frozenset(
        {"repetition_penalty", "presence_penalty", "frequency_penalty", "min_p", "logit_bias"}
    )  # transformers' logits processors, and phi3's for OpenAI's two penalties and logit_bias
    serial_reason = "transformers' generate() here runs one request at a time"

    def __init__(self, path: Path, model, tokenizer, fmt: str, device: str, reuse: bool = False):
        self.path, self.model, self.tokenizer, self.format = path, model, tokenizer, fmt
        self.device = device
        self.executed_device = str(next(model.parameters()).device).upper()
        self.context_length = int(model.config.max_position_embeddings)
        self.vocab_size = int(model.config.vocab_size)
        self.chat_template = load_chat_template(path)
        eos = model.generation_config.eos_token_id
        self.eos_ids = eos if isinstance(eos, list) else [eos]
        self.prompt_cache = PromptCache(enabled=reuse)
        self._past = None  # a DynamicCache holding prompt_cache.ids

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def generate(self, prompt_ids: list[int], settings: GenerationSettings) -> Iterator[RawToken]:
        cache = self.prompt_cache
        if not cache.enabled:
            self._past = None
            return transformers_generate(self.model, self.tokenizer, self.eos_ids, prompt_ids, settings)
        from transformers import DynamicCache

        keep = cache.keep(prompt_ids)
        if keep == 0 or self._past is None:
            # Full-attention layers (no config): a sliding-window layer could not be cropped back once past its window.
            self._past, keep, cache.reused = DynamicCache(), 0, 0
        else:
            self._past.crop(keep)
        past = self._past
        cache.hold(prompt_ids[:keep])

        def held(generated: list[int]) -> None:
            # The cache ends before the last token generated, which was never read (nor was a token after a stop).
            cache.hold((prompt_ids + generated)[: past.get_seq_length()])

        return transformers_generate(
            self.model, self.tokenizer, self.eos_ids, prompt_ids, settings, past=past, on_end=held
        )

    def next_token_logprobs(self, ids: list[int]):
        return transformers_logprobs(self.model, ids)

    def close(self) -> None:
        self._past = None
        self.model = None


class TorchBackend(Backend):
    def load_estimate(self, folder: Path, request: LoadRequest) -> Estimate | None:
        fmt = request.format or self.spec.default_format
        try:
            params = parameter_count(model_config(folder))
        except (ConversionError, KeyError, ValueError, TypeError):  # no usable config.json: the load says why
            return None
        need = DTYPES[fmt].itemsize * params + TORCH_BYTES
        return Estimate(need, f"{params / 1e9:.1f}B parameters at {fmt}, and PyTorch itself")

    def load(self, folder: Path, request: LoadRequest, progress: Progress) -> LoadedModel:
        if request.threads:
            torch.set_num_threads(request.threads)
        fmt = request.format or self.spec.default_format
        progress.phase(f"Loading {request.source.spec} with transformers ({fmt})")
        config = json.loads((folder / "config.json").read_text())
        if config.get("auto_map") and not request.trust_remote_code:
            progress.note("The model ships remote code; phi3 uses transformers' built-in Phi-3 instead.")
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=request.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            dtype=DTYPES[fmt],
            use_safetensors=True,
            trust_remote_code=request.trust_remote_code,
            low_cpu_mem_usage=True,
        ).eval()
        return TorchModel(folder, model, tokenizer, fmt, request.device, reuse=request.cache_reuse)
