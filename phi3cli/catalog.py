"""phi3's catalogue of short model names (`phi-3-mini`, `phi-3.5-mini`, ...), shipped as data/catalog.json.

Each name has a source checkpoint on the Hugging Face hub and the ready-made variants its publishers put there
(OpenVINO IR repos, Microsoft's ONNX Runtime GenAI repos and their subfolders), each with the public pages that
state it. This module reads the file, finds a name (or the id of its source repo), tells which variants the hub
cache already holds, and chooses the variant for a device by routing's ranks (a pure function of a DeviceReport).
phi3cli.catalog_resolve turns a name into the hub repo and folder to download.
"""

from __future__ import annotations

import difflib
import json
import posixpath
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from phi3cli.backends import registry
from phi3cli.devices import DeviceReport
from phi3cli.errors import ModelNotFoundError, Phi3Error

DATA = Path(__file__).resolve().parent / "data" / "catalog.json"
SCHEMA = "phi3.catalog/1"


@dataclass(frozen=True)
class ReadyVariant:
    """A folder of a hub repo that a backend runs as it is, as the catalogue describes it."""

    repo: str
    folder: str  # its path in the repo, "" for the root
    runtime: str  # the backend that runs it
    precision: str
    devices: tuple[str, ...]  # what it is built for
    provider: str | None  # the execution provider its config asks for, where it names one
    needs: str  # what it needs, in words
    size_gb: float | None  # as the cited page states it, None where none does
    size_of: str | None
    cited: tuple[str, ...]

    @property
    def spec(self) -> str:
        """How `--model` names it: REPO or REPO:FOLDER."""
        return f"{self.repo}:{self.folder}" if self.folder else self.repo

    @property
    def size(self) -> str:
        return f"{self.size_gb:g} GB" if self.size_gb is not None else "size not stated"

    @property
    def marker(self) -> str | None:
        """The marker file (in the repo) that says the folder is its runtime's format."""
        return next(iter(self.markers), None)

    @property
    def markers(self) -> tuple[str, ...]:
        """Every file (in the repo) that marks the folder as its runtime's: a text model's or a vision model's."""
        spec = registry().get(self.runtime)
        found = (spec.marker, *spec.other_markers) if spec else ()
        return tuple(posixpath.join(self.folder, m) for m in found if m)


@dataclass(frozen=True)
class CatalogModel:
    """A short name: what it is, its source checkpoint, its ready-made variants (preferred first)."""

    name: str
    title: str
    what: str
    source: str
    source_type: str  # its config.json's model_type: whether phi3 converts it, and how
    source_size_gb: float | None
    source_cited: tuple[str, ...]
    variants: tuple[ReadyVariant, ...]

    def for_device(self, device: str) -> list[ReadyVariant]:
        return [v for v in self.variants if device in v.devices]


def _variant(entry: dict) -> ReadyVariant:
    return ReadyVariant(
        repo=entry["repo"],
        folder=entry.get("folder", "").strip("/"),
        runtime=entry["runtime"],
        precision=entry["precision"],
        devices=tuple(entry["devices"]),
        provider=entry.get("provider"),
        needs=entry.get("needs", ""),
        size_gb=entry.get("size_gb"),
        size_of=entry.get("size_of"),
        cited=tuple(entry["cited"]),
    )


@cache
def catalog() -> dict[str, CatalogModel]:
    """Every catalogue entry by short name, in the file's order."""
    try:
        data = json.loads(DATA.read_text(encoding="utf-8"))
        if data.get("schema") != SCHEMA:
            raise ValueError(f"schema {data.get('schema')!r}, not {SCHEMA}")
        return {
            m["name"]: CatalogModel(
                name=m["name"],
                title=m["title"],
                what=m["what"],
                source=m["source"]["repo"],
                source_type=m["source"].get("model_type", "phi3"),
                source_size_gb=m["source"].get("size_gb"),
                source_cited=tuple(m["source"]["cited"]),
                variants=tuple(_variant(v) for v in m["variants"]),
            )
            for m in data["models"]
        }
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise Phi3Error(f"phi3's model catalogue ({DATA.name}) cannot be read: {exc}") from exc


def find(spec: str) -> CatalogModel | None:
    """The entry a user names: its short name or its source repo's id (either in any case)."""
    wanted = spec.strip().casefold()
    return next((m for m in catalog().values() if wanted in (m.name.casefold(), m.source.casefold())), None)


def is_bare_name(spec: str) -> bool:
    """A word that can only be a short name: no owner/ part, nothing that looks like a path."""
    return "/" not in spec and "\\" not in spec and not spec.startswith((".", "~"))


def unknown_name(spec: str) -> ModelNotFoundError:
    """An unknown name, with the catalogue's names that are close to it."""
    names = list(catalog())
    close = difflib.get_close_matches(spec.casefold(), names, n=3, cutoff=0.6)
    guess = f" Did you mean {' or '.join(close)}?" if close else ""
    return ModelNotFoundError(
        f"No model named {spec!r}: it is not a file, a folder, a Hugging Face id (owner/name[:subfolder]) or a "
        f"name in phi3's catalogue.{guess}",
        hint="`phi3 models catalog` lists the names; `--model demo` runs the built-in demo model.",
    )


# What the hub cache holds (no network): repo -> files, or None when it holds nothing of the repo.
CacheReader = Callable[[str], "dict[str, int | None] | None"]


def read_cache(repo: str) -> dict[str, int | None] | None:
    from phi3cli.hub import cached_listing

    listing = cached_listing(repo)
    return dict(listing.files) if listing else None


def variant_cached(variant: ReadyVariant, read: CacheReader = read_cache) -> bool:
    files = read(variant.repo) or {}
    return any(marker in files for marker in variant.markers)


def source_cached(model: CatalogModel, read: CacheReader = read_cache) -> bool:
    files = read(model.source) or {}
    return "config.json" in files and any(p.endswith(".safetensors") and "/" not in p for p in files)


def cache_folder(repo: str) -> Path:
    """Where the hub cache keeps a repo (HF_HUB_CACHE/models--OWNER--NAME)."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo, repo_type="model")


# Whether a variant fits a device here beyond what routing knows (a DirectML folder where DirectML is installed).
Fits = Callable[[ReadyVariant, str], bool]


def routes(report: DeviceReport, *, device: str, backend: str | None, runtimes: list[str]) -> list[tuple[str, str]]:
    """(runtime, device) pairs routing allows here for these runtimes, best first by the backends' ranks."""
    from phi3cli.routing import choose_route

    found = []
    for runtime in runtimes:
        spec = registry().get(runtime)
        if spec is None or backend not in (None, runtime):
            continue
        for wanted in [device] if device != "auto" else list(report.present.get(runtime, [])):
            try:
                on = choose_route(report, device=wanted, backend=backend, runtime=runtime).device
            except Phi3Error:
                continue
            rank = spec.rank(on)
            found.append((rank if rank is not None else 1 << 30, runtime, on))
    return [(runtime, on) for _, runtime, on in sorted(set(found))]


def choose(
    model: CatalogModel,
    report: DeviceReport,
    *,
    device: str = "auto",
    backend: str | None = None,
    precision: str | None = None,
    fits: Fits = lambda v, on: True,
) -> tuple[ReadyVariant, str] | None:
    """The variant to run and the device it runs on: for the best (runtime, device) routing allows, the first
    variant built for that device (at the precision asked, if one is) that fits; None when none fits here."""
    variants = [v for v in model.variants if precision in (None, v.precision)]
    runtimes = list(dict.fromkeys(v.runtime for v in variants))
    for runtime, on in routes(report, device=device, backend=backend, runtimes=runtimes):
        for variant in variants:
            if variant.runtime == runtime and on in variant.devices and fits(variant, on):
                return variant, on
    return None


def platforms(model: CatalogModel, device: str) -> str:
    """What the variants built for a device need, in words ("Windows with DirectML (REPO:FOLDER); ...")."""
    needs: dict[str, list[str]] = {}
    for v in model.for_device(device):
        needs.setdefault(v.needs, []).append(v.spec)
    return "; ".join(f"{need} ({', '.join(specs)})" for need, specs in needs.items())


def describe(variant: ReadyVariant) -> str:
    """`REPO:FOLDER (onnx int4, 2.72 GB)`"""
    return f"{variant.spec} ({variant.runtime} {variant.precision}, {variant.size})"
