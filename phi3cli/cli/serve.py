"""`phi3 serve`: the model behind a local OpenAI-compatible HTTP API, for other programs to use."""

from __future__ import annotations

from typing import Annotated

import typer

from phi3cli.cli.errors import user_errors
from phi3cli.cli.options import (
    AllowFallbackOpt,
    BackendOpt,
    DeviceChoice,
    DeviceOpt,
    FormatOpt,
    ModelOpt,
    ThreadsOpt,
    TrustRemoteCodeOpt,
)
from phi3cli.cli.render import RichProgress, err_console
from phi3cli.generation import open_model
from phi3cli.sources import DEFAULT_MODEL


@user_errors
def serve(
    model: ModelOpt = DEFAULT_MODEL,
    device: DeviceOpt = DeviceChoice.auto,
    backend: BackendOpt = None,
    format: FormatOpt = None,
    host: Annotated[
        str,
        typer.Option(
            "--host", help="Address to listen on. The default answers this machine only; 0.0.0.0 is everyone."
        ),
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option("--port", "-p", min=0, max=65535, help="Port to listen on (0: any free one).")
    ] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar="PHI3_API_KEY",
            show_envvar=True,
            help="Require 'Authorization: Bearer KEY' on every request (401 otherwise).",
        ),
    ] = None,
    threads: ThreadsOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    allow_fallback: AllowFallbackOpt = False,
) -> None:
    """Serve a model over HTTP in the OpenAI format: /v1/chat/completions, /v1/completions, /v1/models, /health.

    The model loads once (converted first if needed); requests are answered one at a time, in order,
    and a client that disconnects stops its generation. Point any OpenAI client at http://HOST:PORT/v1.
    """
    from phi3cli import serve as server  # needs the serve extra; imported only here

    sock = server.bind(host, port)  # before loading, so a taken port fails at once
    try:
        with RichProgress() as progress:
            loaded, route = open_model(
                model,
                backend=backend,
                device=device.value,
                format=format,
                threads=threads,
                trust_remote_code=trust_remote_code,
                allow_fallback=allow_fallback,
                progress=progress,
            )
            progress.phase("Warming up")
            server.warm_up(loaded)
    except BaseException:
        sock.close()
        raise
    if device == DeviceChoice.auto:
        err_console.print(f"[dim]{route.reason}[/]", soft_wrap=True)
    url = server.url_of(sock)
    err_console.print(
        f"[bold]{model}[/] · {loaded.backend} {loaded.format} on {loaded.executed_device} · "
        f"context {loaded.context_length} tokens · loaded in {loaded.load_seconds:.1f} s",
        soft_wrap=True,
    )
    if not server.is_loopback(host):
        err_console.print(
            f"[bold yellow]Warning:[/] listening on {host}: other machines on the network can use this model"
            + ("." if api_key else " and nothing asks them for a key (add --api-key)."),
            soft_wrap=True,
        )
    err_console.print(
        f"Serving [bold]{model}[/] at [bold]{url}/v1[/]"
        + (" (API key required)" if api_key else "")
        + ". Ctrl-C stops.",
        soft_wrap=True,
    )
    try:
        server.run(server.create_app(loaded, model, api_key=api_key), sock)
    except KeyboardInterrupt:
        pass
    finally:
        loaded.close()
    err_console.print("[dim]Server stopped.[/]")
