"""Models on the Hugging Face hub: safetensors checkpoints, and repos of folders a backend runs as they are.

A repo is listed before anything is downloaded (online: the hub's file list; offline: its snapshot in the hub
cache). A folder that holds a backend's marker file (its spec's `marker`) is a variant that runs with no conversion;
of several (Microsoft's ONNX repos keep one per subfolder) the one that fits the device asked is taken, by the same
ranks routing uses, and only that folder's files are downloaded. Otherwise the root's safetensors checkpoint is the
source, converted as any Hugging Face model. Nothing pickled is ever downloaded or loaded.
"""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import os
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from phi3cli.backends import get_spec, registry
from phi3cli.errors import ModelNotFoundError, OfflineError, Phi3Error, UnsupportedModelError
from phi3cli.progress import Progress, SilentProgress
from phi3cli.store import ModelStore
from phi3cli.util import human_size

if TYPE_CHECKING:
    from phi3cli.routing import Route

# What a Phi-3 checkpoint needs at the repo's root; safetensors only, never pickled weights. The .py files are the
# checkpoint's own code: fetched, run only by `phi3 convert --trust-remote-code` of a model that needs it.
CHECKPOINT_PATTERNS = ("*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt", "*.md", "*.py")
# Pickled files (torch.load would run code from them): never downloaded, whatever folder holds them.
PICKLED = ("*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt", "*.joblib", "pytorch_model*.bin", "training_args.bin")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Words in a variant's name that say its weight format, narrowest first ("int4 before wider formats").
FORMAT_WORDS = (
    ("int4", "q4", "nf4", "uint4", "4bit"),
    ("int8", "q8", "8bit"),
    ("fp16", "bf16", "f16"),
    ("fp32", "f32"),
)


def parse_hub_id(spec: str) -> tuple[str, str | None] | None:
    """(repo, subfolder or None) for `OWNER/NAME` or `OWNER/NAME:SUBFOLDER`; None when spec is neither."""
    repo, colon, folder = spec.partition(":")
    if not HUB_ID.match(repo) or spec.startswith((".", "/", "~")):
        return None
    folder = folder.strip("/")
    if colon and (not folder or ".." in folder.split("/")):
        return None
    return repo, folder or None


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class RepoListing:
    """What a repo holds at one revision: each file's path in the repo and its size (None when unknown)."""

    repo: str
    revision: str  # the commit listed
    files: dict[str, int | None]
    from_cache: bool  # listed from the hub cache (offline): only what was downloaded before

    def in_folder(self, folder: str) -> list[str]:
        """The files directly in a folder of the repo ("" for its root), pickled ones left out."""
        return sorted(
            p
            for p in self.files
            if posixpath.dirname(p) == folder and not any(fnmatch.fnmatch(posixpath.basename(p), g) for g in PICKLED)
        )


@dataclass(frozen=True)
class HubVariant:
    """A folder of a repo that a backend runs as it is."""

    folder: str  # its path in the repo, "" for the root
    backend: str
    files: tuple[str, ...]
    devices: tuple[str, ...] | None = None  # what it is built to run on here (spec.folder_devices); None: any

    @property
    def label(self) -> str:
        return self.folder or "(the repo's root)"


def format_rank(name: str) -> tuple[int, str]:
    """(rank, word) of the narrowest weight format a variant's name says; names that say none come last."""
    words = set(re.split(r"[^a-z0-9]+", name.lower()))
    for rank, names in enumerate(FORMAT_WORDS):
        if found := next((w for w in names if w in words), None):
            return rank, found
    return len(FORMAT_WORDS), "format not in its name"


@dataclass(frozen=True)
class HubModel:
    """A hub model resolved to a folder in the hub cache."""

    repo: str
    folder: Path
    runtime: str | None  # the backend whose folder it is, None for a checkpoint to convert
    variant: str  # its folder in the repo ("" for the root)
    revision: str
    route: Route | None = None  # for a ready-made folder: the backend and device routing chose it for


@contextlib.contextmanager
def hub_errors(repo: str, revision: str | None) -> Iterator[None]:
    """huggingface-hub's exceptions as one-line phi3 errors."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
    except GatedRepoError as exc:
        raise ModelNotFoundError(
            f"{repo} is gated on the hub.", hint="Accept its licence on the hub, then `hf auth login`."
        ) from exc
    except RepositoryNotFoundError as exc:
        raise ModelNotFoundError(f"{repo} does not exist on the Hugging Face hub (or is private).") from exc
    except RevisionNotFoundError as exc:
        raise ModelNotFoundError(f"{repo} has no revision {revision!r}.") from exc
    except LocalEntryNotFoundError as exc:
        why = "HF_HUB_OFFLINE is set" if offline() else "the Hugging Face hub cannot be reached"
        raise OfflineError(
            f"{repo} is not in the local hub cache and {why}.",
            hint="Connect and retry, point --model at a local folder, or use `--model demo`.",
        ) from exc
    except EntryNotFoundError as exc:  # listed a moment ago, gone now (a new commit on the branch)
        raise ModelNotFoundError(f"{repo} no longer has a file it listed.", hint="Run the command again.") from exc
    except OSError as exc:  # connection errors surface as requests/httpx OSError subclasses
        raise OfflineError(
            f"Could not download {repo}: {exc.__class__.__name__}.",
            hint="Check the connection, or use a local folder or `--model demo`.",
        ) from exc


def list_repo(repo: str, revision: str | None = None) -> RepoListing:
    """The repo's files: from the hub (with sizes), or offline (or when the hub cannot be reached) its cached snapshot."""
    if not offline():
        from huggingface_hub import HfApi

        try:
            with hub_errors(repo, revision):
                info = HfApi().model_info(repo, revision=revision, files_metadata=True)
            return RepoListing(repo, info.sha, {s.rfilename: s.size for s in info.siblings or []}, False)
        except OfflineError as unreachable:  # as huggingface-hub does: the cached snapshot, if there is one
            try:
                return _cached_listing(repo, revision)
            except OfflineError:
                raise unreachable from None
    return _cached_listing(repo, revision)


def cached_listing(repo: str, revision: str | None = None) -> RepoListing | None:
    """What the hub cache holds of a repo (never the network), or None when it holds nothing of it."""
    try:
        return _cached_listing(repo, revision)
    except OfflineError:
        return None


def _cached_listing(repo: str, revision: str | None) -> RepoListing:
    snapshot = fetch(repo, revision, [], cached=True)
    files = {
        p.relative_to(snapshot).as_posix(): p.stat().st_size
        for p in sorted(snapshot.rglob("*"))
        if p.is_file() and not p.name.endswith(".incomplete")
    }
    return RepoListing(repo, snapshot.name, files, True)


def fetch(repo: str, revision: str | None, paths: list[str], *, cached: bool) -> Path:
    """Download exactly these files of the repo (resumable; already cached ones are kept); return the snapshot."""
    from huggingface_hub import snapshot_download

    with hub_errors(repo, revision):
        return Path(
            snapshot_download(
                repo,
                revision=revision,
                allow_patterns=[glob.escape(p) for p in paths] or ["\0"],  # no pattern at all would mean everything
                local_files_only=cached or offline(),
            )
        )


def find_variants(listing: RepoListing) -> list[HubVariant]:
    """Every folder of the repo that holds a backend's marker file, by folder."""
    markers = [
        (m, spec.name) for spec in registry().values() if spec.marker for m in (spec.marker, *spec.other_markers)
    ]
    found = []
    for folder in sorted({posixpath.dirname(p) for p in listing.files}):
        for marker, backend in markers:
            if posixpath.join(folder, marker) in listing.files:
                found.append(HubVariant(folder, backend, tuple(listing.in_folder(folder))))
                break
    return found


def with_devices(listing: RepoListing, variants: list[HubVariant]) -> list[HubVariant]:
    """The variants with what each is built to run on, read from its marker file (downloaded alone first)."""
    readers = {v.backend: get_spec(v.backend) for v in variants}
    wanted = [
        posixpath.join(v.folder, readers[v.backend].marker) for v in variants if readers[v.backend].folder_devices
    ]
    if not wanted:
        return variants
    snapshot = fetch(listing.repo, listing.revision, wanted, cached=listing.from_cache)
    read = []
    for v in variants:
        hook = readers[v.backend].folder_devices
        read.append(HubVariant(v.folder, v.backend, v.files, hook(snapshot / v.folder) if hook else None))
    return read


def choose_variant(variants: list[HubVariant], *, device: str, backend: str | None, report) -> tuple[HubVariant, Route]:
    """The variant to run and the route it runs by: the backend (and device) routing ranks best, then the
    variant built for that device, narrowest format first. Raises routing's error when none can run here."""
    from phi3cli.routing import choose_route

    best, errors = None, []
    for name in dict.fromkeys(v.backend for v in variants):
        try:
            route = choose_route(report, device=device, backend=backend, runtime=name)
        except Phi3Error as exc:
            errors.append(exc)
            continue
        rank = get_spec(name).rank(route.device)
        if best is None or (rank if rank is not None else 1 << 30) < best[0]:
            best = (rank if rank is not None else 1 << 30, route)
    if best is None:
        raise errors[0]
    route = best[1]
    name, chosen = route.backend, route.device

    def fit(v: HubVariant) -> int:
        devices = get_spec(v.backend).devices if v.devices is None else v.devices
        return 0 if chosen in devices else 1 if devices else 2

    ours = sorted((v for v in variants if v.backend == name), key=lambda v: (fit(v), format_rank(v.folder), v.folder))
    return ours[0], route


def _pick_by_name(repo: str, variants: list[HubVariant], folder: str) -> HubVariant:
    exact = [v for v in variants if v.folder == folder]
    named = exact or [v for v in variants if posixpath.basename(v.folder) == folder]
    if len(named) == 1:
        return named[0]
    have = ", ".join(v.label for v in variants) or "none"
    raise ModelNotFoundError(
        f"{repo} has no folder {folder!r} that phi3 runs"
        + (" (that name fits several)" if named else "")
        + f"; its runnable folders: {have}.",
        hint=f"Pick one with --model {repo}:SUBFOLDER, or leave out :SUBFOLDER to let phi3 choose.",
    )


def _holds(listing: RepoListing) -> str:
    names = sorted(listing.files, key=lambda p: (-(listing.files[p] or 0), p))
    shown = ", ".join(names[:4]) or "no files"
    return shown + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def _refuse(listing: RepoListing) -> UnsupportedModelError:
    root = listing.in_folder("")
    markers = "one with " + " or ".join(s.marker for s in registry().values() if s.marker)
    what = f"it holds {_holds(listing)}" + (" (listed from the hub cache)" if listing.from_cache else "")
    hint = "phi3 never loads pickled weights (.bin, .pt); use a repo with safetensors, a .gguf file, or `demo`."
    if any(p.endswith(".safetensors") for p in root) and "config.json" not in root:
        return UnsupportedModelError(f"{listing.repo} has no config.json; it is not a transformers model ({what}).")
    return UnsupportedModelError(
        f"{listing.repo} publishes no .safetensors weights, nor a folder phi3 runs as it is ({markers}); {what}.",
        hint=hint,
    )


def resolve_hub(
    repo: str,
    folder: str | None = None,
    *,
    store: ModelStore,
    revision: str | None = None,
    device: str = "auto",
    backend: str | None = None,
    progress: Progress | None = None,
) -> HubModel:
    """Find what a repo offers, pick the variant (or the checkpoint), download only that, and record the use."""
    from phi3cli.hub_history import record_use

    progress = progress or SilentProgress()
    listing = list_repo(repo, revision)
    variants = find_variants(listing)
    fitting = [v for v in variants if backend in (None, v.backend)]
    chosen = folder is None and len(fitting) > 1  # then routing has been asked while choosing
    route = None
    if folder is not None:
        variant = _pick_by_name(repo, variants, folder)
    elif fitting:
        if chosen:
            variant, route = _choose(listing, fitting, device=device, backend=backend, progress=progress)
        else:
            variant = fitting[0]
    else:
        variant = None
    if variant is None:  # the checkpoint at the root, converted as any Hugging Face model
        root = listing.in_folder("")
        if "config.json" not in root or not any(p.endswith(".safetensors") for p in root):
            if variants:
                raise UnsupportedModelError(
                    f"{repo} has folders for {', '.join(sorted({v.backend for v in variants}))} only, not for "
                    f"--backend {backend}, and no safetensors checkpoint to convert.",
                    hint=f"Leave out --backend, or pick a folder with --model {repo}:SUBFOLDER.",
                )
            raise _refuse(listing)
        files = [p for p in root if any(fnmatch.fnmatch(p, g) for g in CHECKPOINT_PATTERNS)]
        runtime, where = None, ""
    else:
        if not chosen:  # routing's error (no such device, backend missing) before anything big is downloaded
            route = _route(variant.backend, device=device, backend=backend)
        files, runtime, where = list(variant.files), variant.backend, variant.folder
    size = [listing.files.get(p) for p in files]
    total = f", {human_size(sum(size))}" if None not in size else ""
    name = f"{repo}:{where}" if where else repo
    if listing.from_cache:
        progress.phase(f"Reading {name} from the hub cache ({len(files)} files{total})")
    else:
        progress.phase(f"Downloading {name} ({len(files)} files{total}; files already in the hub cache are kept)")
    snapshot = fetch(repo, listing.revision, files, cached=listing.from_cache)
    path = snapshot / where if where else snapshot
    record_use(store, repo=repo, variant=where, runtime=runtime or "", revision=snapshot.name, path=path)
    return HubModel(repo, path, runtime, where, snapshot.name, route)


def _route(runtime: str, *, device: str, backend: str | None) -> Route:
    from phi3cli.devices import probe
    from phi3cli.routing import backends_to_probe, choose_route

    report = probe(backends_to_probe(device, backend or runtime))
    return choose_route(report, device=device, backend=backend, runtime=runtime)


def _choose(listing: RepoListing, variants: list[HubVariant], *, device: str, backend: str | None, progress: Progress):
    """One of a repo's variants and the route it runs by, saying on stderr which one and which others it has."""
    from phi3cli.devices import probe
    from phi3cli.routing import backends_to_probe

    variants = with_devices(listing, variants)
    wanted = {b for v in variants for b in backends_to_probe(device, backend or v.backend)}
    variant, route = choose_variant(variants, device=device, backend=backend, report=probe(sorted(wanted)))
    chosen = route.device
    built = get_spec(variant.backend).devices if variant.devices is None else variant.devices
    why = f"built for {chosen}" if chosen in built else f"none of its folders is built for {chosen} here"
    others = ", ".join(v.label for v in variants if v is not variant)
    cached = " (offline: only the folders in the hub cache are listed)" if listing.from_cache else ""
    progress.note(
        f"{listing.repo}: running {variant.label} ({format_rank(variant.folder)[1]}, {why}, with {variant.backend}); "
        f"it also has {others}{cached}. Pick one with --model {listing.repo}:SUBFOLDER."
    )
    return variant, route
