"""What both converting backends share of NNCF: the calibration text phi3 ships, and NNCF's progress bars routed
to phi3's Progress. NNCF itself is imported only while compressing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from phi3cli.progress import Progress

CALIBRATION_TEXT = Path(__file__).with_name("data") / "calibration.txt"


def calibration_samples(path: Path = CALIBRATION_TEXT) -> list[str]:
    """The calibration text shipped with phi3 (plain English, not the text quality is measured on), by paragraph."""
    return [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]


class _TrackToProgress:
    """Stands in for nncf's `track` progress bar, reporting to our Progress instead of its own Rich bar."""

    progress: Progress | None = None

    def __init__(self, sequence=None, description="Working...", total=None, weights=None, **_):
        self.sequence, self.description, self.weights = sequence, description, weights
        if weights is not None:
            total = sum(weights)
        elif total is None and hasattr(sequence, "__len__"):
            total = len(sequence)
        self.total = total

    def __iter__(self):
        self.__enter__()
        weights = self.weights or []
        for i, item in enumerate(self.sequence):
            yield item
            self.update(weights[i] if i < len(weights) else 1)

    def __enter__(self):
        if self.progress:
            self.progress.phase(f"NNCF: {self.description.rstrip('.')}", total=self.total)
        return self

    def __exit__(self, *exc):
        return None

    def update(self, advance: float = 1, **_):
        if self.progress:
            self.progress.advance(advance)


WEIGHT_COMPRESSION_STEPS = ("algorithm", "mixed_precision", "awq", "scale_estimation", "gptq")


@contextlib.contextmanager
def nncf_progress(progress: Progress) -> Iterator[None]:
    """Route NNCF's weight-compression progress bars to our Progress for the duration of the block."""
    import importlib
    import logging

    patched = []
    names = [f"nncf.quantization.algorithms.weight_compression.{n}" for n in WEIGHT_COMPRESSION_STEPS]
    for name in [*names, "nncf.common.tensor_statistics.aggregator"]:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "track"):
            patched.append((module, module.track))
            module.track = _TrackToProgress
    _TrackToProgress.progress = progress
    logger = logging.getLogger("nncf")  # set after importing nncf, which sets it to INFO: its bit-width tables
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        _TrackToProgress.progress = None
        logger.setLevel(level)
        for module, original in patched:
            module.track = original
