"""`phi3 serve` with continuous batching: the real openvino server on a loopback port, the official OpenAI client.

One server for the module (the openvino int4 demo on the CPU, its KV-cache pool sized down to 0.02 GiB so requests
too large for it are cheap to make). Greedy answers under eight concurrent clients are compared with the
same server's answers to one client at a time.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from tests.test_serve import BAD_INPUTS, GOOD, KEY, QUESTIONS, Server, free_port, streamed_text

pytestmark = pytest.mark.slow  # every test here runs the real demo model

pytest.importorskip("openvino_genai")

MAX_TOKENS = 24
POOL_GB = "0.02"  # 1,568 tokens of KV cache for the demo model (13,680 bytes a token, 49 blocks of 32)
POOL_TOKENS = 1568


@pytest.fixture(scope="module")
def server(demo_source, tmp_path_factory):
    srv = Server(free_port(), tmp_path_factory.mktemp("serve-batching") / "server.log")
    srv.start("--api-key", KEY, "--format", "int4", "--kv-cache-gb", POOL_GB, backend="openvino")
    srv.ready()
    yield srv
    srv.stop()
    assert srv.process.returncode == 0, srv.log()
    assert "Traceback" not in srv.log(), srv.log()


def ask(server, question: str, **kwargs) -> str:
    stream = server.client().chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": question}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
        **kwargs,
    )
    return streamed_text(stream)[0]


@pytest.fixture(scope="module")
def alone(server):
    """Each question's greedy answer with no other request running."""
    return {q: ask(server, q) for q in QUESTIONS}


def health(server) -> dict:
    status, body = server.raw("GET", "/health")
    assert status == 200, body
    return body


def test_health_and_start_up_line_say_how_requests_run(server):
    batching = health(server)["batching"]
    assert batching["mode"] == "continuous" and batching["max_sequences"] == 8
    assert batching["prefix_caching"] is True and batching["greedy_invariant"] is True
    assert batching["kv_cache_tokens"] == POOL_TOKENS and batching["kv_cache_bytes"] > 0
    assert "Requests: continuous batching of up to 8 requests" in server.log()


def test_eight_concurrent_streams_each_get_their_answer_alone(server, alone):
    assert len(set(alone.values())) == len(QUESTIONS)  # the check can tell the answers apart
    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        together = list(pool.map(lambda q: ask(server, q), QUESTIONS, timeout=300))
    assert dict(zip(QUESTIONS, together, strict=True)) == alone
    # They really ran together: the engine had several sequences at once (its steps are shared).
    lines = [x for x in server.log().splitlines() if "POST /v1/chat/completions 200" in x]
    assert len(lines) >= 2 * len(QUESTIONS)


def test_a_request_larger_than_the_kv_cache_pool_is_a_400_naming_it(server):
    # 2,000 tokens fit the demo's context of 8,192 but not the pool.
    with pytest.raises(openai.BadRequestError, match=f"KV-cache pool holds {POOL_TOKENS} tokens") as caught:
        server.client().chat.completions.create(**{**GOOD, "max_tokens": 2000})
    assert caught.value.body["code"] == "context_length_exceeded" and caught.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError, match="Shorten the messages") as caught:
        server.client().chat.completions.create(**{**GOOD, "messages": [{"role": "user", "content": "word " * 2000}]})
    assert caught.value.body["param"] == "messages"
    # Without max_tokens the reply is cut where the pool ends, reported as "length" (not refused, never hung).
    long = {**GOOD, "max_tokens": None, "ignore_eos": True, "messages": [{"role": "user", "content": "word " * 1400}]}
    status, body = server.raw("POST", "/v1/chat/completions", json.dumps(long).encode())
    assert status == 200 and body["choices"][0]["finish_reason"] == "length", body
    assert body["usage"]["total_tokens"] == POOL_TOKENS + 1  # the last token's keys and values are never stored


@pytest.mark.parametrize("case", ["malformed JSON", "deeply nested JSON", "empty messages", "n above one",
                                  "prompt plus max_tokens beyond the context", "prompt beyond the context"])  # fmt: skip
def test_bad_input_stays_a_4xx_under_batching(server, case):
    body, status, code = BAD_INPUTS[case]
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    got, answer = server.raw("POST", "/v1/chat/completions", data)
    assert got == status and answer["error"]["code"] == code, answer
    assert server.client().chat.completions.create(**GOOD).usage.completion_tokens >= 1


def test_clients_that_disconnect_free_their_sequences_at_once(server, alone):
    """Eight endless streams fill every sequence; closing them must let the next requests run."""
    before = server.log().count("cancelled: client went away")
    streams = []
    for i in range(8):
        stream = server.client().chat.completions.create(
            model="demo",
            messages=[{"role": "user", "content": f"Tell me a very long story, number {i}."}],
            temperature=0,  # no max_tokens: until the pool is full (minutes for eight of them)
            stream=True,
            extra_body={"ignore_eos": True},
        )
        for count, _chunk in enumerate(stream):
            if count >= 2:
                break
        streams.append(stream)
    assert health(server)["batching"]["running"] == 8
    for stream in streams:
        stream.close()
    deadline = time.monotonic() + 60
    while health(server)["batching"]["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert health(server)["batching"]["running"] == 0
    # The next requests are answered (and the same as alone).
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda q: ask(server, q), QUESTIONS[:4], timeout=120))
    assert answers == [alone[q] for q in QUESTIONS[:4]]
    text = server.wait_for_log("cancelled: client went away")
    assert text.count("cancelled: client went away") - before == 8


def test_one_sequence_serves_on_the_chat_pipeline_with_its_answers(demo_source, store, tmp_path):
    """--max-sequences 1: one request at a time on LLMPipeline, so greedy answers are those of `phi3 chat`."""
    from phi3cli.backends.base import GenerationSettings
    from phi3cli.chat import ChatSession
    from phi3cli.loading import load
    from phi3cli.routing import given

    srv = Server(free_port(), tmp_path / "server.log")
    srv.start("--api-key", KEY, "--format", "int4", "--max-sequences", "1", backend="openvino")
    try:
        srv.wait_ready()
        batching = health(srv)["batching"]
        assert batching["mode"] == "serial" and "LLMPipeline" in batching["reason"]
        answer = ask(srv, QUESTIONS[0])
    finally:
        srv.stop()
    assert "Requests: one request at a time: OpenVINO GenAI's LLMPipeline" in srv.log()
    model = load(demo_source, route=given("openvino", "cpu"), format="int4", store=store)
    try:
        session = ChatSession(model, GenerationSettings(max_new_tokens=MAX_TOKENS))
        for _ in session.ask(QUESTIONS[0]):
            pass
    finally:
        model.close()
    assert answer == session.last_stats.text
