"""KV-cache compile properties of the OpenVINO backend, from LoadRequest.options."""

from __future__ import annotations

from typing import Any

BLOCK_TOKENS = {"cpu": 32, "gpu": 16}  # tokens per paged KV block: the CPU and GPU plugins' block sizes
CPU_DECODE_PROPERTIES = {"KV_CACHE_PRECISION": "f16"}  # see decode_properties


def kv_cache_properties(options: dict[str, Any]) -> dict[str, Any]:
    """KV_CACHE_PRECISION and DYNAMIC_QUANTIZATION_GROUP_SIZE where the (checked) options set them, else OpenVINO's.

    With OpenVINO's CPU defaults (a u8 KV cache; activations quantized per group across each prefill, so a token's
    keys depend on the tokens read with it), a kept cache is close to, not equal to, what a prefill of the whole
    conversation computes, and a greedy answer can differ at a near-tie. kv_cache_precision "f16" with
    dynamic_quantization_group_size 0 makes them equal (to float rounding), at the price of slower decoding.
    """
    props: dict[str, Any] = {}
    if (precision := options.get("kv_cache_precision")) is not None:
        props["KV_CACHE_PRECISION"] = str(precision).lower()
    if (group := options.get("dynamic_quantization_group_size")) is not None:
        props["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = int(group)
    return props


def decode_properties(device: str) -> dict[str, Any]:
    """What makes one conversation decode faster on the CPU: the KV cache in f16 rather than OpenVINO's u8.

    Quantizing and dequantizing the u8 cache costs more per token than the bytes it saves at chat lengths (the figures are in
    CHANGELOG.md). The continuous-batching pipeline keeps u8 (many sequences share its pool,
    which is sized for u8).
    """
    return dict(CPU_DECODE_PROPERTIES) if device == "cpu" else {}
