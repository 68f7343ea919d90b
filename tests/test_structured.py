"""Structured output and tool calls: the real servers (openvino, onnx) on the demo, the official OpenAI client.

Every answer is checked with the jsonschema package: constrained decoding must make it valid whatever the model
would have said. Tool calls run on a tiny random-weight model with Phi-4-mini's shape and chat template, written
here: its words are noise, so only the constraint can make its calls valid.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jsonschema
import openai
import pytest

from tests.conftest import TEST_HOME, run_phi3
from tests.test_serve import KEY, Server, free_port

pytestmark = pytest.mark.slow  # every test here runs the real demo model

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}
ASK_PERSON = [{"role": "user", "content": "Describe a person as JSON with a name and an age."}]
ASK_COLOUR = [
    {"role": "user", "content": 'Answer with a JSON object like {"colour": "red"} naming one colour of the rainbow.'}
]
REFUSED = {"type": "object", "properties": {"a": {"type": "strin"}}}  # both engines refuse the unknown type
# Phi-4-mini-instruct's chat template: tools as JSON on the system turn, inside <|tool|>...<|/tool|>.
PHI4_MINI_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and message['tools'] "
    "is not none %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + message['tools'] + "
    "'<|/tool|>' + '<|end|>' }}{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)
PHI4_MINI_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|tool|>", "<|/tool|>"]
PHI4_MINI_TOKENS += ["<|tool_call|>", "<|/tool_call|>", "<|tool_response|>"]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city", "unit"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "set_alarm",
            "description": "Set an alarm.",
            "parameters": {
                "type": "object",
                "properties": {"hour": {"type": "integer", "enum": [6, 7, 8]}, "loud": {"type": "boolean"}},
                "required": ["hour", "loud"],
            },
        },
    },
]


def start(backend: str, tmp_path_factory, *extra: str) -> Server:
    srv = Server(free_port(), tmp_path_factory.mktemp(f"structured-{backend}") / "server.log")
    srv.start("--api-key", KEY, *extra, backend=backend)
    srv.ready()
    return srv


@pytest.fixture(scope="module", params=["openvino", "onnx"])
def server(request, demo_source, tmp_path_factory):
    pytest.importorskip({"openvino": "openvino_genai", "onnx": "onnxruntime_genai"}[request.param])
    srv = start(request.param, tmp_path_factory)
    yield srv
    srv.stop()
    assert "Traceback" not in srv.log(), srv.log()


def ask(server, stream: bool = False, model: str = "demo", **kwargs):
    """The answer's text and finish reason (streamed or not), and the tool calls if any."""
    answer = server.client().chat.completions.create(
        model=model, temperature=0, max_tokens=kwargs.pop("max_tokens", 64), stream=stream, **kwargs
    )
    if not stream:
        choice = answer.choices[0]
        return choice.message.content, choice.finish_reason, choice.message.tool_calls
    text, finish, calls = "", None, []
    for chunk in answer:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            calls += choice.delta.tool_calls or []
            finish = choice.finish_reason or finish
    return text, finish, calls


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_json_schema_answers_validate(server, stream):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    text, finish, _ = ask(server, stream, messages=ASK_PERSON, response_format=fmt)
    assert finish == "stop", text
    jsonschema.validate(json.loads(text), PERSON)


def test_json_object_is_valid_json(server):
    text, finish, _ = ask(server, messages=ASK_COLOUR, response_format={"type": "json_object"}, max_tokens=128)
    assert isinstance(json.loads(text), dict), (finish, text)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_schema_the_engine_refuses_is_a_400_quoting_it(server, stream):
    fmt = {"type": "json_schema", "json_schema": {"name": "bad", "schema": REFUSED}}
    with pytest.raises(openai.BadRequestError, match="strin"):
        ask(server, stream, messages=ASK_PERSON, response_format=fmt)
    text, _, _ = ask(server, messages=ASK_PERSON, max_tokens=8)  # and the server still answers
    assert text


def test_tools_on_a_model_without_tool_support_are_a_400(server):
    with pytest.raises(openai.BadRequestError, match="no tool support"):
        ask(server, messages=ASK_PERSON, tools=TOOLS)
    status, body = server.raw("GET", "/v1/models")
    supports = body["data"][0]["phi3"]["supports"]
    assert supports["tools"] is False and "json_schema" in supports["response_format"]


BAD_BODIES = {
    "unknown response_format": {"response_format": {"type": "xml"}},
    "json_schema without a schema": {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
    "required without tools": {"tool_choice": "required"},
    "a tool without a name": {"tools": [{"type": "function", "function": {"parameters": {}}}]},
    "a tool message without its call id": {"messages": [{"role": "tool", "content": "18 degrees"}]},
}


@pytest.mark.parametrize("case", list(BAD_BODIES))
def test_malformed_structured_requests_are_400s(server, case):
    body = {"model": "demo", "messages": ASK_PERSON, "max_tokens": 4, **BAD_BODIES[case]}
    status, answer = server.raw("POST", "/v1/chat/completions", json.dumps(body).encode())
    assert status == 400 and answer["error"]["message"], answer


def test_chat_json_schema_prints_json_that_validates(demo_source, tmp_path):
    schema = tmp_path / "person.json"
    schema.write_text(json.dumps(PERSON))
    done = run_phi3("chat", "--model", "demo", "--backend", "openvino", "-n", "64", "--json-schema", str(schema),
                    ASK_PERSON[0]["content"])  # fmt: skip
    assert done.returncode == 0, done.stderr
    jsonschema.validate(json.loads(done.stdout), PERSON)


def write_tiny_phi4_mini(demo: Path, out: Path) -> Path:
    """A random-weight Phi3ForCausalLM with Phi-4-mini's config (partial rotary, tied embeddings) at tiny widths,
    the demo's vocabulary plus Phi-4-mini's special tokens, and Phi-4-mini's chat template."""
    import torch
    from transformers import GenerationConfig, Phi3Config, Phi3ForCausalLM, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(demo)
    tokenizer.add_special_tokens({"additional_special_tokens": PHI4_MINI_TOKENS})
    tokenizer.eos_token = "<|end|>"
    tokenizer.chat_template = PHI4_MINI_TEMPLATE
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    config = Phi3Config(
        vocab_size=len(tokenizer) + (-len(tokenizer)) % 64,
        hidden_size=128,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=4096,
        original_max_position_embeddings=4096,
        partial_rotary_factor=0.75,
        tie_word_embeddings=True,
        hidden_act="silu",
        rope_theta=10000.0,
        bos_token_id=end,
        eos_token_id=end,
        pad_token_id=end,
    )
    torch.manual_seed(0)
    model = Phi3ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=end, bos_token_id=end, pad_token_id=end)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def tiny_phi4_mini(demo: Path) -> Path:
    """The tiny Phi-4-mini in the test home, written once (one path, so the store converts it once)."""
    folder = TEST_HOME / "fixtures" / "tiny-phi4-mini"
    if not (folder / "model.safetensors").is_file():
        staging = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        write_tiny_phi4_mini(demo, staging)
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(demo_source, tmp_path_factory):
    """`phi3 serve` (onnx) on the tiny random-weight Phi-4-mini, and its model id."""
    pytest.importorskip("onnxruntime_genai")
    folder = tiny_phi4_mini(demo_source.path)
    srv = Server(free_port(), tmp_path_factory.mktemp("structured-tools") / "server.log")
    srv.start("--api-key", KEY, backend="onnx", model=str(folder))
    srv.ready()
    yield srv, str(folder)
    srv.stop()
    assert "Traceback" not in srv.log(), srv.log()


WEATHER = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Weather in Paris?"}]


def check_calls(calls, names=None) -> None:
    assert calls, "no tool_calls"
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for call in calls:
        assert call.type == "function" and call.id
        assert call.function.name in (names or schemas)
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_required_tool_choice_gives_a_call_whose_arguments_validate(tiny, stream):
    server, model = tiny
    _, finish, calls = ask(server, stream, model=model, messages=WEATHER, tools=TOOLS, tool_choice="required",
                           parallel_tool_calls=False, max_tokens=200)  # fmt: skip
    assert finish == "tool_calls"
    check_calls(calls)


def test_a_named_tool_is_the_one_called_and_the_tool_message_is_accepted(tiny):
    server, model = tiny
    choice = {"type": "function", "function": {"name": "set_alarm"}}
    _, finish, calls = ask(server, model=model, messages=WEATHER, tools=TOOLS, tool_choice=choice,
                           parallel_tool_calls=False, max_tokens=200)  # fmt: skip
    assert finish == "tool_calls"
    check_calls(calls, names=["set_alarm"])
    follow_up = WEATHER + [
        {"role": "assistant", "content": None, "tool_calls": [calls[0].model_dump()]},
        {"role": "tool", "tool_call_id": calls[0].id, "content": "The alarm is set."},
    ]
    text, finish, _ = ask(server, model=model, messages=follow_up, tools=TOOLS, tool_choice="none", max_tokens=8)
    assert finish in ("stop", "length") and text is not None
    status, body = server.raw("GET", "/health")
    assert status == 200 and body["supports"]["tools"] is True
