"""The one interface every backend implements, and the small pieces they share.

A backend turns a model source into a LoadedModel for a device. A LoadedModel encodes text and generates RawTokens;
it does not time anything itself beyond stamping when each token was produced. phi3cli.generation turns those
tokens into TokenEvents and ReplyStats, so every backend is measured by the same code.
"""

from __future__ import annotations

import json
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from phi3cli.backends.sampling import SamplingControls
from phi3cli.errors import ConversionError, UnsupportedModelError
from phi3cli.progress import Progress
from phi3cli.sizing import Estimate, load_estimate
from phi3cli.templates import ChatTemplate
from phi3cli.util import common_prefix_length, package_versions

if TYPE_CHECKING:
    import numpy as np

    from phi3cli.backends import BackendSpec
    from phi3cli.routing import Route
    from phi3cli.sources import ModelSource
    from phi3cli.speculation import Speculation


@dataclass(frozen=True)
class OutputConstraint:
    """The reply must be JSON valid against json_schema, enforced token by token by the runtime's grammar engine.

    Never by retrying or repairing text: a backend that cannot enforce it says so in constraint_refusal().
    """

    json_schema: dict[str, Any]
    # No whitespace but one space after each , and : (as models trained for tool calls write JSON), so a model
    # cannot wander off into endless indentation; where False the grammar engine's default is kept.
    compact: bool = False

    @property
    def schema_text(self) -> str:
        return json.dumps(self.json_schema, ensure_ascii=False)


@dataclass
class GenerationSettings:
    """How to generate: greedy when temperature is 0."""

    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    ignore_eos: bool = False
    stop: Sequence[str] = ()
    constraint: OutputConstraint | None = None  # what the reply must be, enforced by the runtime's grammar engine
    sampling: SamplingControls = SamplingControls()  # penalties and biases (backends/sampling.py)
    speculate: bool = True  # use the speculation the model was loaded with (serve's per-request switch turns it down)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass
class RawToken:
    """One generated token as the runtime produced it."""

    text: str  # the text this token completes ("" while a multi-byte character is still pending)
    t: float = field(default_factory=time.perf_counter)  # when it was produced
    token_id: int | None = None


@dataclass
class PromptCache:
    """The token ids whose keys and values a runtime's KV cache holds between generates.

    The conversation stays the source of truth: each generate keeps the longest common prefix of what the cache holds
    and the new prompt, rewinds the rest and prefills only the remainder. So a history trimmed or reset, a new system
    prompt, a loaded session, an answer interrupted or cut at a stop string (whose tokens are not in the next prompt)
    all come out right by construction, with no event to invalidate the cache.
    """

    enabled: bool = True  # may be turned off between generates (bench measures its one-prompt tests so)
    min_prefill: int = 1  # prompt tokens always read anew: at least the last one, whose logits give the next token
    min_reuse: int = 16  # a shorter common prefix (a chat template's opening) is read again rather than kept
    block: int = 1  # a paged cache reuses whole blocks of this many tokens: what is kept is rounded down to them
    ids: list[int] = field(default_factory=list)  # what the cache holds, in order
    reused: int = 0  # prompt tokens the last generate took from the cache

    def keep(self, prompt_ids: Sequence[int]) -> int:
        """How many leading prompt tokens to keep from the cache (0 when reuse is off); also sets reused."""
        shared = common_prefix_length(self.ids, prompt_ids) if self.enabled else 0
        shared = min(shared, len(prompt_ids) - self.min_prefill)
        shared -= shared % self.block
        self.reused = shared if shared >= self.min_reuse else 0
        return self.reused

    def hold(self, ids: Sequence[int]) -> None:
        """Record what the cache holds now."""
        self.ids = list(ids)

    def clear(self) -> None:
        self.ids = []
        self.reused = 0


@dataclass
class LoadRequest:
    """What to load: a source, on a device, at a weight format, with backend-specific options."""

    source: ModelSource
    device: str = "cpu"
    format: str | None = None  # None: the backend's default for the device
    threads: int | None = None
    trust_remote_code: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    cache_dir: Path | None = None  # the backend's runtime cache (compiled blobs); None: the store's for the backend
    cache_reuse: bool = False  # keep the KV cache between generates, prefilling only what is new (PromptCache)


class LoadedModel(ABC):
    """A model ready to generate on one device."""

    backend: str
    device: str  # the device asked for: cpu, gpu or npu
    executed_device: str  # what the runtime reports it runs on, read back after loading
    path: Path  # the folder the runtime loaded
    format: str
    context_length: int
    chat_template: ChatTemplate
    max_prompt_tokens: int | None = None  # a tighter prompt budget than the context (an NPU's static shape)
    load_seconds: float = 0.0  # stamped by phi3cli.loading.load
    route: Route | None = None  # stamped by phi3cli.loading.load: the backend and device it was routed to, and why
    prompt_cache: PromptCache | None = None  # set by runtimes that keep their KV cache between generates
    sampling_controls: frozenset[str] = frozenset()  # the SamplingControls fields generate() acts on
    vocab_size: int | None = None  # token ids run from 0 to vocab_size - 1 (where the backend says)
    speculation: Speculation | None = None  # set by runtimes loaded to decode speculatively (LoadRequest.options)

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of text, adding no special tokens (the chat template writes those)."""

    def decode(self, ids: list[int]) -> str:
        """The text of token ids (special tokens left out)."""
        raise NotImplementedError(f"{self.backend} cannot decode tokens")

    @abstractmethod
    def generate(self, prompt_ids: list[int], settings: GenerationSettings) -> Iterator[RawToken]:
        """Generate after the prompt, one RawToken per new token; closing the iterator stops the runtime."""

    def next_token_logprobs(self, ids: list[int]) -> np.ndarray:
        """Log-probabilities of every next token after each of ids[:-1], teacher-forced: (len(ids) - 1, vocabulary).

        What perplexity, KL divergence and top-1 agreement with the reference are computed from.
        """
        raise NotImplementedError(f"{self.backend} cannot score tokens")

    def token_logprobs(self, ids: list[int]) -> list[float]:
        """Log-probability of each of ids[1:] given the tokens before it (for perplexity)."""
        import numpy as np

        logprobs = self.next_token_logprobs(ids)
        return logprobs[np.arange(len(ids) - 1), ids[1:]].astype(float).tolist()

    serial_reason: str = "this runtime generates one request at a time"  # why, for serve's /health and start-up

    def constraint_refusal(self) -> str | None:
        """Why generate() cannot honour settings.constraint on this model, or None when it can.

        A backend whose runtime has a grammar engine overrides this; generate() raises ConstraintError when the
        engine refuses a particular constraint.
        """
        return f"the {self.backend} backend has no grammar engine to constrain its output"

    def batch_engine(self) -> BatchEngine | None:
        """The engine that runs many requests at once, or None (serve queues them): only with options[BATCHING]."""
        return None

    def close(self) -> None:
        """Release the runtime's resources."""


BATCHING = "batching"  # the LoadRequest.options key that asks for a model that serves many requests at once


@dataclass(frozen=True)
class BatchingOptions:
    """What `phi3 serve` asks of a backend that batches: None leaves a setting to the backend's default."""

    max_sequences: int = 8  # requests generating at once
    kv_cache_gb: float | None = None  # the KV-cache pool all of them share
    prefix_caching: bool = True  # keep the KV blocks of earlier prompts for requests that repeat their start


class BatchEngine(ABC):
    """Continuous batching on one loaded model: many generations at once, each its own RawToken stream.

    generate() may be called from many threads; each call is one sequence in the running batch, and it is freed
    when its stream ends, is closed, or `cancelled` is set (at the runtime's next step).
    """

    max_sequences: int  # how many sequences run at once; more requests wait their turn

    @abstractmethod
    def generate(
        self, prompt_ids: list[int], settings: GenerationSettings, cancelled: threading.Event | None = None
    ) -> Iterator[RawToken]:
        """Generate after the prompt as one sequence of the batch (the same tokens as LoadedModel.generate)."""

    def refusal(self, prompt_tokens: int, max_new_tokens: int | None) -> str | None:
        """Why a request of this size can never run here (the KV-cache pool is too small), or None."""
        return None

    def room(self, prompt_tokens: int) -> int | None:
        """The most new tokens a request with this prompt can have here (None: as many as the context holds)."""
        return None

    def describe(self) -> dict[str, Any]:
        """What /health reports: the sizes in use and the state of the batch."""
        return {"max_sequences": self.max_sequences}

    def healthy(self) -> bool:
        """Whether it still runs requests (its loop is alive)."""
        return True

    def close(self) -> None:
        """Stop the engine; running streams end."""


class Backend(ABC):
    """A runtime that loads (and, where it has a format of its own, builds) Phi-3 models.

    phi3cli.loading does what every backend shares (routing, the default and the check of the format, building the
    variant through the store) and hands load() a ready folder.
    """

    recipe_version: ClassVar[str] = "1"  # bump when what build() writes changes, so stored variants are rebuilt
    # A CPU load of this backend's folders was measured to hold about their bytes and a fifth (sizing.load_estimate)
    cpu_load_from_folder: ClassVar[bool] = False

    def __init__(self, spec: BackendSpec):
        self.spec = spec

    @property
    def name(self) -> str:
        return self.spec.name

    def check_device(self, device: str) -> None:
        """Raise DeviceUnavailableError if the runtime cannot run on device here (before anything is built)."""

    @abstractmethod
    def load(self, folder: Path, request: LoadRequest, progress: Progress) -> LoadedModel:
        """Load a ready folder (its own format, or a Hugging Face folder) at request.format on request.device."""

    def folder_format(self, folder: Path) -> str:
        """The weight format a folder in this backend's own format holds."""
        raise UnsupportedModelError(f"The {self.name} backend has no folder format of its own.")

    def build(self, hf_dir: Path, recipe: ConvertRecipe, out: Path, progress: Progress, cache: Path) -> None:
        """Convert a Hugging Face folder into this runtime's format, writing into the (staging) folder out.

        cache is this backend's folder in the model store, for scratch files that outlive one build.
        """
        raise ConversionError(f"The {self.name} backend does not convert models.")

    def quantize(self, model_dir: Path, recipe: ConvertRecipe, out: Path, progress: Progress) -> None:
        """Compress the weights of a model (as spec.quantizes says) into out."""
        raise ConversionError(f"The {self.name} backend does not quantize models.")

    def build_estimate(self, config: dict, recipe: ConvertRecipe) -> Estimate | None:
        """The memory a build of this recipe is expected to hold at its peak, for the pre-flight check (None: unknown)."""
        return None

    def load_estimate(self, folder: Path, request: LoadRequest) -> Estimate | None:
        """The memory a load of folder holds while it answers a short prompt, for the check before loading (None:
        unknown). The KV cache grows on top of it with the context. By default: from the folder's bytes where
        cpu_load_from_folder says so, on the CPU only (a GPU's or an NPU's memory was never measured)."""
        if self.cpu_load_from_folder and request.device == "cpu":
            return load_estimate(folder)
        return None

    def build_target(self, device: str) -> str:
        """The build target of the variant that runs on device (onnx: the execution provider for a GPU)."""
        return device

    def default_target(self) -> str:
        """The build target used when the user names none (onnx: dml on Windows with DirectML)."""
        return self.spec.convert_targets[0] if self.spec.convert_targets else "cpu"

    def runtime_versions(self) -> dict[str, str]:
        """Versions of the libraries this backend uses, recorded in each variant's manifest."""
        return package_versions(self.spec.libraries)

    def converter_version(self) -> str:
        """The converting libraries' versions and the recipe version: part of every store key, so upgrades rebuild."""
        versions = "; ".join(f"{k} {v}" for k, v in self.runtime_versions().items())
        return f"{versions}; recipe {self.recipe_version}"


# Named int4 recipes every converting backend knows, beside its default; `--recipe NAME` picks one.
RECIPE_NAMES = {
    "calibrated": "the int4 default up to 1B parameters: scales fitted on phi3's text (NNCF scale estimation)",
    "data-free": "the int4 default above 1B parameters: no calibration pass, every layer int4",
    "cookbook": "the Phi-3 Cookbook's: OpenVINO --group-size 128 --ratio 0.6 --sym; ONNX Runtime GenAI's builder "
    "defaults (symmetric, block 32, int4 lm_head)",
}


@dataclass(frozen=True)
class ConvertRecipe:
    """How to build a variant: weight format, target device, and the compression knobs."""

    format: str  # int4 | int8 | fp16 | fp32
    target: str = "cpu"  # openvino: cpu | gpu | npu; onnx: cpu | dml | cuda
    group_size: int | None = None  # None: the backend's default
    ratio: float | None = None
    sym: bool | None = None
    awq: bool = False
    dataset: str | None = None
    preset: str | None = None  # a named recipe (RECIPE_NAMES) the fields above override; None: the defaults
    trust_remote_code: bool = False  # a vision model's export may run the checkpoint's own code (--trust-remote-code)

    def canonical(self) -> str:
        """A stable text of every field, for store keys (unset preset and trust: the keys variants had before)."""
        fields = {k: v for k, v in self.__dict__.items() if not (k in ("preset", "trust_remote_code") and not v)}
        return ";".join(f"{k}={v}" for k, v in sorted(fields.items()))
