"""The npu-lib backend: the Intel NPU Acceleration Library (Windows wheels only; no longer developed).

This module holds only the registry entry and the NPU check; the quantizer, the safe storage format and the
runtime are in backend.py.
"""

from __future__ import annotations

from phi3cli.backends import BackendSpec

MANIFEST = "npu_model.json"  # marks a folder as this backend's own format


def probe() -> tuple[list[str], str]:
    """The library's own check, npu_available() (importing the library imports torch and transformers)."""
    from intel_npu_acceleration_library.backend import npu_available

    ok = bool(npu_available())
    return (["npu"] if ok else []), f"{SPEC.probe_label}: {ok}"


SPEC = BackendSpec(
    name="npu-lib",
    factory="phi3cli.backends.npu_lib.backend:NpuLibBackend",
    extra="npu",
    requires=("intel_npu_acceleration_library",),
    devices=("npu",),
    formats=("int4", "int8", "fp16"),
    description="Intel NPU Acceleration Library (Windows; no longer developed)",
    # Picked only when named (`--backend npu-lib`), even for --device npu: it is unmaintained, and OpenVINO GenAI's
    # NPU plugin runs the same hardware.
    preference=(("npu", 90),),
    auto=False,
    marker=MANIFEST,
    probe=probe,
    probe_label="the Intel NPU Acceleration Library's npu_available()",
    probe_on_demand=True,  # importing the library imports torch and transformers and patches torch
    quantizes="source",
    quantize_input="a Hugging Face model (folder, hub id, .gguf or `demo`)",
    libraries=("transformers", "torch"),
    platforms=("win32",),
    platform_note="its wheels are Windows-only; elsewhere pip builds it from source, which downloads "
    "OpenVINO 2024.4 and accepts only Ubuntu; the library is no longer developed",
    instead="Use OpenVINO GenAI's NPU plugin instead: --backend openvino --device npu.",
)
