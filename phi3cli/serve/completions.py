"""POST /v1/chat/completions and /v1/completions: a checked request queued, answered whole or streamed."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from functools import partial

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from phi3cli.generation import ReplyStats, TokenEvent
from phi3cli.serve import protocol
from phi3cli.serve.adapters import pick_adapter
from phi3cli.serve.images import resolve_images
from phi3cli.serve.pool import served
from phi3cli.serve.protocol import ApiError, GenerationRequest
from phi3cli.serve.queue import FINISHED, GenerationJob, Started
from phi3cli.serve.sampling import check_sampling, logprobs_body, parse_sampling
from phi3cli.serve.served import Served
from phi3cli.serve.structured import check_structured, parse_structured, reply_calls
from phi3cli.serve.web import (
    ClientGone,
    JobStream,
    as_api_error,
    collect,
    fail,
    next_item,
    note,
    read_json,
    shutting_down,
    stats_note,
)


async def chat_completions(request: Request) -> Response:
    return await _generate(request, "chat")


async def completions(request: Request) -> Response:
    return await _generate(request, "completion")


async def accept(request: Request, parse) -> tuple[Served, GenerationRequest, dict]:
    """Read the body, find the model it names (loading it if need be; MODEL:ADAPTER picks an adapter) and parse it.

    parse(body, ctx, images) reads the body into a GenerationRequest (images: what image parts may be); ApiError on
    bad input.
    """
    body = await read_json(request)
    body, adapter = pick_adapter(body, list(request.app.state.pool.loaded.values()))
    ctx = await served(request, body)
    # Off the event loop: decoding images (and fetching them, with --allow-image-urls) takes a while.
    parsed = await run_in_threadpool(parse, body, ctx, request.app.state.images)
    parsed.adapter = adapter
    return ctx, parsed, body


def _parse_chat(body: dict, ctx: Served, images) -> GenerationRequest:
    parsed = protocol.parse_chat(body, ctx.model.context_length)
    parse_structured(body, parsed)
    resolve_images(parsed.messages, ctx.model, ctx.name, images)
    parse_sampling(body, parsed)
    return parsed


def _parse_completion(body: dict, ctx: Served, images) -> GenerationRequest:
    parsed = protocol.parse_completion(body, ctx.model.context_length)
    parse_sampling(body, parsed)
    return parsed


async def _generate(request: Request, kind: str) -> Response:
    try:
        ctx, parsed, _ = await accept(request, _parse_chat if kind == "chat" else _parse_completion)
    except ApiError as error:
        return fail(request, error)
    started = await start(request, ctx, parsed)
    if isinstance(started, Response):
        return started
    job, first = started
    rid = protocol.new_id(kind)
    if parsed.stream:
        return JobStream(_stream(ctx, request, job, parsed, rid, first), job)
    stats = await finish(request, job)
    if isinstance(stats, Response):
        return stats
    extra = protocol.timing(stats, ctx.model.format, first.queue_s, parsed.ignored)
    note(request, stats_note(stats, first.queue_s))
    calls = reply_calls(parsed, stats, ctx.tools_format)
    body = protocol.completion_body(parsed, rid, ctx.name, stats, extra, calls)
    body["choices"][0]["logprobs"] = logprobs_body(parsed.kind, job.scored)
    return JSONResponse(body)


async def start(request: Request, ctx: Served, parsed: GenerationRequest) -> tuple[GenerationJob, Started] | Response:
    """Check what the model can honour, queue the request and wait until it starts; an error response otherwise."""
    if parsed.ignored:
        request.scope.setdefault("phi3.log", {})["ignored"] = parsed.ignored
    try:
        check_structured(parsed, ctx.model, ctx.tools_format)
        check_sampling(parsed, ctx.model)
    except ApiError as error:
        return fail(request, error)
    job = ctx.jobs.submit(partial(ctx.prompt_ids, parsed), parsed.settings, parsed.logprobs)
    first = await _wait(request, job, "while queued")
    if isinstance(first, Response):
        return first
    if not isinstance(first, Started):
        return fail(request, shutting_down())
    if parsed.stream:  # a stream starts at its first token: an error before it (a vision model's images that
        head = await _wait(request, job, "before the first token")  # overflow the context) is an error response
        if isinstance(head, Response):
            return head
        job.unread(head)
    return job, first


async def _wait(request: Request, job: GenerationJob, when: str):
    """The job's next item, or the error response to send instead (its failure, or 499 if the client left)."""
    try:
        item = await next_item(job, request)
    except ClientGone:
        job.cancel()
        note(request, f"client went away {when}")
        return Response(status_code=499)
    if isinstance(item, BaseException):
        job.cancel()
        return fail(request, as_api_error(item))
    return item


async def finish(request: Request, job: GenerationJob) -> ReplyStats | Response:
    """The whole reply of a started job (not streamed); an error response if it failed or the client left."""
    try:
        return await collect(job, request)
    except ClientGone:
        note(request, f"cancelled: client went away after {job.tokens} tokens")
        return Response(status_code=499)
    except Exception as exc:
        return fail(request, as_api_error(exc))
    finally:
        job.cancel()


async def _stream(
    ctx: Served, request: Request, job: GenerationJob, parsed: GenerationRequest, rid: str, started: Started
) -> AsyncIterator[bytes]:
    created_at = int(time.time())
    complete = False
    chunk = partial(protocol.chunk_body, parsed, rid, ctx.name, created_at)
    if parsed.kind == "chat":
        first = chunk(text="")
        first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
        yield protocol.sse(first)
    held = bool(parsed.tools) and parsed.tool_choice != "none"  # a reply that may be calls is sent whole
    while (item := await job.next()) is not FINISHED:
        if isinstance(item, TokenEvent):
            if not held:
                yield protocol.sse(chunk(text=item.text))
        elif isinstance(item, ReplyStats):
            calls = reply_calls(parsed, item, ctx.tools_format)
            if held:
                yield protocol.sse(chunk(**({"tool_calls": calls} if calls else {"text": item.text})))
            for closing in _closing_chunks(ctx, parsed, chunk, item, started, calls, job.scored):
                yield protocol.sse(closing)
            note(request, stats_note(item, started.queue_s) + " · streamed")
            complete = True
        elif isinstance(item, BaseException):
            error = as_api_error(item)
            note(request, f"failed mid-stream: {error.message}")
            yield protocol.sse(error.body())
            break
    else:
        if not complete:  # cancelled on the worker: the server is stopping
            note(request, f"cut short after {job.tokens} tokens: the server is stopping")
            yield protocol.sse(shutting_down().body())
    yield protocol.sse("[DONE]")


def _closing_chunks(ctx: Served, parsed: GenerationRequest, chunk, stats: ReplyStats, started: Started, calls, scored):
    finish = "tool_calls" if calls else stats.finish_reason
    closing = chunk(finish=finish)
    closing["choices"][0]["logprobs"] = logprobs_body(parsed.kind, scored)  # every token's, on the closing chunk
    extra = protocol.timing(stats, ctx.model.format, started.queue_s, parsed.ignored)
    if parsed.include_usage:
        # OpenAI's form: the usage comes in one more chunk, with no choices.
        closing["usage"] = None
        yield closing
        yield {**chunk(), "choices": [], "usage": protocol.usage(stats), "phi3": extra}
    else:
        # Clients that did not ask still get the figures, on the chunk that closes the choice.
        yield {**closing, "usage": protocol.usage(stats), "phi3": extra}
