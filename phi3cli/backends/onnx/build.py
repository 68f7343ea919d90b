"""Building an ONNX Runtime GenAI folder with its model builder (create_model as a library), output tamed.

The builder prints its progress on stdout and tqdm bars on stderr; both become phi3 Progress phases.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import sys
import uuid
from collections import deque
from dataclasses import replace
from pathlib import Path

from phi3cli.backends.base import ConvertRecipe
from phi3cli.backends.onnx import SPEC
from phi3cli.backends.onnx.folder import GENAI_CONFIG, TOKENIZER_FILES, read_genai_config
from phi3cli.backends.onnx.layerwise import layer_by_layer
from phi3cli.errors import ConversionError
from phi3cli.progress import Progress
from phi3cli.sizing import calibrated_by_default, model_config
from phi3cli.util import copy_missing, first_line, remove_stale_partials

# Block sizes MatMulNBits accepts (the builder's default is 32).
INT4_BLOCK_SIZES = (16, 32, 64, 128, 256)
# The int4 defaults per target (measured: docs/results/). For the CPU, up to CALIBRATED_MAX_PARAMETERS
# (`calibrated`): the builder writes fp32 and NNCF compresses it much as the OpenVINO default does (asymmetric,
# group 64, half the weights int4 and the rest int8, scales fitted by scale estimation on phi3's calibration text).
# Above it (`data-free`, also `rtn`): the builder's own round-to-nearest (asymmetric blocks, lm_head int8 shared
# with a tied embedding), quantized layer by layer (layerwise.py), since an fp32 graph of a 3.8B model does not fit
# in memory. DirectML and CUDA keep the builder's defaults. `cookbook`: the builder's defaults (symmetric, block
# 32, int4 lm_head).
NNCF_INT4_RECIPE: dict[str, dict] = {"cpu": {"group_size": 64, "ratio": 0.5, "sym": False, "scale_estimation": True}}
_RTN = {"int4_algo_config": "rtn_last", "int4_is_symmetric": False}
NAMED_INT4_RECIPES: dict[str, dict] = {"cookbook": {}, "rtn": _RTN, "data-free": _RTN}
CALIBRATED = "calibrated"  # the NNCF recipe, by name


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


def nncf_settings(recipe: ConvertRecipe, calibrated_default: bool = True) -> dict | None:
    """NNCF's settings when this recipe compresses an fp32 build with NNCF (the CPU int4 default where
    calibrated_default, or --recipe calibrated), else None (the builder's own int4)."""
    defaults = NNCF_INT4_RECIPE.get(recipe.target)
    if recipe.format != "int4" or defaults is None or recipe.preset not in (None, CALIBRATED):
        return None
    if recipe.preset is None and not calibrated_default and not (recipe.awq or recipe.dataset):
        return None
    settings = dict(defaults)
    if recipe.group_size is not None:
        settings["group_size"] = recipe.group_size
    if recipe.ratio is not None:
        if not 0 < recipe.ratio <= 1:
            raise ConversionError(f"--ratio is the share of weights in int4, from 0 to 1, not {recipe.ratio}.")
        settings["ratio"] = recipe.ratio
    if recipe.sym is not None:
        settings["sym"] = recipe.sym
    settings["awq"] = recipe.awq
    if recipe.dataset is not None:
        path = Path(recipe.dataset).expanduser()
        if not path.is_file():
            raise ConversionError(
                f"ONNX int4 calibrates on a text file; {recipe.dataset!r} is not one.",
                hint="Give --dataset FILE.txt (paragraphs separated by blank lines), or leave it out for phi3's text.",
            )
        settings["dataset"] = path
    return settings


def _builder_options(recipe: ConvertRecipe, nncf: dict | None) -> dict:
    options = {"hf_token": "false", "hf_remote": False}  # local folders only; never run a model's own code
    if nncf is not None:
        return options  # the builder writes fp32; NNCF does the int4
    if recipe.format == "int4" and recipe.preset is None and recipe.target == "cpu":
        recipe = replace(recipe, preset="data-free")  # the default above CALIBRATED_MAX_PARAMETERS
    unsupported = [
        flag
        for flag, given in (("--ratio", recipe.ratio is not None), ("--awq", recipe.awq), ("--dataset", recipe.dataset))
        if given
    ]
    if unsupported:
        raise ConversionError(
            f"{', '.join(unsupported)} apply to OpenVINO and to the CPU int4 default; the ONNX Runtime GenAI "
            "builder's own recipes quantize every MatMul to int4 with round-to-nearest.",
            hint="Drop them, or leave out --recipe (CPU), or use --to openvino.",
        )
    if recipe.preset is not None and recipe.preset not in NAMED_INT4_RECIPES:
        names = ", ".join(NAMED_INT4_RECIPES)
        raise ConversionError(
            f"ONNX Runtime GenAI has no recipe named {recipe.preset!r}.", hint=f"Use --recipe {names}."
        )
    if recipe.format != "int4":
        if recipe.preset is not None:
            raise ConversionError(f"--recipe {recipe.preset} is an int4 recipe.", hint="Use --format int4.")
        if recipe.group_size is not None or recipe.sym is not None:
            raise ConversionError(
                "--group-size and --sym/--asym apply to int4 only.", hint="Drop them or use --format int4."
            )
        return options
    options.update(NAMED_INT4_RECIPES[recipe.preset] if recipe.preset is not None else {})
    if recipe.group_size is not None:
        options["int4_block_size"] = recipe.group_size
    if recipe.sym is not None:
        options["int4_is_symmetric"] = recipe.sym
    return options


def _check_block(recipe: ConvertRecipe) -> None:
    if recipe.group_size is not None and recipe.format == "int4" and recipe.group_size not in INT4_BLOCK_SIZES:
        raise ConversionError(
            f"ONNX int4 uses block sizes {', '.join(map(str, INT4_BLOCK_SIZES))}, not {recipe.group_size}.",
            hint="Change --group-size.",
        )


def _set_provider_options(folder: Path, providers: list[dict]) -> None:
    path = folder / GENAI_CONFIG
    data = json.loads(path.read_text())
    data["model"]["decoder"].setdefault("session_options", {})["provider_options"] = providers
    path.write_text(json.dumps(data, indent=4) + "\n")


def build_folder(hf_dir: Path, recipe: ConvertRecipe, out: Path, progress: Progress, cache: Path) -> None:
    """Run the model builder on a Hugging Face folder into out; its scratch goes under cache and is removed."""
    if recipe.format not in SPEC.formats:
        raise ConversionError(
            f"ONNX Runtime GenAI builds {', '.join(SPEC.formats)}, not {recipe.format}.", hint="Change --format."
        )
    if recipe.target not in SPEC.convert_targets:
        raise ConversionError(
            f"ONNX models are built for {', '.join(SPEC.convert_targets)}, not {recipe.target}.",
            hint="Change --target.",
        )
    _check_block(recipe)
    nncf = nncf_settings(recipe, calibrated_by_default(model_config(hf_dir)))
    ep, drop_providers = builder_target(recipe)
    options = _builder_options(recipe, nncf)
    built_format = "fp32" if nncf is not None else recipe.format
    try:
        layers = int(json.loads((hf_dir / "config.json").read_text())["num_hidden_layers"])
    except (OSError, ValueError, KeyError, TypeError):
        layers = None
    what = f"{built_format}, {recipe.target}"
    remove_stale_partials(cache)  # scratch of builds that were killed
    scratch = cache / f".build-{uuid.uuid4().hex[:8]}.partial-{os.getpid()}"
    built = scratch / "fp32" if nncf is not None else out
    output = _BuilderOutput(progress, what, built_format)
    progress.phase("Loading ONNX Runtime GenAI's model builder")
    try:
        with (
            contextlib.redirect_stdout(output),
            contextlib.redirect_stderr(_WithoutProgressBars()),
            quantizer_logs(),
        ):
            from onnxruntime_genai.models.builder import create_model

            progress.phase(f"Building the ONNX graph, layer by layer ({what})", total=layers)
            with layer_by_layer() if built_format == "int4" else contextlib.nullcontext():
                create_model(None, str(hf_dir), str(built), built_format, ep, str(scratch / "hf"), **options)
    except Exception as exc:
        shutil.rmtree(scratch, ignore_errors=True)
        last = f" (after: {output.tail[-1]})" if output.tail else ""
        raise ConversionError(
            f"ONNX Runtime GenAI's model builder failed on {hf_dir}: {first_line(exc, typed=True)}{last}",
            hint="Run again with --debug for the traceback.",
        ) from exc
    try:
        if nncf is not None:
            from phi3cli.backends.onnx.compress import compress_model

            filename = read_genai_config(built)["model"]["decoder"]["filename"]
            compress_model(built, filename, nncf, out, progress)
            copy_missing(built, out, [p.name for p in built.iterdir() if not p.name.startswith(filename)])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if drop_providers:
        _set_provider_options(out, [])
    copy_missing(hf_dir, out, TOKENIZER_FILES)  # what the builder did not write, so templates.py finds it
    read_genai_config(out)


@contextlib.contextmanager
def quantizer_logs(progress: Progress | None = None):
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
