"""FAKE intel_npu_acceleration_library.nn: the two layer types the real compile() puts into an LLM."""

from .linear import Linear, QuantizedLinear

__all__ = ["Linear", "QuantizedLinear"]
