"""The `phi3` command line. Each command lives in its own module; this file only registers them."""

from __future__ import annotations

import os
import signal
from typing import Annotated

import typer

from phi3cli import __version__
from phi3cli.cli.bench import bench
from phi3cli.cli.chat import chat
from phi3cli.cli.convert import convert
from phi3cli.cli.devices import devices
from phi3cli.cli.models import models_app
from phi3cli.cli.quantize import quantize
from phi3cli.cli.serve import serve

app = typer.Typer(
    name="phi3",
    help="Run Microsoft Phi-3 models on AI PCs (NPU, GPU, CPU) and ordinary machines.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"phi3 {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks instead of one-line errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Run Microsoft Phi-3 models on AI PCs (NPU, GPU, CPU) and ordinary machines."""
    if debug:
        os.environ["PHI3_DEBUG"] = "1"


app.command("bench")(bench)
app.command("chat")(chat)
app.command("convert")(convert)
app.command("devices")(devices)
app.command("quantize")(quantize)
app.command("serve")(serve)
app.add_typer(models_app, name="models")


def _terminate(signum, frame):
    # SIGTERM unwinds like Ctrl-C, so staging folders are removed and nothing half-written remains.
    raise KeyboardInterrupt


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    app(prog_name="phi3")
