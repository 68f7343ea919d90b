"""The web side: routes, API-key check, one log line per request, errors as OpenAI-style bodies."""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import time
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from phi3cli.backends.base import LoadedModel
from phi3cli.errors import ConstraintError, ContextOverflowError
from phi3cli.generation import ReplyStats, TokenEvent, prompt_budget
from phi3cli.serve import protocol
from phi3cli.serve.protocol import ApiError, GenerationRequest
from phi3cli.serve.queue import FINISHED, GenerationQueue, Job, Started
from phi3cli.serve.structured import check_structured, parse_structured, reply_calls, supports
from phi3cli.structured import tool_format

log = logging.getLogger("phi3.serve")

MAX_BODY_BYTES = 8 * 1024 * 1024
DISCONNECT_POLL_S = 0.5  # how often a non-streamed request checks that its client is still there


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


def shutting_down() -> ApiError:
    return ApiError("The server is stopping; the reply was cut short.", status=503, code=None, type="server_error")


class JobStream(StreamingResponse):
    """A streamed answer whose job is cancelled however the response ends, even before its first chunk."""

    def __init__(self, content, job: Job):
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

    def __init__(self, app):
        self.app = app

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


class ApiKeyCheck:
    """ASGI middleware: every request must carry `Authorization: Bearer <key>` (when a key is set)."""

    def __init__(self, app, api_key: str | None):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.api_key:
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


def _note(request: Request, detail: str) -> None:
    request.scope.setdefault("phi3.log", {})["detail"] = detail


def create_app(model: LoadedModel, name: str, api_key: str | None = None) -> Starlette:
    """The server for one loaded model, served under the id `name`."""
    jobs = GenerationQueue(model)
    created = int(time.time())
    tools_format = tool_format(model.chat_template)
    support = supports(model, tools_format)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        jobs.start()
        try:
            yield
        finally:
            jobs.close()

    def model_card() -> dict:
        return {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "phi3",
            "phi3": {
                "backend": model.backend,
                "format": model.format,
                "device": model.device,
                "executed_device": model.executed_device,
                "context_length": model.context_length,
                "max_prompt_tokens": prompt_budget(model),
                "supports": support,
            },
        }

    async def health(request: Request) -> Response:
        return JSONResponse(
            {
                "status": "ok",
                "model": name,
                "pid": os.getpid(),  # which process answered (with --ray: which replica)
                "backend": model.backend,
                "executed_device": model.executed_device,
                "busy": jobs.running > 0,
                "running": jobs.running,
                "waiting": jobs.waiting,
                "served": jobs.served,
                "batching": jobs.describe(),
                "supports": support,
            }
        )

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def one_model(request: Request) -> Response:
        if request.path_params["model"] != name:
            return _fail(request, ApiError(f"The model {request.path_params['model']!r} does not exist.", status=404,
                                           param="model", code="model_not_found"))  # fmt: skip
        return JSONResponse(model_card())

    async def chat_completions(request: Request) -> Response:
        return await _generate(request, "chat")

    async def completions(request: Request) -> Response:
        return await _generate(request, "completion")

    async def _generate(request: Request, kind: str) -> Response:
        try:
            body = await _read_json(request)
            protocol.check_model(body, name)
            parse = protocol.parse_chat if kind == "chat" else protocol.parse_completion
            parsed = parse(body, model.context_length)
            if kind == "chat":
                parse_structured(body, parsed)
        except ApiError as error:
            return _fail(request, error)
        if parsed.ignored:
            request.scope.setdefault("phi3.log", {})["ignored"] = parsed.ignored
        try:
            check_structured(parsed, model, tools_format)
        except ApiError as error:
            return _fail(request, error)
        job = jobs.submit(_preparer(parsed), parsed.settings)
        try:
            first = await _next(job, request)
        except ClientGone:
            job.cancel()
            _note(request, "client went away while queued")
            return Response(status_code=499)
        if isinstance(first, BaseException):
            return _fail(request, _as_api_error(first))
        if not isinstance(first, Started):
            return _fail(request, shutting_down())
        rid = protocol.new_id(kind)
        if parsed.stream:
            return JobStream(_stream(request, job, parsed, rid, first), job)
        try:
            stats = await _collect(job, request)
        except ClientGone:
            _note(request, f"cancelled: client went away after {job.tokens} tokens")
            return Response(status_code=499)
        except Exception as exc:
            return _fail(request, _as_api_error(exc))
        finally:
            job.cancel()
        extra = protocol.timing(stats, model.format, first.queue_s, parsed.ignored)
        _note(request, _stats_note(stats, first.queue_s))
        calls = reply_calls(parsed, stats, tools_format)
        return JSONResponse(protocol.completion_body(parsed, rid, name, stats, extra, calls))

    def _preparer(parsed: GenerationRequest):
        def prepare(loaded: LoadedModel) -> list[int]:
            if parsed.kind == "chat":
                messages = parsed.messages
                if tools_format is not None:
                    messages = tools_format.messages_with_tools(messages, parsed.tools)
                try:
                    text = loaded.chat_template.render(messages)
                except Exception as exc:  # the model's template refused the conversation (a role order, say)
                    raise ApiError(f"The chat template rejected the messages: {exc}", param="messages") from None
                if parsed.calls_forced:  # the reply starts inside the call: the constraint writes its JSON
                    text += tools_format.call_open
            else:
                text = parsed.prompt
            ids = loaded.encode(text)
            budget = prompt_budget(loaded)
            if error := protocol.context_errors(len(ids), budget, parsed.max_tokens, loaded.context_length):
                raise error
            if jobs.engine and (why := jobs.engine.refusal(len(ids), None)):
                raise ApiError(why, param="messages" if parsed.kind == "chat" else "prompt", code="context_length_exceeded")
            if jobs.engine and (why := jobs.engine.refusal(len(ids), parsed.max_tokens)):
                raise ApiError(why, param="max_tokens", code="context_length_exceeded")
            return ids

        return prepare

    async def _next(job: Job, request: Request):
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

    async def _collect(job: Job, request: Request) -> ReplyStats:
        stats = None
        while (item := await _next(job, request)) is not FINISHED:
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, ReplyStats):
                stats = item
        if stats is None:  # cancelled on the worker: the server is stopping
            raise shutting_down()
        return stats

    async def _stream(
        request: Request, job: Job, parsed: GenerationRequest, rid: str, started: Started
    ) -> AsyncIterator[bytes]:
        created_at = int(time.time())
        complete = False
        if parsed.kind == "chat":
            first = protocol.chunk_body(parsed, rid, name, created_at, text="")
            first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
            yield protocol.sse(first)
        held = bool(parsed.tools) and parsed.tool_choice != "none"  # a reply that may be calls is sent whole
        while (item := await job.next()) is not FINISHED:
            if isinstance(item, TokenEvent):
                if not held:
                    yield protocol.sse(protocol.chunk_body(parsed, rid, name, created_at, text=item.text))
            elif isinstance(item, ReplyStats):
                calls = reply_calls(parsed, item, tools_format)
                if held:
                    whole = {"tool_calls": calls} if calls else {"text": item.text}
                    yield protocol.sse(protocol.chunk_body(parsed, rid, name, created_at, **whole))
                for chunk in _closing_chunks(parsed, rid, created_at, item, started, calls):
                    yield protocol.sse(chunk)
                _note(request, _stats_note(item, started.queue_s) + " · streamed")
                complete = True
            elif isinstance(item, BaseException):
                error = _as_api_error(item)
                _note(request, f"failed mid-stream: {error.message}")
                yield protocol.sse(error.body())
                break
        else:
            if not complete:  # cancelled on the worker: the server is stopping
                _note(request, f"cut short after {job.tokens} tokens: the server is stopping")
                yield protocol.sse(shutting_down().body())
        yield protocol.sse("[DONE]")

    def _closing_chunks(
        parsed: GenerationRequest, rid: str, created_at: int, stats: ReplyStats, started: Started, calls: list | None
    ):
        finish = "tool_calls" if calls else stats.finish_reason
        closing = protocol.chunk_body(parsed, rid, name, created_at, finish=finish)
        extra = protocol.timing(stats, model.format, started.queue_s, parsed.ignored)
        if parsed.include_usage:
            # OpenAI's form: the usage comes in one more chunk, with no choices.
            closing["usage"] = None
            yield closing
            yield {**protocol.chunk_body(parsed, rid, name, created_at), "choices": [],
                   "usage": protocol.usage(stats), "phi3": extra}  # fmt: skip
        else:
            # Clients that did not ask still get the figures, on the chunk that closes the choice.
            yield {**closing, "usage": protocol.usage(stats), "phi3": extra}

    async def _read_json(request: Request) -> dict:
        size = request.headers.get("content-length")
        if size and size.isdigit() and int(size) > MAX_BODY_BYTES:
            raise ApiError(f"The request body is over {MAX_BODY_BYTES // 2**20} MiB.", status=413, code="too_large")
        return protocol.parse_body(await request.body())

    def _fail(request: Request, error: ApiError) -> Response:
        _note(request, f"{error.code or error.type}: {error.message}")
        return error_response(error)

    def _as_api_error(exc: BaseException) -> ApiError:
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

    def _stats_note(stats: ReplyStats, queue_s: float) -> str:
        return (
            f"{stats.generated_tokens} tokens ({stats.prompt_tokens} prompt) · {stats.decode_tps:.1f} tok/s · "
            f"TTFT {stats.ttft_s * 1000:.0f} ms · queued {queue_s * 1000:.0f} ms · {stats.finish_reason}"
        )

    async def unexpected_error(request: Request, exc: Exception) -> Response:
        return _fail(request, _as_api_error(exc))

    async def http_error(request: Request, exc: HTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return _fail(request, ApiError(message, status=exc.status_code, code=code))

    app = Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/models/{model:path}", one_model, methods=["GET"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
        ],
        middleware=[Middleware(RequestLog), Middleware(ApiKeyCheck, api_key=api_key)],
        exception_handlers={HTTPException: http_error, Exception: unexpected_error},
        lifespan=lifespan,
    )
    app.state.jobs = jobs
    return app
