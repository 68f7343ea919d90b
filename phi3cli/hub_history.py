"""The record of the hub models phi3 ran (hub-models.json in the store), as `phi3 models` lists them: where they
lie in the Hugging Face hub cache, their size there, and deleting them from it, which only happens when the user asks
(other tools share that cache).

phi3 records each use in the store (hub-models.json); the files stay in the hub cache, as huggingface-hub keeps
them (snapshots/REVISION/... linking into blobs/).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from phi3cli.store import ModelStore
from phi3cli.util import short_hash, write_atomically

RECORD = "hub-models.json"
SCHEMA = "phi3.hub-models/1"


@dataclass
class HubUse:
    """One hub model (a repo's folder, or its checkpoint) that phi3 ran from the hub cache."""

    repo: str
    variant: str  # its folder in the repo, "" for the root
    runtime: str  # the backend that runs it as it is, "" for a checkpoint phi3 converts
    revision: str
    path: str  # the folder in the snapshot
    last_used: float

    @property
    def id(self) -> str:
        return short_hash("hub", self.repo, self.variant)[:8]

    @property
    def name(self) -> str:
        return f"{self.repo}:{self.variant}" if self.variant else self.repo

    @property
    def folder(self) -> Path:
        return Path(self.path)

    @property
    def snapshot(self) -> Path:
        return self.folder.parents[len(Path(self.variant).parts) - 1] if self.variant else self.folder

    @property
    def cache_root(self) -> Path:
        """The hub cache folder (HF_HUB_CACHE when it was used)."""
        return self.snapshot.parent.parent.parent

    def files(self) -> list[Path]:
        """The variant's files: those directly in its folder (a checkpoint's root, an IR or ONNX folder)."""
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.iterdir() if p.is_file() or p.is_symlink())

    def size(self) -> int:
        """Bytes on disk of its files (the blobs they link to), as `du -L` counts them."""
        seen: set[tuple[int, int]] = set()
        total = 0
        for p in self.files():
            try:
                st = p.stat()
            except OSError:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
        return total

    @property
    def status(self) -> str:
        if not self.folder.is_dir():
            return "gone from the hub cache"
        broken = [p.name for p in self.files() if not p.exists()]
        return f"broken: {', '.join(broken)} missing" if broken else "ok"


def _path(store: ModelStore) -> Path:
    return store.root / RECORD


def _read(store: ModelStore) -> list[HubUse]:
    try:
        data = json.loads(_path(store).read_text())
        if data.get("schema") != SCHEMA:
            return []
        return [HubUse(**entry) for entry in data["models"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def _write(store: ModelStore, uses: list[HubUse]) -> None:
    data = {"schema": SCHEMA, "models": [asdict(u) for u in uses]}
    write_atomically(_path(store), json.dumps(data, indent=2) + "\n")


def record_use(store: ModelStore, *, repo: str, variant: str, runtime: str, revision: str, path: Path) -> None:
    """Note that phi3 ran this hub model now (one entry per repo and folder: the latest revision used)."""
    with store.lock("hub-models"):
        uses = [u for u in _read(store) if (u.repo, u.variant) != (repo, variant)]
        uses.append(HubUse(repo, variant, runtime, revision, str(Path(path).absolute()), time.time()))
        _write(store, sorted(uses, key=lambda u: (u.repo, u.variant)))


def hub_uses(store: ModelStore) -> list[HubUse]:
    """Every hub model phi3 ran, by repo and folder."""
    return _read(store)


def find_hub_uses(store: ModelStore, target: str) -> list[HubUse]:
    """The hub models a user names: an id (its first 4+ characters), a repo (all its folders), or REPO:FOLDER."""
    target = target.strip()
    uses = _read(store)
    found = [u for u in uses if target in (u.repo, u.name)]
    if not found and len(target) >= 4:
        found = [u for u in uses if u.id.startswith(target.lower())]
    return found


def forget(store: ModelStore, use: HubUse) -> None:
    with store.lock("hub-models"):
        _write(store, [u for u in _read(store) if (u.repo, u.variant) != (use.repo, use.variant)])


def delete_from_cache(store: ModelStore, use: HubUse) -> int:
    """Delete a hub model's files from the hub cache and forget it; return the bytes freed.

    When they are the whole cached revision, huggingface-hub's own delete_revisions removes it (snapshot, refs
    and blobs); otherwise (one folder of a multi-variant repo) its links go, and each blob no other link uses.
    """
    freed = 0
    if use.folder.is_dir():
        mine = set(use.files())
        everything = {p for p in use.snapshot.rglob("*") if p.is_file() or p.is_symlink()}
        freed = _delete_revision(use) if everything <= mine else _delete_files(use, mine)
    forget(store, use)
    return freed


def _delete_revision(use: HubUse) -> int:
    from huggingface_hub import HFCacheInfo, scan_cache_dir

    info = scan_cache_dir(use.cache_root)
    repo_dir = use.snapshot.parent.parent
    repos = frozenset(r for r in info.repos if Path(r.repo_path) == repo_dir)
    if not repos:  # huggingface-hub does not take it for a cached repo (a corrupted entry): remove the files alone
        return _delete_files(use, set(use.files()))
    # delete_revisions matches a commit in any repo of the cache: ask it about this repo alone.
    strategy = HFCacheInfo(size_on_disk=0, repos=repos, warnings=[]).delete_revisions(use.snapshot.name)
    strategy.execute()
    return strategy.expected_freed_size


def _delete_files(use: HubUse, mine: set[Path]) -> int:
    repo_dir = use.snapshot.parent.parent
    kept = {os.path.realpath(p) for p in (repo_dir / "snapshots").rglob("*") if p.is_symlink() and p not in mine}
    freed = 0
    for link in sorted(mine):
        blob = Path(os.path.realpath(link)) if link.is_symlink() else None
        if blob is None:
            freed += link.stat().st_blocks * 512
        link.unlink()
        if blob is not None and str(blob) not in kept and repo_dir in blob.parents and blob.exists():
            freed += blob.stat().st_blocks * 512
            blob.unlink()
    folder = use.folder
    while folder != use.snapshot and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
        folder = folder.parent
    return freed
