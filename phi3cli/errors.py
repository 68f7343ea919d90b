"""Errors meant for the user: the CLI prints them as one line (plus a hint) and exits non-zero."""

from __future__ import annotations


class Phi3Error(Exception):
    """An error with a message a user can act on; `hint` names the command or flag that fixes it."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


class ModelNotFoundError(Phi3Error):
    """The model id, path or alias does not resolve to anything."""


class UnsupportedModelError(Phi3Error):
    """The model exists but is not a Phi-3-architecture model, or not in a format we can read."""


class OfflineError(Phi3Error):
    """The hub cannot be reached (or HF_HUB_OFFLINE is set) and nothing is cached."""


class BackendUnavailableError(Phi3Error):
    """A backend's optional extra is not installed, or it cannot run on this platform."""


class DeviceUnavailableError(Phi3Error):
    """The requested device is not present, or the runtime executed on another one.

    `instead` names a device that is present (gpu, cpu); the CLI turns it into the command to run there.
    """

    def __init__(self, message: str, hint: str | None = None, *, instead: str | None = None):
        super().__init__(message, hint)
        self.instead = instead


class ContextOverflowError(Phi3Error):
    """The prompt does not fit the model's context window."""


class ConversionError(Phi3Error):
    """A convert or quantize step failed; nothing was left at the output path."""


class NotEnoughMemoryError(Phi3Error):
    """A build or a load would need more memory than is available: refused before it starts, not killed halfway."""

    def __init__(self, message: str, hint: str | None = None, *, needed: int = 0, available: int = 0):
        super().__init__(message, hint)
        self.needed, self.available = needed, available  # bytes


class OutputExistsError(Phi3Error):
    """The output path exists and --force was not given."""


class StoreEntryNotFoundError(Phi3Error):
    """Nothing in the model store matches what the user named (`phi3 models rm/path`)."""


class SessionFileError(Phi3Error):
    """A chat session file cannot be read, is not a phi3 session, or names a model that is not here."""


class ConstraintError(Phi3Error):
    """The runtime's grammar engine refused a constraint (a schema feature it does not support); quotes its reason."""
