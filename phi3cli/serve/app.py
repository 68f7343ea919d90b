"""The web app: its routes, the models' routes and /health, middleware and error handlers put together."""

from __future__ import annotations

import contextlib
import os
from importlib import resources

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from phi3cli.backends.base import LoadedModel
from phi3cli.serve.adapters import adapters_health
from phi3cli.serve.completions import chat_completions, completions
from phi3cli.serve.images import ImageOptions
from phi3cli.serve.pool import ModelPool
from phi3cli.serve.protocol import ApiError
from phi3cli.serve.responses import responses
from phi3cli.serve.web import ApiKeyCheck, RequestLog, as_api_error, fail


async def health(request: Request) -> Response:
    pool: ModelPool = request.app.state.pool
    loaded = list(pool.loaded.values())
    answer = {
        "status": "ok",
        "model": pool.default,
        "models": [ctx.name for ctx in loaded],  # those loaded, least recently used first
        "pid": os.getpid(),  # which process answered (with --ray: which replica)
        "busy": any(ctx.jobs.running for ctx in loaded),
        "running": sum(ctx.jobs.running for ctx in loaded),
        "waiting": sum(ctx.jobs.waiting for ctx in loaded),
        "served": sum(ctx.jobs.served for ctx in loaded),
    }
    if first := pool.loaded.get(pool.default):  # the default model's runtime, as before several models
        answer |= {"backend": first.model.backend, "executed_device": first.model.executed_device}
        answer |= {"batching": first.jobs.describe(), "supports": first.support}
        answer |= adapters_health(first.model, first.name)
    return JSONResponse(answer)


async def chat_page(request: Request) -> Response:
    """The chat page: one static file, no build step; it asks for the API key itself, so it is served without one."""
    page = resources.files("phi3cli.serve").joinpath("static/chat.html").read_text(encoding="utf-8")
    return HTMLResponse(page, headers={"Cache-Control": "no-cache"})


async def models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": request.app.state.pool.cards()})


async def one_model(request: Request) -> Response:
    name = request.path_params["model"]
    for card in request.app.state.pool.cards():
        if card["id"] == name:
            return JSONResponse(card)
    return fail(request, ApiError(f"The model {name!r} does not exist.", status=404, param="model",
                                  code="model_not_found"))  # fmt: skip


async def unexpected_error(request: Request, exc: Exception) -> Response:
    return fail(request, as_api_error(exc))


async def http_error(request: Request, exc: HTTPException) -> Response:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return fail(request, ApiError(message, status=exc.status_code, code=code))


ROUTES = [
    Route("/", chat_page, methods=["GET"]),
    Route("/health", health, methods=["GET"]),
    Route("/v1/models", models, methods=["GET"]),
    Route("/v1/models/{model:path}", one_model, methods=["GET"]),
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/responses", responses, methods=["POST"]),
]


def create_app(
    model: LoadedModel | None,
    name: str,
    api_key: str | None = None,
    metrics: bool = False,
    pool: ModelPool | None = None,
    images: ImageOptions | None = None,
) -> Starlette:
    """The server for one loaded model served under the id `name`, or for a pool of models loaded on demand (then
    model is the one already loaded, or None); with metrics, Prometheus's at /metrics."""
    pool = pool or ModelPool([name])
    if model is not None:
        pool.add(name, model, model.load_seconds)
    routes, counted = list(ROUTES), None
    if metrics:
        from phi3cli.serve.metrics import ServerMetrics  # prometheus_client, only when asked for

        counted = ServerMetrics(lambda: list(pool.loaded.values()))
        count = counted.reply

        def hook(ctx) -> None:
            ctx.jobs.on_reply = lambda stats: count(ctx.name, stats)

        pool.on_load = hook
        for ctx in pool.loaded.values():
            hook(ctx)
        routes.append(Route("/metrics", counted.endpoint, methods=["GET"]))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        pool.start()
        try:
            yield
        finally:
            pool.close()

    app = Starlette(
        routes=routes,
        middleware=[Middleware(RequestLog, metrics=counted), Middleware(ApiKeyCheck, api_key=api_key)],
        exception_handlers={HTTPException: http_error, Exception: unexpected_error},
        lifespan=lifespan,
    )
    app.state.pool = pool
    app.state.images = images or ImageOptions()  # what image_url parts may be (serve/images.py)
    app.state.jobs = pool  # what `phi3 serve` and Ray call: cancel_all() on Ctrl-C, healthy()
    return app
