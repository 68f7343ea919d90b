"""The HTTP plumbing every route shares: middleware, error bodies, the request log's notes, reading a job's items."""

from __future__ import annotations

import hmac
import logging
import time

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from phi3cli.errors import ConstraintError, ContextOverflowError
from phi3cli.generation import ReplyStats
from phi3cli.serve import protocol
from phi3cli.serve.protocol import ApiError
from phi3cli.serve.queue import FINISHED, GenerationJob

log = logging.getLogger("phi3.serve")

MAX_BODY_BYTES = 8 * 1024 * 1024
OPEN_PATHS = {"/"}  # the chat page holds no data; it sends the key the user types with every request it makes
DISCONNECT_POLL_S = 0.5  # how often a non-streamed request checks that its client is still there


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


def shutting_down() -> ApiError:
    return ApiError("The server is stopping; the reply was cut short.", status=503, code=None, type="server_error")


class JobStream(StreamingResponse):
    """A streamed answer whose job is cancelled however the response ends, even before its first chunk."""

    def __init__(self, content, job: GenerationJob):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.job = job

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()
            notes = scope.setdefault("phi3.log", {})
            if "detail" not in notes:  # the stream neither completed nor failed: the client went away
                notes["detail"] = f"cancelled: client went away after {self.job.tokens} tokens"


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


class RequestLog:
    """ASGI middleware: one line per request (method, path, status, latency, and what the handler adds)."""

    def __init__(self, app, metrics=None):
        self.app, self.metrics = app, metrics  # a ServerMetrics counts each request by route and status

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = [0]
        scope["phi3.log"] = notes = {}

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            line = f"{scope['method']} {scope['path']} {status[0] or '-'} {time.perf_counter() - start:.3f} s"
            if detail := notes.get("detail"):
                line += f" · {detail}"
            if ignored := notes.get("ignored"):  # accepted, as other local servers do, but not acted on
                line += f" · ignored unsupported fields: {', '.join(ignored)}"
            log.info(line)
            if self.metrics is not None:
                self.metrics.request(scope["path"], status[0] or 499)  # 499: the client left before an answer


class ApiKeyCheck:
    """ASGI middleware: every request must carry `Authorization: Bearer <key>` (when a key is set)."""

    def __init__(self, app, api_key: str | None):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.api_key and scope["path"] not in OPEN_PATHS:
            headers = dict(scope["headers"])
            given = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip(), self.api_key):
                scope.setdefault("phi3.log", {})["detail"] = "missing or wrong API key"
                error = ApiError(
                    "Incorrect or missing API key; send it as 'Authorization: Bearer <key>'.",
                    status=401,
                    code="invalid_api_key",
                )
                return await error_response(error)(scope, receive, send)
        return await self.app(scope, receive, send)


def note(request: Request, detail: str) -> None:
    """What the request's log line adds after its status and latency."""
    request.scope.setdefault("phi3.log", {})["detail"] = detail


def fail(request: Request, error: ApiError) -> Response:
    note(request, f"{error.code or error.type}: {error.message}")
    return error_response(error)


def as_api_error(exc: BaseException) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ContextOverflowError):
        return ApiError(exc.message, code="context_length_exceeded")
    if isinstance(exc, ConstraintError):
        return ApiError(exc.message, param="response_format", code="unsupported_schema")
    log.error("generation failed", exc_info=exc)
    return ApiError(
        f"The generation failed: {exc.__class__.__name__}: {exc}", status=500, code=None, type="server_error"
    )


async def read_json(request: Request) -> dict:
    size = request.headers.get("content-length")
    if size and size.isdigit() and int(size) > MAX_BODY_BYTES:
        raise ApiError(f"The request body is over {MAX_BODY_BYTES // 2**20} MiB.", status=413, code="too_large")
    return protocol.parse_body(await request.body())


async def next_item(job: GenerationJob, request: Request):
    """The job's next item, checking at most every DISCONNECT_POLL_S that the client is still there."""
    while True:
        item = await job.next(DISCONNECT_POLL_S)
        now = time.perf_counter()
        if now - request.scope.get("phi3.checked", 0.0) >= DISCONNECT_POLL_S:
            request.scope["phi3.checked"] = now
            if await request.is_disconnected():
                raise ClientGone
        if item is not None:
            return item


async def collect(job: GenerationJob, request: Request) -> ReplyStats:
    """The finished reply's stats (a non-streamed answer)."""
    stats = None
    while (item := await next_item(job, request)) is not FINISHED:
        if isinstance(item, BaseException):
            raise item
        if isinstance(item, ReplyStats):
            stats = item
    if stats is None:  # cancelled on the worker: the server is stopping
        raise shutting_down()
    return stats


def stats_note(stats: ReplyStats, queue_s: float) -> str:
    return (
        f"{stats.generated_tokens} tokens ({stats.prompt_tokens} prompt) · {stats.decode_tps:.1f} tok/s · "
        f"TTFT {stats.ttft_s * 1000:.0f} ms · queued {queue_s * 1000:.0f} ms · {stats.finish_reason}"
    )
