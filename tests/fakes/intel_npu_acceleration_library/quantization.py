"""FAKE intel_npu_acceleration_library.quantization: the real symmetric per-channel quantizer and int4 packing.

The real compile() quantizes int4/int8 through Intel Neural Compressor (RTN, symmetric, per channel) and then
lowers each layer to nn.QuantizedLinear; this fake goes straight to the same layer type with the library's
own quantize_tensor (also used by the real nn.Linear.fromTensor) and packs int4 the way its C++
compressToI4 does (low nibble first).
"""

from __future__ import annotations

import torch


def quantize_tensor(weight: torch.Tensor, min_max_range: tuple[int, int] = (-128, 127)):
    """Quantize a tensor symmetrically per output channel: W = S * W_q (int8 values, fp16 scale)."""
    scale = torch.max(torch.abs(weight), dim=-1).values
    if torch.any(scale == 0):
        scale = torch.ones_like(scale) * torch.max(torch.abs(weight))
    scale = (scale / max(min_max_range)).to(torch.float16).view(-1, 1)
    weights_quant = torch.floor(weight / scale).clamp(min(min_max_range), max(min_max_range))
    return weights_quant.to(torch.int8), scale


def compress_to_i4(weights: torch.Tensor) -> torch.Tensor:
    """Pack two int4 values per byte along the input dimension (uint8, shape [out, in // 2])."""
    w = weights.contiguous().view(torch.uint8).view(weights.shape[0], -1, 2)
    return (w[..., 0] & 0x0F) | ((w[..., 1] & 0x0F) << 4)
