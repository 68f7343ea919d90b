"""FAKE intel_npu_acceleration_library.backend: npu_available(), get_driver_version() and run_matmul().

The real module talks to the NPU driver through a native library; this fake answers from ``_fake.NPU_PRESENT``
and runs matmuls on the CPU with torch.
"""

from __future__ import annotations

import math

import torch

from intel_npu_acceleration_library import _fake


def npu_available() -> bool:
    """Return if the NPU is available (FAKE: what the test set; False unless a test pretends otherwise)."""
    _fake.record("npu_available")
    return _fake.NPU_PRESENT


def get_driver_version() -> int:
    if not npu_available():
        raise RuntimeError("NPU is not available on this system")
    return 2408


_weights: dict[tuple, torch.Tensor] = {}  # like the real runtime's per-op cache: prepared once per layer


def clear_cache() -> None:
    """Clear the cache of models (FAKE: the prepared weights)."""
    _weights.clear()


@torch.no_grad()
def run_matmul(x: torch.Tensor, weights: torch.Tensor, scale: torch.Tensor | None = None, op_id: str | None = None):
    """x @ weights.T for float, int8 or packed-int4 (uint8) weights; the result has x's dtype (CPU, FAKE)."""
    key = (op_id, weights.data_ptr(), None if scale is None else scale.data_ptr())
    if op_id is None or key not in _weights:
        w = _dequantize(weights, scale)
        if op_id is None:
            return torch.nn.functional.linear(x.float(), w).to(x.dtype)
        _weights[key] = w
    return torch.nn.functional.linear(x.float(), _weights[key]).to(x.dtype)


def _dequantize(weights: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    out_c, in_c = weights.shape[-2:]
    if weights.dtype.is_floating_point:
        w = weights.float()
    elif weights.dtype in (torch.int8, torch.uint8):
        if scale is None:
            raise RuntimeError("Quantized weights require a not null scale")
        if weights.dtype == torch.uint8:
            in_c *= 2
            low = (weights & 0x0F).to(torch.int16)
            high = ((weights >> 4) & 0x0F).to(torch.int16)
            q = torch.stack((low - (low & 0x8) * 2, high - (high & 0x8) * 2), dim=2).view(out_c, in_c)
        else:
            q = weights
        # QuantizedLinear hands over scale * sqrt(in_c); the real kernel compensates the same way.
        w = q.float() * (scale.float().view(-1, 1) / math.sqrt(in_c))
    else:
        raise RuntimeError(f"Unsupported dtype for weights {weights.dtype}")
    return w


__all__ = ["npu_available", "get_driver_version", "run_matmul", "clear_cache"]
