"""The model store: where built models live, keyed so a variant is built once and reused.

Layout under the store root (``PHI3_HOME``, default ``$XDG_CACHE_HOME/phi3`` or ``~/.cache/phi3``)::

    sources/<source-slug>/                       models materialised from a .gguf or built (demo)
    variants/<source-slug>/<variant-dir>/        converted or quantized models, each with variant.json
    cache/<name>/                                runtime caches (compiled blobs, builder scratch)
    locks/                                       one lock file per build, so two processes never build twice

``<variant-dir>`` is ``<backend>-<format>-<target>-<hash>``, the hash covering the converter's version
and the full recipe, so upgrading a converter builds a new variant instead of reusing an old one.
Anything is written beside its final path as ``.<name>.partial-<pid>`` and renamed into place
only when complete, so a half-built model never appears under its real name; variant.json is
written last. phi3cli.inventory lists, removes and prunes what is here (`phi3 models`).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from phi3cli.util import atomic_output, dir_size, package_version, short_hash, slugify, write_atomically

MANIFEST = "variant.json"
SCHEMA = "phi3.variant/1"


def store_root() -> Path:
    """The store's root folder: $PHI3_HOME, else the user cache directory."""
    if env := os.environ.get("PHI3_HOME"):
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "phi3"


@dataclass(frozen=True)
class VariantKey:
    """What identifies a built variant: its source, backend, weight format, target and converter."""

    source: str
    backend: str
    format: str
    target: str
    converter: str = ""
    recipe: str = ""

    @property
    def dirname(self) -> str:
        return f"{self.backend}-{self.format}-{self.target}-{short_hash(self.converter, self.recipe)}"


@dataclass
class Variant:
    """A complete variant in the store, as its manifest describes it."""

    key: VariantKey
    path: Path
    created: float
    last_used: float
    versions: dict[str, str] = field(default_factory=dict)
    source_spec: str = ""

    def size(self) -> int:
        return dir_size(self.path)

    def outdated(self) -> dict[str, tuple[str, str | None]]:
        """Runtime libraries whose installed version differs from the one this variant was built with."""
        changed = {}
        for name, built in self.versions.items():
            now = package_version(name)
            # A local build label (torch's "+cpu") is the same release.
            if now is None or now.split("+")[0] != str(built).split("+")[0]:
                changed[name] = (built, now)
        return changed


def variant_problem(variant: Variant) -> str | None:
    """Why a variant with a valid manifest still cannot be loaded (its runtime's main file is missing)."""
    from phi3cli.backends import registry

    spec = registry().get(variant.key.backend)
    marker = spec.marker if spec else None
    if marker and not spec.marks(variant.path):
        return f"{marker} is missing"
    return None


class ModelStore:
    """Cache of models built from sources: demo/gguf materialisations and converted variants."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root else store_root()

    @property
    def sources_dir(self) -> Path:
        return self.root / "sources"

    @property
    def variants_dir(self) -> Path:
        return self.root / "variants"

    def cache_dir(self, name: str) -> Path:
        path = self.root / "cache" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def source_dir(self, slug: str) -> Path:
        return self.sources_dir / slug

    def variant_dir(self, key: VariantKey) -> Path:
        return self.variants_dir / key.source / key.dirname

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """Hold an inter-process lock so one build of a thing runs at a time."""
        from filelock import FileLock

        locks = self.root / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        with FileLock(str(locks / f"{slugify(name)}.lock")):
            yield

    def find_variant(self, key: VariantKey) -> Variant | None:
        """The complete variant for key, or None (absent, or broken: a broken entry is never loaded)."""
        path = self.variant_dir(key)
        variant = self.read_manifest(path)
        if variant is None or variant.key != key or variant_problem(variant):
            return None
        return variant

    @contextlib.contextmanager
    def build_variant(
        self, key: VariantKey, *, source_spec: str, versions: dict[str, str], force: bool = False
    ) -> Iterator[Path]:
        """Stage a new variant; its manifest is written last, and the folder renamed into place."""
        final = self.variant_dir(key)
        with atomic_output(final, force=force) as staging:
            yield staging
            now = time.time()
            manifest = {
                "schema": SCHEMA,
                "key": asdict(key),
                "source_spec": source_spec,
                "versions": versions,
                "created": now,
                "last_used": now,
            }
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")

    def touch(self, variant: Variant) -> None:
        """Record that a variant was used now."""
        path = variant.path / MANIFEST
        data = json.loads(path.read_text())
        data["last_used"] = variant.last_used = time.time()
        write_atomically(path, json.dumps(data, indent=2) + "\n")

    @staticmethod
    def read_manifest(path: Path) -> Variant | None:
        try:
            data = json.loads((path / MANIFEST).read_text())
            if data.get("schema") != SCHEMA:
                return None
            return Variant(
                key=VariantKey(**data["key"]),
                path=path,
                created=float(data["created"]),
                last_used=float(data["last_used"]),
                versions=dict(data.get("versions", {})),
                source_spec=data.get("source_spec", ""),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None
