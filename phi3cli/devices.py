"""What this machine has: the CPU, and the devices each installed runtime can see.

Each backend's probe (its registry entry) imports only the runtime's light entry module (openvino,
onnxruntime_genai), never torch or transformers, and a probe's failure is reported rather than raised.
"""

from __future__ import annotations

import os
import platform
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from phi3cli.backends import DEVICE_WORDS, registry
from phi3cli.util import first_line


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


def probe(backends: Iterable[str] | None = None) -> DeviceReport:
    """Ask every installed backend (or only those named) what it can run on here."""
    report = DeviceReport(cpu=f"{cpu_name()} ({os.cpu_count()} logical cores)")
    specs = registry()
    wanted = set(specs if backends is None else backends)
    for name, spec in specs.items():
        if name not in wanted:
            continue
        if reason := spec.missing():
            report.missing[name] = reason
            continue
        if spec.probe is None:  # nothing to ask: it runs wherever it installs
            report.present[name], report.details[name] = list(spec.devices), spec.description
            continue
        try:
            report.present[name], report.details[name] = spec.probe()
        except Exception as exc:  # a broken install must not break `phi3 devices`
            report.present[name] = []
            report.details[name] = f"probe failed: {first_line(exc, typed=True)}"
    return report


def npu_checks(report: DeviceReport) -> list[tuple[str, bool | None, str]]:
    """Every way phi3 looks for an NPU: (what was asked, NPU found or None if it could not be asked, what it said)."""
    checks = []
    for name, spec in registry().items():
        if "npu" not in spec.devices:
            continue
        if name in report.missing:
            checks.append((spec.label, None, f"cannot be asked here: {report.missing[name]}"))
        elif name in report.present:
            checks.append((spec.label, "npu" in report.present[name], report.details.get(name, "")))
    return checks


_DEVICE_OF_WORD = {word: device for device, words in DEVICE_WORDS.items() for word in words}


def normalise_device(name: str) -> str | None:
    """cpu, gpu or npu for one device or provider name as a runtime reports it; None if unknown."""
    word = name.strip(" \t[]()'\"").lower().removesuffix("executionprovider")
    word = re.split(r"[.:(\s]", word, maxsplit=1)[0]
    return _DEVICE_OF_WORD.get(word)


def executed_devices(reported: str) -> list[str | None]:
    """The devices in what a runtime reports, which may list several ("GPU.0, CPU" when part of a graph fell back)."""
    parts = [p for p in re.split(r"[,;+]|\s{2,}", reported or "") if p.strip()]
    return [normalise_device(p) for p in parts]
