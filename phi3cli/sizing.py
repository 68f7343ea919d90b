"""How big a model is and how much memory (and disk) building a variant of it or loading one takes: the checks
before a conversion and before a load.

A conversion or a load that runs out of memory is killed by the kernel with no message; these checks say so
before the first byte is written or read. Nothing heavy is imported here.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from phi3cli.errors import ConversionError, NotEnoughMemoryError

GB = 1e9
# A test (or a user who knows better) sets the memory phi3 may count on, in GB, instead of what the system reports.
MEMORY_LIMIT_ENV = "PHI3_MEMORY_LIMIT_GB"
# And the disk space free where a build writes, in GB, instead of what the file system reports.
DISK_LIMIT_ENV = "PHI3_DISK_FREE_GB"
# Bytes per parameter of a built variant, from the 32-layer Phi-3-mini-shaped builds of
# docs/results/2026-12-05-real-size.md (int4: 0.58 with OpenVINO; 0.68 with ONNX Runtime GenAI, which keeps the
# embedding in float32), rounded up.
VARIANT_BYTES_PER_PARAMETER = {"int4": 0.7, "int8": 1.1, "fp16": 2.0, "fp32": 4.0}
# Models up to this size get the calibrated int4 default (scale estimation on phi3's text); larger ones the
# data-free one, which needs no inference pass over the full model (measured at Phi-3-mini's size: docs/results).
CALIBRATED_MAX_PARAMETERS = 1_000_000_000


def parameter_count(config: dict) -> int:
    """The parameters of a checkpoint, from its config.json: the decoder (embedding and lm_head included), and
    the image and audio encoders of a multimodal one."""
    return decoder_parameters(config) + encoder_parameters(config)


def decoder_parameters(config: dict) -> int:
    """The parameters of a decoder-only transformer, from its config.json (embedding and lm_head included)."""
    hidden = int(config["hidden_size"])
    layers = int(config.get("num_hidden_layers") or 0)
    heads = int(config.get("num_attention_heads") or 1)
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    inter = int(config.get("intermediate_size") or 4 * hidden)
    vocab = int(config.get("vocab_size") or 0)
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)
    mlp = 3 * hidden * inter
    embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings") else 2)
    return layers * (attention + mlp + 2 * hidden) + embeddings + hidden


# Phi-3.5-vision's config names its image encoder instead of giving its widths: CLIP ViT-L/14 at 336 pixels
# (24 layers, width 1024, MLP 4096), whose four-patch features a two-layer MLP projects to the text width.
CLIP_VIT_L = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24}
CLIP_VIT_L_NAMES = ("openai/clip-vit-large-patch14-336", "clip_vision_model")


def encoder_parameters(config: dict) -> int:
    """The image and audio encoders of a multimodal checkpoint with their projections to the text width (0 for a
    text model). The formulas follow the layers of transformers' Phi4Multimodal and Phi-3.5-vision's code; for
    Phi-4-multimodal's default widths they give 0.44B (image) and 0.46B (audio), within 1 % of transformers' count
    (tests/test_sizing.py)."""
    text = int(config.get("hidden_size") or 0)
    total = 0
    vision = config.get("vision_config")
    if isinstance(vision, dict) and vision.get("hidden_size"):  # phi4mm: a SigLIP tower and its pooling head
        width = int(vision["hidden_size"])
        total += _tower(vision, extra_layers=1) + width * text + text * text
    image = config.get("img_processor")
    if isinstance(image, dict) and (
        image.get("model_name") in CLIP_VIT_L_NAMES or image.get("name") in CLIP_VIT_L_NAMES
    ):
        total += _tower(CLIP_VIT_L) + 4 * CLIP_VIT_L["hidden_size"] * text + text * text  # phi3_v
    audio = config.get("audio_config")
    if isinstance(audio, dict) and audio.get("hidden_size"):  # phi4mm: a conformer
        width = int(audio["hidden_size"])
        inter = int(audio.get("intermediate_size") or 4 * width)
        blocks = int(audio.get("num_blocks") or audio.get("num_hidden_layers") or 0)
        # Per block: attention and the convolution module (4 h^2 each), two gated feed-forwards (3 h i each); the
        # input subsampling about 10 h^2; a projection pair for speech and one for speech with images.
        total += blocks * (8 * width * width + 6 * width * inter) + 10 * width * width
        total += 2 * (width * text + text * text)
    return total


def _tower(config: dict, extra_layers: int = 0) -> int:
    """A ViT encoder stack: attention (4 h^2) and a two-layer MLP (2 h i) per layer."""
    width = int(config["hidden_size"])
    inter = int(config.get("intermediate_size") or 4 * width)
    layers = int(config.get("num_hidden_layers") or 0) + extra_layers
    return layers * (4 * width * width + 2 * width * inter)


def model_config(hf_dir: Path) -> dict:
    try:
        return json.loads((Path(hf_dir) / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConversionError(f"{hf_dir} has no readable config.json ({exc}).") from exc


def checkpoint_dtype(config: dict) -> str:
    """The dtype the checkpoint's weights are stored in (float32 when config.json does not say)."""
    return str(config.get("torch_dtype") or config.get("dtype") or "float32").replace("torch.", "")


def calibrated_by_default(config: dict) -> bool:
    """Whether the int4 default of a converting backend fits its scales on calibration text for this model."""
    return parameter_count(config) <= CALIBRATED_MAX_PARAMETERS


@dataclass(frozen=True)
class Estimate:
    """The memory a build (or a load) needs at its peak, and what dominates it (for the message).

    What it holds itself: a checkpoint read through a memory map counts only for what the build keeps, since the
    kernel drops mapped pages it has read when memory runs short (so peak RSS, which counts them, can be higher).
    """

    peak_bytes: int
    what: str
    # The disk the build fills at its peak: the variant, and what it writes on the way (an fp16 or fp32 export
    # that is then compressed). 0: not estimated.
    disk_bytes: int = 0


def variant_bytes(params: int, fmt: str) -> int:
    """About how many bytes a variant of a model with params parameters takes on disk in format fmt."""
    return int(VARIANT_BYTES_PER_PARAMETER.get(fmt, 2.0) * params)


# What a CPU load held at its least, measured at 32 layers of Phi-3-mini's widths inside memory cgroups
# (benchmarks/memory_floor.py; docs/results/2026-12-06-memory.md): OpenVINO ran in 2.7 GB and was killed in 2.6 GB
# with its 2.26 GB int4 IR; ONNX Runtime GenAI ran in 3.1 GB and was killed in 3.0 GB with its 2.68 GB folder.
# The weights and a fifth more, rounded up.
LOAD_FACTOR = 1.2
LOAD_BASE = int(0.1 * GB)


def folder_bytes(folder: Path) -> int:
    """The bytes of every file under folder, as a load reads them (their length, not the blocks they take)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def load_estimate(folder: Path) -> Estimate:
    """The memory a CPU runtime holds while it runs the model in folder (ONNX Runtime GenAI's and OpenVINO's, as
    measured; the KV cache grows on top of it with the context)."""
    weights = folder_bytes(folder)
    return Estimate(
        int(LOAD_FACTOR * weights + LOAD_BASE), f"its {weights / GB:.1f} GB of weights and the runtime's own"
    )


def gb_override(name: str) -> int | None:
    """Bytes from an environment variable given in GB (None where it is unset)."""
    value = os.environ.get(name)
    if not value:
        return None
    try:
        return int(float(value) * GB)
    except ValueError as exc:
        raise ConversionError(f"{name}={value!r} is not a number of GB.") from exc


def available_memory() -> int:
    """Bytes a new build or load can use: the override in PHI3_MEMORY_LIMIT_GB, else the system's available memory,
    or less where this process's memory cgroup (a container's limit, say) leaves less."""
    limit = gb_override(MEMORY_LIMIT_ENV)
    if limit is not None:
        return limit
    import psutil

    available = int(psutil.virtual_memory().available)
    room = cgroup_available()
    return available if room is None else min(available, room)


CGROUP_ROOT = Path("/sys/fs/cgroup")
NO_LIMIT = 2**60  # cgroup v1 writes "no limit" as a number near 2^63


def cgroup_available(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = CGROUP_ROOT) -> int | None:
    """What this process's memory cgroup still allows, on Linux where a limit is set (None elsewhere): the limit
    less what the group holds, its file pages that no process maps left out (the page cache the kernel reclaims,
    which stays charged to the group after the processes that read it end). A limited group's processes are
    killed at its limit whatever the machine has free, and psutil reports the machine's."""
    try:
        lines = [line.split(":", 2) for line in proc_cgroup.read_text().splitlines() if line.count(":") >= 2]
    except OSError:
        return None
    for _, controllers, path in lines:  # cgroup v1, the memory controller's own hierarchy
        if "memory" in controllers.split(","):
            return _v1_room(root / "memory", path)
    for _, controllers, path in lines:  # cgroup v2: the unified hierarchy, limits anywhere up the tree
        if controllers == "" and (root / "cgroup.controllers").exists():
            return _v2_room(root, path)
    return None


def _v1_room(root: Path, path: str) -> int | None:
    folder = root / path.lstrip("/")
    if not folder.is_dir():  # in a container, its own group is mounted as the root
        folder = root
    stat = _memory_stat(folder)
    limit = stat.get("hierarchical_memory_limit") or _read_int(folder / "memory.limit_in_bytes")
    usage = _read_int(folder / "memory.usage_in_bytes")
    if not limit or limit >= NO_LIMIT or usage is None:
        return None
    return _room(limit, usage, stat, V1_FILE_PAGES)


def _v2_room(root: Path, path: str) -> int | None:
    folder, room = root / path.lstrip("/"), None
    if not folder.is_dir():
        folder = root
    while True:
        limit, usage = _read_int(folder / "memory.max"), _read_int(folder / "memory.current")
        if limit is not None and usage is not None:  # "max" (no limit) reads as None
            here = _room(limit, usage, _memory_stat(folder), V2_FILE_PAGES)
            room = here if room is None else min(room, here)
        if folder == root or root not in folder.parents:
            return room
        folder = folder.parent


# memory.stat's names for a group's inactive, active and mapped file pages, in cgroup v1 (with its children) and v2
V1_FILE_PAGES = ("total_inactive_file", "total_active_file", "total_mapped_file")
V2_FILE_PAGES = ("inactive_file", "active_file", "file_mapped")


def _room(limit: int, usage: int, stat: dict[str, int], names: tuple[str, str, str]) -> int:
    """The limit less what the group holds, the page cache no process maps left out (the kernel reclaims it first)."""
    inactive, active, mapped = (stat.get(name, 0) for name in names)
    return max(0, limit - (usage - max(0, inactive + active - mapped)))


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _memory_stat(folder: Path) -> dict[str, int]:
    try:
        pairs = (line.split() for line in (folder / "memory.stat").read_text().splitlines())
        return {p[0]: int(p[1]) for p in pairs if len(p) == 2 and p[1].isdigit()}
    except OSError:
        return {}


def check_memory(estimate: Estimate | None, action: str, hint: str) -> None:
    """Refuse an action (a build, a load: "Converting X for openvino (int4)") whose estimated peak is more than the
    memory available, in one line, before it starts."""
    if estimate is None:
        return
    available = available_memory()
    if estimate.peak_bytes > available:
        raise NotEnoughMemoryError(
            f"{action} needs about {estimate.peak_bytes / GB:.1f} GB of memory ({estimate.what}); "
            f"{available / GB:.1f} GB is available, so it would be killed halfway.",
            hint=hint,
            needed=estimate.peak_bytes,
            available=available,
        )


def free_disk(where: Path) -> int:
    """Bytes free on the file system that holds where (or the nearest folder above it that exists): the override
    in PHI3_DISK_FREE_GB, else what the file system reports."""
    limit = gb_override(DISK_LIMIT_ENV)
    if limit is not None:
        return limit
    where = Path(where).absolute()
    while not where.exists() and where != where.parent:
        where = where.parent
    return shutil.disk_usage(where).free


def check_disk(estimate: Estimate | None, where: Path, action: str) -> None:
    """Refuse a build ("Converting X for openvino (int4)") whose output will not fit on the disk that receives it
    (where), in one line, before it starts."""
    if estimate is None or not estimate.disk_bytes:
        return
    free = free_disk(where)
    if estimate.disk_bytes > free:
        raise ConversionError(
            f"{action} writes about {estimate.disk_bytes / GB:.1f} GB; {free / GB:.1f} GB is free on the "
            f"disk holding {where}, so it would fail halfway.",
            hint="Free some space (`phi3 models list` shows what phi3 keeps, `phi3 models rm` removes it), or "
            "convert into another disk's folder with -o.",
        )
