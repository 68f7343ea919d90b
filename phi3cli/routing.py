"""Which backend runs a request on which device, decided from what is present: a pure function."""

from __future__ import annotations

from dataclasses import dataclass

from phi3cli.backends import BACKENDS
from phi3cli.devices import PROBE_LABELS, DeviceReport
from phi3cli.errors import BackendUnavailableError, DeviceUnavailableError

# Best first. The NPU library is picked only when named (`--backend npu-lib`), even for `--device npu`:
# it is unmaintained, and OpenVINO GenAI's NPU plugin runs the same hardware.
PREFERENCE = [
    ("openvino", "npu"),
    ("openvino", "gpu"),
    ("onnx", "gpu"),
    ("openvino", "cpu"),
    ("onnx", "cpu"),
    ("torch", "cpu"),
    ("npu-lib", "npu"),
]
AUTO_EXCLUDED = {"npu-lib"}


@dataclass(frozen=True)
class Route:
    backend: str
    device: str
    reason: str


def _seen(report: DeviceReport, device: str = "auto", backend: str | None = None) -> str:
    """What each probe saw; for one device, only the backends that can drive it (for npu: OpenVINO and the library)."""
    names = [b for b in BACKENDS if (device == "auto" or device in BACKENDS[b].devices) and backend in (None, b)]
    parts = []
    for b in names:
        if b in report.missing:
            parts.append(f"{PROBE_LABELS.get(b, b)} cannot be asked here ({report.missing[b]})")
        elif b in report.details:
            parts.append(report.details[b])
    return "; ".join(parts)


def _tried(report: DeviceReport, candidates: list[tuple[str, str]], chosen: tuple[str, str]) -> str:
    """Each (backend, device) considered before the choice, in order of preference, and whether it was there."""
    marks = []
    for b, d in candidates:
        present = d in report.present.get(b, [])
        marks.append(f"{d}/{b} " + ("yes" if present else "not installed" if b in report.missing else "no"))
        if (b, d) == chosen:
            break
    return ", ".join(marks)


def choose_route(
    report: DeviceReport, *, device: str = "auto", backend: str | None = None, runtime: str | None = None
) -> Route:
    """Pick (backend, device) for a request; raise with what was looked for when nothing fits.

    runtime is the backend a prebuilt model folder belongs to (an OpenVINO IR, an ONNX folder).
    """
    if runtime:
        if backend and backend != runtime:
            raise BackendUnavailableError(
                f"The model is an {runtime} model; it cannot run with --backend {backend}.",
                hint=f"Use --backend {runtime}, or give the original model to convert it.",
            )
        backend = runtime
    if backend:
        spec = BACKENDS.get(backend)
        if spec is None:
            raise BackendUnavailableError(
                f"Unknown backend {backend!r}.", hint=f"Choose one of: {', '.join(BACKENDS)}."
            )
        if backend in report.missing:
            raise BackendUnavailableError(
                f"The {backend} backend is not available: {report.missing[backend]}.", hint=spec.instead or None
            )
    candidates = [(b, d) for b, d in PREFERENCE if (backend is None or b == backend)]
    if device != "auto":
        candidates = [(b, d) for b, d in candidates if d == device]
    if backend is None:
        candidates = [(b, d) for b, d in candidates if b not in AUTO_EXCLUDED]
    for b, d in candidates:
        if d in report.present.get(b, []):
            if device == "auto":
                reason = f"auto: picked {d} with {b}; looked for, best first: {_tried(report, candidates, (b, d))} ({_seen(report)})"
            else:
                reason = f"{d} with {b}"
            return Route(b, d, reason)
    wanted = device.upper() if device != "auto" else "usable device"
    has = set(report.present.get(backend, [])) if backend else {d for devs in report.present.values() for d in devs}
    instead = next((d for d in ("gpu", "cpu") if d in has and d != device), None)
    hint = None
    if not instead:
        hint = (
            f"Leave out --backend {backend} and use --device cpu (or gpu)."
            if backend
            else "Install a backend: pip install 'phi3cli[all]'."
        )
    if backend is None and device != "auto":
        excluded = [b for b in AUTO_EXCLUDED if device in report.present.get(b, [])]
        if excluded:  # only the library sees it: say so rather than pretend nothing is there
            raise DeviceUnavailableError(
                f"Only the {excluded[0]} backend sees a{'n' if device == 'npu' else ''} {wanted} here "
                f"({_seen(report, device)}).",
                hint=f"Use it with --backend {excluded[0]}, or install OpenVINO GenAI's NPU plugin: "
                "pip install 'phi3cli[openvino]'.",
            )
    raise DeviceUnavailableError(
        f"No {wanted}" + (f" for the {backend} backend" if backend else "") + " found. "
        f"Looked for it with: {_seen(report, device, backend)}. This machine has: {_machine(report)}.",
        hint=hint,
        instead=instead,
    )


def _machine(report: DeviceReport) -> str:
    """What the machine has, by the probes: the CPU by name, and any GPU or NPU a runtime sees."""
    found = {d for devs in report.present.values() for d in devs}
    others = [d.upper() for d in ("npu", "gpu") if d in found]
    return ", ".join([f"CPU — {report.cpu}", *others])


def backends_to_probe(device: str = "auto", backend: str | None = None) -> list[str] | None:
    """Which backends a request needs probed; None for all but the NPU library.

    Asking the library (npu_available()) imports it, which imports torch and transformers and patches torch;
    so it is asked only for --device npu or --backend npu-lib (and by `phi3 devices`).
    """
    if backend:
        return [backend]
    if device == "npu":
        return [b for b in BACKENDS if "npu" in BACKENDS[b].devices]
    return [b for b in BACKENDS if b not in AUTO_EXCLUDED]
