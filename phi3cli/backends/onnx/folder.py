"""Reading an ONNX Runtime GenAI folder: anything with a genai_config.json.

Built here (`phi3 convert --to onnx`), by the model builder itself, or downloaded (Microsoft's published Phi-3 ONNX
folders).
"""

from __future__ import annotations

import json
from pathlib import Path

from phi3cli.errors import UnsupportedModelError

GENAI_CONFIG = "genai_config.json"
# Files a model folder needs beside the ONNX graph so tokenizer and chat template match the source.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "tokenizer.model",
    "generation_config.json",
)


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
    """int4, fp16 or fp32, read from the ONNX graph's operators and initializer types."""
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
