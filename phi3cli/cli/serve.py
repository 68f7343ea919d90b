"""`phi3 serve`: the model behind a local OpenAI-compatible HTTP API, for other programs to use."""

from __future__ import annotations

from typing import Annotated

import typer

from phi3cli import DEFAULT_MODEL
from phi3cli.cli.errors import user_errors
from phi3cli.cli.options import (
    AllowFallbackOpt,
    AllowImageUrlsOpt,
    BackendOpt,
    ConvertOpt,
    DeviceChoice,
    DeviceOpt,
    FormatOpt,
    MaxImagePixelsOpt,
    OptionOpt,
    ThreadsOpt,
    TrustRemoteCodeOpt,
    adapter_options,
    backend_options,
)
from phi3cli.cli.render import RichProgress, err_console
from phi3cli.cli.speculate import AssistantTokensOpt, DraftOpt, NgramOpt, PromptLookupOpt, describe, requested


@user_errors
def serve(
    models: Annotated[
        list[str] | None,
        typer.Option(
            "--model",
            "-m",
            help="The model to serve (as `phi3 chat --model` takes it; default: demo). Repeat it to offer several, "
            "each under the id given: the first loads at start, the others when a request names them (as does a "
            "variant of the model store named by its id, from `phi3 models list`).",
        ),
    ] = None,
    max_loaded: Annotated[
        int | None,
        typer.Option(
            "--max-loaded",
            min=1,
            help="Keep at most N models loaded; loading another unloads the least recently used first. Default: "
            "no limit.",
            rich_help_panel="Several models",
        ),
    ] = None,
    keep_alive: Annotated[
        str | None,
        typer.Option(
            "--keep-alive",
            help="Unload a model after it has been idle this long (seconds, or 30s, 5m, 1h); a request's own "
            "keep_alive overrides it for its model. Default: keep models loaded.",
            rich_help_panel="Several models",
        ),
    ] = None,
    convert: ConvertOpt = False,
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
    metrics: Annotated[
        bool,
        typer.Option(
            "--metrics",
            help="Serve Prometheus metrics at /metrics: requests by route and status, tokens, time to first token "
            "and per token, queue depth, running sequences, KV-cache use, loaded models (never prompts).",
        ),
    ] = False,
    threads: ThreadsOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    allow_fallback: AllowFallbackOpt = False,
    option: OptionOpt = None,
    max_sequences: Annotated[
        int,
        typer.Option(
            "--max-sequences",
            min=1,
            help="Requests generated at once where the backend batches (/health says whether it does); more wait "
            "their turn. 1 runs them one at a time on the pipeline `phi3 chat` uses, with its greedy answers. "
            "With --ray: the most each replica takes.",
            rich_help_panel="Batching",
        ),
    ] = 8,
    kv_cache_gb: Annotated[
        float | None,
        typer.Option(
            "--kv-cache-gb",
            help="Memory for the KV cache that batched requests share. Default: room for every sequence's full "
            "context, at most a quarter of the memory available. A request that cannot fit in it gets a 400.",
            rich_help_panel="Batching",
        ),
    ] = None,
    prefix_caching: Annotated[
        bool,
        typer.Option(
            "--prefix-caching/--no-prefix-caching",
            help="Keep the KV cache of earlier prompts, so a client that resends a growing conversation does not "
            "have it read again (where the backend batches).",
            rich_help_panel="Batching",
        ),
    ] = True,
    draft: DraftOpt = None,
    prompt_lookup: PromptLookupOpt = False,
    num_assistant_tokens: AssistantTokensOpt = None,
    max_ngram_size: NgramOpt = None,
    ray: Annotated[
        bool,
        typer.Option(
            "--ray",
            help="Serve as a Ray Serve deployment: --replicas copies of the model, on the nodes of a Ray cluster "
            "(needs phi3cli's ray extra).",
            rich_help_panel="Ray",
        ),
    ] = False,
    ray_address: Annotated[
        str | None,
        typer.Option(
            "--ray-address",
            help="With --ray: join this Ray cluster (HEAD_IP:6379, as `ray start --head` prints). "
            "Default: start a Ray instance on this machine.",
            rich_help_panel="Ray",
        ),
    ] = None,
    replicas: Annotated[
        int,
        typer.Option("--replicas", min=1, help="With --ray: how many replicas load the model.", rich_help_panel="Ray"),
    ] = 1,
    allow_image_urls: AllowImageUrlsOpt = False,
    max_image_pixels: MaxImagePixelsOpt = None,
    adapter: Annotated[
        list[str] | None,
        typer.Option(
            "--adapter",
            help="Load a LoRA adapter (a PEFT folder) beside the model, as NAME=DIR[:ALPHA]; repeat it for several. "
            "A request whose model is MODEL:NAME runs with adapter NAME, one naming MODEL alone runs the base. With "
            "adapters, requests are answered one at a time (/health says so). OpenVINO on the CPU or GPU.",
            rich_help_panel="Adapters",
        ),
    ] = None,
) -> None:
    """Serve a model over HTTP in the OpenAI format: /v1/chat/completions, /v1/completions, /v1/responses, /v1/models.

    The model loads once (converted first if needed). Where the backend can, requests are batched
    (continuous batching: each starts as soon as there is room, all advance together); otherwise
    they are answered one at a time, in order. A client that disconnects stops its generation.
    With --ray, Ray Serve runs --replicas copies and routes the requests to them. With --draft or --prompt-lookup
    every request decodes speculatively; a request with `"speculative": false` proposes one token a pass instead.
    Point any OpenAI client at http://HOST:PORT/v1.
    """
    names = list(dict.fromkeys(models or [DEFAULT_MODEL]))
    model = names[0]
    idle = _keep_alive(keep_alive)
    if ray and (len(names) > 1 or max_loaded or keep_alive):
        raise typer.BadParameter("--ray serves one model: one --model, no --max-loaded or --keep-alive.")
    if not ray and (ray_address or replicas != 1):
        raise typer.BadParameter("--ray-address and --replicas apply with --ray only.")
    if ray and metrics:
        raise typer.BadParameter("--metrics is not available with --ray (each replica would count alone).")
    from phi3cli.backends.base import BATCHING, BatchingOptions

    options = backend_options(option) | adapter_options(adapter)
    if max_sequences > 1 and not adapter:  # with run-time adapters: one request at a time
        options[BATCHING] = BatchingOptions(max_sequences, kv_cache_gb, prefix_caching)
    load_kwargs = dict(
        backend=backend,
        device=device.value,
        format=format,
        threads=threads,
        trust_remote_code=trust_remote_code,
        allow_fallback=allow_fallback,
        options=options,
        convert=convert,
        speculation=requested(draft, prompt_lookup, num_assistant_tokens, max_ngram_size),
    )
    from phi3cli.images import ImageLimits
    from phi3cli.serve.images import ImageOptions

    images = ImageOptions(ImageLimits(max_pixels=max_image_pixels or ImageLimits.max_pixels), allow_image_urls)
    if ray:
        from phi3cli.loading import check_named_options

        check_named_options(backend, options)  # here, not in each replica's log
        where = (host, port, replicas, ray_address)
        return _serve_with_ray(model, load_kwargs, where, api_key, max_sequences, threads, images)
    _serve_here(names, load_kwargs, host, port, api_key, metrics, max_loaded, idle, images)


def _serve_here(names, load_kwargs, host, port, api_key, metrics, max_loaded, idle, images=None) -> None:
    """Bind the port, load and warm up the first model, then serve (the others on demand) until Ctrl-C."""
    import psutil

    from phi3cli import serve as server  # needs the serve extra; imported only here
    from phi3cli.loading import load

    model = names[0]
    sock = server.bind(host, port)  # before loading, so a taken port fails at once
    try:
        with RichProgress() as progress:
            before = psutil.Process().memory_info().rss
            loaded = load(model, **load_kwargs, progress=progress)
            progress.phase("Warming up")
            server.warm_up(loaded)
            memory = psutil.Process().memory_info().rss - before
    except BaseException:
        sock.close()
        raise
    if load_kwargs["device"] == DeviceChoice.auto.value:
        err_console.print(f"[dim]{loaded.route.reason}[/]", soft_wrap=True)
    url = server.url_of(sock)
    err_console.print(
        f"[bold]{model}[/] · {loaded.backend} {loaded.format} on {loaded.executed_device} · "
        f"context {loaded.context_length} tokens · loaded in {loaded.load_seconds:.1f} s"
        f"{describe(loaded.speculation)}",
        soft_wrap=True,
    )
    err_console.print(f"Requests: {server.describe(loaded)}.", soft_wrap=True, markup=False)
    _warn_if_open(host, api_key)
    more = f" (and {', '.join(names[1:])} on demand)" if len(names) > 1 else ""
    err_console.print(
        f"Serving [bold]{model}[/]{more} at [bold]{url}/v1[/]"
        + (" (API key required)" if api_key else "")
        + ". Ctrl-C stops.",
        soft_wrap=True,
    )

    def load_on_demand(name: str):
        on_demand = load(name, **load_kwargs)
        server.warm_up(on_demand)
        return on_demand

    from phi3cli.serve.pool import store_variant

    pool = server.ModelPool(names, load_on_demand, max_loaded, idle, find=store_variant)
    pool.add(model, loaded, loaded.load_seconds, memory)
    try:
        server.run(server.create_app(None, model, api_key=api_key, metrics=metrics, pool=pool, images=images), sock)
    except KeyboardInterrupt:
        pass
    finally:
        pool.close_models()
    err_console.print("[dim]Server stopped.[/]")


def _keep_alive(value: str | None) -> float:
    from phi3cli.serve.pool import FOREVER, parse_keep_alive
    from phi3cli.serve.protocol import ApiError

    try:
        seconds = parse_keep_alive(value)
    except ApiError:
        raise typer.BadParameter(
            f"{value!r} is not seconds or a duration (30s, 5m, 1h).", param_hint="--keep-alive"
        ) from None
    return FOREVER if seconds is None else seconds


def _warn_if_open(host: str, api_key: str | None) -> None:
    from phi3cli.serve import is_loopback

    if not is_loopback(host):
        err_console.print(
            f"[bold yellow]Warning:[/] listening on {host}: other machines on the network can use this model"
            + ("." if api_key else " and nothing asks them for a key (add --api-key)."),
            soft_wrap=True,
        )


def _serve_with_ray(model, load_kwargs, where, api_key, max_sequences, threads, images) -> None:
    """The same app as a Ray Serve deployment; Ray's proxy listens on host:port and routes to the replicas."""
    from phi3cli.serve import ray_serve  # needs the ray extra; imported only here

    host, port, replicas, address = where
    plan = ray_serve.RayPlan(
        model=model,
        load_kwargs=load_kwargs,
        host=host,
        port=port,
        replicas=replicas,
        address=address,
        api_key=api_key,
        max_ongoing_requests=max_sequences,
        replica_cpus=float(threads or 1),
        images=images,
    )

    def note(text: str) -> None:
        err_console.print(f"[dim]{text}[/]", soft_wrap=True)

    where = f"the Ray cluster at {address}" if address else "a local Ray instance"
    note(f"Deploying {replicas} replica(s) of {model} on {where}; each loads the model (this takes a while)...")
    try:
        ray_serve.deploy(plan, note)
        _warn_if_open(host, api_key)
        err_console.print(
            f"Serving [bold]{model}[/] at [bold]http://{host}:{port}/v1[/] from {replicas} Ray Serve replica(s)"
            + (" (API key required)" if api_key else "")
            + ". Ctrl-C stops.",
            soft_wrap=True,
        )
        ray_serve.wait(note)
    except KeyboardInterrupt:
        pass
    finally:
        ray_serve.undeploy(started_here=address is None)
    err_console.print("[dim]Server stopped.[/]")
