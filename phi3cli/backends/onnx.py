"""ONNX Runtime GenAI: its model builder makes the folder, its Generator runs it on the CPU, DirectML or CUDA.

A folder is anything with a genai_config.json: built here (`phi3 convert --to onnx`), by the builder
itself, or downloaded (Microsoft's published Phi-3 ONNX folders). Which execution provider runs it is
decided in one place, `choose_providers`, from the device asked, what the folder's config names and what
this ONNX Runtime GenAI build provides.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import json
import logging
import os
import re
import shutil
import sys
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime_genai as og

from phi3cli.backends.base import Backend, ConvertRecipe, GenerationSettings, LoadedModel, LoadRequest, RawToken
from phi3cli.errors import (
    BackendUnavailableError,
    ContextOverflowError,
    ConversionError,
    DeviceUnavailableError,
    UnsupportedModelError,
)
from phi3cli.progress import Progress
from phi3cli.store import MANIFEST, ModelStore, remove_stale_partials
from phi3cli.templates import load_chat_template

FORMATS = ("int4", "fp16", "fp32")
TARGETS = ("cpu", "dml", "cuda")
GENAI_CONFIG = "genai_config.json"
# Bumped when what build() writes changes, so stored variants are rebuilt.
BUILD_RECIPE = "1"
# Block sizes MatMulNBits accepts (the builder's default is 32).
INT4_BLOCK_SIZES = (16, 32, 64, 128, 256)
# Files a model folder needs beside the ONNX graph so tokenizer and chat template match the source.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "tokenizer.model",
    "generation_config.json",
)
# Execution providers a genai_config.json can name, and the package that brings each.
PROVIDERS = {
    "dml": ("DirectML", "onnxruntime-genai-directml (Windows only)"),
    "cuda": ("CUDA", "onnxruntime-genai-cuda (NVIDIA GPUs)"),
}
GENAI_DISTRIBUTIONS = ("onnxruntime-genai", "onnxruntime-genai-directml", "onnxruntime-genai-cuda")


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def available_providers() -> set[str]:
    """GPU execution providers this ONNX Runtime GenAI build has (the CPU is always there)."""
    checks = {"dml": "is_dml_available", "cuda": "is_cuda_available"}
    return {name for name, check in checks.items() if getattr(og, check, lambda: False)()}


# --- provider selection: the one place that knows about DirectML, CUDA and Windows ---------------------


@dataclass(frozen=True)
class ProviderChoice:
    """The execution providers to run a folder with; () is ONNX Runtime's CPU provider."""

    providers: tuple[str, ...]
    clear: bool  # drop what genai_config.json names, then append `providers`
    note: str | None = None  # something the user should read (a config's provider overridden)


def _provider_label(name: str) -> str:
    return PROVIDERS.get(name, (name, ""))[0]


def _provider_missing(name: str, why: str) -> DeviceUnavailableError:
    label, package = PROVIDERS.get(name, (name, None))
    where = f"{package} provides it" if package else "no ONNX Runtime GenAI package phi3 knows provides it"
    return DeviceUnavailableError(
        f"{why} the {label} execution provider, which this ONNX Runtime GenAI lacks; {where}.",
        hint="Install that package, or run the model on the CPU with --device cpu.",
    )


def choose_providers(device: str, configured: list[str], available: set[str], platform: str) -> ProviderChoice:
    """Providers for a request: cpu clears whatever the folder names (a DirectML folder then runs on the
    CPU); gpu keeps the folder's provider if it has one, else DirectML on Windows, else CUDA."""
    if device == "cpu":
        note = None
        if configured:
            names = ", ".join(_provider_label(p) for p in configured)
            note = f"The model's genai_config.json targets {names}; running it on the CPU with its providers cleared."
        return ProviderChoice((), clear=True, note=note)
    if device != "gpu":
        raise DeviceUnavailableError(
            f"The onnx backend runs on cpu or gpu, not {device}.",
            hint="Use --device cpu or gpu, or --backend openvino for the NPU.",
        )
    if configured:
        for name in configured:
            if name not in available:
                raise _provider_missing(name, "The model's genai_config.json asks for")
        return ProviderChoice(tuple(configured), clear=False)
    wanted = ("dml", "cuda") if platform == "win32" else ("cuda",)
    for name in wanted:
        if name in available:
            return ProviderChoice((name,), clear=True)
    raise DeviceUnavailableError(
        "This ONNX Runtime GenAI has no GPU execution provider: DirectML comes with "
        f"{PROVIDERS['dml'][1]}, CUDA with {PROVIDERS['cuda'][1]}.",
        hint="Install one of them in place of onnxruntime-genai, or use --device cpu.",
    )


def apply_providers(config, choice: ProviderChoice) -> None:
    """Make an og.Config use the chosen providers."""
    if choice.clear:
        config.clear_providers()
        for name in choice.providers:
            config.append_provider(name)


def configured_providers(genai: dict) -> list[str]:
    """The execution providers a genai_config.json names for its decoder, in order."""
    options = genai["model"]["decoder"].get("session_options", {}).get("provider_options", [])
    return [name for entry in options if isinstance(entry, dict) for name in entry]


EXECUTED = {"CPU": "CPU", "DML": "GPU (DirectML)", "CUDA": "GPU (CUDA)"}


# --- reading a folder ---------------------------------------------------------------------------------


def read_genai_config(folder: Path) -> dict:
    """genai_config.json of a folder, checked for what phi3 relies on; one clear error otherwise."""
    path = Path(folder) / GENAI_CONFIG
    fix = "Rebuild it with `phi3 convert MODEL --to onnx`, or point --model at a complete ONNX Runtime GenAI folder."
    if not path.is_file():
        raise UnsupportedModelError(
            f"{folder} has no {GENAI_CONFIG}; it is not an ONNX Runtime GenAI folder.", hint=fix
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UnsupportedModelError(
            f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}).", hint=fix
        ) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise UnsupportedModelError(f"{path} cannot be read: {exc}", hint=fix) from exc
    try:
        model = data["model"]
        decoder = model["decoder"]
        filename = decoder["filename"]
        context = int(model["context_length"])
        if not isinstance(filename, str) or context <= 0:
            raise ValueError
    except (KeyError, TypeError, ValueError):
        raise UnsupportedModelError(
            f"{path} lacks what ONNX Runtime GenAI needs (model.context_length, model.decoder.filename).", hint=fix
        ) from None
    if not (Path(folder) / filename).is_file():
        raise UnsupportedModelError(f"{path} names {filename}, which is not in {folder}.", hint=fix)
    return data


def detect_format(folder: Path, filename: str) -> str:
    """int4, fp16 or fp32: from phi3's manifest if the folder has one, else from the ONNX graph."""
    with contextlib.suppress(OSError, ValueError, KeyError):
        return json.loads((folder / MANIFEST).read_text())["key"]["format"]
    try:
        import onnx

        graph = onnx.load(str(folder / filename), load_external_data=False).graph
    except Exception:  # an unreadable graph is reported when ONNX Runtime loads it
        return "unknown"
    if any(node.op_type in ("MatMulNBits", "GatherBlockQuantized") for node in graph.node):
        return "int4"
    types = {init.data_type for init in graph.initializer}
    if onnx.TensorProto.FLOAT16 in types:
        return "fp16"
    return "fp32" if onnx.TensorProto.FLOAT in types else "unknown"


# --- running ------------------------------------------------------------------------------------------


class OnnxModel(LoadedModel):
    backend = "onnx"

    def __init__(self, path: Path, model, fmt: str, device: str, genai: dict):
        self.path, self.model, self.format, self.device = path, model, fmt, device
        self.tokenizer = og.Tokenizer(model)
        with contextlib.suppress(Exception):  # the chat template writes the special tokens itself
            self.tokenizer.update_options(add_special_tokens="false")
        self.executed_device = EXECUTED.get(model.device_type, model.device_type)
        self.context_length = int(genai["model"]["context_length"])
        self.chat_template = load_chat_template(path)

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self.tokenizer.encode(text)]

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
        params.set_search_options(**options)
        return params

    def generate(self, prompt_ids: list[int], settings: GenerationSettings) -> Iterator[RawToken]:
        params = self._params(len(prompt_ids) + settings.max_new_tokens, settings)
        generator = og.Generator(self.model, params)
        stream = self.tokenizer.create_stream()
        try:
            generator.append_tokens(prompt_ids)  # the prefill: inside the iterator, so it counts in TTFT
            while not generator.is_done():
                generator.generate_next_token()
                token_id = int(generator.get_next_tokens()[0])
                yield RawToken(stream.decode(token_id), token_id=token_id)
        finally:
            del generator

    def token_logprobs(self, ids: list[int]) -> list[float]:
        if len(ids) >= self.context_length:
            raise ContextOverflowError(f"{len(ids)} tokens do not fit the context of {self.context_length}.")
        generator = og.Generator(self.model, self._params(len(ids) + 1))
        generator.append_tokens(ids)
        logits = np.asarray(generator.get_output("logits"), dtype=np.float32)
        logits = logits.reshape(-1, logits.shape[-1])
        del generator
        if logits.shape[0] != len(ids):
            raise NotImplementedError("this ONNX model returns logits for the last position only")
        logits = logits[:-1]
        peak = logits.max(axis=-1, keepdims=True)
        norm = np.log(np.exp(logits - peak).sum(axis=-1, keepdims=True)) + peak
        return (logits - norm)[np.arange(len(ids) - 1), ids[1:]].astype(float).tolist()

    def close(self) -> None:
        self.tokenizer = self.model = None


# --- building -----------------------------------------------------------------------------------------


class _BuilderOutput(io.TextIOBase):
    """Receives the model builder's prints (stdout) as progress phases; keeps the last lines for errors."""

    def __init__(self, progress: Progress, what: str, fmt: str):
        self.progress, self.what, self.fmt = progress, what, fmt
        self.tail: deque[str] = deque(maxlen=20)
        self._buffer = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._buffer += text
        *lines, self._buffer = re.split(r"[\r\n]", self._buffer)
        for line in lines:
            self._line(line.strip())
        return len(text)

    def _line(self, line: str) -> None:
        if not line:
            return
        self.tail.append(line)
        if line.startswith("Reading layer "):
            self.progress.advance()
        elif line.startswith("Saving ONNX model"):
            step = "Quantizing to int4 and writing" if self.fmt == "int4" else "Writing"
            self.progress.phase(f"{step} the ONNX model ({self.what})")
        elif line.startswith("Saving GenAI config"):
            self.progress.phase("Writing genai_config.json and the tokenizer files")


_TQDM = re.compile(r"\?it/s\]|it/s\]|s/it\]")


class _WithoutProgressBars(io.TextIOBase):
    """Stands in for stderr while the builder runs: everything but tqdm's bars goes to the process's stderr.

    Our own progress display writes to stderr too, so stderr cannot simply be captured; and a terminal
    display may have replaced sys.stderr with a proxy that draws through it, so this writes to the
    stream underneath.
    """

    def __init__(self):
        self.real = sys.__stderr__ or io.StringIO()
        self._after_bar = False

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        bar = bool(_TQDM.search(text))
        if not bar and not (self._after_bar and text == "\n"):
            self.real.write(text)
        self._after_bar = bar
        return len(text)

    def flush(self) -> None:
        self.real.flush()

    def isatty(self) -> bool:
        return self.real.isatty()

    def fileno(self) -> int:
        return self.real.fileno()

    @property
    def encoding(self):
        return getattr(self.real, "encoding", "utf-8")


def builder_target(recipe: ConvertRecipe) -> tuple[str, bool]:
    """(the builder's execution-provider argument, whether to drop its provider options afterwards).

    The builder has no fp16 graph for the CPU (its fp16-CPU fallback fails in ONNX Runtime's CPU provider
    with a buffer-reuse shape mismatch), so fp16 for the CPU is its fp16 GroupQueryAttention graph, built
    with the CUDA layout and run by the CPU provider.
    """
    if recipe.format == "fp16" and recipe.target == "cpu":
        return "cuda", True
    return recipe.target, False


def _builder_options(recipe: ConvertRecipe) -> dict:
    options = {"hf_token": "false", "hf_remote": False}  # local folders only; never run a model's own code
    unsupported = [
        flag
        for flag, given in (("--ratio", recipe.ratio is not None), ("--awq", recipe.awq), ("--dataset", recipe.dataset))
        if given
    ]
    if unsupported:
        raise ConversionError(
            f"{', '.join(unsupported)} apply to OpenVINO; the ONNX Runtime GenAI builder quantizes every MatMul "
            "to int4 with round-to-nearest.",
            hint="Drop them, or use --to openvino.",
        )
    if recipe.format != "int4":
        if recipe.group_size is not None or recipe.sym is not None:
            raise ConversionError(
                "--group-size and --sym/--asym apply to int4 only.", hint="Drop them or use --format int4."
            )
        return options
    if recipe.group_size is not None:
        if recipe.group_size not in INT4_BLOCK_SIZES:
            raise ConversionError(
                f"ONNX int4 uses block sizes {', '.join(map(str, INT4_BLOCK_SIZES))}, not {recipe.group_size}.",
                hint="Change --group-size.",
            )
        options["int4_block_size"] = recipe.group_size
    if recipe.sym is not None:
        options["int4_is_symmetric"] = recipe.sym
    return options


def _set_provider_options(folder: Path, providers: list[dict]) -> None:
    path = folder / GENAI_CONFIG
    data = json.loads(path.read_text())
    data["model"]["decoder"].setdefault("session_options", {})["provider_options"] = providers
    path.write_text(json.dumps(data, indent=4) + "\n")


def _keep_tokenizer_files(source: Path, out: Path) -> None:
    """Copy the tokenizer and chat-template files the builder did not write, so templates.py finds them."""
    for name in TOKENIZER_FILES:
        if (source / name).is_file() and not (out / name).exists():
            shutil.copy2(source / name, out / name)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{exc.__class__.__name__}: {text[0] if text else ''}".rstrip(": ")


class OnnxBackend(Backend):
    name = "onnx"

    def default_target(self) -> str:
        return "dml" if sys.platform == "win32" and "dml" in available_providers() else "cpu"

    def converter_version(self) -> str:
        return f"onnxruntime-genai {og.__version__}; onnxruntime {_version('onnxruntime')}; recipe {BUILD_RECIPE}"

    def runtime_versions(self) -> dict[str, str]:
        names = (*GENAI_DISTRIBUTIONS, "onnxruntime", "onnx-ir", "onnx")
        return {name: v for name in names if (v := _version(name))}

    def build(self, hf_dir: Path, recipe: ConvertRecipe, out: Path, store: ModelStore, progress: Progress) -> None:
        if recipe.format not in FORMATS:
            raise ConversionError(
                f"ONNX Runtime GenAI builds {', '.join(FORMATS)}, not {recipe.format}.", hint="Change --format."
            )
        if recipe.target not in TARGETS:
            raise ConversionError(
                f"ONNX models are built for {', '.join(TARGETS)}, not {recipe.target}.", hint="Change --target."
            )
        ep, drop_providers = builder_target(recipe)
        options = _builder_options(recipe)
        try:
            layers = int(json.loads((hf_dir / "config.json").read_text())["num_hidden_layers"])
        except (OSError, ValueError, KeyError, TypeError):
            layers = None
        what = f"{recipe.format}, {recipe.target}"
        scratch_root = store.cache_dir("onnx-builder")
        remove_stale_partials(scratch_root)  # scratch of builds that were killed
        scratch = scratch_root / f".build-{uuid.uuid4().hex[:8]}.partial-{os.getpid()}"
        output = _BuilderOutput(progress, what, recipe.format)
        progress.phase("Loading ONNX Runtime GenAI's model builder")
        try:
            with (
                contextlib.redirect_stdout(output),
                contextlib.redirect_stderr(_WithoutProgressBars()),
                _quantizer_logs(),
            ):
                from onnxruntime_genai.models.builder import create_model

                progress.phase(f"Building the ONNX graph, layer by layer ({what})", total=layers)
                create_model(None, str(hf_dir), str(out), recipe.format, ep, str(scratch), **options)
        except Exception as exc:
            last = f" (after: {output.tail[-1]})" if output.tail else ""
            raise ConversionError(
                f"ONNX Runtime GenAI's model builder failed on {hf_dir}: {_first_line(exc)}{last}",
                hint="Run again with --debug for the traceback.",
            ) from exc
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        if drop_providers:
            _set_provider_options(out, [])
        _keep_tokenizer_files(hf_dir, out)
        read_genai_config(out)

    def quantize(self, model_dir: Path, recipe: ConvertRecipe, out: Path, progress: Progress) -> None:
        if recipe.format != "int4":
            raise ConversionError(f"ONNX quantize makes int4 weights, not {recipe.format}.", hint="Use --format int4.")
        genai = read_genai_config(model_dir)
        filename = genai["model"]["decoder"]["filename"]
        source_format = detect_format(model_dir, filename)
        if source_format == "int4":
            raise ConversionError(
                f"{model_dir} is already int4.", hint="Quantize an fp16 or fp32 folder (phi3 convert --format fp32)."
            )
        block = recipe.group_size if recipe.group_size is not None else 32
        if block not in INT4_BLOCK_SIZES or recipe.ratio is not None or recipe.awq:
            raise ConversionError(
                "ONNX int4 quantization takes --group-size "
                f"{'/'.join(map(str, INT4_BLOCK_SIZES))} and --sym/--asym only (no --ratio or --awq).",
                hint="Change the options, or use --backend openvino for mixed precision and AWQ.",
            )
        try:
            self._quantize_int4(model_dir, genai, filename, source_format, block, recipe, out, progress)
        except ConversionError:
            raise
        except Exception as exc:
            raise ConversionError(
                f"Quantizing {model_dir} to int4 failed: {_first_line(exc)}",
                hint="Run again with --debug for the traceback.",
            ) from exc

    @staticmethod
    def _quantize_int4(model_dir, genai, filename, source_format, block, recipe, out, progress) -> None:
        import onnx
        from onnx.external_data_helper import load_external_data_for_model

        with _quantizer_logs():
            from onnxruntime.quantization import QuantFormat
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        progress.phase(f"Reading {filename} ({source_format})")
        model = onnx.load(str(model_dir / filename), load_external_data=False)
        external = {
            entry.value for init in model.graph.initializer for entry in init.external_data if entry.key == "location"
        }
        load_external_data_for_model(model, str(model_dir))
        weights = {init.name for init in model.graph.initializer}
        matmuls = [n for n in model.graph.node if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in weights]
        progress.phase(f"Quantizing {len(matmuls)} MatMul weights to int4 (block {block})", total=len(matmuls))
        quantizer = MatMulNBitsQuantizer(
            model,
            bits=4,
            block_size=block,
            is_symmetric=recipe.sym if recipe.sym is not None else True,
            # int8 activations on the CPU provider, as the builder does for CPU models
            accuracy_level=0 if configured_providers(genai) else 4,
            quant_format=QuantFormat.QOperator,
            op_types_to_quantize=("MatMul",),
        )
        with _quantizer_logs(progress):
            quantizer.process()
        progress.phase(f"Writing the int4 {filename}")
        onnx.save_model(
            quantizer.model.model,
            str(out / filename),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=f"{filename}.data",
            size_threshold=0,
        )
        skip = {filename, f"{filename}.data", MANIFEST, *external}
        for item in model_dir.iterdir():
            if item.is_file() and item.name not in skip and not (out / item.name).exists():
                shutil.copy2(item, out / item.name)
        read_genai_config(out)

    def load(self, request: LoadRequest, store: ModelStore, progress: Progress) -> LoadedModel:
        source = request.source
        if source.runtime not in (None, "onnx"):
            raise BackendUnavailableError(
                f"{source.spec} is an {source.runtime} model; the onnx backend runs ONNX Runtime GenAI folders.",
                hint=f"Use --backend {source.runtime}.",
            )
        available = available_providers()
        if source.kind == "onnx":
            folder = source.path
        else:
            fmt = request.format or "int4"
            if fmt not in FORMATS:
                raise UnsupportedModelError(
                    f"The onnx backend runs {', '.join(FORMATS)} weights, not {fmt}.", hint="Change --format."
                )
            target = "cpu"
            if request.device != "cpu":
                target = choose_providers(request.device, [], available, sys.platform).providers[0]
            from phi3cli.convert import ensure_variant

            folder = ensure_variant(self, source, ConvertRecipe(format=fmt, target=target), store, progress)
        genai = read_genai_config(folder)
        choice = choose_providers(request.device, configured_providers(genai), available, sys.platform)
        if choice.note:
            progress.note(choice.note)
        fmt = detect_format(folder, genai["model"]["decoder"]["filename"])
        if source.kind == "onnx" and request.format and request.format != fmt:
            progress.note(f"{folder} holds {fmt} weights; --format {request.format} applies to conversions only.")
        progress.phase(f"Loading {folder.name} with ONNX Runtime GenAI ({fmt})")
        try:
            config = og.Config(str(folder))
            apply_providers(config, choice)
            if request.threads:
                session = {"intra_op_num_threads": request.threads}
                config.overlay(json.dumps({"model": {"decoder": {"session_options": session}}}))
            model = og.Model(config)
        except RuntimeError as exc:
            raise UnsupportedModelError(
                f"ONNX Runtime GenAI cannot load {folder}: {str(exc).strip().splitlines()[0]}",
                hint="Check its genai_config.json, or rebuild it with `phi3 convert MODEL --to onnx`.",
            ) from exc
        return OnnxModel(folder, model, fmt, request.device, genai)


@contextlib.contextmanager
def _quantizer_logs(progress: Progress | None = None):
    """Keep ONNX Runtime's int4 quantizer quiet, advancing progress once per weight it starts on.

    Importing that module calls logging.basicConfig(level=INFO), which would print every later INFO record
    of any library on stderr; the root logger is put back as it was.
    """
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    logger = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")

    class Counter(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if progress is not None and record.getMessage().startswith("start to quantize"):
                progress.advance()

    counter = Counter()
    saved = logger.level, logger.propagate
    logger.addHandler(counter)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(counter)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)
