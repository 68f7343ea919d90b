"""The onnx backend: ONNX Runtime GenAI's model builder makes the folder, its Generator runs it on CPU, DirectML
or CUDA.

This module holds only the registry entry and the device probe; the runtime lives beside it: providers (which
execution provider runs a folder), folder (reading genai_config.json), runtime (og.Model and the generate loop),
build (the model builder), quantize (the int4 quantizer), backend (the facade).
"""

from __future__ import annotations

import json
from pathlib import Path

from phi3cli.backends import BackendSpec


def probe() -> tuple[list[str], str]:
    """CPU always; gpu where ONNX Runtime GenAI was built with DirectML or CUDA."""
    from phi3cli.backends.onnx.providers import available_providers

    providers = [label for name, label in (("dml", "DirectML"), ("cuda", "CUDA")) if name in available_providers()]
    devices = (["gpu"] if providers else []) + ["cpu"]
    missing = "" if providers else " (GPU: onnxruntime-genai-directml on Windows, onnxruntime-genai-cuda for CUDA)"
    return devices, "ONNX Runtime GenAI providers: " + ", ".join(providers + ["CPU"]) + missing


def folder_devices(folder: Path) -> tuple[str, ...]:
    """What a folder's genai_config.json builds it for: the CPU when it names no provider, the GPU when this ONNX
    Runtime GenAI has every provider it names, nothing when it names one missing here (cleared, it runs on the CPU)."""
    from phi3cli.backends.onnx.providers import available_providers, configured_providers

    try:
        configured = configured_providers(json.loads((folder / "genai_config.json").read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return ()
    if not configured:
        return ("cpu",)
    try:
        available = available_providers()
    except ImportError:
        available = set()
    return ("gpu",) if set(configured) <= available else ()


SPEC = BackendSpec(
    name="onnx",
    factory="phi3cli.backends.onnx.backend:OnnxBackend",
    extra="onnx",
    requires=("onnxruntime_genai",),
    devices=("gpu", "cpu"),
    formats=("int4", "fp16", "fp32"),
    description="ONNX Runtime GenAI (CPU, CUDA, DirectML) on its model builder's output",
    preference=(("gpu", 30), ("cpu", 50)),
    marker="genai_config.json",
    folder_devices=folder_devices,
    probe=probe,
    probe_label="ONNX Runtime GenAI's providers",
    convert_targets=("cpu", "dml", "cuda"),
    quantizes="folder",
    quantize_input="an ONNX Runtime GenAI folder (fp16 or fp32)",
    quantize_make="phi3 convert {model} --to onnx --format fp32 -o DIR",
    libraries=(
        "onnxruntime-genai",
        "onnxruntime-genai-directml",
        "onnxruntime-genai-cuda",
        "onnxruntime",
        "onnx-ir",
        "onnx",
        "transformers",
    ),
    constrains=True,  # llguidance, through GeneratorParams.set_guidance
)
