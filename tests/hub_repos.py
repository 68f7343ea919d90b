"""Hugging Face hub repos laid out in a real hub cache, as huggingface-hub leaves a download, for offline tests.

`publish` writes HF_HUB_CACHE/models--OWNER--NAME/{blobs/, snapshots/REVISION/..., refs/main}: each file a blob
(a hard link of the built file, so nothing is copied and deleting it never touches the store) and a relative
link to it in the snapshot, which is how huggingface-hub stores files on Linux.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

SKIP = {"variant.json"}  # the store's manifest: a published folder has none


def publish(cache: Path, repo_id: str, folders: dict[str, Path] = (), files: dict[str, bytes] = ()) -> Path:
    """Lay out repo_id: each local folder's files under its path in the repo ("" for the root), plus files
    given as bytes; return the snapshot folder."""
    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    revision = hashlib.sha1(repo_id.encode()).hexdigest()  # a commit hash of its own, as on the hub
    snapshot = repo / "snapshots" / revision
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    entries = {
        f"{where}/{p.name}".lstrip("/"): p
        for where, folder in dict(folders).items()
        for p in sorted(Path(folder).iterdir())
        if p.is_file() and p.name not in SKIP
    }
    entries.update(dict(files))
    for path, content in entries.items():
        blob = repo / "blobs" / hashlib.sha256(f"{repo_id}/{path}".encode()).hexdigest()
        if isinstance(content, bytes):
            blob.write_bytes(content)
        else:
            try:
                os.link(content, blob)
            except OSError:  # another file system
                shutil.copy2(content, blob)
        link = snapshot / path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


def demo_variants(demo_source, store) -> dict[str, Path]:
    """The demo's converted folders in the test store (built once): OpenVINO IR int4 ("ir"), ONNX Runtime GenAI
    int4 for the CPU ("cpu") and for DirectML ("dml"), to publish under the repo ids of ready-made variants."""
    from phi3cli.backends import get_backend
    from phi3cli.backends.base import ConvertRecipe
    from phi3cli.convert import ensure_variant

    def variant(backend: str, fmt: str, target: str = "cpu") -> Path:
        return ensure_variant(get_backend(backend), demo_source, ConvertRecipe(format=fmt, target=target), store)

    return {"ir": variant("openvino", "int4"), "cpu": variant("onnx", "int4"), "dml": variant("onnx", "int4", "dml")}


def resolve(spec: str, tmp_path, **kwargs):
    """resolve_source on a store of this test's own, with the notes it made."""
    from phi3cli.progress import SilentProgress
    from phi3cli.sources import resolve_source
    from phi3cli.store import ModelStore

    progress = SilentProgress()
    return resolve_source(spec, ModelStore(tmp_path / "home"), progress=progress, **kwargs), progress.notes
