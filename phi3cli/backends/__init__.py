"""The registry of backends: each is described once, by the BackendSpec its package exports.

Backends are found through the entry-point group ``phi3cli.backends``; the built-in ones register there the same
way a backend in its own package does (pyproject.toml)::

    [project.entry-points."phi3cli.backends"]
    openvino = "phi3cli.backends.openvino:SPEC"

A spec lives in a light module (no runtime imports): loading the registry imports only the specs, probing whether a
backend is installed uses importlib's find_spec, and the runtime itself is imported only by get_backend. Routing,
device probing, sources, bench and the CLI all read these specs; nothing outside a backend's package spells its name.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from phi3cli.backends.options import BackendOption
from phi3cli.errors import BackendUnavailableError, DeviceUnavailableError, Phi3Error, UnsupportedModelError

ENTRY_POINT_GROUP = "phi3cli.backends"

# The devices phi3 runs on, each with the words runtimes use for it in what they report ("GPU.0",
# "DmlExecutionProvider", "cuda:0"). Options, routes, tables and checks all read these; a spec names a subset.
DEVICE_WORDS = {
    "cpu": ("cpu",),
    "gpu": ("gpu", "dml", "directml", "cuda", "tensorrt", "rocm", "migraphx", "webgpu", "xpu", "mps"),
    "npu": ("npu", "qnn", "vitisai"),
}
DEVICES = tuple(DEVICE_WORDS)
LISTING_ORDER = DEVICES[::-1]  # how tables and messages list devices: the accelerators first
# Weight formats, narrowest first; a spec's formats are drawn from these (its first is its default).
FORMATS = ("int4", "int8", "fp16", "bf16", "fp32")


@dataclass(frozen=True)
class BackendSpec:
    """Everything phi3 knows about a backend before importing it."""

    name: str
    factory: str  # "module:Class" of its Backend, imported only when the backend is used
    extra: str  # pip install 'phi3cli[extra]' brings it
    requires: tuple[str, ...]  # top-level modules that must be importable
    devices: tuple[str, ...]  # devices it can drive, where present
    formats: tuple[str, ...]  # weight formats it runs; the first is its default
    description: str
    # Rank per device for --device auto and for choosing among backends (lower is preferred).
    preference: tuple[tuple[str, int], ...] = ()
    auto: bool = True  # whether routing may pick it when no --backend is named
    marker: str | None = None  # the file that marks a folder in its own format; None: it runs Hugging Face folders
    other_markers: tuple[str, ...] = ()  # files that mark other kinds of its folders (a vision model's IRs)
    vision_types: tuple[str, ...] = ()  # config model_types of vision-language models it converts and runs
    # Of those, the ones whose conversion runs the checkpoint's own code: only with --trust-remote-code.
    remote_code_types: tuple[str, ...] = ()
    # For a folder in its own format, read from its marker file alone (before its weights are downloaded): the
    # devices it is built to run on here. None: every device in `devices` (an IR runs wherever OpenVINO does).
    folder_devices: Callable[[Path], tuple[str, ...]] | None = None
    # What it found here: () -> (devices present, what it saw). Imports only the runtime's light entry module.
    probe: Callable[[], tuple[list[str], str]] | None = None
    probe_label: str = ""  # what the probe asks, for messages ("OpenVINO's device list")
    probe_on_demand: bool = False  # its probe is costly: asked only when named, or for one of its devices
    convert_targets: tuple[str, ...] = ()  # `phi3 convert --to NAME --device T` targets; empty: not a convert target
    quantizes: str | None = None  # what `phi3 quantize --backend NAME` takes: "folder" (its own format) or "source"
    quantize_input: str = ""  # that input, in words
    quantize_make: str = ""  # the command that makes that input from a Hugging Face model ({model} is filled in)
    libraries: tuple[str, ...] = ()  # distributions whose versions change its results (recorded, part of store keys)
    reference: bool = False  # the full-precision reference that bench measures quality against
    platforms: tuple[str, ...] = ()  # sys.platform values it installs on; empty means all
    platform_note: str = ""  # why it installs only there
    instead: str = ""  # what to use where it is unavailable (a hint naming the flags)
    constrains: bool = False  # its runtime has a grammar engine: it honours GenerationSettings.constraint
    options: tuple[BackendOption, ...] = ()  # what `--option KEY=VALUE` may set (backends/options.py)
    speculates: tuple[str, ...] = ()  # the kinds of speculative decoding its runtime has: "draft", "prompt-lookup"
    origin: str = field(default="", compare=False)  # the entry point that registered it

    def missing(self) -> str | None:
        """Why this backend cannot be used here, or None when it can."""
        if self.platforms and sys.platform not in self.platforms:
            why = f": {self.platform_note}" if self.platform_note else ""
            return f"{self.name} installs only on {', '.join(self.platforms)} (this is {sys.platform}){why}"
        absent = [m for m in self.requires if not _importable(m)]
        if absent:
            return f"{', '.join(absent)} not installed: pip install 'phi3cli[{self.extra}]'"
        return None

    def marks(self, path: Path) -> str | None:
        """The marker file that makes path a folder in this backend's own format, or None."""
        return next((m for m in (self.marker, *self.other_markers) if m and (path / m).is_file()), None)

    @property
    def installed(self) -> bool:
        return self.missing() is None

    @property
    def default_format(self) -> str:
        return self.formats[0]

    def refusal(self, *, device: str | None = None, format: str | None = None) -> str | None:
        """Why this backend cannot run on device or at format (None when it can): the one check every command makes."""
        if device is not None and device not in self.devices:
            return f"The {self.name} backend runs on {', '.join(self.devices)}, not {device}."
        if format is not None and format not in self.formats:
            return f"The {self.name} backend runs {', '.join(self.formats)} weights, not {format}."
        return None

    def check(self, *, device: str | None = None, format: str | None = None) -> None:
        """Raise what refusal() says, with the flags to change and the backends that could."""
        if device is not None and (why := self.refusal(device=device)):
            others = [s.name for s in able(device=device) if s.auto]
            alternatives = f", or --backend {' or '.join(others)}." if others else "."
            raise DeviceUnavailableError(why, hint=f"Use --device {self.devices[-1]}{alternatives}")
        if format is not None and (why := self.refusal(format=format)):
            others = [s.name for s in able(format=format)]
            raise UnsupportedModelError(
                why, hint=f"{format} runs with --backend {' or '.join(others)}." if others else "Change --format."
            )

    def rank(self, device: str) -> int | None:
        """Its preference rank on a device (lower first), None where it does not run."""
        return dict(self.preference).get(device)

    @property
    def label(self) -> str:
        return self.probe_label or self.name


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


@cache
def registry() -> dict[str, BackendSpec]:
    """Every registered backend by name, in preference order (its best rank on any device)."""
    from importlib.metadata import entry_points

    found: dict[str, BackendSpec] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            spec = ep.load()
        except Exception as exc:  # a broken plugin must not break phi3
            print(f"phi3: ignoring backend entry point {ep.name} ({ep.value}): {exc}", file=sys.stderr)
            continue
        if not isinstance(spec, BackendSpec) or spec.name != ep.name:
            print(
                f"phi3: ignoring backend entry point {ep.name}: it is not a BackendSpec named {ep.name}",
                file=sys.stderr,
            )
            continue
        if spec.name not in found:  # the same distribution seen twice on sys.path
            found[spec.name] = BackendSpec(**{**spec.__dict__, "origin": ep.value})
    if not found:
        raise Phi3Error(
            "No backends are registered: phi3cli's package metadata is missing.", hint="Install it: pip install -e ."
        )
    best = {name: min((r for _, r in spec.preference), default=1 << 30) for name, spec in found.items()}
    return {name: found[name] for name in sorted(found, key=lambda n: (best[n], n))}


def names() -> list[str]:
    return list(registry())


def get_spec(name: str) -> BackendSpec:
    try:
        return registry()[name]
    except KeyError:
        raise BackendUnavailableError(
            f"Unknown backend {name!r}.", hint=f"Choose one of: {', '.join(registry())}."
        ) from None


def reference_spec() -> BackendSpec | None:
    """The backend whose full-precision answers bench compares the others with."""
    return next((s for s in registry().values() if s.reference), None)


def converters() -> list[BackendSpec]:
    """Backends `phi3 convert --to` can produce, best first."""
    return [s for s in registry().values() if s.convert_targets]


def able(*, device: str | None = None, format: str | None = None) -> list[BackendSpec]:
    """The registered backends that run on device and at format, best first."""
    return [s for s in registry().values() if s.refusal(device=device, format=format) is None]


def runtime_of_folder(path) -> str | None:
    """The backend whose own format a folder is in (by its marker file), or None."""
    for spec in registry().values():
        if spec.marks(path):
            return spec.name
    return None


def get_backend(name: str):
    """An instance of the named backend, or a BackendUnavailableError naming the extra to install."""
    spec = get_spec(name)
    if reason := spec.missing():
        raise BackendUnavailableError(f"The {name} backend is not available: {reason}.", hint=spec.instead or None)
    module, _, attr = spec.factory.partition(":")
    cls = getattr(importlib.import_module(module), attr)
    return cls(spec)
