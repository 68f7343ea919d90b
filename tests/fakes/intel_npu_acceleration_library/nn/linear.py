"""FAKE intel_npu_acceleration_library.nn.linear: Linear (fp16) and QuantizedLinear (int8 / packed int4).

Same constructors, attributes (weight, scale, bias, inC, outC, op_id) and class methods as the real 1.4.0
classes; forward runs the fake backend's CPU run_matmul instead of the NPU.
"""

from __future__ import annotations

import math
import uuid

import torch

from intel_npu_acceleration_library.backend import run_matmul
from intel_npu_acceleration_library.dtypes import NPUDtype
from intel_npu_acceleration_library.quantization import compress_to_i4, quantize_tensor


class Linear(torch.nn.Module):
    """Torch Linear operation NPU backend (FAKE: runs on the CPU)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight = torch.nn.Parameter(weight)
        self.bias = torch.nn.Parameter(bias) if isinstance(bias, torch.Tensor) else None
        self.outC, self.inC = self.weight.shape
        self.op_id = str(uuid.uuid4())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = run_matmul(x, self.weight, None, self.op_id)
        return out if self.bias is None else out + self.bias

    @staticmethod
    def fromTorch(layer: torch.nn.Linear, dtype: torch.dtype = torch.float16):
        if any(dim > 2**17 for dim in layer.weight.shape):
            return layer
        return Linear.fromTensor(layer.weight, getattr(layer, "bias", None), dtype)

    @staticmethod
    def fromTensor(weight: torch.Tensor, bias: torch.Tensor | None, dtype=torch.float16):
        if dtype.is_floating_point:
            torch_dtype = dtype.torch_dtype if isinstance(dtype, NPUDtype) else dtype
            return Linear(weight.to(torch_dtype), None if bias is None else bias.to(torch_dtype))
        if isinstance(dtype, NPUDtype):
            weights_quant, scale = quantize_tensor(weight, (dtype.min, dtype.max))
            if dtype.bits == 4:
                weights_quant = compress_to_i4(weights_quant)
            return QuantizedLinear(weights_quant, scale, bias)
        raise RuntimeError(f"intel-npu-acceleration-library library do not support yet the requeste datatype: {dtype}")


class QuantizedLinear(torch.nn.Module):
    """Torch Quantized Linear operation NPU backend (FAKE: runs on the CPU).

    As in the real class, ``weight`` and ``scale`` are plain tensor attributes (not parameters or buffers,
    so ``state_dict()`` does not hold them) and ``scale`` is stored multiplied by sqrt(inC).
    """

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight = weight
        if self.weight.dtype not in (torch.int8, torch.uint8):
            raise RuntimeError(f"Quantized weight must be in torch.(u)int8 dtype instead of {self.weight.dtype}")
        self.outC, self.inC = self.weight.shape
        if self.weight.dtype == torch.uint8:
            self.inC *= 2
        self.scale = scale * math.sqrt(self.inC)
        self.bias = bias
        self.op_id = str(uuid.uuid4())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            raise RuntimeError(
                "Training is not supported for QuantizedLinear layer. Use `.eval()` to do inference only"
            )
        out = run_matmul(x, self.weight, self.scale, self.op_id)
        return out if self.bias is None else out + self.bias
