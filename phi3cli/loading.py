"""Loading a model, the one way every command does it.

load() resolves what the user named, routes it once (a hub repo of ready-made folders is routed while its folder is
chosen, and that route is kept), builds or finds the variant in the model store, loads it, stamps the load time and
checks where the runtime really runs. `phi3 chat`, `phi3 serve` (and each Ray replica), bench's worker and the
benchmarks call it; bench's parent calls prepare(), the same path short of loading, to build each configuration's
variant with progress before any is timed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from phi3cli.backends import BackendSpec, get_backend, get_spec
from phi3cli.backends.adapters import ADAPTERS
from phi3cli.backends.base import BATCHING, Backend, ConvertRecipe, LoadedModel, LoadRequest
from phi3cli.backends.options import check_options
from phi3cli.convert import ensure_variant
from phi3cli.devices import executed_devices
from phi3cli.errors import BackendUnavailableError, DeviceUnavailableError
from phi3cli.progress import Progress, SilentProgress
from phi3cli.routing import Route
from phi3cli.sizing import check_memory
from phi3cli.sources import ModelSource, refuse_vision_elsewhere, resolve_source
from phi3cli.speculation import SPECULATION, Speculation, check_backend, check_vocabularies, vocabulary
from phi3cli.store import ModelStore


@dataclass
class Prepared:
    """A model ready to load: the backend, the folder it runs, the request with its format decided, and the route."""

    backend: Backend
    folder: Path
    request: LoadRequest
    route: Route


def prepare(
    model: str | ModelSource | None,
    *,
    backend: str | None = None,
    device: str = "auto",
    route: Route | None = None,
    format: str | None = None,
    threads: int | None = None,
    trust_remote_code: bool = False,
    options: dict[str, Any] | None = None,
    cache_reuse: bool = False,
    cache_dir: Path | None = None,
    convert: bool = False,
    store: ModelStore | None = None,
    progress: Progress | None = None,
) -> Prepared:
    """Resolve the model (unless a ModelSource is given), route it once, and build or find the folder to load.

    route is a choice made already (bench plans its configurations and attempts each as asked); without it the
    backend and device are routed here from backend and device (auto: the best present), or taken from the route
    a hub repo's folder was chosen by. convert: a catalogue name converts its source instead of downloading a
    ready-made variant.
    """
    store = store or ModelStore()
    progress = progress or SilentProgress()
    if route is not None:
        backend, device = route.backend, route.device
    check_named_options(backend, options)
    source = (
        model
        if isinstance(model, ModelSource)
        else resolve_source(
            model, store, progress=progress, device=device, backend=backend, format=format, convert=convert
        )
    )
    if route is None and (kept := source.route) and backend in (None, kept.backend) and device in ("auto", kept.device):
        route = kept  # routed while resolving: not probed again
    route = route or _route(source, device=device, backend=backend)
    options = checked_options(get_spec(route.backend), route.device, options or {}, progress)
    request = LoadRequest(
        source=source,
        device=route.device,
        format=format,
        threads=threads,
        trust_remote_code=trust_remote_code,
        options=options,
        cache_dir=cache_dir,
        cache_reuse=cache_reuse,
    )
    impl = get_backend(route.backend)
    if request.options.get(ADAPTERS):  # LoRA at run time: refused before building, read against the base
        from phi3cli.adapter_store import check_runtime, runtime_request

        request = check_runtime(impl, request, store, progress)  # merged instead, for a backend running HF folders
    folder, request = runtime_folder(impl, request, store, progress)
    if request.options.get(ADAPTERS):
        request = runtime_request(impl, folder, request, store)
    return Prepared(impl, folder, request, route)


def load(
    model: str | ModelSource | None,
    *,
    allow_fallback: bool = False,
    store: ModelStore | None = None,
    progress: Progress | None = None,
    speculation: Speculation | None = None,
    **how: Any,
) -> LoadedModel:
    """Resolve, route, build or find, and load a model (how: prepare()'s keywords).

    speculation: decode speculatively; its draft is resolved and built as any model is, for the same backend and
    device, and must share the model's tokenizer.

    The model is stamped with its route (whose reason says why, for --device auto) and its load time, the runtime's
    own load of the ready folder. If the runtime reports another device than
    the one asked, this raises DeviceUnavailableError, or with allow_fallback passes a notice to progress.note (the
    CLI prints it in yellow): never a silent fallback.
    """
    progress = progress or SilentProgress()
    ready = prepare(model, store=store, progress=progress, **how)
    if speculation is not None:
        ready = with_speculation(ready, speculation, store, progress, **how)
    check_load_memory(ready)
    start = time.perf_counter()
    loaded = ready.backend.load(ready.folder, ready.request, progress)
    loaded.load_seconds = time.perf_counter() - start
    loaded.route = ready.route
    try:
        notice = check_executed_device(loaded, allow_fallback=allow_fallback)
    except DeviceUnavailableError:
        loaded.close()
        raise
    if notice:
        progress.note(notice)
    return loaded


def check_load_memory(ready: Prepared) -> None:
    """Refuse, in one line, a load that would not fit in the memory available, before the runtime reads a byte."""
    request = ready.request
    if request.format == "int4":
        smaller = "a smaller model"
    elif "int4" in ready.backend.spec.formats:
        smaller = "its int4 variant (--format int4)"
    else:
        smaller = "an int4 variant with a backend that makes one (`phi3 devices` lists their formats)"
    check_memory(
        ready.backend.load_estimate(ready.folder, request),
        f"Loading {request.source.spec} on {request.device} ({ready.backend.name}, {request.format})",
        hint=f"Close other programs, or run {smaller}.",
    )


def check_named_options(backend: str | None, options: dict[str, Any] | None) -> None:
    """With the backend named, a wrong option fails before the model is fetched, built or deployed (one line)."""
    if backend:
        check_options(get_spec(backend), options or {}, skip=(BATCHING, ADAPTERS))


def checked_options(spec: BackendSpec, device: str, options: dict[str, Any], progress: Progress) -> dict[str, Any]:
    """The options checked against what the backend declares (a one-line error naming what it takes), typed; one
    that does not apply on this device is noted and dropped. phi3's own (BATCHING, set by serve; ADAPTERS) pass as they are."""
    checked = check_options(spec, options, skip=(BATCHING, ADAPTERS))
    declared = {o.name: o for o in spec.options}
    idle = [k for k in checked if k in declared and declared[k].devices and device not in declared[k].devices]
    for key in idle:
        where = " and ".join(declared[key].devices)
        progress.note(f"--option {key} applies on {where} only; ignored on {device}.")
    return {k: v for k, v in checked.items() if k not in idle}


def with_speculation(
    ready: Prepared, speculation: Speculation, store: ModelStore | None, progress: Progress, **how: Any
) -> Prepared:
    """The prepared model with its speculation in the request: the backend checked, the draft ready and matching."""
    check_backend(ready.backend.spec, speculation, ready.request.device)
    if speculation.draft:
        store = store or ModelStore()
        keep = {k: how[k] for k in ("threads", "trust_remote_code", "convert") if k in how}
        route, name = ready.route, ready.request.source.spec
        progress.phase(f"Preparing the draft {speculation.draft}")
        source = resolve_source(speculation.draft, store, progress=progress, device=route.device, backend=route.backend)
        if vocabulary(source.path) is not None:  # compared before a draft is built, where its source tells
            check_vocabularies(ready.folder, source.path, name, source.spec)
        draft = prepare(source, route=route, store=store, progress=progress, **keep)
        check_vocabularies(ready.folder, draft.folder, name, source.spec)
        speculation = replace(speculation, draft_folder=draft.folder, draft_format=draft.request.format)
    options = {**ready.request.options, SPECULATION: speculation}
    return replace(ready, request=replace(ready.request, options=options))


def _route(source: ModelSource, *, device: str, backend: str | None) -> Route:
    """Probe what the request needs and pick the backend and device (routing's choice)."""
    from phi3cli.devices import probe
    from phi3cli.routing import backends_to_probe, choose_route

    report = probe(backends_to_probe(device, backend or source.runtime))
    return choose_route(report, device=device, backend=backend, runtime=source.runtime)


def runtime_folder(
    backend: Backend, request: LoadRequest, store: ModelStore, progress: Progress | None = None
) -> tuple[Path, LoadRequest]:
    """What every backend's load shares: the folder it runs and the request with its format and cache decided.

    Checks that the backend can run the source and the device, picks the default format and checks the one asked,
    and builds the variant through the store on first use. A prebuilt folder is the backend's own, at its format.
    The runtime cache is the store's for the backend unless the request names one (bench's cold load).
    """
    progress = progress or SilentProgress()
    spec = backend.spec
    source = request.source
    if source.runtime and source.runtime != spec.name:
        raise BackendUnavailableError(
            f"{source.spec} is an {source.runtime} model; the {spec.name} backend cannot run it.",
            hint=f"Use --backend {source.runtime}, or give the original model to convert it.",
        )
    spec.check(device=request.device)
    backend.check_device(request.device)
    request = replace(request, cache_dir=request.cache_dir or store.cache_dir(spec.name))
    if source.runtime:
        fmt = backend.folder_format(source.path)
        if request.format and request.format != fmt:
            progress.note(f"{source.path} holds {fmt} weights; --format {request.format} applies only to conversion.")
        return source.path, replace(request, format=fmt)
    fmt = request.format or spec.default_format
    spec.check(format=fmt)
    request = replace(request, format=fmt)
    refuse_vision_elsewhere(source, spec.name)
    if spec.marker is None:  # it runs the Hugging Face folder itself
        return source.hf_dir(store, progress), request
    recipe = ConvertRecipe(format=fmt, target=backend.build_target(request.device))
    return ensure_variant(backend, source, recipe, store, progress), request


def check_executed_device(model: LoadedModel, *, allow_fallback: bool = False) -> str | None:
    """Compare the device asked with what the runtime says it executes on; never let a fallback pass silently.

    Returns None when they agree, a notice when they differ and allow_fallback is set, else raises.
    """
    asked, reported = model.device, (model.executed_device or "").strip()
    found = executed_devices(reported)
    if found and all(d == asked for d in found):
        return None
    what = f"the {model.backend} runtime reports it executes on {reported or 'an unreported device'}"
    if not allow_fallback:
        raise DeviceUnavailableError(
            f"Asked for {asked}, but {what}; stopping instead of running on another device.",
            hint="Pass --allow-fallback to run anyway, or choose the device it has with --device.",
        )
    return f"Fallback: asked for {asked}, but {what}. Running anyway (--allow-fallback)."
