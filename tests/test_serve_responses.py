"""POST /v1/responses, driven by the official client's `responses.create`, streamed and not.

The protocol runs on the FAKE scripted model (it echoes the last user message); the JSON-schema constraint runs on
the real demo model (slow), as chat completions' does.
"""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tests.fakes.scripted_model import FakeScriptedModel, pieces
from tests.test_serve import KEY
from tests.test_serve_protocol import CONTEXT, InProcessServer


@pytest.fixture(scope="module")
def fake():
    return FakeScriptedModel(context_length=CONTEXT)


@pytest.fixture(scope="module")
def server(fake, tmp_path_factory):
    srv = InProcessServer(fake, tmp_path_factory.mktemp("responses") / "server.log")
    srv.start()
    srv.ready()
    yield srv
    srv.stop()
    assert "Traceback" not in srv.log(), srv.log()


def test_text_input_and_instructions(server, fake):
    answer = server.client().responses.create(
        model="demo", input="Name a colour.", instructions="Answer in one word.", temperature=0
    )
    assert answer.status == "completed" and answer.object == "response"
    assert answer.output_text == "You said: Name a colour."
    prompt = fake.decode(fake.prompts[-1])
    assert "Answer in one word." in prompt and prompt.index("Answer in one word.") < prompt.index("Name a colour.")
    assert answer.usage.input_tokens == len(fake.prompts[-1])
    assert answer.usage.output_tokens == len(pieces(answer.output_text))
    assert answer.model_extra["phi3"]["backend"] == "fake"


def test_message_items_and_max_output_tokens(server):
    items = [
        {"role": "user", "content": "Hello."},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Hi."}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "one two three four five"}]},
    ]
    answer = server.client().responses.create(model="demo", input=items, max_output_tokens=3, temperature=0)
    assert answer.output_text == "You said: one"
    assert answer.status == "incomplete" and answer.incomplete_details.reason == "max_output_tokens"


def test_streamed_events_come_in_the_documented_order(server):
    events = list(server.client().responses.create(model="demo", input="Tell me a story.", stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == "You said: Tell me a story." == events[-4].text
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].response.output_text == "".join(deltas) and events[-1].response.usage.output_tokens == len(deltas)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"previous_response_id": "resp_123"}, "previous_response_id"),
        ({"tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}]}, "tools"),
        ({"input": [{"type": "function_call_output", "call_id": "x", "output": "1"}]}, "input[0]"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
    ],
)
def test_bad_requests_are_400s_naming_the_field(server, fields, param):
    with pytest.raises(openai.BadRequestError) as caught:
        server.client().responses.create(**{"model": "demo", "input": "x", **fields})
    assert caught.value.body["param"] == param and "\n" not in caught.value.body["message"]
    if param == "previous_response_id":
        assert "stateless" in caught.value.body["message"]


def test_a_json_schema_on_a_model_without_a_grammar_engine_is_a_400(server):
    with pytest.raises(openai.BadRequestError, match="fake backend has no grammar engine"):
        server.client().responses.create(
            model="demo", input="x", text={"format": {"type": "json_schema", "name": "p", "schema": {"type": "object"}}}
        )


PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


@pytest.fixture(scope="module")
def real_server(demo_source, tmp_path_factory):
    from phi3cli.loading import load

    srv = InProcessServer(load("demo", backend="openvino"), tmp_path_factory.mktemp("responses-ov") / "log", KEY)
    srv.start()
    srv.ready()
    yield srv
    srv.stop()
    srv.model.close()


@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True])
def test_text_format_json_schema_constrains_the_answer(real_server, stream):
    ask = dict(
        model="demo",
        input="Describe a person as JSON with a name and an age.",
        temperature=0,
        max_output_tokens=64,
        text={"format": {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}},
    )
    if stream:
        events = list(real_server.client().responses.create(**ask, stream=True))
        assert events[-1].type == "response.completed"
        text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    else:
        text = real_server.client().responses.create(**ask).output_text
    jsonschema.validate(json.loads(text), PERSON)
