"""Structured output and tool calls, the model-side half: which models read tools, and how calls are written.

The runtime-side half (enforcing an OutputConstraint token by token) is each backend's; this module knows the
chat formats. A model trained for tool calls in Phi-4-mini's format reads the tools as JSON in its system turn,
inside <|tool|>…<|/tool|>, and writes calls as <|tool_call|>[{"name": …, "arguments": {…}}]<|/tool_call|>.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phi3cli.backends import registry
from phi3cli.backends.base import OutputConstraint
from phi3cli.errors import Phi3Error
from phi3cli.templates import ChatTemplate

ANY_JSON_OBJECT: dict[str, Any] = {"type": "object"}
# response_format json_object / chat --json: any object. With no schema to end it, its JSON is kept compact where
# the engine has that option, so a small model does not drift into pretty-printed text without end.
ANY_OBJECT = OutputConstraint(ANY_JSON_OBJECT, compact=True)


@dataclass(frozen=True)
class ToolFormat:
    """How a model's chat format carries tools and calls (Phi-4-mini's tags)."""

    tools_marker: str = "<|tool|>"  # in the chat template: the model reads tools in its system turn
    call_open: str = "<|tool_call|>"
    call_close: str = "<|/tool_call|>"

    def messages_with_tools(self, messages: list[dict[str, Any]], tools: list[dict]) -> list[dict[str, Any]]:
        """The conversation as the template expects it: the tools' JSON on the system turn, calls as text."""
        functions = [tool["function"] for tool in tools]
        out = [dict(m) for m in messages]
        if functions:
            if not out or out[0]["role"] != "system":
                out.insert(0, {"role": "system", "content": ""})
            out[0]["tools"] = json.dumps(functions, ensure_ascii=False)
        for message in out:
            if message["role"] == "assistant" and message.get("tool_calls"):
                calls = [
                    {"name": c["function"]["name"], "arguments": _arguments(c["function"].get("arguments"))}
                    for c in message.pop("tool_calls")
                ]
                text = self.call_open + json.dumps(calls, ensure_ascii=False) + self.call_close
                message["content"] = (message.get("content") or "") + text
        return out

    def parse_calls(self, text: str, tools: list[dict]) -> list[dict] | None:
        """The calls in a reply (with or without its tags), as OpenAI tool_calls; None when it is plain text."""
        body = text.strip().removeprefix(self.call_open).removesuffix(self.call_close).strip()
        try:
            calls = json.loads(body)
        except ValueError:
            return None
        names = {tool["function"]["name"] for tool in tools}
        if isinstance(calls, dict):
            calls = [calls]
        if not isinstance(calls, list) or not calls:
            return None
        if not all(isinstance(c, dict) and c.get("name") in names for c in calls):
            return None
        return [
            {
                "id": "call_" + uuid.uuid4().hex[:24],
                "type": "function",
                "function": {"name": c["name"], "arguments": json.dumps(c.get("arguments") or {}, ensure_ascii=False)},
            }
            for c in calls
        ]


PHI4_MINI = ToolFormat()
TOOL_FORMATS = (PHI4_MINI,)


def tool_format(template: ChatTemplate) -> ToolFormat | None:
    """The tool format a chat template is written for, or None when it has no tool support."""
    return next((f for f in TOOL_FORMATS if f.tools_marker in template.source), None)


def _arguments(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value or {}


def calls_constraint(tools: list[dict], choice: str | None, parallel: bool = True) -> OutputConstraint:
    """The JSON a tool call must be: a list of calls, each naming a tool (or the one chosen) with valid arguments."""
    chosen = [t["function"] for t in tools if choice in (None, t["function"]["name"])]
    variants = [
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "enum": [f["name"]]},
                "arguments": f.get("parameters") or ANY_JSON_OBJECT,
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for f in chosen
    ]
    items = variants[0] if len(variants) == 1 else {"anyOf": variants}
    schema: dict[str, Any] = {"type": "array", "items": items, "minItems": 1}
    if not parallel:
        schema["maxItems"] = 1
    return OutputConstraint(schema, compact=True)


def output_constraint(schema_file: Path | None, json_object: bool = False) -> OutputConstraint | None:
    """`phi3 chat --json-schema FILE` or `--json`: the constraint every answer must meet."""
    if schema_file is not None and json_object:
        raise Phi3Error("Give --json-schema or --json, not both.")
    if json_object:
        return ANY_OBJECT
    if schema_file is None:
        return None
    try:
        schema = json.loads(Path(schema_file).read_text())
    except OSError as exc:
        raise Phi3Error(f"Cannot read the JSON schema {schema_file}: {exc.strerror}.") from None
    except ValueError as exc:
        raise Phi3Error(f"The JSON schema {schema_file} is not JSON: {exc}.") from None
    if not isinstance(schema, dict):
        raise Phi3Error(f"{schema_file} must hold a JSON schema object.")
    return OutputConstraint(schema)


def constraining_backends() -> list[str]:
    """The backends whose runtimes can constrain generation (a grammar engine)."""
    return sorted(name for name, spec in registry().items() if spec.constrains)


def constraining_hint() -> str:
    able = constraining_backends()
    return f"Backends that can: {', '.join(able)} (--backend NAME)." if able else "No installed backend can."
