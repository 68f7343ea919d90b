"""What a bench run measures: its settings, and the backend x device x format configurations it covers.

Configurations come from the backend registry (devices and formats per spec) and from what
phi3cli.devices.probe() finds here; whatever cannot run is kept as a skipped row with its reason.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from phi3cli.backends import DEVICES, LISTING_ORDER, get_backend, reference_spec, registry
from phi3cli.devices import DeviceReport
from phi3cli.errors import Phi3Error

if TYPE_CHECKING:
    from phi3cli.sources import ModelSource

QUALITY_TOKENS = 64  # greedy tokens per prompt compared with the reference


@dataclass(frozen=True)
class Configuration:
    """One thing to measure: a backend on a device at a weight format."""

    backend: str
    device: str
    format: str

    @property
    def label(self) -> str:
        return f"{self.backend}/{self.device}/{self.format}"

    @property
    def is_reference(self) -> bool:
        return self == reference_configuration()


def reference_configuration() -> Configuration | None:
    """What agreement and quality are measured against: the reference backend at full precision, on the CPU."""
    spec = reference_spec()
    return Configuration(spec.name, "cpu", spec.default_format) if spec else None


@dataclass
class PlannedConfiguration:
    """A configuration and, when it cannot run here, why (it then becomes a skipped row)."""

    config: Configuration
    skip: str | None = None


@dataclass
class BenchSettings:
    """How every configuration is measured; recorded verbatim in the outputs so runs can be compared."""

    prompt_tokens: list[int] = field(default_factory=lambda: [512])
    gen_tokens: int = 128
    warmup: int = 1
    repetitions: int = 5
    threads: int | None = None  # None: each runtime's own default
    timeout_s: float = 900.0  # per configuration, loading and quality included
    quality: bool = True
    quality_tokens: int = QUALITY_TOKENS
    turns: int = 0  # the multi-turn test: conversations of this many user messages of each prompt length (0: none)
    cache_reuse: bool = True  # whether the multi-turn test keeps the KV cache between turns, as `phi3 chat` does
    options: dict[str, str] = field(default_factory=dict)  # --option: each configuration gets those its backend takes
    image: str | None = None  # --image: the image test's file on vision models (None: a generated picture)

    def validate(self) -> None:
        """Refuse counts that cannot give a measurement, naming the flag to change."""
        checks = [
            ("--prompt-tokens", min(self.prompt_tokens, default=0), 1),
            ("--gen-tokens", self.gen_tokens, 1),
            ("--repetitions", self.repetitions, 1),
            ("--warmup", self.warmup, 0),
            ("--threads", self.threads if self.threads is not None else 1, 1),
            ("--turns", self.turns, 0),
        ]
        for flag, value, least in checks:
            if value < least:
                raise Phi3Error(f"{flag} must be at least {least} (got {value}).", hint=f"Change {flag}.")
        if self.timeout_s <= 0:
            raise Phi3Error(f"--timeout must be positive (got {self.timeout_s:g}).", hint="Change --timeout.")
        if len(set(self.prompt_tokens)) != len(self.prompt_tokens):
            raise Phi3Error("--prompt-tokens lists a value twice.", hint="Give each prompt length once.")

    def as_dict(self) -> dict:
        data = asdict(self)
        reference = reference_configuration()
        data.update(greedy=True, ignore_eos=True, reference=reference.label if reference else None)
        return data


def _module_present(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def plan_configurations(
    report: DeviceReport,
    *,
    backends: Sequence[str] = (),
    devices: Sequence[str] = (),
    formats: Sequence[str] = (),
    everything: bool = False,
    default: Configuration | None = None,
    source: ModelSource | None = None,
) -> list[PlannedConfiguration]:
    """Every backend x device x format asked for, each either runnable or skipped with a reason.

    Devices named explicitly are attempted even where the probe saw none (the runtime then says why);
    with --all or no --device, only devices the probe found are run and the others are listed as skipped.
    Without any selection and without `everything`, the one configuration `default` is planned. When the source is
    a backend's own folder (an OpenVINO IR), only that backend can run it, at the folder's format, and the other
    backends are listed as not applicable.
    """
    specs = registry()
    runtime = source.runtime if source else None
    for name in backends:
        if name not in specs:
            raise Phi3Error(f"Unknown backend {name!r}.", hint=f"Choose --backend from: {', '.join(specs)}.")
    for device in devices:
        if device not in DEVICES:
            raise Phi3Error(f"Unknown device {device!r}.", hint=f"Choose --device from: {', '.join(DEVICES)}.")
    if not (backends or devices or formats or everything) and default is not None:
        return [PlannedConfiguration(default)]

    planned: list[PlannedConfiguration] = []
    for name in backends or list(specs):
        spec = specs[name]
        wanted_devices = list(devices) or list(spec.devices)
        wanted_formats = list(formats) or list(spec.formats)
        reason = spec.missing()
        if reason is None and not _module_present(spec.factory.partition(":")[0]):
            reason = f"{spec.factory} is not part of this install"
        if reason is None and runtime and name != runtime:
            reason = f"not applicable: the model is a {runtime} folder, which only the {runtime} backend runs"
        if reason is not None:  # one row per device, so the reason shows in each device's group
            planned += [PlannedConfiguration(Configuration(name, d, "any"), skip=reason) for d in wanted_devices]
            continue
        if name == runtime:  # a prebuilt folder holds one format: --format can only select it
            held = get_backend(name).folder_format(source.path)
            if formats and held not in formats:
                why = f"the model folder holds {held} weights"
                planned += [
                    PlannedConfiguration(Configuration(name, d, f), skip=why) for d in wanted_devices for f in formats
                ]
                continue
            wanted_formats = [held]
        seen = report.details.get(name, "")
        for device in wanted_devices:
            if why := spec.refusal(device=device):
                planned += [PlannedConfiguration(Configuration(name, device, f), skip=why) for f in wanted_formats]
                continue
            if not devices and device not in report.present.get(name, []):
                why = f"no {device} here ({seen})" if seen else f"no {device} here"
                planned.append(PlannedConfiguration(Configuration(name, device, "any"), skip=why))
                continue
            for fmt in wanted_formats:
                planned.append(PlannedConfiguration(Configuration(name, device, fmt), skip=spec.refusal(format=fmt)))
    return planned


def default_configuration(report: DeviceReport, source: ModelSource | None = None) -> Configuration:
    """What `phi3 chat` would run here: the best backend and device present, at that backend's default format
    (or, for a backend's own folder, that backend at the folder's format)."""
    from phi3cli.routing import choose_route

    runtime = source.runtime if source else None
    route = choose_route(report, runtime=runtime)
    fmt = get_backend(runtime).folder_format(source.path) if runtime else registry()[route.backend].default_format
    return Configuration(route.backend, route.device, fmt)


def settings_with_baseline(
    baseline: dict | None,
    *,
    prompt_tokens: list[int] | None = None,
    gen_tokens: int | None = None,
    warmup: int | None = None,
    repetitions: int | None = None,
    threads: int | None = None,
    quality: bool | None = None,
    quality_tokens: int | None = None,
    timeout_s: float | None = None,
    turns: int | None = None,
    cache_reuse: bool | None = None,
    options: dict[str, str] | None = None,
    image: str | None = None,
) -> BenchSettings:
    """Checked settings: the options given (not None), the --compare baseline's for those unset, else the defaults.

    The timeout is this run's own, never the baseline's.
    """
    base = baseline["settings"] if baseline else {}
    default = BenchSettings()

    def pick(value, key):
        return value if value is not None else base.get(key, getattr(default, key))

    settings = BenchSettings(
        prompt_tokens=prompt_tokens or list(base.get("prompt_tokens", default.prompt_tokens)),
        gen_tokens=pick(gen_tokens, "gen_tokens"),
        warmup=pick(warmup, "warmup"),
        repetitions=pick(repetitions, "repetitions"),
        threads=pick(threads, "threads"),
        timeout_s=timeout_s if timeout_s is not None else default.timeout_s,
        quality=pick(quality, "quality"),
        quality_tokens=pick(quality_tokens, "quality_tokens"),
        turns=pick(turns, "turns"),
        cache_reuse=pick(cache_reuse, "cache_reuse"),
        options=dict(pick(options, "options")),
        image=pick(image, "image"),
    )
    settings.validate()
    return settings


def baseline_configurations(
    report: DeviceReport, baseline: dict, source: ModelSource | None = None
) -> list[PlannedConfiguration]:
    """The configurations the baseline measured (failed ones left out), each planned against this machine."""
    return [
        item
        for r in baseline["results"]
        if r["status"] == "ok"
        for item in plan_configurations(
            report, backends=[r["backend"]], devices=[r["device"]], formats=[r["format"]], source=source
        )
    ]


def sort_key(config: Configuration) -> tuple:
    """NPU, then GPU, then CPU; backends in registry order; formats in each backend's own order."""
    specs = registry()
    names = list(specs)
    spec = specs.get(config.backend)
    formats = list(spec.formats) if spec else []
    return (
        LISTING_ORDER.index(config.device) if config.device in LISTING_ORDER else len(LISTING_ORDER),
        names.index(config.backend) if config.backend in names else len(names),
        formats.index(config.format) if config.format in formats else len(formats),
        config.format,
    )
