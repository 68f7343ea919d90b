"""The registry of backends: what each is called, where it lives, which extra installs it.

Probing uses importlib's find_spec only, so listing backends imports no runtime.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass

from phi3cli.errors import BackendUnavailableError


@dataclass(frozen=True)
class BackendSpec:
    """A backend as the registry knows it before importing it."""

    name: str
    module: str
    class_name: str
    extra: str
    probes: tuple[str, ...]  # top-level modules that must be importable
    devices: tuple[str, ...]  # devices it can drive, where present
    formats: tuple[str, ...]  # weight formats it runs; the first is the default
    description: str
    platforms: tuple[str, ...] = ()  # sys.platform values it installs on; empty means all
    platform_note: str = ""  # why it installs only there
    instead: str = ""  # what to use where it is unavailable (a hint naming the flags)

    def missing(self) -> str | None:
        """Why this backend cannot be used here, or None when it can."""
        if self.platforms and sys.platform not in self.platforms:
            why = f": {self.platform_note}" if self.platform_note else ""
            return f"{self.name} installs only on {', '.join(self.platforms)} (this is {sys.platform}){why}"
        absent = [m for m in self.probes if importlib.util.find_spec(m) is None]
        if absent:
            return f"{', '.join(absent)} not installed: pip install 'phi3cli[{self.extra}]'"
        return None

    @property
    def installed(self) -> bool:
        return self.missing() is None


BACKENDS: dict[str, BackendSpec] = {
    spec.name: spec
    for spec in (
        BackendSpec(
            name="torch",
            module="phi3cli.backends.torch_backend",
            class_name="TorchBackend",
            extra="torch",
            probes=("torch", "transformers"),
            devices=("cpu",),
            formats=("fp32", "bf16"),
            description="transformers + PyTorch; the full-precision reference",
        ),
        BackendSpec(
            name="openvino",
            module="phi3cli.backends.openvino",
            class_name="OpenVINOBackend",
            extra="openvino",
            probes=("openvino", "openvino_genai", "openvino_tokenizers"),
            devices=("npu", "gpu", "cpu"),
            formats=("int4", "int8", "fp16"),
            description="OpenVINO GenAI LLMPipeline on IR built by optimum-intel + NNCF",
        ),
        BackendSpec(
            name="onnx",
            module="phi3cli.backends.onnx",
            class_name="OnnxBackend",
            extra="onnx",
            probes=("onnxruntime_genai",),
            devices=("gpu", "cpu"),
            formats=("int4", "fp16", "fp32"),
            description="ONNX Runtime GenAI (CPU, CUDA, DirectML) on its model builder's output",
        ),
        BackendSpec(
            name="npu-lib",
            module="phi3cli.backends.npu_lib",
            class_name="NpuLibBackend",
            extra="npu",
            probes=("intel_npu_acceleration_library",),
            devices=("npu",),
            formats=("int4", "int8", "fp16"),
            description="Intel NPU Acceleration Library (Windows; no longer developed)",
            platforms=("win32",),
            platform_note="its wheels are Windows-only; elsewhere pip builds it from source, which downloads "
            "OpenVINO 2024.4 and accepts only Ubuntu; the library is no longer developed",
            instead="Use OpenVINO GenAI's NPU plugin instead: --backend openvino --device npu.",
        ),
    )
}


def get_spec(name: str) -> BackendSpec:
    try:
        return BACKENDS[name]
    except KeyError:
        raise BackendUnavailableError(
            f"Unknown backend {name!r}.", hint=f"Choose one of: {', '.join(BACKENDS)}."
        ) from None


def get_backend(name: str):
    """An instance of the named backend, or a BackendUnavailableError naming the extra to install."""
    spec = get_spec(name)
    if reason := spec.missing():
        raise BackendUnavailableError(f"The {name} backend is not available: {reason}.", hint=spec.instead or None)
    module = importlib.import_module(spec.module)
    return getattr(module, spec.class_name)()
