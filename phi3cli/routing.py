"""Which backend runs a request on which device, decided from what is present: a pure function."""

from __future__ import annotations

from dataclasses import dataclass

from phi3cli.backends import LISTING_ORDER, get_spec, registry
from phi3cli.devices import DeviceReport
from phi3cli.errors import BackendUnavailableError, DeviceUnavailableError


@dataclass(frozen=True)
class Route:
    backend: str
    device: str
    reason: str


def given(backend: str, device: str) -> Route:
    """A route chosen by the caller, not by probing: bench attempts each configuration it planned as asked."""
    return Route(backend, device, f"{device} with {backend}")


def _seen(report: DeviceReport, device: str = "auto", backend: str | None = None) -> str:
    """What each probe saw; for one device, only the backends that can drive it (for npu: OpenVINO and the library)."""
    specs = registry()
    names = [b for b, s in specs.items() if (device == "auto" or device in s.devices) and backend in (None, b)]
    parts = []
    for b in names:
        if b in report.missing:
            parts.append(f"{specs[b].label} cannot be asked here ({report.missing[b]})")
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


def preference() -> list[tuple[str, str]]:
    """Every (backend, device) pair, best first, by the ranks in the backends' registry entries."""
    pairs = [(rank, b, d) for b, spec in registry().items() for d, rank in spec.preference]
    return [(b, d) for _, b, d in sorted(pairs)]


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
        spec = get_spec(backend)
        if backend in report.missing:
            raise BackendUnavailableError(
                f"The {backend} backend is not available: {report.missing[backend]}.", hint=spec.instead or None
            )
        if device != "auto":
            spec.check(device=device)
    specs = registry()
    candidates = [(b, d) for b, d in preference() if (backend is None or b == backend)]
    if device != "auto":
        candidates = [(b, d) for b, d in candidates if d == device]
    if backend is None:
        candidates = [(b, d) for b, d in candidates if specs[b].auto]
    for b, d in candidates:
        if d in report.present.get(b, []):
            if device == "auto":
                reason = f"auto: picked {d} with {b}; looked for, best first: {_tried(report, candidates, (b, d))} ({_seen(report)})"
                return Route(b, d, reason)
            return given(b, d)
    wanted = device.upper() if device != "auto" else "usable device"
    has = set(report.present.get(backend, [])) if backend else {d for devs in report.present.values() for d in devs}
    instead = next((d for d in LISTING_ORDER if d in has and d not in (device, "npu")), None)  # never sent to an NPU
    hint = None
    if not instead:
        hint = (
            f"Leave out --backend {backend} and use --device cpu (or gpu)."
            if backend
            else "Install a backend: pip install 'phi3cli[all]'."
        )
    if backend is None and device != "auto":
        excluded = [b for b, s in specs.items() if not s.auto and device in report.present.get(b, [])]
        if excluded:  # only a backend that is never picked by itself sees it: say so rather than pretend nothing is
            usual = next((specs[b] for b, d in preference() if d == device and specs[b].auto), None)
            other = f", or install the {usual.name} backend: pip install 'phi3cli[{usual.extra}]'" if usual else ""
            raise DeviceUnavailableError(
                f"Only the {excluded[0]} backend sees a{'n' if device == 'npu' else ''} {wanted} here "
                f"({_seen(report, device)}).",
                hint=f"Use it with --backend {excluded[0]}{other}.",
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
    others = [d.upper() for d in LISTING_ORDER if d in found and d != "cpu"]
    return ", ".join([f"CPU — {report.cpu}", *others])


def backends_to_probe(device: str = "auto", backend: str | None = None) -> list[str]:
    """Which backends a request needs probed.

    A probe that is costly (the NPU library's npu_available() imports torch and transformers and patches torch)
    is asked only when its backend is named or its device is asked for (and by `phi3 devices`).
    """
    if backend:
        return [backend]
    if device != "auto":
        return [b for b, s in registry().items() if device in s.devices]
    return [b for b, s in registry().items() if not s.probe_on_demand]
