"""Reading an IR folder: which files it needs, the precision its weights are stored in, its context length."""

from __future__ import annotations

import json
import math
from pathlib import Path

import openvino as ov

from phi3cli.errors import UnsupportedModelError
from phi3cli.util import first_line

IR_FILES = ("openvino_model.xml", "openvino_model.bin")
VISION_MARKER = "openvino_language_model.xml"  # a vision-language model's IRs (phi3cli/backends/openvino/vision.py)
VISION_FILES = (
    VISION_MARKER,
    "openvino_language_model.bin",
    "openvino_text_embeddings_model.xml",
    "openvino_text_embeddings_model.bin",
    "openvino_vision_embeddings_model.xml",
    "openvino_vision_embeddings_model.bin",
    "openvino_vision_projection_model.xml",
    "openvino_vision_projection_model.bin",
)
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
            f"{xml.parent} cannot be read as an OpenVINO model: {first_line(exc)}",
            hint="Export it again: phi3 convert MODEL --to openvino -o DIR.",
        ) from exc
    for fmt in ("int4", "int8", "fp16"):
        if summary.get(fmt, 0) > 0.05:
            return fmt
    return "fp32"


def main_xml(folder: Path) -> str:
    """The IR whose weights say the folder's format: the language model of a vision model, else the model."""
    return VISION_MARKER if (folder / VISION_MARKER).is_file() else IR_FILES[0]


def check_ir(folder: Path) -> None:
    """Refuse a folder that is not a complete IR for LLMPipeline (or VLMPipeline), naming what is missing."""
    needed = VISION_FILES if (folder / VISION_MARKER).is_file() else IR_FILES
    missing = [
        name
        for name in needed + TOKENIZER_FILES
        if not (folder / name).is_file() or (folder / name).stat().st_size == 0
    ]
    if not missing:
        return
    if any(not name.startswith("openvino_tok") and not name.startswith("openvino_detok") for name in missing):
        raise UnsupportedModelError(
            f"{folder} is not a complete OpenVINO model: {', '.join(missing)} missing or empty.",
            hint="Export it again: phi3 convert MODEL --to openvino -o DIR.",
        )
    raise UnsupportedModelError(
        f"{folder} has no OpenVINO tokenizer ({', '.join(missing)} missing), which OpenVINO GenAI needs.",
        hint=f"Add it with openvino-tokenizers: convert_tokenizer {folder} --with-detokenizer -o {folder}",
    )


def context_length(folder: Path) -> int:
    """The context window the IR's config.json gives (4096 when it gives none)."""
    try:
        config = json.loads((folder / "config.json").read_text())
        return int(config.get("max_position_embeddings") or config.get("n_positions") or 4096)
    except (OSError, ValueError, TypeError):
        return 4096
