"""POST /v1/responses: OpenAI's Responses API, stateless, over the same queue and checks as chat completions.

A Responses body is read into a chat request (instructions as the system turn, input as the messages, text.format
as response_format), so the prompt, the JSON constraint and the timing are those of /v1/chat/completions. Nothing
is stored: previous_response_id and conversation are 400s saying so. Streamed as the documented events:
response.created, response.in_progress, response.output_item.added, response.content_part.added,
response.output_text.delta..., response.output_text.done, response.content_part.done, response.output_item.done,
then response.completed (or response.incomplete at max_output_tokens, response.failed on an error).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from phi3cli.generation import ReplyStats, TokenEvent
from phi3cli.serve import protocol
from phi3cli.serve.completions import accept, finish, start
from phi3cli.serve.images import resolve_images
from phi3cli.serve.protocol import ApiError, GenerationRequest, image_url_of
from phi3cli.serve.queue import FINISHED, GenerationJob, Started
from phi3cli.serve.served import Served
from phi3cli.serve.structured import parse_structured
from phi3cli.serve.web import JobStream, as_api_error, fail, note, shutting_down, stats_note

KNOWN = {"model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "stream", "text", "store"}
KNOWN |= {
    "keep_alive",
    "previous_response_id",
    "conversation",
    "background",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
}
ROLES = {"user", "assistant", "system", "developer"}
STATELESS = "this server is stateless (it stores no responses); send the whole conversation as 'input' items"


async def responses(request: Request) -> Response:
    try:
        ctx, parsed, body = await accept(request, _parse)
    except ApiError as error:
        return fail(request, error)
    started = await start(request, ctx, parsed)
    if isinstance(started, Response):
        return started
    job, first = started
    record = ResponseRecord(ctx, body, parsed)
    if parsed.stream:
        return JobStream(_events(request, job, record, first), job)
    stats = await finish(request, job)
    if isinstance(stats, Response):
        return stats
    note(request, stats_note(stats, first.queue_s))
    return JSONResponse(record.whole(stats, first))


def _parse(body: dict, ctx: Served, images) -> GenerationRequest:
    parsed = parse_response_request(body, ctx.model.context_length)
    resolve_images(parsed.messages, ctx.model, ctx.name, images)
    return parsed


def parse_response_request(body: dict, context_length: int) -> GenerationRequest:
    """A /v1/responses body, checked and read into a chat request."""
    if body.get("previous_response_id") is not None:
        raise ApiError(f"'previous_response_id' cannot be used: {STATELESS}.", param="previous_response_id")
    if body.get("conversation") is not None:
        raise ApiError(f"'conversation' cannot be used: {STATELESS}.", param="conversation")
    if body.get("background"):
        raise ApiError("'background' responses are not supported: the answer comes in the reply.", param="background")
    if body.get("tools"):
        raise ApiError(
            "'tools' are not supported on /v1/responses by this server; /v1/chat/completions takes them "
            "(with a model whose chat template has tool support).",
            param="tools",
            code="tools_unsupported",
        )
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise ApiError("'instructions' must be a string.", param="instructions")
    messages = ([{"role": "system", "content": instructions}] if instructions else []) + _input(body.get("input"))
    chat = {"messages": messages, "temperature": body.get("temperature"), "top_p": body.get("top_p")}
    chat |= {"stream": body.get("stream"), "max_tokens": body.get("max_output_tokens")}
    try:
        parsed = protocol.parse_chat(chat, context_length)
    except ApiError as error:  # name the Responses field, not the chat one it was read into
        error.param = {"max_tokens": "max_output_tokens", "messages": "input"}.get(error.param, error.param)
        error.message = error.message.replace("'max_tokens'", "'max_output_tokens'")
        raise
    parse_structured({"response_format": _format(body.get("text"))}, parsed)
    parsed.ignored = sorted(k for k, v in body.items() if k not in KNOWN and v is not None)
    return parsed


def _input(value: Any) -> list[dict]:
    if isinstance(value, str):
        if not value:
            raise ApiError("'input' is empty.", param="input")
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise ApiError("'input' must be a string or a non-empty list of message items.", param="input")
    messages = []
    for i, item in enumerate(value):
        where = f"input[{i}]"
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind != "message" or item.get("role") not in ROLES:
            raise ApiError(
                f"{where} must be a message item {{role: user|assistant|system|developer, content}}; got "
                f"{kind or type(item).__name__!r} (this server is stateless and runs no tools).",
                param=where,
            )
        content = item.get("content")
        images = []  # input_image parts, as the chat's image_url parts
        if isinstance(content, list):
            texts = []
            for part in content:
                if isinstance(part, dict) and part.get("type") == "input_image":
                    images.append({"type": "image_url", "image_url": {"url": image_url_of(part, f"{where}.content")}})
                    continue
                if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text", "text"):
                    what = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise ApiError(f"{where}.content has a {what!r} part; this model reads text only.", param=where)
                texts.append(part.get("text"))
            content = "".join(t for t in texts if isinstance(t, str))
        if not isinstance(content, str):
            raise ApiError(f"{where}.content must be a string or a list of input_text parts.", param=where)
        messages.append(
            {"role": item["role"], "content": [*images, {"type": "text", "text": content}] if images else content}
        )
    return messages


def _format(text: Any) -> dict | None:
    """text.format as a chat response_format: {type: json_schema, name, schema, strict} is flat here."""
    if text is None:
        return None
    fmt = text.get("format") if isinstance(text, dict) else None
    if fmt is None:
        return None
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": fmt.get("name"), "schema": fmt.get("schema")}}
    return fmt


class ResponseRecord:
    """The Response object of one request, built up as its reply arrives."""

    def __init__(self, ctx: Served, body: dict, parsed: GenerationRequest):
        self.ctx, self.body, self.parsed = ctx, body, parsed
        self.id = "resp_" + uuid.uuid4().hex[:24]
        self.item_id = "msg_" + uuid.uuid4().hex[:24]
        self.created_at = int(time.time())
        self.sequence = 0

    def response(self, status: str, output: list, stats: ReplyStats | None = None, started: Started | None = None):
        body, parsed = self.body, self.parsed
        fmt = (body.get("text") or {}).get("format") if isinstance(body.get("text"), dict) else None
        answer = {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "model": self.ctx.name,
            "output": output,
            "parallel_tool_calls": False,
            "previous_response_id": None,
            "store": False,
            "temperature": parsed.settings.temperature,
            "top_p": parsed.settings.top_p,
            "text": {"format": fmt or {"type": "text"}},
            "tool_choice": "none",
            "tools": [],
            "truncation": "disabled",
            "metadata": body.get("metadata") or {},
            "usage": None,
        }
        if stats is not None:
            answer["completed_at"] = int(time.time())
            answer["usage"] = {
                "input_tokens": stats.read_tokens,
                "input_tokens_details": {"cached_tokens": stats.cached_tokens},
                "output_tokens": stats.generated_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": stats.read_tokens + stats.generated_tokens,
            }
            answer["phi3"] = protocol.timing(stats, self.ctx.model.format, started.queue_s, parsed.ignored)
        return answer

    def part(self, text: str) -> dict:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def message(self, status: str, text: str | None) -> dict:
        content = [] if text is None else [self.part(text)]
        return {"id": self.item_id, "type": "message", "role": "assistant", "status": status, "content": content}

    def whole(self, stats: ReplyStats, started: Started) -> dict:
        status = "incomplete" if stats.finish_reason == "length" else "completed"
        return self.response(status, [self.message(status, stats.text)], stats, started)

    def event(self, kind: str, **fields) -> bytes:
        """One server-sent event, named as its type (the Responses API's form), numbered in order."""
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


async def _events(
    request: Request, job: GenerationJob, record: ResponseRecord, started: Started
) -> AsyncIterator[bytes]:
    where = {"item_id": record.item_id, "output_index": 0, "content_index": 0}
    yield record.event("response.created", response=record.response("in_progress", []))
    yield record.event("response.in_progress", response=record.response("in_progress", []))
    yield record.event("response.output_item.added", output_index=0, item=record.message("in_progress", None))
    yield record.event("response.content_part.added", **where, part=record.part(""))
    complete = False
    while (item := await job.next()) is not FINISHED:
        if isinstance(item, TokenEvent):
            yield record.event("response.output_text.delta", **where, delta=item.text, logprobs=[])
        elif isinstance(item, ReplyStats):
            whole = record.whole(item, started)
            yield record.event("response.output_text.done", **where, text=item.text, logprobs=[])
            yield record.event("response.content_part.done", **where, part=record.part(item.text))
            yield record.event("response.output_item.done", output_index=0, item=whole["output"][0])
            yield record.event(f"response.{whole['status']}", response=whole)
            note(request, stats_note(item, started.queue_s) + " · streamed")
            complete = True
        elif isinstance(item, BaseException):
            error = as_api_error(item)
            note(request, f"failed mid-stream: {error.message}")
            yield _failed(record, error)
            return
    if not complete:  # cancelled on the worker: the server is stopping
        note(request, f"cut short after {job.tokens} tokens: the server is stopping")
        yield _failed(record, shutting_down())


def _failed(record: ResponseRecord, error: ApiError) -> bytes:
    failed = record.response("failed", [])
    failed["error"] = {"code": error.code or "server_error", "message": error.message}
    return record.event("response.failed", response=failed)
