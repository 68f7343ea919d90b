"""One place that turns exceptions into one-line messages and exit codes."""

from __future__ import annotations

import functools
import os
import shlex
import sys
from collections.abc import Callable
from typing import Any

import typer

from phi3cli.errors import DeviceUnavailableError, Phi3Error

EXIT_INTERRUPTED = 130

Outcome = tuple[str, str | None, int]  # message, hint, exit code


def debug_enabled() -> bool:
    return os.environ.get("PHI3_DEBUG", "") not in ("", "0")


def command_on(device: str, argv: list[str] | None = None) -> str:
    """The command being run, with --device set to device (added if it was not given)."""
    args = list(sys.argv[1:] if argv is None else argv)
    for i, arg in enumerate(args):
        if arg in ("--device", "-d") and i + 1 < len(args):
            args[i + 1] = device
            break
        if arg.startswith("--device="):
            args[i] = f"--device={device}"
            break
    else:
        args += ["--device", device]
    return shlex.join(["phi3", *args])


def _run_instead(exc: DeviceUnavailableError) -> str | None:
    """The error's own hint, else the command that runs it on the device that is present."""
    if exc.hint or not exc.instead:
        return exc.hint
    return f"Run it on the {exc.instead.upper()} instead: {command_on(exc.instead)}"


def _unexpected(exc: BaseException) -> Outcome:
    from phi3cli.util import first_line  # on the error path only: keeps `phi3 --help` light

    return (
        f"Unexpected error: {first_line(exc, typed=True)}",
        "Run again with --debug (or PHI3_DEBUG=1) for the traceback.",
        1,
    )


# Exception type -> (message, hint, exit code); the first type the exception is an instance of wins, so the most
# specific types come first (as huggingface_hub's CLI maps its errors).
RULES: tuple[tuple[type[BaseException], Callable[[Any], Outcome]], ...] = (
    (DeviceUnavailableError, lambda exc: (exc.message, _run_instead(exc), exc.exit_code)),
    (Phi3Error, lambda exc: (exc.message, exc.hint, exc.exit_code)),
    (KeyboardInterrupt, lambda exc: ("Interrupted; nothing was left half-written.", None, EXIT_INTERRUPTED)),
    (MemoryError, lambda exc: ("Out of memory.", "Try a smaller --format (int4) or close other programs.", 1)),
    (BaseException, _unexpected),
)


def message_for(exc: BaseException) -> Outcome:
    """(message, hint, exit code) for an exception reaching the command line."""
    return next(rule(exc) for kind, rule in RULES if isinstance(exc, kind))


def user_errors(command):
    """Wrap a command so users see one line and an exit code, and --debug shows the traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except (Exception, KeyboardInterrupt) as exc:
            if debug_enabled():
                raise
            message, hint, code = message_for(exc)
            from rich.console import Console
            from rich.markup import escape

            err = Console(stderr=True, highlight=False)
            err.print(f"[bold red]Error:[/] {escape(message)}", soft_wrap=True)
            if hint:
                err.print(f"[dim]{escape(hint)}[/]", soft_wrap=True)
            sys.stderr.flush()
            raise typer.Exit(code) from None

    return wrapper
