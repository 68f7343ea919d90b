"""The model store: where built models live, keyed so a variant is built once and reused.

Layout under the store root (``PHI3_HOME``, default ``$XDG_CACHE_HOME/phi3`` or ``~/.cache/phi3``)::

    sources/<source-slug>/                       models materialised from a .gguf or built (demo)
    variants/<source-slug>/<variant-dir>/        converted or quantized models, each with variant.json
    cache/<name>/                                runtime caches (compiled blobs, builder scratch)
    locks/                                       one lock file per build, so two processes never build twice

Anything is written beside its final path as ``.<name>.partial-<pid>`` and renamed into place
only when complete, so a half-built model never appears under its real name.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from phi3cli.errors import ConversionError, OutputExistsError

MANIFEST = "variant.json"
SCHEMA = "phi3.variant/1"
_PARTIAL = re.compile(r"^\.(?P<name>.+)\.(?:partial|old)-(?P<pid>\d+)$")


def store_root() -> Path:
    """The store's root folder: $PHI3_HOME, else the user cache directory."""
    if env := os.environ.get("PHI3_HOME"):
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "phi3"


def slugify(text: str) -> str:
    """A folder-safe name for a model id or path."""
    return re.sub(r"[^A-Za-z0-9._-]+", "--", text).strip("-") or "model"


def short_hash(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:10]


def dir_size(path: Path) -> int:
    """Bytes on disk under path, as du counts them (allocated blocks, hard links once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for p in [path, *path.rglob("*")]:
        try:
            st = p.lstat()
        except FileNotFoundError:
            continue
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        total += st.st_blocks * 512
    return total


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(parent: Path) -> list[Path]:
    """Delete leftovers of builds whose process is gone (a killed convert); return what was removed."""
    removed = []
    if not parent.is_dir():
        return removed
    for p in parent.iterdir():
        m = _PARTIAL.match(p.name)
        if m and not _pid_alive(int(m["pid"])):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed


@contextlib.contextmanager
def atomic_output(final: Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a staging folder beside ``final``; rename it to ``final`` only if the block completes.

    On any exception, Ctrl-C included, the staging folder is removed and ``final`` is untouched.
    """
    final = Path(final).absolute()
    if final.exists() and not force:
        raise OutputExistsError(f"{final} already exists.", hint="Pass --force to replace it.")
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(final.parent)
    staging = final.parent / f".{final.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        if final.exists():
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            final.rename(old)
            staging.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(final)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if exc.errno == errno.ENOSPC:
            raise ConversionError(
                f"No space left on the disk holding {final.parent}; nothing was written to {final}.",
                hint="Free some space or choose another output folder with -o.",
            ) from exc
        raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


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
        path = self.variant_dir(key)
        variant = self._read_manifest(path)
        if variant is None or variant.key != key:
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
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(path)

    def variants(self) -> list[Variant]:
        """Every complete variant in the store."""
        found = []
        if not self.variants_dir.is_dir():
            return found
        for source in sorted(self.variants_dir.iterdir()):
            if not source.is_dir():
                continue
            for path in sorted(source.iterdir()):
                if path.is_dir() and not path.name.startswith("."):
                    variant = self._read_manifest(path)
                    if variant:
                        found.append(variant)
        return found

    @staticmethod
    def _read_manifest(path: Path) -> Variant | None:
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
