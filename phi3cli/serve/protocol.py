"""The OpenAI wire format: request bodies checked into settings, replies built from ReplyStats.

Pure functions over dicts, no web framework: every bad value becomes an ApiError (a 4xx with an
OpenAI-style error body), so the server never answers bad input with a 500.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from phi3cli import __version__
from phi3cli.backends.base import GenerationSettings
from phi3cli.generation import ReplyStats

# Fields we read; any other field with a value is accepted, ignored and logged (as llama.cpp's server
# and Ollama do), so applications that send user or metadata keep working. Sampling fields are acted on or refused.
COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "stream"}
COMMON_FIELDS |= {"stream_options", "n", "ignore_eos", "keep_alive"}
COMMON_FIELDS |= {"frequency_penalty", "presence_penalty", "repetition_penalty", "min_p", "logit_bias", "logprobs"}
COMMON_FIELDS |= {"speculative"}  # phi3's extension: false turns the server's speculative decoding down
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "response_format", "tools", "tool_choice"}
CHAT_FIELDS |= {"parallel_tool_calls", "top_logprobs"}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt"}
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
MAX_SEED = 2**63


class ApiError(Exception):
    """A request the server refuses, answered with `status` and an OpenAI-style error body."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        param: str | None = None,
        code: str | None = "invalid_value",
        type: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.type = message, status, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class GenerationRequest:
    """A checked request: what to prompt with, how to generate, and how to answer."""

    kind: str  # chat | completion
    settings: GenerationSettings
    max_tokens: int | None  # what the client asked for; None means "until the context is full"
    stream: bool = False
    include_usage: bool = False
    messages: list[dict[str, Any]] = field(default_factory=list)  # chat
    prompt: str = ""  # completion
    ignored: list[str] = field(default_factory=list)  # fields accepted but not acted on
    response_format: str = "text"  # text | json_object | json_schema (its schema is settings.constraint)
    tools: list[dict] = field(default_factory=list)  # OpenAI function tools, checked
    tool_choice: str = "auto"  # none | auto | required | function (then tool_name)
    tool_name: str | None = None
    parallel_tool_calls: bool = True
    logprobs: int | None = None  # None: no log-probabilities; n: each token's and its n likeliest alternatives
    adapter: dict[str, float] | None = None  # the run-time LoRA adapter a MODEL:ADAPTER name picks (None: the base)

    @property
    def calls_forced(self) -> bool:
        """The reply must be tool calls (tool_choice required or a named function)."""
        return bool(self.tools) and self.tool_choice in ("required", "function")

    @property
    def needs_constraint(self) -> bool:
        return self.settings.constraint is not None or self.calls_forced


def parse_body(raw: bytes) -> dict:
    """The JSON object in a request body."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(
            "We could not parse the JSON body of your request: it is not valid JSON.", code="invalid_json"
        ) from None
    except RecursionError:  # json's parser recurses once per level of nesting
        raise ApiError(
            "We could not parse the JSON body of your request: it is nested too deeply.", code="invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise ApiError("The request body must be a JSON object.", code="invalid_json")
    return body


def parse_chat(body: dict, context_length: int) -> GenerationRequest:
    """A /v1/chat/completions body, checked."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(
            "'messages' must be a non-empty list of {role, content} objects.", param="messages", code="invalid_value"
        )
    parsed = [_message(m, i) for i, m in enumerate(messages)]
    max_tokens = _max_tokens(body, ("max_completion_tokens", "max_tokens"), context_length)
    request = _common(body, "chat", max_tokens, CHAT_FIELDS, context_length)
    request.messages = parsed
    return request


def parse_completion(body: dict, context_length: int) -> GenerationRequest:
    """A /v1/completions body, checked: one prompt, as text (no chat template)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError("'prompt' must be a string (one prompt per request).", param="prompt")
    if not prompt:
        raise ApiError("'prompt' is empty.", param="prompt")
    max_tokens = _max_tokens(body, ("max_tokens",), context_length, default=16)
    request = _common(body, "completion", max_tokens, COMPLETION_FIELDS, context_length)
    request.prompt = prompt
    return request


def _message(message: Any, index: int) -> dict[str, Any]:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise ApiError(f"{where} must be an object with 'role' and 'content'.", param=where)
    role = message.get("role")
    if role not in CHAT_ROLES:
        raise ApiError(
            f"{where}.role is {role!r}; this server takes {', '.join(sorted(CHAT_ROLES))}.", param=f"{where}.role"
        )
    content = message.get("content")
    if content is None and role == "assistant":
        content = ""
    extra: dict[str, Any] = {}
    if role == "assistant" and message.get("tool_calls"):
        calls = message["tool_calls"]
        if not isinstance(calls, list) or not all(
            isinstance(c, dict) and isinstance(c.get("function"), dict) and isinstance(c["function"].get("name"), str)
            for c in calls
        ):
            raise ApiError(f"{where}.tool_calls must be a list of {{function: {{name, arguments}}}}.", param=where)
        extra["tool_calls"] = calls
    if role == "tool":
        if not isinstance(message.get("tool_call_id"), str):
            raise ApiError(f"{where} is a tool message without a 'tool_call_id'.", param=f"{where}.tool_call_id")
        extra["tool_call_id"] = message["tool_call_id"]
    if isinstance(content, list):  # content parts: text, and images kept as URLs (serve/images.py decodes them)
        texts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "image_url" and role == "user":
                extra.setdefault("image_urls", []).append(image_url_of(part, f"{where}.content"))
                continue
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ApiError(
                    f"{where}.content has a {kind!r} part; phi3 reads text and image_url parts.",
                    param=f"{where}.content",
                )
            texts.append(part["text"])
        content = "".join(texts)
    if not isinstance(content, str):
        raise ApiError(f"{where}.content must be a string or a list of text parts.", param=f"{where}.content")
    return {"role": CHAT_ROLES[role], "content": content, **extra}


def image_url_of(part: dict, where: str) -> str:
    """The URL of an `{"type": "image_url", "image_url": {"url": ...}}` part (or a Responses `input_image` part,
    whose image_url is the URL itself); serve/images.py decodes it."""
    value = part.get("image_url")
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        raise ApiError(f"{where} has an image_url part without a url.", param=where)
    return url


def _max_tokens(body: dict, names: tuple[str, ...], context_length: int, default: int | None = None) -> int | None:
    for name in names:
        value = body.get(name)
        if value is None:
            continue
        if not _is_int(value) or value < 1:
            raise ApiError(f"'{name}' must be an integer of at least 1; got {value!r}.", param=name)
        if value > context_length:
            raise ApiError(
                f"'{name}' is {value}, beyond this model's context of {context_length} tokens.",
                param=name,
                code="context_length_exceeded",
            )
        return value
    return default


def _common(body: dict, kind: str, max_tokens: int | None, known: set[str], context_length: int) -> GenerationRequest:
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    top_k = body.get("top_k")
    if top_k is None:
        top_k = 0
    elif not _is_int(top_k) or top_k < 0:
        raise ApiError(f"'top_k' must be a non-negative integer; got {top_k!r}.", param="top_k")
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not 0 <= seed < MAX_SEED):
        raise ApiError(f"'seed' must be an integer from 0 to 2**63-1; got {seed!r}.", param="seed")
    n = body.get("n")
    if n is not None and n != 1:
        raise ApiError(f"'n' must be 1: this server returns one choice per request; got {n!r}.", param="n")
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise ApiError("'stream_options' must be an object.", param="stream_options")
    include_usage = bool(options and options.get("include_usage"))
    settings = GenerationSettings(
        # Without max_tokens, generate until the context is full (stream_reply clips to what is left).
        max_new_tokens=max_tokens or context_length,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        ignore_eos=_flag(body, "ignore_eos"),
        stop=_stops(body.get("stop")),
        speculate=body.get("speculative") is None or _flag(body, "speculative"),
    )
    ignored = sorted(k for k, v in body.items() if k not in known and v is not None)
    return GenerationRequest(kind, settings, max_tokens, stream, include_usage, ignored=ignored)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ApiError(f"'{name}' must be a number from {low:g} to {high:g}; got {value!r}.", param=name)
    return float(value)


def _flag(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(f"'{name}' must be true or false; got {value!r}.", param=name)
    return value


def _stops(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise ApiError("'stop' must be a string or a list of strings.", param="stop")
    return tuple(s for s in value if s)


def context_errors(prompt_tokens: int, budget: int, max_tokens: int | None, context_length: int) -> ApiError | None:
    """Why a tokenized prompt (and the reply asked for) does not fit the context, or None."""
    if prompt_tokens > budget:
        return ApiError(
            f"The prompt is {prompt_tokens} tokens; this model accepts at most {budget}. Shorten the messages.",
            param="messages",
            code="context_length_exceeded",
        )
    if max_tokens is not None and prompt_tokens + max_tokens > context_length:
        return ApiError(
            f"This model's context is {context_length} tokens; you asked for {prompt_tokens + max_tokens} "
            f"({prompt_tokens} in the prompt, {max_tokens} in the completion). Lower max_tokens or shorten the prompt.",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return None


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def usage(stats: ReplyStats) -> dict:
    return {
        "prompt_tokens": stats.read_tokens,
        "completion_tokens": stats.generated_tokens,
        "total_tokens": stats.read_tokens + stats.generated_tokens,
    }


def timing(stats: ReplyStats, fmt: str, queue_s: float, ignored: list[str]) -> dict:
    """The phi3-specific field: what ran where, and how fast (the same figures as `phi3 chat`)."""
    return {
        "backend": stats.backend,
        "format": fmt,
        "device": stats.device,
        "executed_device": stats.executed_device,
        "queue_ms": round(queue_s * 1000, 1),
        "ttft_ms": round(stats.ttft_s * 1000, 1),
        "decode_tokens_per_s": round(stats.decode_tps, 2),
        "tpot_ms": round(stats.tpot_ms, 2),
        "prefill_tokens_per_s": round(stats.prefill_tps, 1),
        "total_ms": round(stats.total_s * 1000, 1),
        "ignored_fields": ignored,
    }


def fingerprint(backend: str, fmt: str) -> str:
    return f"phi3-{__version__}-{backend}-{fmt}"


def completion_body(
    request: GenerationRequest, rid: str, model: str, stats: ReplyStats, extra: dict, tool_calls: list | None = None
) -> dict:
    """The whole (non-streamed) answer; with tool_calls, the calls in place of the text."""
    finish = stats.finish_reason
    if request.kind == "chat":
        message: dict[str, Any] = {"role": "assistant", "content": stats.text}
        if tool_calls:
            message.update(content=None, tool_calls=tool_calls)
            finish = "tool_calls"
        choice = {"index": 0, "message": message}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": stats.text}
        obj = "text_completion"
    choice.update(logprobs=None, finish_reason=finish)
    return {
        "id": rid,
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": fingerprint(stats.backend, extra["format"]),
        "choices": [choice],
        "usage": usage(stats),
        "phi3": extra,
    }


def chunk_body(
    request: GenerationRequest,
    rid: str,
    model: str,
    created: int,
    *,
    text: str | None = None,
    finish: str | None = None,
    tool_calls: list | None = None,
) -> dict:
    """One streamed chunk: a piece of text, tool calls, or the closing chunk with the finish reason."""
    if request.kind == "chat":
        delta: dict[str, Any] = {} if text is None else {"content": text}
        if tool_calls:
            delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(tool_calls)]
        choice: dict[str, Any] = {"index": 0, "delta": delta}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or ""}
        obj = "text_completion"
    choice.update(logprobs=None, finish_reason=finish)
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}


def sse(data: dict | str) -> bytes:
    """One server-sent event."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {payload}\n\n".encode()
