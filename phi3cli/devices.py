"""What this machine has: the CPU, and the devices each installed runtime can see.

Probes import only the runtime's light entry module (openvino, onnxruntime_genai), never torch
or transformers, and each probe's failure is reported rather than raised.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Iterable
from dataclasses import dataclass, field

from phi3cli.backends import BACKENDS


@dataclass
class DeviceReport:
    """Devices per backend (only installed backends), with what each probe saw, for messages."""

    cpu: str
    present: dict[str, list[str]] = field(default_factory=dict)  # backend -> devices, best first
    details: dict[str, str] = field(default_factory=dict)  # backend -> what its probe saw
    missing: dict[str, str] = field(default_factory=dict)  # backend -> why it is unavailable


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def openvino_devices() -> tuple[list[str], str]:
    """Devices OpenVINO lists (CPU, GPU, GPU.0, NPU...), mapped to phi3's cpu/gpu/npu."""
    import openvino as ov

    found = list(ov.Core().available_devices)
    mapped = [d for d in ("npu", "gpu", "cpu") if any(x.split(".")[0].lower() == d for x in found)]
    return mapped, "OpenVINO devices: " + (", ".join(found) or "none")


def onnx_devices() -> tuple[list[str], str]:
    """CPU always; gpu where ONNX Runtime GenAI was built with DirectML or CUDA."""
    import onnxruntime_genai as og

    providers = [
        name
        for name, check in (("DirectML", "is_dml_available"), ("CUDA", "is_cuda_available"))
        if getattr(og, check, lambda: False)()
    ]
    devices = (["gpu"] if providers else []) + ["cpu"]
    missing = "" if providers else " (GPU: onnxruntime-genai-directml on Windows, onnxruntime-genai-cuda for CUDA)"
    return devices, "ONNX Runtime GenAI providers: " + ", ".join(providers + ["CPU"]) + missing


def npu_lib_devices() -> tuple[list[str], str]:
    """The NPU library's own check, npu_available() (importing the library imports torch and transformers)."""
    from intel_npu_acceleration_library.backend import npu_available

    ok = bool(npu_available())
    return (["npu"] if ok else []), f"{PROBE_LABELS['npu-lib']}: {ok}"


def torch_devices() -> tuple[list[str], str]:
    return ["cpu"], "PyTorch: CPU"


PROBES = {"openvino": openvino_devices, "onnx": onnx_devices, "npu-lib": npu_lib_devices, "torch": torch_devices}
# What each probe asks, for messages that say where phi3 looked.
PROBE_LABELS = {
    "openvino": "OpenVINO's device list",
    "onnx": "ONNX Runtime GenAI's providers",
    "npu-lib": "the Intel NPU Acceleration Library's npu_available()",
    "torch": "PyTorch",
}


def probe(backends: Iterable[str] | None = None) -> DeviceReport:
    """Ask every installed backend (or only those named) what it can run on here."""
    report = DeviceReport(cpu=f"{cpu_name()} ({os.cpu_count()} logical cores)")
    wanted = set(BACKENDS if backends is None else backends)
    for name, spec in BACKENDS.items():
        if name not in wanted:
            continue
        if reason := spec.missing():
            report.missing[name] = reason
            continue
        try:
            report.present[name], report.details[name] = PROBES[name]()
        except Exception as exc:  # a broken install must not break `phi3 devices`
            report.present[name] = []
            report.details[name] = f"probe failed: {exc.__class__.__name__}: {exc}".splitlines()[0]
    return report


def npu_checks(report: DeviceReport) -> list[tuple[str, bool | None, str]]:
    """Both ways phi3 looks for an NPU: (what was asked, NPU found or None if it could not be asked, what it said)."""
    checks = []
    for name in ("openvino", "npu-lib"):
        label = PROBE_LABELS[name]
        if name in report.missing:
            checks.append((label, None, f"cannot be asked here: {report.missing[name]}"))
        elif name in report.present:
            checks.append((label, "npu" in report.present[name], report.details.get(name, "")))
    return checks
