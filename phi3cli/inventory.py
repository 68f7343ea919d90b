"""What the model store holds, as `phi3 models` lists, removes and prunes it.

Every variant, materialised source and cache, and the broken or half-built entries a killed build left; ids are
short hashes of paths inside the store, so they stay the same from one listing to the next.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from phi3cli.errors import Phi3Error, StoreEntryNotFoundError
from phi3cli.store import MANIFEST, ModelStore, Variant, variant_problem
from phi3cli.util import dir_size, partial_owner, pid_alive, short_hash


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


class StoreInventory:
    """Listing and cleaning one model store."""

    def __init__(self, store: ModelStore):
        self.store = store

    def variants(self) -> list[Variant]:
        """Every complete, sound variant in the store."""
        return [e.variant for e in self.entries() if e.kind == "variant" and e.variant is not None]

    def entries(self) -> list[StoreEntry]:
        """Everything the store holds: variants, materialised sources, caches, broken and half-built entries."""
        found: list[StoreEntry] = []
        if self.store.variants_dir.is_dir():
            for group in sorted(self.store.variants_dir.iterdir()):
                if partial_owner(group.name):
                    found.append(self._partial(group, group.name))
                elif group.is_dir() and not group.name.startswith("."):
                    for path in sorted(group.iterdir()):
                        found.append(self._variant_entry(path, group.name))
                elif not group.name.startswith("."):
                    found.append(self._entry("broken", path=group, source="", status="broken: not a folder"))
        for kind, folder in (("source", self.store.sources_dir), ("cache", self.store.root / "cache")):
            if not folder.is_dir():
                continue
            for path in sorted(folder.iterdir()):
                if owner := partial_owner(path.name):
                    found.append(self._partial(path, owner[0]))
                elif not path.name.startswith("."):
                    found.append(self._other_entry(kind, path))
        return [e for e in found if e is not None]

    def entry_id(self, path: Path) -> str:
        """A short, stable id for an entry: a hash of its path inside the store."""
        return short_hash(path.relative_to(self.store.root).as_posix())[:8]

    def _entry(self, kind: str, *, path: Path, source: str, status: str, **more) -> StoreEntry:
        return StoreEntry(kind=kind, id=self.entry_id(path), path=path, source=source, status=status, **more)

    def _variant_entry(self, path: Path, group: str) -> StoreEntry | None:
        if partial_owner(path.name):
            return self._partial(path, group)
        if path.name.startswith("."):
            return None
        variant = self.store.read_manifest(path)
        if variant is None:
            why = "no variant.json" if not (path / MANIFEST).exists() else "variant.json unreadable or not ours"
            if not path.is_dir():
                why = "not a folder"
            return self._entry("broken", path=path, source=group, status=f"broken: {why}")
        problem = variant_problem(variant)
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
        pid = partial_owner(path.name)[1]
        alive = pid_alive(pid)
        status = f"building (process {pid})" if alive else f"stale: left by process {pid}, which is gone"
        return self._entry("partial", path=path, source=source, status=status)

    def find_entries(self, target: str) -> list[StoreEntry]:
        """Entries a user names: an id (or its first characters), a path in the store, or a source.

        A source (its folder name under variants/, or the model as given to convert) selects all its variants.
        """
        target = target.strip()
        entries = self.entries()
        path = Path(target).expanduser()
        by_spec = [e for e in entries if e.variant and e.variant.source_spec == target and not path.exists()]
        if by_spec:  # a hub id (OWNER/NAME) as given to convert, not a path
            return by_spec
        if path.is_absolute() or "/" in target or os.sep in target:
            if not path.is_absolute() and not path.exists():
                path = self.store.root / path  # relative to the store root, as `models list` shows it
            resolved = _resolved(path)
            if not _is_within(resolved, _resolved(self.store.root)):
                raise Phi3Error(
                    f"{target} is not in the model store ({self.store.root}); phi3 removes only its own files."
                )
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
            and e.path.parent.parent == self.store.variants_dir
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
        if group.parent == self.store.variants_dir and group.is_dir() and not any(group.iterdir()):
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
        return dir_size(self.store.root) if self.store.root.exists() else 0
