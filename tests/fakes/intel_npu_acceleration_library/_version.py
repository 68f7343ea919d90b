"""FAKE: the real library's _version.py holds "v1.4.0"; the suffix names this as the fake."""

__version__ = "v1.4.0-fake"
