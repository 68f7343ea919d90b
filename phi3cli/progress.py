"""How long-running core work reports progress without knowing about any terminal library."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    """Receives the phases of long work; the CLI draws them, library callers may ignore them."""

    def phase(self, description: str, total: float | None = None) -> None:
        """A new phase begins; total is its size in units when known (bytes, steps)."""

    def advance(self, amount: float = 1.0) -> None:
        """Some units of the current phase are done."""

    def grow(self, amount: float) -> None:
        """The current phase turned out bigger than its total said (work found only once it ran)."""

    def note(self, message: str) -> None:
        """Something the user should read (a choice made on their behalf, a fallback)."""


class SilentProgress:
    """A Progress that shows nothing; notes are kept so callers can read them back."""

    def __init__(self) -> None:
        self.notes: list[str] = []

    def phase(self, description: str, total: float | None = None) -> None:
        pass

    def advance(self, amount: float = 1.0) -> None:
        pass

    def grow(self, amount: float) -> None:
        pass

    def note(self, message: str) -> None:
        self.notes.append(message)


# A step report (a bench worker's progress line) that says the phase has more steps, instead of finishing one.
MORE_STEPS = "more steps: "


def more_steps(message: str) -> int | None:
    """The steps a MORE_STEPS report adds; None for a report of a step done."""
    return int(message[len(MORE_STEPS) :]) if message.startswith(MORE_STEPS) else None
