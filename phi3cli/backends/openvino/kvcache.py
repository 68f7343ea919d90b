"""KV-cache compile properties of the OpenVINO backend, from LoadRequest.options."""

from __future__ import annotations

from typing import Any

from phi3cli.errors import Phi3Error

KV_PRECISIONS = ("u8", "u4", "f16", "bf16", "f32")
BLOCK_TOKENS = {"cpu": 32, "gpu": 16}  # tokens per paged KV block: the CPU and GPU plugins' block sizes
CPU_DECODE_PROPERTIES = {"KV_CACHE_PRECISION": "f16"}  # see decode_properties


def kv_cache_properties(options: dict[str, Any]) -> dict[str, Any]:
    """KV_CACHE_PRECISION and DYNAMIC_QUANTIZATION_GROUP_SIZE where LoadRequest.options sets them (else OpenVINO's).

    With OpenVINO's CPU defaults (a u8 KV cache; activations quantized per group across each prefill, so a token's
    keys depend on the tokens read with it), a kept cache is close to, not equal to, what a prefill of the whole
    conversation computes, and a greedy answer can differ at a near-tie. kv_cache_precision "f16" with
    dynamic_quantization_group_size 0 makes them equal (to float rounding), at the price of slower decoding.
    """
    props: dict[str, Any] = {}
    precision = options.get("kv_cache_precision")
    if precision is not None:
        precision = str(precision).lower()
        if precision not in KV_PRECISIONS:
            raise Phi3Error(
                f"Unknown KV cache precision {precision!r}.", hint=f"Use one of: {', '.join(KV_PRECISIONS)}."
            )
        props["KV_CACHE_PRECISION"] = precision
    group = options.get("dynamic_quantization_group_size")
    if group is not None:
        if int(group) < 0:
            raise Phi3Error(f"dynamic_quantization_group_size must be 0 (off) or more, not {group}.")
        props["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = int(group)
    return props


def decode_properties(device: str) -> dict[str, Any]:
    """What makes one conversation decode faster on the CPU: the KV cache in f16 rather than OpenVINO's u8.

    Measured with scripts/bench_peers.py on Phi-3-mini's widths (README, performance): quantizing and
    dequantizing the u8 cache costs more per token than the bytes it saves at chat lengths. The continuous-batching
    pipeline keeps u8 (many sequences share its pool, which is sized for u8).
    """
    return dict(CPU_DECODE_PROPERTIES) if device == "cpu" else {}
