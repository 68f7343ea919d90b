"""Building an IR: optimum-intel's export to fp16, NNCF's weight compression, OpenVINO's tokenizer converter.

The converters' own warnings, log tables and progress bars are tamed: phi3's Progress says what happens.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openvino as ov

from phi3cli.backends.nncf_weights import nncf_progress
from phi3cli.backends.openvino.ir import TOKENIZER_FILES
from phi3cli.backends.openvino.longrope import longrope_in_graph
from phi3cli.backends.openvino.recipe import describe_recipe
from phi3cli.errors import ConversionError
from phi3cli.progress import Progress
from phi3cli.util import first_line

FULL_DISK_BYTES = 64 << 20  # a write that failed with less than this free is taken as a full disk


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
            bars = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()  # "Loading checkpoint shards": our phase line says it
        except ImportError:
            hf_verbosity = None
        try:
            yield
        finally:
            for n, level in levels.items():
                logging.getLogger(n).setLevel(level)
            if hf_verbosity is not None:
                hf_logging.set_verbosity(hf_verbosity)
                if bars:
                    hf_logging.enable_progress_bar()


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
        raise OSError(errno.ENOSPC, f"No space left on device ({first_line(exc)})") from exc


def export_ir(hf_dir: Path, out: Path, progress: Progress) -> None:
    """Export a Hugging Face folder to an fp16 OpenVINO IR (stateful, with KV cache) plus OV tokenizers."""
    from optimum.exporters.openvino import main_export
    from optimum.intel import OVConfig

    progress.phase(f"Exporting {hf_dir.name} to OpenVINO IR with optimum-intel")
    try:
        with _quiet_converters(), longrope_in_graph(json.loads((hf_dir / "config.json").read_text())):
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
        raise ConversionError(f"optimum-intel could not export {hf_dir}: {first_line(exc)}") from exc


def compress_ir(src: Path, settings: dict[str, Any], out: Path, progress: Progress) -> None:
    """NNCF weight compression of the IR in src, written to out.

    Data-free settings go straight to nncf.compress_weights on the IR read through a memory map, one weight at a
    time (no compiled model, no second copy of the fp16 weights); calibrated ones through optimum-intel's
    OVQuantizer, which runs the model over the calibration text.
    """
    progress.phase(f"Compressing weights with NNCF ({describe_recipe(settings)})")
    try:
        with _quiet_converters(), nncf_progress(progress):
            if settings.get("dataset") is None:
                _compress_data_free(src, settings, out)
            else:
                from optimum.intel import OVConfig, OVModelForCausalLM, OVQuantizer, OVWeightQuantizationConfig

                model = OVModelForCausalLM.from_pretrained(src, compile=False, local_files_only=True)
                config = OVWeightQuantizationConfig(tokenizer=str(src), **settings)
                OVQuantizer(model).quantize(ov_config=OVConfig(quantization_config=config), save_directory=out)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise
        raise ConversionError(f"NNCF could not compress {src}: {first_line(exc)}") from exc
    except (RuntimeError, ValueError, ImportError) as exc:
        _raise_if_disk_full(exc, out)
        if settings.get("dataset") is not None:
            name = settings["dataset"] if isinstance(settings["dataset"], str) else "from the text file"
            raise ConversionError(
                f"Could not build the calibration data {name}: {first_line(exc)}",
                hint="Use --dataset auto or --dataset FILE.txt (paragraphs split by blank lines) when the hub cannot be reached.",
            ) from exc
        raise ConversionError(f"NNCF could not compress {src}: {first_line(exc)}") from exc


def _compress_data_free(src: Path, settings: dict[str, Any], out: Path) -> None:
    import nncf

    mode = getattr(nncf.CompressWeightsMode, f"INT{settings['bits']}_{'SYM' if settings['sym'] else 'ASYM'}")
    options: dict[str, Any] = {"mode": mode}
    if settings["bits"] == 4:
        options.update(group_size=settings["group_size"], ratio=settings["ratio"])
    model = nncf.compress_weights(ov.Core().read_model(src / "openvino_model.xml"), **options)
    out.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, out / "openvino_model.xml", compress_to_fp16=False)
    del model


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
        f"The tokenizer of {hf_dir.name} cannot be converted to OpenVINO ({first_line(exc)}); "
        "OpenVINO GenAI needs openvino_tokenizer.xml and openvino_detokenizer.xml to run the model.",
        hint="Convert with --to onnx, or run the original model with --backend torch.",
    )
