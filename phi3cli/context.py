"""A model's context window and the KV-cache memory a full window takes, read from its folder's config files.

A 128k Phi-3 holds 131072 tokens only if there is memory for their keys and values: layers x KV heads x
head size x 2 (keys and values) x bytes per value, per token. Reading it needs no runtime, only config.json
(a Hugging Face or OpenVINO folder) or genai_config.json (ONNX Runtime GenAI).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# Windows above this are "long": the /model line and bench say what their KV cache costs.
LONG_CONTEXT = 8192
FP16_BYTES = 2


@dataclass(frozen=True)
class AttentionShape:
    """What sizes the KV cache: per layer, per token, num_kv_heads x head_dim values for keys and again for values."""

    layers: int
    kv_heads: int
    head_dim: int

    def kv_cache_bytes(self, tokens: int, bytes_per_value: int = FP16_BYTES) -> int:
        return self.layers * self.kv_heads * self.head_dim * 2 * bytes_per_value * tokens


def attention_shape(folder: Path) -> AttentionShape | None:
    """The attention shape a model folder declares (genai_config.json first, then config.json), None if unknown."""
    folder = Path(folder)
    try:
        genai = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
        return AttentionShape(
            int(genai["num_hidden_layers"]), int(genai["num_key_value_heads"]), int(genai["head_size"])
        )
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        config = json.loads((folder / "config.json").read_text())
        heads = int(config["num_attention_heads"])
        head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
        kv_heads = int(config.get("num_key_value_heads") or heads)
        return AttentionShape(int(config["num_hidden_layers"]), kv_heads, head_dim)
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return None


def full_context_kv_bytes(folder: Path, context_length: int) -> int | None:
    """Bytes of an fp16 KV cache holding the whole window, or None when the folder does not say its shape."""
    shape = attention_shape(folder)
    return shape.kv_cache_bytes(context_length) if shape else None


def fmt_memory(value: int) -> str:
    return f"{value / 1e9:.1f} GB" if value >= 1e9 else f"{value / 1e6:.0f} MB"


def describe_context(context_length: int, folder: Path) -> str:
    """'context 131072 tokens (KV cache at full context: 51.5 GB at fp16)'; the cost only for long windows."""
    text = f"context {context_length} tokens"
    kv = full_context_kv_bytes(folder, context_length) if context_length > LONG_CONTEXT else None
    return text + (f" (KV cache at full context: {fmt_memory(kv)} at fp16)" if kv else "")
