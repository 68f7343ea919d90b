"""How long-running core work reports progress without knowing about any terminal library."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    """Receives the phases of long work; the CLI draws them, library callers may ignore them."""

    def phase(self, description: str, total: float | None = None) -> None:
        """A new phase begins; total is its size in units when known (bytes, steps)."""

    def advance(self, amount: float = 1.0) -> None:
        """Some units of the current phase are done."""

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

    def note(self, message: str) -> None:
        self.notes.append(message)
