"""A short model name (or its source repo's id) -> the hub repo, and folder, that phi3 downloads for it.

The ready-made variant for the device routing chooses (an NPU variant for `--device npu`, a DirectML folder for
`--device gpu` where DirectML is installed, int4 on the CPU), said in one line; the source checkpoint, to convert,
when no ready-made variant fits here or `--convert` asks for it. Offline (HF_HUB_OFFLINE), only what the hub
cache holds counts, and when it holds nothing the error says what to pull on a connected machine and which
cache folder to copy. sources.resolve_source calls `catalog_spec` before it reads a spec as a hub id.
"""

from __future__ import annotations

from collections.abc import Callable

from phi3cli.catalog import (
    CatalogModel,
    ReadyVariant,
    cache_folder,
    choose,
    describe,
    find,
    is_bare_name,
    platforms,
    source_cached,
    unknown_name,
    variant_cached,
)
from phi3cli.devices import DeviceReport
from phi3cli.errors import DeviceUnavailableError, OfflineError, Phi3Error, UnsupportedModelError
from phi3cli.progress import Progress, SilentProgress
from phi3cli.remote_code import remote_code_types

# Raises UnsupportedModelError where an entry's source checkpoint is of a type phi3 does not convert (as asked).
SourceCheck = Callable[[CatalogModel], None]


def catalog_spec(
    spec: str,
    *,
    device: str = "auto",
    backend: str | None = None,
    format: str | None = None,
    convert: bool = False,
    revision: str | None = None,
    progress: Progress | None = None,
    check_source: SourceCheck = lambda model: None,
) -> str | None:
    """The hub spec (REPO or REPO:FOLDER) a catalogue name stands for here; None for any other spec.

    format, where asked, is the precision the variant must have (else the source is converted to it). A bare
    word that is no catalogue name is refused with the names close to it. check_source refuses a source that
    cannot be converted, before anything of it is downloaded (Phi-4-multimodal's, which carries its own code).
    """
    model = find(spec)
    if model is None:
        if is_bare_name(spec):
            raise unknown_name(spec)
        return None
    if revision is not None and not is_bare_name(spec):  # a revision of the source repo itself: that repo
        return None
    progress = progress or SilentProgress()
    if convert:
        _convertible(model, check_source, "--convert asks for its source, which cannot be converted")
        progress.note(
            f"{model.name}: converting its source {model.source}; `phi3 models catalog` lists its ready-made variants."
        )
        return model.source
    report = _probe(device, backend)
    pick = choose(model, report, device=device, backend=backend, precision=format, fits=provider_fit)
    from phi3cli.hub import offline

    where = dict(device=device, backend=backend, check_source=check_source, progress=progress)
    if offline():
        return _from_cache(model, pick, report, format=format, **where)
    if pick is None:
        return _fallback(model, report, why=f" at {format}" if format else "", **where)
    progress.note(_picked(model, *pick))
    return pick[0].spec


def pull_spec(
    spec: str, *, device: str = "auto", backend: str | None = None, convert: bool = False, progress: Progress
) -> str | None:
    """What `phi3 models pull` downloads for a catalogue name and a device named: the variant chat would run there
    if this machine has that device, else the catalogue's first for it, so a connected machine can fetch for
    another one. None where resolving the spec as chat does is what pull wants."""
    model = find(spec)
    if model is None or convert or device == "auto":
        return None
    pick = choose(model, _probe(device, backend), device=device, backend=backend, fits=provider_fit)
    if pick is not None:
        progress.note(_picked(model, *pick))
        return pick[0].spec
    built = [v for v in model.for_device(device) if backend in (None, v.runtime)]
    if not built:
        raise UnsupportedModelError(
            f"{model.name} has no ready-made variant for the {device.upper()}"
            + (f" with {backend}" if backend else "")
            + ".",
            hint=f"`phi3 models pull {model.name} --convert` downloads its source {model.source} to convert.",
        )
    progress.note(
        f"{model.name}: {describe(built[0])}, its first ready-made {device.upper()} variant in the catalogue "
        f"(it needs {built[0].needs}; this machine cannot run it, so it was not checked here)."
    )
    return built[0].spec


def provider_fit(variant: ReadyVariant, on: str) -> bool:
    """Whether a variant whose config names an execution provider runs on `on` here: its marker file alone is
    read (downloaded if need be) and the backend says what it is built for. Variants naming none always fit."""
    from phi3cli.backends import registry
    from phi3cli.hub import fetch

    spec = registry().get(variant.runtime)
    if variant.provider is None or spec is None or spec.folder_devices is None or variant.marker is None:
        return True
    try:
        snapshot = fetch(variant.repo, None, [variant.marker], cached=False)
    except Phi3Error:  # offline and not cached, or the hub cannot be reached: it cannot be used now
        return False
    return on in spec.folder_devices(snapshot / variant.folder)


def _probe(device: str, backend: str | None) -> DeviceReport:
    from phi3cli.devices import probe
    from phi3cli.routing import backends_to_probe

    return probe(backends_to_probe(device, backend))


def _picked(model: CatalogModel, variant: ReadyVariant, on: str, why: str = "") -> str:
    return (
        f"{model.name} → {describe(variant)}: its ready-made {on.upper()} variant, as routing runs "
        f"{variant.runtime} on {on} here{why}; --convert builds from {model.source} instead."
    )


def _convert_route(model: CatalogModel, report: DeviceReport, *, device: str, backend: str | None):
    """The route the source checkpoint would take here; when there is none, routing's error, led by what the
    catalogue's variants for that device need."""
    from phi3cli.routing import choose_route

    try:
        return choose_route(report, device=device, backend=backend)
    except DeviceUnavailableError as exc:
        if device == "auto" or not model.for_device(device):
            raise
        raise DeviceUnavailableError(
            f"{model.name} has no {device.upper()} variant that runs here: its {device.upper()} variants need "
            f"{platforms(model, device)}. {exc.message}",
            hint=exc.hint,
            instead=exc.instead,
        ) from exc


def _convertible(model: CatalogModel, check_source: SourceCheck, lead: str) -> None:
    """Refuse, in one line, a source that cannot be converted, led by how phi3 came to it."""
    try:
        check_source(model)
    except UnsupportedModelError as exc:
        raise UnsupportedModelError(
            f"{model.name}: {lead}: {exc.message}",
            hint=f"`phi3 models catalog` lists {model.name}'s ready-made variants and what each needs.",
        ) from exc


def _converts(model: CatalogModel, check_source: SourceCheck) -> bool:
    try:
        check_source(model)
    except UnsupportedModelError:
        return False
    return True


def _source_route(model: CatalogModel, report: DeviceReport, *, device, backend, check_source: SourceCheck, why=""):
    """The route converting the source would take here, once routing and the source's type allow it."""
    try:
        route = _convert_route(model, report, device=device, backend=backend)
    except DeviceUnavailableError as exc:  # no "run it on the CPU instead" where nothing of it would run there
        if exc.instead and not model.for_device(exc.instead) and not _converts(model, check_source):
            exc.instead = None
        raise
    lead = f"no ready-made variant fits {route.backend} on {route.device} here{why}, and its source cannot be converted"
    _convertible(model, check_source, lead)
    return route


def _fallback(
    model: CatalogModel,
    report: DeviceReport,
    *,
    device: str,
    backend: str | None,
    check_source: SourceCheck,
    progress: Progress,
    why: str = "",
) -> str:
    route = _source_route(model, report, device=device, backend=backend, check_source=check_source, why=why)
    progress.note(
        f"{model.name}: no ready-made variant fits {route.backend} on {route.device} here{why}; converting its "
        f"source {model.source} instead (the whole checkpoint is read, then converted)."
    )
    return model.source


def _from_cache(
    model: CatalogModel,
    pick: tuple[ReadyVariant, str] | None,
    report: DeviceReport,
    *,
    device: str,
    backend: str | None,
    format: str | None,
    check_source: SourceCheck,
    progress: Progress,
) -> str:
    """Offline: the best variant the hub cache holds, else the cached source to convert, else what to pull."""
    held = choose(
        model,
        report,
        device=device,
        backend=backend,
        precision=format,
        fits=lambda v, on: variant_cached(v) and provider_fit(v, on),
    )
    if held is not None:
        variant, on = held
        other = f", {pick[0].spec}, preferred here, is not" if pick is not None and pick[0] != variant else ""
        progress.note(_picked(model, variant, on, f" (offline: it is in the hub cache{other})"))
        return variant.spec
    if pick is not None and not source_cached(model):
        raise _offline_error(model, pick[0], device)
    why = (f" at {format}" if format else "") + (" in the hub cache" if pick is not None else "")
    where = dict(device=device, backend=backend, check_source=check_source, why=why)
    _source_route(model, report, **where)  # nothing can run here, or the source cannot be converted: said first
    if not source_cached(model):
        raise _offline_error(model, None, device)
    return _fallback(model, report, progress=progress, **where)


def _offline_error(model: CatalogModel, variant: ReadyVariant | None, device: str) -> OfflineError:
    repo = variant.repo if variant else model.source
    folder = cache_folder(repo)
    wanted = f"its ready-made variant for this machine, {variant.spec}" if variant else f"its source {model.source}"
    pull = f"phi3 models pull {model.name}" + (f" --device {device}" if device != "auto" else "")
    if variant is None:  # the source, to convert (running its own code where that is how it converts)
        pull += " --convert" + (" --trust-remote-code" if model.source_type in remote_code_types() else "")
    return OfflineError(
        f"{model.name} is not in the local hub cache and HF_HUB_OFFLINE is set: it needs {wanted}.",
        hint=f"On a connected machine run `{pull}`, then copy the folder {folder.name} from that machine's hub "
        f"cache into {folder.parent} on this one.",
    )
