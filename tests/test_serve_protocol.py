"""`phi3 serve`'s protocol, queue and bookkeeping on a FAKE model (tests/fakes/scripted_model.py): no real runtime.

The app runs in this process on a loopback port behind uvicorn, driven by the official OpenAI client, as in
tests/test_serve.py, which checks the same server with the real demo model in a `phi3 serve` subprocess (slow).
The fake is served under the id "demo", the one test_serve's request bodies name.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from phi3cli.backends.base import GenerationSettings
from phi3cli.chat import ChatSession
from tests.fakes.scripted_model import FakeScriptedModel, pieces
from tests.test_serve import BAD_INPUTS, GOOD, KEY, MAX_TOKENS, QUESTIONS, Server, chat, free_port, streamed_text

CONTEXT = 8192  # the demo model's, so test_serve's oversized requests are oversized here too


class InProcessServer(Server):
    """The app of phi3cli.serve for one model, on uvicorn in a thread of this process; its request log in a file."""

    def __init__(self, model, log_path, api_key: str | None = KEY, **app_kwargs):
        super().__init__(free_port(), log_path)
        self.model, self.api_key, self.app_kwargs = model, api_key, app_kwargs

    def start(self) -> None:
        import uvicorn

        from phi3cli.serve import bind, create_app

        self.app = create_app(self.model, "demo", api_key=self.api_key, **self.app_kwargs)
        self._handler = logging.FileHandler(self.log_path)
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log = logging.getLogger("phi3.serve")
        log.addHandler(self._handler)
        log.setLevel(logging.INFO)
        config = uvicorn.Config(self.app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
        self.uvicorn = uvicorn.Server(config)
        sock = bind("127.0.0.1", self.port)
        self.thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not self.uvicorn.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, self.log()
            time.sleep(0.02)

    def stop(self) -> None:
        self.app.state.jobs.cancel_all()  # what phi3 serve does on Ctrl-C
        self.uvicorn.should_exit = True
        self.thread.join(30)
        logging.getLogger("phi3.serve").removeHandler(self._handler)
        self._handler.close()


@pytest.fixture(scope="module")
def fake():
    return FakeScriptedModel(context_length=CONTEXT)


@pytest.fixture(scope="module")
def server(fake, tmp_path_factory):
    srv = InProcessServer(fake, tmp_path_factory.mktemp("serve-fake") / "server.log")
    srv.start()
    srv.ready()
    yield srv
    srv.stop()
    assert not srv.thread.is_alive()
    assert "Traceback" not in srv.log(), srv.log()


def reference(question: str, **settings):
    """What `phi3 chat` answers on another copy of the fake (ChatSession, as the chat command runs it)."""
    session = ChatSession(FakeScriptedModel(context_length=CONTEXT), GenerationSettings(max_new_tokens=MAX_TOKENS))
    for _ in session.ask(question):
        pass
    return session.last_stats


def test_models_and_health(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["demo"]
    card = models.data[0].model_extra["phi3"]
    assert (card["backend"], card["context_length"], card["max_prompt_tokens"]) == ("fake", CONTEXT, CONTEXT - 1)
    status, body = server.raw("GET", "/health")
    assert status == 200 and body["status"] == "ok" and body["model"] == "demo"
    assert body["batching"] == {
        "mode": "serial",
        "max_sequences": 1,
        "reason": "this runtime generates one request at a time",
    }


def test_chat_equals_the_chat_pipeline_and_reports_its_figures(server, fake):
    question = QUESTIONS[0]
    expected = reference(question)
    assert expected.text == f"You said: {question}"
    answer = chat(server.client(), question)
    assert answer.choices[0].message.content == expected.text
    assert answer.choices[0].finish_reason == expected.finish_reason == "stop"
    assert answer.usage.prompt_tokens == expected.prompt_tokens == len(fake.prompts[-1])
    assert answer.usage.completion_tokens == expected.generated_tokens == len(pieces(expected.text))
    timing = answer.model_extra["phi3"]
    assert timing["backend"] == "fake" and timing["executed_device"] == "CPU" and timing["ttft_ms"] > 0
    assert fake.settings[-1].max_new_tokens == MAX_TOKENS and fake.settings[-1].temperature == 0


def test_scripted_replies_are_cut_at_max_tokens(server, fake):
    fake.script("one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen x")
    answer = chat(server.client(), "Count.")
    assert answer.choices[0].finish_reason == "length" and answer.usage.completion_tokens == MAX_TOKENS
    assert answer.choices[0].message.content.endswith("sixteen")


def test_streamed_chat_ends_with_usage(server):
    question = QUESTIONS[1]
    stream = chat(server.client(), question, stream=True, stream_options={"include_usage": True})
    text, chunks = streamed_text(stream)
    assert text == reference(question).text
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # really streamed
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "stop"
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == reference(question).generated_tokens
    assert last.model_extra["phi3"]["ttft_ms"] > 0


def test_streamed_chat_without_include_usage_still_reports_usage(server):
    question = QUESTIONS[2]
    text, chunks = streamed_text(chat(server.client(), question, stream=True))
    assert text == reference(question).text
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].usage.prompt_tokens == reference(question).prompt_tokens


def test_completion_and_stop_sequences(server, fake):
    client = server.client()
    fake.script("Paris, of course. It is big.", "Paris, of course. It is big.", "Paris, of course. It is big.")
    answer = client.completions.create(model="demo", prompt="The capital of France is", max_tokens=8, temperature=0)
    assert answer.choices[0].text == "Paris, of course. It is big."
    assert answer.usage.prompt_tokens == len("The capital of France is")
    assert fake.decode(fake.prompts[-1]) == "The capital of France is"  # a completion is not templated
    whole = client.completions.create(model="demo", prompt="x", max_tokens=8, temperature=0, stop=["It"])
    assert whole.choices[0].text == "Paris, of course. " and whole.choices[0].finish_reason == "stop"
    stream = client.completions.create(model="demo", prompt="x", max_tokens=8, temperature=0, stop="It", stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == "Paris, of course. "


def test_eight_concurrent_clients_each_get_their_own_answer(server):
    def ask(i: int) -> str:
        client = server.client()
        if i % 2:
            return streamed_text(chat(client, QUESTIONS[i], stream=True))[0]
        return chat(client, QUESTIONS[i]).choices[0].message.content

    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        answers = list(pool.map(ask, range(len(QUESTIONS)), timeout=60))
    assert answers == [f"You said: {q}" for q in QUESTIONS]


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_a_4xx_and_the_server_keeps_serving(server, case):
    body, status, code = BAD_INPUTS[case]
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    got, answer = server.raw("POST", "/v1/chat/completions", data)
    assert got == status, answer
    assert answer["error"]["code"] == code and answer["error"]["message"]
    assert set(answer["error"]) == {"message", "type", "param", "code"}
    good = server.client().chat.completions.create(**GOOD)
    assert good.choices[0].message.content and good.usage.completion_tokens >= 1


def test_the_client_library_raises_its_own_errors(server):
    client = server.client()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="demo", prompt="x", max_tokens=10**6)


def test_unsupported_fields_are_ignored_and_logged(server):
    answer = server.client().chat.completions.create(**GOOD, metadata={"app": "x"}, user="someone")
    assert answer.choices[0].message.content
    assert answer.model_extra["phi3"]["ignored_fields"] == ["metadata", "user"]
    server.wait_for_log("ignored unsupported fields: metadata, user")


def test_json_output_and_tools_are_400s_naming_why(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError, match=r"fake backend has no grammar engine"):
        client.chat.completions.create(**GOOD, response_format={"type": "json_object"})
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    with pytest.raises(openai.BadRequestError, match="no tool support"):
        client.chat.completions.create(**GOOD, tools=tools)
    supports = server.raw("GET", "/health")[1]["supports"]
    assert supports["response_format"] == ["text"] and supports["tools"] is False


def test_a_client_that_disconnects_stops_its_generation(server, fake):
    before = server.log().count("cancelled: client went away")
    fake.token_delay = 0.02  # 4000 tokens would take over a minute
    try:
        fake.stopped.clear()
        stream = server.client().chat.completions.create(
            model="demo",
            messages=[{"role": "user", "content": "Tell me a very long story."}],
            max_tokens=4000,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        for count, _chunk in enumerate(stream):
            if count >= 3:
                break
        stream.close()
        server.wait_for_log("cancelled: client went away")
        assert fake.stopped.wait(10)  # the fake's generation was closed, not run to its end
        with pytest.raises(openai.APITimeoutError):  # a non-streamed request whose client gives up is stopped too
            server.client(timeout=1).chat.completions.create(
                model="demo",
                messages=[{"role": "user", "content": "Another long story, please."}],
                max_tokens=4000,
                extra_body={"ignore_eos": True},
            )
        deadline = time.monotonic() + 30
        while server.log().count("cancelled: client went away") < before + 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert server.log().count("cancelled: client went away") == before + 2, server.log()
    finally:
        fake.token_delay = 0.0
    assert chat(server.client(), QUESTIONS[3]).choices[0].message.content == f"You said: {QUESTIONS[3]}"
    status, health = server.raw("GET", "/health")
    assert status == 200 and not health["busy"] and health["waiting"] == 0


def test_requests_wait_their_turn_in_order(server, fake):
    """Without a batch engine one request generates at a time; the others wait, then each gets its answer."""
    fake.token_delay = 0.05
    try:
        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(chat, server.client(), q) for q in QUESTIONS[:3]]
            deadline = time.monotonic() + 10
            while (health := server.raw("GET", "/health")[1])["waiting"] < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert health["busy"] and health["running"] == 1 and health["waiting"] >= 1, health
            answers = [f.result(60).choices[0].message.content for f in futures]
    finally:
        fake.token_delay = 0.0
    assert answers == [f"You said: {q}" for q in QUESTIONS[:3]]


def test_api_key_is_checked_on_every_request(server):
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").chat.completions.create(**GOOD)
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").models.list()
    for path in ("/health", "/v1/models"):
        status, body = server.raw("GET", path, key=None)
        assert status == 401 and body["error"]["code"] == "invalid_api_key"


def test_every_request_is_one_log_line(server):
    chat(server.client(), QUESTIONS[5])
    text = server.wait_for_log("POST /v1/chat/completions 200")
    line = next(x for x in text.splitlines() if "POST /v1/chat/completions 200" in x)
    assert " s · " in line and "tok/s" in line and "prompt" in line


def test_health_answers_while_a_generation_runs(server, fake):
    results = []
    fake.token_delay = 0.05
    try:
        generating = threading.Thread(target=lambda: chat(server.client(), QUESTIONS[4]))
        generating.start()
        for _ in range(10):
            results.append(server.raw("GET", "/health")[0])
        generating.join(60)
    finally:
        fake.token_delay = 0.0
    assert results == [200] * 10
