"""FAKE intel_npu_acceleration_library.compiler: CompilerConfig and compile(), as in the real 1.4.0.

The real compile() applies Llama/Gemma-only fusions (Phi-3's modules are untouched), quantizes int4/int8 with
Intel Neural Compressor and lowers every torch.nn.Linear to nn.Linear (fp16) or nn.QuantizedLinear. This fake
produces the same layer types directly.
"""

from __future__ import annotations

import torch

from intel_npu_acceleration_library import _fake
from intel_npu_acceleration_library import nn as npu_nn
from intel_npu_acceleration_library.dtypes import NPUDtype, int4, int8


class CompilerConfig:
    """Configuration class to store the compilation configuration of a model for the NPU (FAKE mirror)."""

    def __init__(self, use_to: bool = False, dtype: torch.dtype | NPUDtype = torch.float16, training: bool = False):
        _fake.record("CompilerConfig", use_to=use_to, dtype=dtype, training=training)
        self.use_to = use_to
        self.dtype = dtype
        self.training = training


def _lower(module: torch.nn.Module, dtype) -> None:
    for name, layer in module.named_children():
        if isinstance(layer, torch.nn.Linear):
            if dtype in (int8, int4):
                new = npu_nn.Linear.fromTensor(layer.weight.detach(), layer.bias, dtype)
            else:
                new = npu_nn.Linear.fromTorch(layer)
            module.add_module(name, new)
        else:
            _lower(layer, dtype)


def compile(model: torch.nn.Module, config: CompilerConfig) -> torch.nn.Module:
    """Compile a model for the NPU (FAKE: same layer types, CPU arithmetic)."""
    if not (config.dtype.is_floating_point or config.dtype in (int8, int4)):
        raise RuntimeError(
            f"intel-npu-acceleration-library library do not support yet the requeste datatype: {config.dtype}"
        )
    with torch.no_grad():
        _lower(model, config.dtype)
    return model.eval()
