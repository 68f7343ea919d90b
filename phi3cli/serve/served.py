"""A model as the server holds it: the loaded model, the id it is served under, its queue and what it supports."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from phi3cli.backends.base import LoadedModel
from phi3cli.backends.vision import ImagePrompt, with_placeholders
from phi3cli.generation import prompt_budget
from phi3cli.serve import protocol
from phi3cli.serve.adapters import use_adapter
from phi3cli.serve.protocol import ApiError, GenerationRequest
from phi3cli.serve.queue import GenerationQueue
from phi3cli.serve.structured import supports
from phi3cli.structured import ToolFormat, tool_format


@dataclass
class Served:
    """One loaded model behind the routes: what every handler reads (the app's state holds it)."""

    model: LoadedModel
    name: str
    jobs: GenerationQueue
    tools_format: ToolFormat | None
    support: dict
    created: int = field(default_factory=lambda: int(time.time()))
    loaded_at: float = field(default_factory=time.time)
    load_seconds: float = 0.0
    memory_bytes: int | None = None  # the server's resident memory growth while it loaded (None: not measured)
    keep_alive: float = -1.0  # seconds idle before it is unloaded; negative: never
    last_used: float = field(default_factory=time.monotonic)

    @classmethod
    def of(cls, model: LoadedModel, name: str) -> Served:
        tools = tool_format(model.chat_template)
        return cls(model, name, GenerationQueue(model), tools, supports(model, tools))

    def card(self) -> dict:
        """The model's entry in /v1/models."""
        model = self.model
        return {
            "id": self.name,
            "object": "model",
            "created": self.created,
            "owned_by": "phi3",
            "loaded": True,
            "phi3": {
                "backend": model.backend,
                "format": model.format,
                "device": model.device,
                "executed_device": model.executed_device,
                "context_length": model.context_length,
                "max_prompt_tokens": prompt_budget(model),
                "supports": self.support,
                "loaded_since": int(self.loaded_at),
                "load_seconds": round(self.load_seconds or model.load_seconds, 2),
                "memory_bytes": self.memory_bytes,
                "keep_alive_s": None if self.keep_alive < 0 else self.keep_alive,
                "running": self.jobs.running,
                "waiting": self.jobs.waiting,
            },
        }

    def prompt_ids(self, parsed: GenerationRequest, loaded: LoadedModel) -> list[int]:
        """The request's prompt, templated and tokenized on the worker; an ApiError when it cannot fit."""
        use_adapter(loaded, parsed.adapter)  # the request's run-time LoRA adapter, set before its generate
        tools_format = self.tools_format
        if parsed.kind == "chat":
            messages = parsed.messages
            if tools_format is not None:
                messages = tools_format.messages_with_tools(messages, parsed.tools)
            messages, images = with_placeholders(messages, loaded)
            try:
                text = loaded.chat_template.render(messages)
            except Exception as exc:  # the model's template refused the conversation (a role order, say)
                raise ApiError(f"The chat template rejected the messages: {exc}", param="messages") from None
            if parsed.calls_forced:  # the reply starts inside the call: the constraint writes its JSON
                text += tools_format.call_open
        else:
            text = parsed.prompt
        ids = loaded.encode(text)
        if parsed.kind == "chat" and images:
            ids = ImagePrompt(ids, text, images)
        budget = prompt_budget(loaded)
        if error := protocol.context_errors(len(ids), budget, parsed.max_tokens, loaded.context_length):
            raise error
        engine = self.jobs.engine
        if engine and (why := engine.refusal(len(ids), None)):
            raise ApiError(why, param="messages" if parsed.kind == "chat" else "prompt", code="context_length_exceeded")
        if engine and (why := engine.refusal(len(ids), parsed.max_tokens)):
            raise ApiError(why, param="max_tokens", code="context_length_exceeded")
        return ids
