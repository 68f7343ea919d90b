"""The torch backend: transformers + PyTorch on the CPU at full precision, the reference the others are measured by.

This module holds only the registry entry; the runtime is in runtime.py.
"""

from __future__ import annotations

from phi3cli.backends import BackendSpec


def probe() -> tuple[list[str], str]:
    return ["cpu"], "PyTorch: CPU"


SPEC = BackendSpec(
    name="torch",
    factory="phi3cli.backends.torch_backend.runtime:TorchBackend",
    extra="torch",
    requires=("torch", "transformers"),
    devices=("cpu",),
    formats=("fp32", "bf16"),
    description="transformers + PyTorch; the full-precision reference",
    preference=(("cpu", 60),),
    probe=probe,
    probe_label="PyTorch",
    libraries=("torch", "transformers", "accelerate", "safetensors"),
    reference=True,
)
