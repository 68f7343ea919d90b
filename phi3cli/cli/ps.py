"""`phi3 ps`: the models a running `phi3 serve` offers, which are loaded, where, since when and in how much memory."""

from __future__ import annotations

import time
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from phi3cli.cli.errors import user_errors
from phi3cli.cli.render import out_console


@user_errors
def ps(
    url: Annotated[
        str, typer.Option("--url", help="The server's address, as `phi3 serve` printed it.")
    ] = "http://127.0.0.1:8000",
    api_key: Annotated[
        str | None,
        typer.Option("--api-key", envvar="PHI3_API_KEY", show_envvar=True, help="The key the server requires."),
    ] = None,
) -> None:
    """Show the models a running `phi3 serve` offers: loaded or not, backend, device, since when, memory, keep-alive."""
    from phi3cli.server_status import served_models

    models = served_models(url, api_key)
    table = Table("model", "loaded", "backend", "device", "since", "memory", "keep alive", "running")
    now = time.time()
    for m in models:
        if not m.loaded:
            table.add_row(escape(m.id), "[dim]no[/]", "", "", "", "", "", "")
            continue
        since = f"{time.strftime('%H:%M:%S', time.localtime(m.since))} ({_ago(now - m.since)})" if m.since else ""
        memory = f"{m.memory_bytes / 2**20:,.0f} MiB" if m.memory_bytes is not None else "?"
        keep = "forever" if m.keep_alive_s is None else f"{m.keep_alive_s:g} s idle"
        busy = f"{m.running}" + (f" (+{m.waiting} waiting)" if m.waiting else "")
        table.add_row(escape(m.id), "yes", f"{m.backend} {m.format}", m.device, since, memory, keep, busy)
    out_console().print(table)


def _ago(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds} s ago" if seconds < 120 else f"{seconds // 60} min ago"
