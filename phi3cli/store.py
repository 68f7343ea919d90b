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
written last. `phi3 models` lists, removes and prunes what is here.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from phi3cli.errors import ConversionError, OutputExistsError, Phi3Error, StoreEntryNotFoundError

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

    def outdated(self) -> dict[str, tuple[str, str | None]]:
        """Runtime libraries whose installed version differs from the one this variant was built with."""
        changed = {}
        for name, built in self.versions.items():
            now = installed_version(name)
            # A local build label (torch's "+cpu") is the same release.
            if now is None or now.split("+")[0] != str(built).split("+")[0]:
                changed[name] = (built, now)
        return changed


def installed_version(distribution: str) -> str | None:
    """The installed version of a Python distribution, or None."""
    try:
        return importlib.metadata.version(distribution)
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None


@dataclass
class StoreEntry:
    """One thing in the store, as `phi3 models list` shows it."""

    kind: str  # variant | source | cache | broken | partial
    id: str
    path: Path
    source: str  # the source slug it belongs to
    status: str  # ok | broken: why | building (process N) | stale: ...
    variant: Variant | None = None
    created: float | None = None
    last_used: float | None = None

    @property
    def size(self) -> int:
        return dir_size(self.path)

    @property
    def removable(self) -> bool:
        return not self.status.startswith("building")


@dataclass
class PruneReason:
    entry: StoreEntry
    reason: str


def _resolved(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _is_within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _variant_problem(variant: Variant) -> str | None:
    """Why a variant with a valid manifest still cannot be loaded (its runtime's main file is missing)."""
    from phi3cli.sources import RUNTIME_MARKERS  # lazy: sources imports this module

    marker = RUNTIME_MARKERS.get(variant.key.backend)
    if marker and not (variant.path / marker).is_file():
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
        variant = self._read_manifest(path)
        if variant is None or variant.key != key or _variant_problem(variant):
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
        """Every complete, sound variant in the store."""
        return [e.variant for e in self.entries() if e.kind == "variant" and e.variant is not None]

    # Listing and cleaning (`phi3 models`)

    def entries(self) -> list[StoreEntry]:
        """Everything the store holds: variants, materialised sources, caches, broken and half-built entries."""
        found: list[StoreEntry] = []
        if self.variants_dir.is_dir():
            for group in sorted(self.variants_dir.iterdir()):
                if _PARTIAL.match(group.name):
                    found.append(self._partial(group, group.name))
                elif group.is_dir() and not group.name.startswith("."):
                    for path in sorted(group.iterdir()):
                        found.append(self._variant_entry(path, group.name))
                elif not group.name.startswith("."):
                    found.append(self._entry("broken", path=group, source="", status="broken: not a folder"))
        for kind, folder in (("source", self.sources_dir), ("cache", self.root / "cache")):
            if not folder.is_dir():
                continue
            for path in sorted(folder.iterdir()):
                if _PARTIAL.match(path.name):
                    found.append(self._partial(path, _PARTIAL.match(path.name)["name"]))
                elif not path.name.startswith("."):
                    found.append(self._other_entry(kind, path))
        return [e for e in found if e is not None]

    def entry_id(self, path: Path) -> str:
        """A short, stable id for an entry: a hash of its path inside the store."""
        return short_hash(path.relative_to(self.root).as_posix())[:8]

    def _entry(self, kind: str, *, path: Path, source: str, status: str, **more) -> StoreEntry:
        return StoreEntry(kind=kind, id=self.entry_id(path), path=path, source=source, status=status, **more)

    def _variant_entry(self, path: Path, group: str) -> StoreEntry | None:
        m = _PARTIAL.match(path.name)
        if m:
            return self._partial(path, group)
        if path.name.startswith("."):
            return None
        variant = self._read_manifest(path)
        if variant is None:
            why = "no variant.json" if not (path / MANIFEST).exists() else "variant.json unreadable or not ours"
            if not path.is_dir():
                why = "not a folder"
            return self._entry("broken", path=path, source=group, status=f"broken: {why}")
        problem = _variant_problem(variant)
        if problem is None and (variant.key.source != group or variant.key.dirname != path.name):
            problem = "variant.json describes another variant (moved or copied here)"
        return self._entry(
            "broken" if problem else "variant",
            path=path,
            source=group,
            status=f"broken: {problem}" if problem else "ok",
            variant=variant,
            created=variant.created,
            last_used=variant.last_used,
        )

    def _other_entry(self, kind: str, path: Path) -> StoreEntry:
        status = "ok"
        if kind == "source" and not (path / "config.json").is_file():
            status = "broken: no config.json"
        try:
            created = path.stat().st_mtime
        except OSError:
            created = None
        return self._entry(kind, path=path, source=path.name, status=status, created=created)

    def _partial(self, path: Path, source: str) -> StoreEntry:
        pid = int(_PARTIAL.match(path.name)["pid"])
        alive = _pid_alive(pid)
        status = f"building (process {pid})" if alive else f"stale: left by process {pid}, which is gone"
        return self._entry("partial", path=path, source=source, status=status)

    def find_entries(self, target: str) -> list[StoreEntry]:
        """Entries a user names: an id (or its first characters), a path in the store, or a source.

        A source (its folder name under variants/, or the model as given to convert) selects all its variants.
        """
        target = target.strip()
        entries = self.entries()
        path = Path(target).expanduser()
        if path.is_absolute() or "/" in target or os.sep in target:
            if not path.is_absolute() and not path.exists():
                path = self.root / path  # relative to the store root, as `models list` shows it
            resolved = _resolved(path)
            if not _is_within(resolved, _resolved(self.root)):
                raise Phi3Error(f"{target} is not in the model store ({self.root}); phi3 removes only its own files.")
            found = [e for e in entries if _resolved(e.path) == resolved]
            if found:
                return found
            raise StoreEntryNotFoundError(
                f"{target} is not an entry of the model store.",
                hint="`phi3 models list` shows the ids and paths you can name.",
            )
        if len(target) >= 4:
            found = [e for e in entries if e.id.startswith(target.lower())]
            if found:
                return found
        found = [
            e
            for e in entries
            if e.kind in ("variant", "broken")
            and e.path.parent.parent == self.variants_dir
            and (e.source == target or (e.variant and e.variant.source_spec == target))
        ]
        if found:
            return found
        raise StoreEntryNotFoundError(
            f"Nothing in the model store matches {target!r}.",
            hint="`phi3 models list` shows the ids, sources and paths you can name.",
        )

    def remove(self, entry: StoreEntry) -> int:
        """Delete an entry (atomically out of sight first); return the bytes freed."""
        if entry.kind == "partial" and entry.status.startswith("building"):
            raise Phi3Error(
                f"{entry.path} is being built right now ({entry.status}); it cannot be removed until that build ends."
            )
        if not entry.path.exists() and not entry.path.is_symlink():
            raise StoreEntryNotFoundError(f"{entry.path} no longer exists.")
        size = entry.size
        path = entry.path
        if entry.kind != "partial" and path.is_dir() and not path.is_symlink():
            # Out of sight under a stale-partial name first, so an interrupted removal never leaves
            # a half-deleted variant under its real name; the next build cleans it up.
            hidden = path.parent / f".{path.name}.old-{os.getpid()}"
            path.rename(hidden)
            path = hidden
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        group = entry.path.parent
        if group.parent == self.variants_dir and group.is_dir() and not any(group.iterdir()):
            group.rmdir()
        return size

    def prune_candidates(self, *, unused_days: float | None = None, now: float | None = None) -> list[PruneReason]:
        """What prune would remove, and why: stale half-builds, broken entries, variants built by runtime
        versions that are no longer installed, and (with unused_days) variants not used for that long."""
        now = time.time() if now is None else now
        picked = []
        for entry in self.entries():
            reason = None
            if entry.kind == "partial" and entry.status.startswith("stale"):
                reason = entry.status
            elif entry.kind == "broken":
                reason = entry.status
            elif entry.kind == "variant" and entry.variant is not None:
                if changed := entry.variant.outdated():
                    reason = "built with " + ", ".join(
                        f"{name} {built} (now {now_v or 'not installed'})" for name, (built, now_v) in changed.items()
                    )
                elif unused_days is not None and now - entry.variant.last_used >= unused_days * 86400:
                    reason = f"unused for {(now - entry.variant.last_used) / 86400:.0f} days"
            if reason:
                picked.append(PruneReason(entry, reason))
        return picked

    def total_size(self) -> int:
        """Bytes on disk under the store root, as `du -s -B1` counts them."""
        return dir_size(self.root) if self.root.exists() else 0

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
