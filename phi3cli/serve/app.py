"""The web app: its routes, the models' routes and /health, middleware and error handlers put together."""

from __future__ import annotations

import contextlib
import os

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from phi3cli.backends.base import LoadedModel
from phi3cli.serve.completions import chat_completions, completions
from phi3cli.serve.protocol import ApiError
from phi3cli.serve.responses import responses
from phi3cli.serve.served import Served, served
from phi3cli.serve.web import ApiKeyCheck, RequestLog, as_api_error, fail


async def health(request: Request) -> Response:
    ctx = served(request)
    jobs = ctx.jobs
    return JSONResponse(
        {
            "status": "ok",
            "model": ctx.name,
            "pid": os.getpid(),  # which process answered (with --ray: which replica)
            "backend": ctx.model.backend,
            "executed_device": ctx.model.executed_device,
            "busy": jobs.running > 0,
            "running": jobs.running,
            "waiting": jobs.waiting,
            "served": jobs.served,
            "batching": jobs.describe(),
            "supports": ctx.support,
        }
    )


async def models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [served(request).card()]})


async def one_model(request: Request) -> Response:
    ctx, name = served(request), request.path_params["model"]
    if name != ctx.name:
        return fail(request, ApiError(f"The model {name!r} does not exist.", status=404, param="model",
                                      code="model_not_found"))  # fmt: skip
    return JSONResponse(ctx.card())


async def unexpected_error(request: Request, exc: Exception) -> Response:
    return fail(request, as_api_error(exc))


async def http_error(request: Request, exc: HTTPException) -> Response:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return fail(request, ApiError(message, status=exc.status_code, code=code))


ROUTES = [
    Route("/health", health, methods=["GET"]),
    Route("/v1/models", models, methods=["GET"]),
    Route("/v1/models/{model:path}", one_model, methods=["GET"]),
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/responses", responses, methods=["POST"]),
]


def create_app(model: LoadedModel, name: str, api_key: str | None = None, metrics: bool = False) -> Starlette:
    """The server for one loaded model, served under the id `name`; with metrics, Prometheus's at /metrics."""
    ctx = Served.of(model, name)
    routes, counted = list(ROUTES), None
    if metrics:
        from phi3cli.serve.metrics import ServerMetrics  # prometheus_client, only when asked for

        counted = ServerMetrics(lambda: [ctx])
        ctx.jobs.on_reply = lambda stats: counted.reply(ctx.name, stats)
        routes.append(Route("/metrics", counted.endpoint, methods=["GET"]))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        ctx.jobs.start()
        try:
            yield
        finally:
            ctx.jobs.close()

    app = Starlette(
        routes=routes,
        middleware=[Middleware(RequestLog, metrics=counted), Middleware(ApiKeyCheck, api_key=api_key)],
        exception_handlers={HTTPException: http_error, Exception: unexpected_error},
        lifespan=lifespan,
    )
    app.state.served = ctx
    app.state.jobs = ctx.jobs
    return app
