"""Small helpers every layer uses: exception text, package versions, writing files whole.

A leaf module: it imports only the standard library and phi3cli.errors, so anything may import it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from phi3cli.errors import ConversionError, OutputExistsError

# A runtime's source-location line ("Exception from src/core/...:123:", "Check '...' failed at ..."): not the reason.
_LOCATION = re.compile(r"^(Exception from \S+:\d+:?|Check '.*' failed at \S+:?)$")
_PARTIAL = re.compile(r"^\.(?P<name>.+)\.(?:partial|old)-(?P<pid>\d+)$")
_INTERRUPTS = [0]  # Ctrl-C and SIGTERM received by this process, counted by on_interrupt


def on_interrupt(signum, frame) -> None:
    """Signal handler for SIGINT and SIGTERM: count the signal, then unwind like Ctrl-C.

    Python only prints a KeyboardInterrupt raised inside a ``__del__`` (and some libraries catch it); the count
    lets atomic_output refuse to commit after an interrupt it never saw.
    """
    _INTERRUPTS[0] += 1
    raise KeyboardInterrupt


def first_line(exc: BaseException, *, typed: bool = False, limit: int = 240) -> str:
    """The line of an exception that says what went wrong; with typed, after its type ("ValueError: bad shape")."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    useful = [line for line in lines if not _LOCATION.match(line)]
    text = (useful or lines or [""])[0]
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    if typed or not text:
        return f"{exc.__class__.__name__}: {text}".rstrip(": ")
    return text


def package_version(distribution: str) -> str | None:
    """The installed version of a Python distribution, or None."""
    from importlib import metadata  # not at import time: it costs start-up

    try:
        return metadata.version(distribution)
    except (metadata.PackageNotFoundError, ValueError):
        return None


def package_versions(distributions: Iterable[str]) -> dict[str, str]:
    """{distribution: version} of those installed."""
    return {name: v for name in distributions if (v := package_version(name))}


def log_softmax(logits):
    """Log-probabilities (float32) of each row of logits (positions x vocabulary), computed in float64."""
    import numpy as np

    logits = np.asarray(logits, dtype=np.float64)
    top = logits.max(axis=-1, keepdims=True)
    return (logits - top - np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))).astype(np.float32)


def short_hash(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:10]


def slugify(text: str) -> str:
    """A folder-safe name for a model id or path."""
    return re.sub(r"[^A-Za-z0-9._-]+", "--", text).strip("-") or "model"


def write_atomically(path: Path, data: str | bytes) -> Path:
    """Write a file beside its final name and rename it into place, so a failure leaves no half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def copy_missing(src: Path, out: Path, names: Iterable[str]) -> None:
    """Copy the named files of src that exist into out, where out does not have them yet."""
    for name in names:
        if (src / name).is_file() and not (out / name).exists():
            shutil.copy2(src / name, out / name)


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


def human_size(n: int) -> str:
    """Bytes in binary units, as `du -h` shows them."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def partial_owner(name: str) -> tuple[str, int] | None:
    """(final name, pid) for a staging or retired name (".NAME.partial-PID", ".NAME.old-PID"), else None."""
    m = _PARTIAL.match(name)
    return (m["name"], int(m["pid"])) if m else None


def remove_stale_partials(parent: Path) -> list[Path]:
    """Delete leftovers of builds whose process is gone (a killed convert); return what was removed."""
    removed = []
    if not parent.is_dir():
        return removed
    for p in parent.iterdir():
        owner = partial_owner(p.name)
        if owner and not pid_alive(owner[1]):
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
    interrupts = _INTERRUPTS[0]
    try:
        yield staging
        if _INTERRUPTS[0] != interrupts:
            raise KeyboardInterrupt  # interrupted while writing, and something swallowed it: commit nothing
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


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading token ids a and b share."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
