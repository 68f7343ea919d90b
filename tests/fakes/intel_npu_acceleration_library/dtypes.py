"""FAKE intel_npu_acceleration_library.dtypes: NPUDtype and the module-level dtypes, as in the real 1.4.0."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class NPUDtype:
    """A data type for the NPU (FAKE mirror of the real dataclass: name, bits, min, max, torch_dtype)."""

    name: str
    bits: int
    min: int
    max: int
    torch_dtype: torch.dtype

    @property
    def is_floating_point(self) -> bool:
        return self.torch_dtype.is_floating_point

    def __eq__(self, value) -> bool:
        if isinstance(value, torch.dtype):
            info = torch.finfo(value) if value.is_floating_point else torch.iinfo(value)
            return (
                self.bits == info.bits and self.max == info.max and self.min == info.min and self.torch_dtype == value
            )
        return super().__eq__(value)

    def __repr__(self) -> str:
        return self.name


float16 = NPUDtype("fp16", 16, torch.finfo(torch.float16).min, torch.finfo(torch.float16).max, torch.float16)
bfloat16 = NPUDtype("bf16", 16, torch.finfo(torch.bfloat16).min, torch.finfo(torch.bfloat16).max, torch.bfloat16)
int4 = NPUDtype("int4", 4, -8, 7, torch.int8)
int8 = NPUDtype("int8", 8, -128, 127, torch.int8)
