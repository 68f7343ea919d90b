"""OpenVINO: IR built by optimum-intel + NNCF weight compression, run by OpenVINO GenAI's LLMPipeline.

Building exports the Hugging Face model to an fp16 IR with optimum-intel, then compresses the weights
with NNCF (int4 or int8); the OpenVINO tokenizer and detokenizer are written beside the IR so the
runtime needs no transformers. Running feeds our own prompt token ids (rendered by templates.py) to
LLMPipeline and streams one RawToken per generated token.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import random
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
import openvino_genai as ov_genai

from phi3cli.backends.base import (
    Backend,
    ConvertRecipe,
    GenerationSettings,
    IncrementalDecoder,
    LoadedModel,
    LoadRequest,
    RawToken,
    pull_from_push,
)
from phi3cli.errors import ConversionError, DeviceUnavailableError, Phi3Error, UnsupportedModelError
from phi3cli.progress import Progress
from phi3cli.store import ModelStore
from phi3cli.templates import ChatTemplate, load_chat_template

FORMATS = ("int4", "int8", "fp16")
DEFAULT_FORMAT = "int4"
OV_DEVICES = {"cpu": "CPU", "gpu": "GPU", "npu": "NPU"}
# The seed's int4 recipe, and the one OpenVINO's NPU guide asks for (symmetric, channel-wise, all layers int4).
INT4_RECIPE = {"group_size": 128, "ratio": 0.6, "sym": True}
NPU_INT4_RECIPE = {"group_size": -1, "ratio": 1.0, "sym": True}
MIN_GROUP_SIZE = 16
FULL_DISK_BYTES = 64 << 20  # a write that failed with less than this free is taken as a full disk
# NPU pipeline properties (static shapes), by the option names LoadRequest.options uses, with their defaults.
NPU_OPTIONS = {
    "max_prompt_len": ("MAX_PROMPT_LEN", 1024),
    "min_response_len": ("MIN_RESPONSE_LEN", 128),
    "generate_hint": ("GENERATE_HINT", "FAST_COMPILE"),
    "prefill_hint": ("PREFILL_HINT", None),  # None: the plugin's default (DYNAMIC)
}
PRECISIONS = ("auto", "f32", "bf16", "f16")
IR_FILES = ("openvino_model.xml", "openvino_model.bin")
TOKENIZER_FILES = (
    "openvino_tokenizer.xml",
    "openvino_tokenizer.bin",
    "openvino_detokenizer.xml",
    "openvino_detokenizer.bin",
)
# Files kept beside the IR: config (context length), generation config (eos), and what templates.py reads.
SUPPORT_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)
_OV_LOCATION = re.compile(r"^(Exception from \S+:\d+:?|Check '.*' failed at \S+:?)$")
HUB_DATASETS = ("wikitext2", "c4", "c4-new", "gsm8k")


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "absent"


# ---------------------------------------------------------------------------------------------- building


def weight_widths(config: dict) -> list[int]:
    """The input widths of the model's weight matrices (what an int4 group size must divide)."""
    hidden = int(config["hidden_size"])
    heads = int(config.get("num_attention_heads") or 1)
    head_dim = int(config.get("head_dim") or hidden // heads)
    widths = {hidden, heads * head_dim}
    if config.get("intermediate_size"):
        widths.add(int(config["intermediate_size"]))
    return sorted(widths)


def fit_group_size(requested: int, widths: list[int]) -> int:
    """The requested group size if it divides every width, else the largest power of two below it that does."""
    if requested == -1 or all(w % requested == 0 for w in widths):
        return requested
    size = 1 << (requested.bit_length() - 1)
    while size >= MIN_GROUP_SIZE:
        if size < requested and all(w % size == 0 for w in widths):
            return size
        size //= 2
    raise ConversionError(
        f"No int4 group size of at least {MIN_GROUP_SIZE} divides the layer widths {widths}.",
        hint="Use --group-size -1 (channel-wise) or --format int8.",
    )


def resolve_recipe(recipe: ConvertRecipe, config: dict, progress: Progress) -> dict[str, Any] | None:
    """NNCF weight-compression settings for a recipe (None for fp16), with defaults filled in and checked."""
    if recipe.format not in FORMATS:
        raise UnsupportedModelError(
            f"OpenVINO builds {', '.join(FORMATS)} weights, not {recipe.format}.",
            hint="Use --format int4, int8 or fp16 (fp32 runs with --backend torch or onnx).",
        )
    if recipe.target not in OV_DEVICES:
        raise ConversionError(
            f"OpenVINO builds for cpu, gpu or npu, not {recipe.target}.", hint="Use --device cpu, gpu or npu."
        )
    if recipe.ratio is not None and not 0.0 <= recipe.ratio <= 1.0:
        raise ConversionError(f"--ratio must be between 0 and 1, not {recipe.ratio}.", hint="For example --ratio 0.8.")
    if recipe.awq and not recipe.dataset:
        raise ConversionError("--awq needs calibration data.", hint="Add --dataset auto (or a text file).")
    if recipe.format == "fp16":
        if recipe.awq or recipe.dataset:
            raise ConversionError(
                "--awq and --dataset tune weight compression; fp16 compresses nothing.", hint="Use --format int4."
            )
        return None
    if recipe.format == "int8":
        if recipe.group_size is not None or recipe.ratio is not None:
            progress.note("int8 is channel-wise on every layer; --group-size and --ratio apply to int4 only.")
        # Channel-wise int8 on every layer; asymmetric unless asked (optimum-intel's default).
        return {"bits": 8, "sym": bool(recipe.sym), "group_size": -1, "ratio": 1.0, **_data_aware(recipe)}
    defaults = NPU_INT4_RECIPE if recipe.target == "npu" else INT4_RECIPE
    requested = recipe.group_size if recipe.group_size is not None else defaults["group_size"]
    if requested == 0 or requested < -1:
        raise ConversionError(
            f"--group-size must be a positive number or -1 (channel-wise), not {requested}.",
            hint="For example --group-size 128.",
        )
    group = fit_group_size(requested, weight_widths(config))
    if group != requested:
        progress.note(
            f"Group size {requested} does not divide every layer width {weight_widths(config)}; "
            f"using {group}, the largest that does (set it with --group-size)."
        )
    return {
        "bits": 4,
        "sym": defaults["sym"] if recipe.sym is None else recipe.sym,
        "group_size": group,
        "ratio": defaults["ratio"] if recipe.ratio is None else recipe.ratio,
        **_data_aware(recipe),
    }


def _data_aware(recipe: ConvertRecipe) -> dict[str, Any]:
    """AWQ settings: quant_method and a dataset optimum-intel accepts (a name, or a list of texts from a file)."""
    if not recipe.awq and not recipe.dataset:
        return {}
    name = recipe.dataset
    path = Path(name).expanduser()
    if path.is_file():
        texts = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
        if not texts:
            raise ConversionError(f"The calibration file {path} is empty.", hint="Give a text file, one sample a line.")
        dataset: str | list[str] = texts
    elif name == "auto":
        dataset = name
    elif name in HUB_DATASETS:
        import importlib.util

        if importlib.util.find_spec("datasets") is None:
            raise ConversionError(
                f"--dataset {name} is fetched from the Hugging Face hub with the `datasets` package, "
                "which is not installed.",
                hint="Use --dataset auto (text the model generates) or --dataset FILE.txt (one sample a line), "
                "or pip install datasets and connect to the hub.",
            )
        dataset = name
    else:
        raise ConversionError(
            f"Unknown calibration data set {name!r}.",
            hint=f"Use auto, a text file (one sample a line), or one of {', '.join(HUB_DATASETS)}.",
        )
    return {"dataset": dataset, "quant_method": "awq" if recipe.awq else "default"}


def describe_recipe(settings: dict[str, Any] | None) -> str:
    if settings is None:
        return "fp16"
    if settings["bits"] == 8:
        return f"int8 {'sym' if settings['sym'] else 'asym'}, channel-wise"
    group = "channel-wise" if settings["group_size"] == -1 else f"group {settings['group_size']}"
    awq = ", AWQ" if settings.get("quant_method") == "awq" else ""
    return f"int4 {'sym' if settings['sym'] else 'asym'}, {group}, ratio {settings['ratio']:g}{awq}"


@contextlib.contextmanager
def _quiet_converters() -> Iterator[None]:
    """Silence the exporters' tracer warnings and info tables; our Progress tells the user what happens."""
    names = ("nncf", "optimum", "optimum.intel", "optimum.exporters", "transformers", "torch")
    levels = {n: logging.getLogger(n).level for n in names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for n in names:
            logging.getLogger(n).setLevel(logging.ERROR)
        try:
            from transformers.utils import logging as hf_logging

            hf_verbosity = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()
        except ImportError:
            hf_verbosity = None
        try:
            yield
        finally:
            for n, level in levels.items():
                logging.getLogger(n).setLevel(level)
            if hf_verbosity is not None:
                hf_logging.set_verbosity(hf_verbosity)


class _TrackToProgress:
    """Stands in for nncf's `track` progress bar, reporting to our Progress instead of its own Rich bar."""

    progress: Progress | None = None

    def __init__(self, sequence=None, description="Working...", total=None, weights=None, **_):
        self.sequence, self.description, self.weights = sequence, description, weights
        if weights is not None:
            total = sum(weights)
        elif total is None and hasattr(sequence, "__len__"):
            total = len(sequence)
        self.total = total

    def __iter__(self):
        self.__enter__()
        weights = self.weights or []
        for i, item in enumerate(self.sequence):
            yield item
            self.update(weights[i] if i < len(weights) else 1)

    def __enter__(self):
        if self.progress:
            self.progress.phase(f"NNCF: {self.description.rstrip('.')}", total=self.total)
        return self

    def __exit__(self, *exc):
        return None

    def update(self, advance: float = 1, **_):
        if self.progress:
            self.progress.advance(advance)


WEIGHT_COMPRESSION_STEPS = ("algorithm", "mixed_precision", "awq", "scale_estimation", "gptq")


@contextlib.contextmanager
def _nncf_progress(progress: Progress) -> Iterator[None]:
    """Route NNCF's weight-compression progress bars to our Progress for the duration of the block."""
    import importlib

    patched = []
    names = [f"nncf.quantization.algorithms.weight_compression.{n}" for n in WEIGHT_COMPRESSION_STEPS]
    for name in [*names, "nncf.common.tensor_statistics.aggregator"]:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "track"):
            patched.append((module, module.track))
            module.track = _TrackToProgress
    _TrackToProgress.progress = progress
    try:
        yield
    finally:
        _TrackToProgress.progress = None
        for module, original in patched:
            module.track = original


def _raise_if_disk_full(exc: BaseException, out: Path) -> None:
    """Turn a write that failed on a full disk into the OSError(ENOSPC) atomic_output reports plainly.

    OpenVINO's save_model reports a full disk only as "basic_ios::clear: iostream error", so the free space
    left on the output's disk decides.
    """
    try:
        free = shutil.disk_usage(out).free
    except OSError:
        free = None
    if "No space left" in str(exc) or (free is not None and free < FULL_DISK_BYTES):
        raise OSError(errno.ENOSPC, f"No space left on device ({_first_line(exc)})") from exc


def export_ir(hf_dir: Path, out: Path, progress: Progress) -> None:
    """Export a Hugging Face folder to an fp16 OpenVINO IR (stateful, with KV cache) plus OV tokenizers."""
    from optimum.exporters.openvino import main_export
    from optimum.intel import OVConfig

    progress.phase(f"Exporting {hf_dir.name} to OpenVINO IR with optimum-intel")
    try:
        with _quiet_converters():
            main_export(
                str(hf_dir),
                output=out,
                task="text-generation-with-past",
                ov_config=OVConfig(dtype="fp16"),
                convert_tokenizer=True,
                library_name="transformers",
                local_files_only=True,
            )
    except (RuntimeError, ValueError) as exc:
        _raise_if_disk_full(exc, out)
        raise ConversionError(f"optimum-intel could not export {hf_dir}: {_first_line(exc)}") from exc


def compress_ir(src: Path, settings: dict[str, Any], out: Path, progress: Progress) -> None:
    """NNCF weight compression of the IR in src, written to out (through optimum-intel's OVQuantizer)."""
    from optimum.intel import OVConfig, OVModelForCausalLM, OVQuantizer, OVWeightQuantizationConfig

    progress.phase(f"Compressing weights with NNCF ({describe_recipe(settings)})")
    try:
        with _quiet_converters(), _nncf_progress(progress):
            model = OVModelForCausalLM.from_pretrained(src, compile=False, local_files_only=True)
            config = OVWeightQuantizationConfig(tokenizer=str(src), **settings)
            OVQuantizer(model).quantize(ov_config=OVConfig(quantization_config=config), save_directory=out)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise
        raise ConversionError(f"NNCF could not compress {src}: {_first_line(exc)}") from exc
    except (RuntimeError, ValueError, ImportError) as exc:
        _raise_if_disk_full(exc, out)
        if settings.get("dataset") is not None:
            name = settings["dataset"] if isinstance(settings["dataset"], str) else "from the text file"
            raise ConversionError(
                f"Could not build the calibration data {name}: {_first_line(exc)}",
                hint="Use --dataset auto or --dataset FILE.txt (one sample a line) when the hub cannot be reached.",
            ) from exc
        raise ConversionError(f"NNCF could not compress {src}: {_first_line(exc)}") from exc


def weight_summary(xml: Path) -> dict[str, float]:
    """Share of weight elements per storage precision in an IR (int4, int8, fp16, fp32)."""
    names = {"i4": "int4", "u4": "int4", "nf4": "int4", "i8": "int8", "u8": "int8", "f16": "fp16", "bf16": "fp16"}
    counts: dict[str, int] = {}
    model = ov.Core().read_model(str(xml))
    for op in model.get_ops():
        if op.get_type_name() != "Constant":
            continue
        size = math.prod(op.get_output_shape(0))
        if size < 4096:  # scales, shapes, norms: not weights
            continue
        kind = names.get(op.get_element_type().get_type_name(), "fp32")
        counts[kind] = counts.get(kind, 0) + size
    total = sum(counts.values()) or 1
    return {k: v / total for k, v in sorted(counts.items(), key=lambda kv: -kv[1])}


def ir_format(xml: Path) -> str:
    """The weight format an IR was built at, read from the precisions its weights are stored in."""
    try:
        summary = weight_summary(xml)
    except RuntimeError as exc:
        raise UnsupportedModelError(
            f"{xml.parent} cannot be read as an OpenVINO model: {_first_line(exc)}",
            hint="Export it again: phi3 convert MODEL --to openvino -o DIR.",
        ) from exc
    for fmt in ("int4", "int8", "fp16"):
        if summary.get(fmt, 0) > 0.05:
            return fmt
    return "fp32"


def ensure_tokenizers(out: Path, hf_dir: Path, progress: Progress) -> None:
    """Write openvino_tokenizer/detokenizer beside the IR if the export did not (LLMPipeline needs them)."""
    if all((out / name).is_file() for name in TOKENIZER_FILES):
        return
    progress.phase("Converting the tokenizer with openvino-tokenizers")
    try:
        from openvino_tokenizers import convert_tokenizer
        from transformers import AutoTokenizer

        with _quiet_converters():
            tokenizer = AutoTokenizer.from_pretrained(hf_dir)
            ov_tokenizer, ov_detokenizer = convert_tokenizer(tokenizer, with_detokenizer=True)
        ov.save_model(ov_tokenizer, out / "openvino_tokenizer.xml")
        ov.save_model(ov_detokenizer, out / "openvino_detokenizer.xml")
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise
        raise _tokenizer_error(hf_dir, exc) from exc
    except Exception as exc:  # any converter failure means the model cannot run without transformers
        _raise_if_disk_full(exc, out)
        raise _tokenizer_error(hf_dir, exc) from exc


def _tokenizer_error(hf_dir: Path, exc: BaseException) -> ConversionError:
    return ConversionError(
        f"The tokenizer of {hf_dir.name} cannot be converted to OpenVINO ({_first_line(exc)}); "
        "OpenVINO GenAI needs openvino_tokenizer.xml and openvino_detokenizer.xml to run the model.",
        hint="Convert with --to onnx, or run the original model with --backend torch.",
    )


def copy_support_files(src: Path, out: Path, names: tuple[str, ...] = SUPPORT_FILES) -> None:
    """Copy the config, tokenizer and chat-template files the IR folder lacks."""
    for name in names:
        if (src / name).is_file() and not (out / name).exists():
            shutil.copy2(src / name, out / name)


def _first_line(exc: BaseException) -> str:
    """The line of an exception that says what went wrong (for OpenVINO's, not its source location)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    useful = [line for line in lines if not _OV_LOCATION.match(line)]
    text = (useful or lines or [exc.__class__.__name__])[0]
    return text if len(text) <= 240 else text[:237] + "..."


# ---------------------------------------------------------------------------------------------- running


def check_ir(folder: Path) -> None:
    """Refuse a folder that is not a complete IR for LLMPipeline, naming what is missing."""
    missing = [
        name
        for name in IR_FILES + TOKENIZER_FILES
        if not (folder / name).is_file() or (folder / name).stat().st_size == 0
    ]
    if not missing:
        return
    if any(name.startswith("openvino_model") for name in missing):
        raise UnsupportedModelError(
            f"{folder} is not a complete OpenVINO model: {', '.join(missing)} missing or empty.",
            hint="Export it again: phi3 convert MODEL --to openvino -o DIR.",
        )
    raise UnsupportedModelError(
        f"{folder} has no OpenVINO tokenizer ({', '.join(missing)} missing), which OpenVINO GenAI needs.",
        hint=f"Add it with openvino-tokenizers: convert_tokenizer {folder} --with-detokenizer -o {folder}",
    )


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
    """LLMPipeline properties for the NPU (static shapes), from LoadRequest.options with OpenVINO's defaults."""
    props: dict[str, Any] = {}
    for option, (prop, default) in NPU_OPTIONS.items():
        value = options.get(option, default)
        if value is None:
            continue
        if prop in ("MAX_PROMPT_LEN", "MIN_RESPONSE_LEN"):
            value = int(value)
            if value < 1:
                raise Phi3Error(f"--{option.replace('_', '-')} must be at least 1, not {value}.")
        else:
            value = str(value).upper()
        props[prop] = value
    return props


def precision_properties(device: str, options: dict[str, Any]) -> dict[str, Any]:
    """INFERENCE_PRECISION_HINT: f32 by default on the CPU, so answers match the reference on CPUs with bf16.

    OpenVINO computes in bf16 by default on CPUs that have it (Xeon, Zen 4), which changes the greedy answers of
    small models; "auto" leaves OpenVINO's choice, bf16/f16 trade accuracy for speed. Other devices keep theirs.
    """
    value = str(options.get("inference_precision") or ("f32" if device == "cpu" else "auto")).lower()
    if value not in PRECISIONS:
        raise Phi3Error(f"Unknown inference precision {value!r}.", hint=f"Use one of: {', '.join(PRECISIONS)}.")
    return {} if value == "auto" else {"INFERENCE_PRECISION_HINT": value}


def attention_properties(device: str, options: dict[str, Any]) -> dict[str, Any]:
    """ATTENTION_BACKEND: the stateful SDPA pipeline by default on the CPU.

    OpenVINO GenAI's default on the CPU is its continuous-batching pipeline (PagedAttention), which rebuilds the
    model at every start, so the compiled-model cache does not shorten the next start; the stateful pipeline
    loads from the cache and runs one conversation as fast. "pa" asks for continuous batching.
    """
    value = str(options.get("attention_backend") or ("sdpa" if device == "cpu" else "auto")).lower()
    if value not in ("auto", "sdpa", "pa"):
        raise Phi3Error(f"Unknown attention backend {value!r}.", hint="Use sdpa, pa or auto.")
    return {} if value == "auto" else {"ATTENTION_BACKEND": value.upper()}


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


def execution_devices(log: list[str]) -> str | None:
    """The EXECUTION_DEVICES of the LLM's compiled model, from GenAI's compile log (not the tokenizers')."""
    model = None
    found = None
    for line in log:
        if line.startswith("Model:"):
            model = line.split(":", 1)[1].strip()
        elif line.strip().startswith("EXECUTION_DEVICES:") and model and "okenizer" not in model:
            value = line.split(":", 1)[1].strip()
            if value:
                found = value
    return found


class _TokenStreamer(ov_genai.StreamerBase):
    """Receives each generated token id from LLMPipeline and pushes it, decoded, to the consumer."""

    def __init__(self, decoder: IncrementalDecoder, emit: Callable[[RawToken], bool]):
        super().__init__()
        self._decoder, self._emit = decoder, emit

    def write(self, token) -> ov_genai.StreamingStatus:
        status = ov_genai.StreamingStatus.RUNNING
        for token_id in [token] if isinstance(token, int) else token:
            if not self._emit(RawToken(self._decoder.push(token_id), token_id=token_id)):
                status = ov_genai.StreamingStatus.CANCEL
        return status

    def end(self) -> None:
        pass


class OpenVINOModel(LoadedModel):
    backend = "openvino"

    def __init__(self, path: Path, pipe, fmt: str, device: str, executed: str, context: int, prompt_limit: int | None):
        self.path, self.pipe, self.format, self.device = path, pipe, fmt, device
        self.executed_device = executed
        self.context_length = context
        self.max_prompt_tokens = prompt_limit
        self.tokenizer = pipe.get_tokenizer()
        self.chat_template = _chat_template(path, self.tokenizer)
        self.last_perf = None  # openvino_genai.PerfMetrics of the last generate, for cross-checking our timings
        self.scorer_properties: dict[str, Any] = {}  # how token_logprobs compiles the IR (on the CPU)
        self._scorer = None

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).input_ids.data[0].tolist()

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def decode_pair(self, first: list[int], second: list[int]) -> tuple[str, str]:
        """Both windows in one detokenizer call: it costs as much as one (about 0.15 ms here)."""
        a, b = self.tokenizer.decode([first, second], skip_special_tokens=True)
        return a, b

    def generation_config(self, settings: GenerationSettings):
        config = self.pipe.get_generation_config()
        config.max_new_tokens = settings.max_new_tokens
        config.apply_chat_template = False
        config.ignore_eos = settings.ignore_eos
        config.do_sample = not settings.greedy
        if not settings.greedy:
            config.temperature = settings.temperature
            config.top_p = settings.top_p
            if settings.top_k:
                config.top_k = settings.top_k
            config.rng_seed = settings.seed if settings.seed is not None else random.getrandbits(31)
        return config

    def generate(self, prompt_ids: list[int], settings: GenerationSettings) -> Iterator[RawToken]:
        config = self.generation_config(settings)
        inputs = ov.Tensor(np.array([prompt_ids], dtype=np.int64))
        decoder = IncrementalDecoder(self.decode, self.decode_pair)

        def produce(emit: Callable[[RawToken], bool]) -> None:
            result = self.pipe.generate(inputs, config, _TokenStreamer(decoder, emit))
            self.last_perf = result.perf_metrics

        return pull_from_push(produce)

    def token_logprobs(self, ids: list[int]) -> list[float]:
        """One forward pass of the IR over ids with a fresh KV state (compiled on first use, on the CPU)."""
        if self._scorer is None:
            core = ov.Core()
            model = core.read_model(str(self.path / "openvino_model.xml"))
            self._scorer = core.compile_model(model, "CPU", self.scorer_properties)
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
        logits = request.infer({k: v for k, v in inputs.items() if k in names})["logits"][0, :-1].astype(np.float64)
        top = logits.max(axis=-1, keepdims=True)
        logsumexp = top[:, 0] + np.log(np.exp(logits - top).sum(axis=-1))
        return (logits[np.arange(n - 1), ids[1:]] - logsumexp).tolist()

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


def _context_length(folder: Path) -> int:
    try:
        config = json.loads((folder / "config.json").read_text())
        return int(config.get("max_position_embeddings") or config.get("n_positions") or 4096)
    except (OSError, ValueError, TypeError):
        return 4096


class OpenVINOBackend(Backend):
    name = "openvino"

    def build(self, hf_dir: Path, recipe: ConvertRecipe, out: Path, store: ModelStore, progress: Progress) -> None:
        config = json.loads((hf_dir / "config.json").read_text())
        settings = resolve_recipe(recipe, config, progress)
        if settings is None:
            export_ir(hf_dir, out, progress)
        else:
            exported = out / ".fp16-export"
            export_ir(hf_dir, exported, progress)
            compress_ir(exported, settings, out, progress)
            copy_support_files(exported, out, TOKENIZER_FILES + SUPPORT_FILES)
            shutil.rmtree(exported)
        ensure_tokenizers(out, hf_dir, progress)
        copy_support_files(hf_dir, out)
        self._note_weights(out, progress)

    def quantize(self, model_dir: Path, recipe: ConvertRecipe, out: Path, progress: Progress) -> None:
        model_dir = Path(model_dir)
        check_ir(model_dir)
        if recipe.format == "fp16":
            raise ConversionError(
                "Quantizing compresses weights to int4 or int8; fp16 comes from exporting.",
                hint="Use --format int4 or int8, or `phi3 convert MODEL --to openvino --format fp16`.",
            )
        if not (model_dir / "config.json").is_file():
            raise UnsupportedModelError(
                f"{model_dir} has no config.json; NNCF compression through optimum-intel needs it.",
                hint="Export the model with `phi3 convert` or optimum-cli, which write it.",
            )
        current = ir_format(model_dir / "openvino_model.xml")
        if current in ("int4", "int8"):
            raise ConversionError(
                f"{model_dir} is already compressed ({current}); compressing it again would lose accuracy.",
                hint="Quantize an fp16 IR (phi3 convert MODEL --to openvino --format fp16).",
            )
        config = json.loads((model_dir / "config.json").read_text())
        settings = resolve_recipe(recipe, config, progress)
        compress_ir(model_dir, settings, out, progress)
        copy_support_files(model_dir, out, TOKENIZER_FILES + SUPPORT_FILES)
        self._note_weights(out, progress)

    @staticmethod
    def _note_weights(out: Path, progress: Progress) -> None:
        progress.phase("Reading back the weight precisions of the IR")
        shares = weight_summary(out / "openvino_model.xml")
        progress.note("Weights stored as " + ", ".join(f"{k} {v:.0%}" for k, v in shares.items() if v >= 0.005) + ".")

    def load(self, request: LoadRequest, store: ModelStore, progress: Progress) -> LoadedModel:
        from phi3cli.convert import ensure_variant

        core = ov.Core()
        device = ov_device_for(request.device, list(core.available_devices))
        source = request.source
        if source.runtime == "openvino":
            folder = source.path
            check_ir(folder)
            fmt = ir_format(folder / "openvino_model.xml")
            if request.format and request.format != fmt:
                progress.note(f"{folder} holds {fmt} weights; --format {request.format} applies only to conversion.")
        else:
            if source.runtime:
                raise UnsupportedModelError(
                    f"{source.spec} is an {source.runtime} model; OpenVINO runs IR folders or converts Hugging Face models.",
                    hint=f"Use --backend {source.runtime}.",
                )
            fmt = request.format or DEFAULT_FORMAT
            if fmt not in FORMATS:
                raise UnsupportedModelError(
                    f"The openvino backend runs {', '.join(FORMATS)} weights, not {fmt}.",
                    hint="Use --format int4, int8 or fp16 (fp32 runs with --backend torch or onnx).",
                )
            folder = ensure_variant(self, source, ConvertRecipe(format=fmt, target=request.device), store, progress)
            check_ir(folder)

        # options["cache_dir"]: another compiled-model cache (phi3 bench times a load with an empty one).
        properties: dict[str, Any] = {"CACHE_DIR": str(request.options.get("cache_dir") or store.cache_dir("openvino"))}
        if request.threads:
            properties["INFERENCE_NUM_THREADS"] = int(request.threads)
        properties.update(precision_properties(request.device, request.options))
        properties.update(attention_properties(request.device, request.options))
        context = _context_length(folder)
        prompt_limit = None
        ignored = [f"--{o.replace('_', '-')}" for o in NPU_OPTIONS if o in request.options and request.device != "npu"]
        if ignored:
            verb = "apply" if len(ignored) > 1 else "applies"
            progress.note(f"{', '.join(ignored)} {verb} to the NPU only; ignored on {request.device}.")
        if request.device == "npu":
            npu = npu_properties(request.options)
            properties.update(npu)
            prompt_limit = npu["MAX_PROMPT_LEN"]
            context = min(context, npu["MAX_PROMPT_LEN"] + npu["MIN_RESPONSE_LEN"])

        progress.phase(f"Loading {folder.name} on {device} with OpenVINO GenAI")
        try:
            with _compile_log() as log:
                pipe = ov_genai.LLMPipeline(str(folder), device, **properties)
        except RuntimeError as exc:
            raise Phi3Error(
                f"OpenVINO GenAI could not load {folder} on {device}: {_first_line(exc)}",
                hint="Run again with --debug for OpenVINO's full message.",
            ) from exc
        executed = execution_devices(log) or device
        model = OpenVINOModel(folder, pipe, fmt, request.device, executed, context, prompt_limit)
        model.scorer_properties = {"CACHE_DIR": properties["CACHE_DIR"], **precision_properties("cpu", request.options)}
        return model

    def converter_version(self) -> str:
        return f"optimum-intel {_version('optimum-intel')}, nncf {_version('nncf')}, openvino {ov.__version__}"

    def runtime_versions(self) -> dict[str, str]:
        packages = (
            "openvino",
            "openvino-genai",
            "openvino-tokenizers",
            "optimum-intel",
            "optimum",
            "nncf",
            "transformers",
        )
        return {p: _version(p) for p in packages}
