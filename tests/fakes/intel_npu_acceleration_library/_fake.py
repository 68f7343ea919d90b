"""FAKE-only controls (no such module in the real library): the recorded calls and the pretend NPU."""

from __future__ import annotations

CALLS: list[tuple[str, tuple, dict]] = []  # (function, args, kwargs) for each public call the tests check
NPU_PRESENT = False  # what backend.npu_available() answers; this machine has no NPU


def record(name: str, *args, **kwargs) -> None:
    CALLS.append((name, args, dict(kwargs)))


def reset(npu_present: bool = False) -> None:
    global NPU_PRESENT
    CALLS.clear()
    NPU_PRESENT = npu_present
