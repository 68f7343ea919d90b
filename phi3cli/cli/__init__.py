"""The `phi3` command line. Each command lives in its own module; this file only registers them."""

from __future__ import annotations

import importlib
import os
import signal
from typing import Annotated

import typer
import typer.main
from typer import _click as click
from typer.core import TyperCommand, TyperGroup

from phi3cli import __version__

# name: (module, attribute, the line `phi3 --help` shows), in the order it lists them. A command's module is
# imported only when it runs or shows its own help, so `phi3 --help` loads none of them; a test checks each line
# against the command's own help.
COMMANDS = {
    "bench": (
        "phi3cli.cli.bench",
        "bench",
        "Measure load time, time to first token, prefill and decode speed, memory, size and answer quality.",
    ),
    "chat": ("phi3cli.cli.chat", "chat", "Chat with a Phi-3 model, streaming the answer token by token."),
    "convert": (
        "phi3cli.cli.convert",
        "convert",
        "Convert a Phi-3 model to OpenVINO IR or ONNX Runtime GenAI at int4, int8 or fp16.",
    ),
    "devices": (
        "phi3cli.cli.devices",
        "devices",
        "Show the CPU, the devices each installed runtime sees, which extras are missing, each backend's options, "
        "and every NPU check.",
    ),
    "quantize": (
        "phi3cli.cli.quantize",
        "quantize",
        "Quantize a model's weights to int4, int8 or fp16 with a runtime's own quantizer.",
    ),
    "serve": (
        "phi3cli.cli.serve",
        "serve",
        "Serve a model over HTTP in the OpenAI format: /v1/chat/completions, /v1/completions, /v1/responses, /v1/models.",
    ),
    "ps": (
        "phi3cli.cli.ps",
        "ps",
        "Show the models a running `phi3 serve` offers: loaded or not, backend, device, since when, memory, keep-alive.",
    ),
    "models": (
        "phi3cli.cli.models",
        "models_app",
        "List, locate, remove and prune the models phi3 built (converted variants, the demo model, caches), "
        "list the hub models it ran from the Hugging Face hub cache, and list and pull the catalogue's short names.",
    ),
}


def load_command(name: str) -> click.Command:
    """The click command for NAME, built from its module (imported now)."""
    module, attribute, _ = COMMANDS[name]
    target = getattr(importlib.import_module(module), attribute)
    if isinstance(target, typer.Typer):
        return typer.main.get_group(target)
    single = typer.Typer(rich_markup_mode="rich", add_completion=False)
    single.command(name)(target)
    return typer.main.get_command(single)


class _LazyGroup(TyperGroup):
    """Lists the commands from COMMANDS; builds one only when it is invoked or asked for its own help."""

    _listing = False

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        if self._listing:  # the group's own --help needs only the name and the line
            return TyperCommand(name, short_help=COMMANDS[name][2])
        return load_command(name)

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False


app = typer.Typer(
    name="phi3",
    cls=_LazyGroup,
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


def main() -> None:
    from phi3cli.util import on_interrupt

    # SIGTERM unwinds like Ctrl-C, so staging folders are removed and nothing half-written remains.
    signal.signal(signal.SIGINT, on_interrupt)
    signal.signal(signal.SIGTERM, on_interrupt)
    app(prog_name="phi3")
