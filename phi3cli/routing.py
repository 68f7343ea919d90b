"""Which backend runs a request on which device, decided from what is present: a pure function."""

from __future__ import annotations

from dataclasses import dataclass

from phi3cli.backends import BACKENDS
from phi3cli.devices import DeviceReport
from phi3cli.errors import BackendUnavailableError, DeviceUnavailableError

# Best first. The NPU library is never picked automatically: it is unmaintained, and OpenVINO's
# NPU plugin runs the same hardware; `--backend npu-lib` asks for it.
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


def _seen(report: DeviceReport) -> str:
    parts = [report.details[b] for b in report.details] + [f"{b}: {why}" for b, why in report.missing.items()]
    return "; ".join(parts)


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
            raise BackendUnavailableError(f"The {backend} backend is not available: {report.missing[backend]}.")
    candidates = [(b, d) for b, d in PREFERENCE if (backend is None or b == backend)]
    if device != "auto":
        candidates = [(b, d) for b, d in candidates if d == device]
    elif backend is None:
        candidates = [(b, d) for b, d in candidates if b not in AUTO_EXCLUDED]
    for b, d in candidates:
        if d in report.present.get(b, []):
            if device == "auto":
                reason = f"auto: picked {d} with {b} (best present; {_seen(report)})"
            else:
                reason = f"{d} with {b}"
            return Route(b, d, reason)
    wanted = device if device != "auto" else "any device"
    has = sorted({d for devs in report.present.values() for d in devs}) or ["nothing usable"]
    instead = next((d for d in ("gpu", "cpu") if d in has and d != device), None)
    raise DeviceUnavailableError(
        f"No {wanted}" + (f" for the {backend} backend" if backend else "") + f" here. Looked for: {_seen(report)}. "
        f"This machine has: {', '.join(has)}.",
        hint=f"Run on it with --device {instead}." if instead else "Install a backend: pip install 'phi3cli[all]'.",
    )
