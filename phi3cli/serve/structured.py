"""response_format and tools on the server: what the loaded model supports, refusals, and calls read from replies."""

from __future__ import annotations

from typing import Any

from phi3cli.backends.base import LoadedModel, OutputConstraint
from phi3cli.generation import ReplyStats
from phi3cli.serve.protocol import ApiError, GenerationRequest
from phi3cli.structured import ANY_OBJECT, ToolFormat, calls_constraint, constraining_backends

NO_TOOLS = (
    "this model's chat template has no tool support (it never reads 'tools'); models trained for tool calls, "
    "such as Phi-4-mini, have one"
)


def parse_structured(body: dict, request: GenerationRequest) -> None:
    """response_format, tools, tool_choice and parallel_tool_calls of a chat body, checked into the request."""
    request.response_format, request.settings.constraint = _response_format(body.get("response_format"))
    request.tools = _tools(body.get("tools"))
    request.tool_choice, request.tool_name = _tool_choice(body.get("tool_choice"), request.tools)
    request.parallel_tool_calls = body.get("parallel_tool_calls") is not False
    if request.tools and request.tool_choice != "none" and request.settings.constraint is not None:
        raise ApiError("Send either 'tools' or a JSON 'response_format', not both.", param="response_format")


def _response_format(value: Any) -> tuple[str, OutputConstraint | None]:
    """response_format: text, json_object (any JSON object) or json_schema (JSON valid against its schema)."""
    if value is None:
        return "text", None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return "text", None
    if kind == "json_object":
        return kind, ANY_OBJECT
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise ApiError(
                "response_format json_schema needs 'json_schema': {'name': ..., 'schema': {...}} with the schema "
                "as an object.",
                param="response_format.json_schema.schema",
            )
        return kind, OutputConstraint(schema)
    raise ApiError(
        f"response_format.type is {kind!r}; this server takes text, json_object or json_schema.",
        param="response_format.type",
    )


def _tools(value: Any) -> list[dict]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ApiError("'tools' must be a list of {type: function, function: {...}} objects.", param="tools")
    tools = []
    for i, tool in enumerate(value):
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise ApiError(
                f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., 'parameters': {{...}}}}}}.",
                param=f"tools[{i}]",
            )
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise ApiError(f"tools[{i}].function.parameters must be a JSON schema object.", param=f"tools[{i}]")
        tools.append({"type": "function", "function": function})
    return tools


def _tool_choice(value: Any, tools: list[dict]) -> tuple[str, str | None]:
    if value is None:
        return "auto", None
    if value in ("none", "auto", "required"):
        if value == "required" and not tools:
            raise ApiError("tool_choice is 'required' but no 'tools' were sent.", param="tool_choice")
        return value, None
    name = value.get("function", {}).get("name") if isinstance(value, dict) else None
    if not isinstance(name, str):
        raise ApiError(
            "tool_choice must be none, auto, required or {'type': 'function', 'function': {'name': ...}}.",
            param="tool_choice",
        )
    if name not in {t["function"]["name"] for t in tools}:
        raise ApiError(f"tool_choice names {name!r}, which is not one of the tools sent.", param="tool_choice")
    return "function", name


def supports(model: LoadedModel, tools_format: ToolFormat | None) -> dict:
    """What /v1/models and /health say the loaded model does with response_format and tools."""
    refusal = model.constraint_refusal()
    info: dict = {
        "response_format": ["text"] if refusal else ["text", "json_object", "json_schema"],
        "tools": tools_format is not None,
        "tool_choice": (["none", "auto"] + ([] if refusal else ["required", "function"])) if tools_format else [],
    }
    if refusal:
        info["constrained_decoding"] = f"no: {refusal}"
    if tools_format is None:
        info["tools_reason"] = NO_TOOLS
    return info


def check_structured(parsed: GenerationRequest, model: LoadedModel, tools_format: ToolFormat | None) -> None:
    """A 400 naming the reason for a request this model or backend cannot honour; sets the tool-call constraint."""
    if parsed.kind != "chat":
        return
    uses_tools = bool(parsed.tools) or any(m["role"] == "tool" or m.get("tool_calls") for m in parsed.messages)
    if uses_tools and tools_format is None:
        raise ApiError(f"This server cannot take tools: {NO_TOOLS}.", param="tools", code="tools_unsupported")
    if parsed.calls_forced:
        parsed.settings.constraint = calls_constraint(parsed.tools, parsed.tool_name, parsed.parallel_tool_calls)
    if parsed.needs_constraint and (why := model.constraint_refusal()):
        able = constraining_backends()
        what = "tool_choice" if parsed.calls_forced else "response_format"
        hint = f" Backends that can: {', '.join(able)} (phi3 serve --backend NAME)." if able else ""
        raise ApiError(
            f"This server cannot constrain the output for {what}: {why}.{hint}", param=what, code="unsupported_value"
        )


def reply_calls(parsed: GenerationRequest, stats: ReplyStats, tools_format: ToolFormat | None) -> list | None:
    """The tool calls in a finished reply, as OpenAI tool_calls; None for a plain-text reply."""
    if tools_format is None or not parsed.tools or parsed.tool_choice == "none":
        return None
    return tools_format.parse_calls(stats.text, parsed.tools)
