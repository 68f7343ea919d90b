"""`phi3 serve`: the real server on a loopback port, driven by the official OpenAI client."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from phi3cli.backends.base import GenerationSettings
from tests.conftest import run_phi3

KEY = "test-key-not-secret"
MAX_TOKENS = 16
# Eight different questions, one per concurrent client.
QUESTIONS = [
    "What is the capital of France?",
    "Name three colours of the rainbow.",
    "Write one sentence about the sea.",
    "What is two plus two?",
    "Name a large animal that lives in Africa.",
    "What do bees make?",
    "Which planet is closest to the Sun?",
    "Say hello in Spanish.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `phi3 serve` subprocess and its log."""

    def __init__(self, port: int, log_path):
        self.port, self.log_path = port, log_path
        self.base = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen | None = None

    def start(self, *extra: str, backend: str = "torch", model: str = "demo") -> None:
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        args = ["serve", "--model", model, "--backend", backend, "--port", str(self.port), *extra]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "phi3cli", *args], stdout=self._log, stderr=subprocess.STDOUT, env=os.environ.copy()
        )

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"the server exited:\n{self.log()}"
            try:
                if self.raw("GET", "/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"the server did not answer /health within {timeout} s:\n{self.log()}")

    def ready(self, *first: Callable[[], object]) -> None:
        """Run first (work that overlaps the server's start), then wait for /health; stop the server if either fails."""
        try:
            for step in first:
                step()
            self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text()

    def raw(self, method: str, path: str, data: bytes | None = None, key: str | None = KEY) -> tuple[int, dict]:
        """A request without the OpenAI client (for bodies it would never send)."""
        request = urllib.request.Request(self.base + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        if key:
            request.add_header("Authorization", f"Bearer {key}")
        try:
            with urllib.request.urlopen(request, timeout=60) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def client(self, key: str = KEY, timeout: float = 120):
        return openai.OpenAI(base_url=self.base + "/v1", api_key=key, max_retries=0, timeout=timeout)

    def wait_for_log(self, needle: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in (text := self.log()):
                return text
            time.sleep(0.2)
        raise AssertionError(f"{needle!r} not in the server log:\n{self.log()}")


@pytest.fixture(scope="module")
def server(demo_source, tmp_path_factory, request):
    srv = Server(free_port(), tmp_path_factory.mktemp("serve") / "server.log")
    srv.start("--api-key", KEY)
    srv.ready(lambda: request.getfixturevalue("references"))  # computed while the server loads
    yield srv
    srv.stop()
    assert srv.process.returncode == 0, srv.log()
    assert "Traceback" not in srv.log(), srv.log()


@pytest.fixture(scope="module")
def references(torch_model):
    """`phi3 chat`'s greedy answer to each question (ChatSession, as the chat command runs it)."""
    from phi3cli.chat import ChatSession

    answers = {}
    for question in QUESTIONS:
        session = ChatSession(torch_model, GenerationSettings(max_new_tokens=MAX_TOKENS))
        for _ in session.ask(question):
            pass
        answers[question] = session.last_stats
    return answers


def chat(client, question: str, **kwargs):
    return client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": question}], max_tokens=MAX_TOKENS, temperature=0, **kwargs
    )


def streamed_text(stream) -> tuple[str, list]:
    pieces, chunks = [], []
    for chunk in stream:
        chunks.append(chunk)
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    return "".join(pieces), chunks


@pytest.mark.slow
def test_reference_is_what_the_chat_command_prints(server, references):
    # tests/test_cli.py checks that `phi3 chat` prints exactly this for the same question.
    assert references[QUESTIONS[0]].text == "The capital of France is Paris."


@pytest.mark.slow
def test_models_and_health(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["demo"]
    assert models.data[0].model_extra["phi3"]["backend"] == "torch"
    status, body = server.raw("GET", "/health")
    assert status == 200 and body["status"] == "ok" and body["model"] == "demo"


@pytest.mark.slow
def test_chat_equals_phi3_chat(server, references):
    question = QUESTIONS[0]
    reference = references[question]
    answer = chat(server.client(), question)
    assert answer.choices[0].message.content == reference.text
    assert answer.choices[0].finish_reason == reference.finish_reason
    assert answer.usage.prompt_tokens == reference.prompt_tokens
    assert answer.usage.completion_tokens == reference.generated_tokens
    timing = answer.model_extra["phi3"]
    assert timing["backend"] == "torch" and timing["executed_device"] == "CPU"
    assert timing["ttft_ms"] > 0 and timing["decode_tokens_per_s"] > 0


@pytest.mark.slow
def test_streamed_chat_equals_phi3_chat_and_ends_with_usage(server, references):
    question = QUESTIONS[1]
    reference = references[question]
    stream = chat(server.client(), question, stream=True, stream_options={"include_usage": True})
    text, chunks = streamed_text(stream)
    assert text == reference.text
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # really streamed
    assert chunks[-2].choices[0].finish_reason == reference.finish_reason
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == reference.generated_tokens
    assert last.model_extra["phi3"]["ttft_ms"] > 0


@pytest.mark.slow
def test_streamed_chat_without_include_usage_still_reports_usage(server, references):
    question = QUESTIONS[2]
    text, chunks = streamed_text(chat(server.client(), question, stream=True))
    assert text == references[question].text
    assert chunks[-1].choices[0].finish_reason and chunks[-1].usage.prompt_tokens == references[question].prompt_tokens


@pytest.mark.slow
def test_completion_and_stop_sequences(server, torch_model):
    from phi3cli.generation import generate_text

    prompt = "The capital of France is"
    expected = generate_text(torch_model, prompt, GenerationSettings(max_new_tokens=8)).text
    client = server.client()
    answer = client.completions.create(model="demo", prompt=prompt, max_tokens=8, temperature=0)
    assert answer.choices[0].text == expected
    assert answer.usage.prompt_tokens == len(torch_model.encode(prompt))
    # A stop sequence is never sent, streamed or not, and both forms agree.
    stop = expected.strip().split()[1]
    cut = expected[: expected.index(stop)]
    whole = client.completions.create(model="demo", prompt=prompt, max_tokens=8, temperature=0, stop=[stop])
    assert whole.choices[0].text == cut and whole.choices[0].finish_reason == "stop"
    stream = client.completions.create(model="demo", prompt=prompt, max_tokens=8, temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == cut


@pytest.mark.slow
def test_eight_concurrent_clients_each_get_their_own_answer(server, references):
    def ask(i: int) -> str:
        client = server.client()
        if i % 2:
            return streamed_text(chat(client, QUESTIONS[i], stream=True))[0]
        return chat(client, QUESTIONS[i]).choices[0].message.content

    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        answers = list(pool.map(ask, range(len(QUESTIONS)), timeout=600))
    assert len({references[q].text for q in QUESTIONS}) == len(QUESTIONS)  # the check can tell answers apart
    for question, answer in zip(QUESTIONS, answers, strict=True):
        assert answer == references[question].text, question


GOOD = {"model": "demo", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0}
BAD_INPUTS = {
    "malformed JSON": (b'{"model": "demo", "messages": [', 400, "invalid_json"),
    "deeply nested JSON": (b'{"messages":' + b"[" * 100_000, 400, "invalid_json"),
    "not an object": (b"[1, 2]", 400, "invalid_json"),
    "wrong model": ({**GOOD, "model": "gpt-4o"}, 404, "model_not_found"),
    "empty messages": ({**GOOD, "messages": []}, 400, "invalid_value"),
    "unknown role": ({**GOOD, "messages": [{"role": "robot", "content": "x"}]}, 400, "invalid_value"),
    "image part for a text-only model": (
        {**GOOD, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        400,
        "invalid_image",
    ),
    "audio part": (
        {**GOOD, "messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
        400,
        "invalid_value",
    ),
    "negative max_tokens": ({**GOOD, "max_tokens": -5}, 400, "invalid_value"),
    "string max_tokens": ({**GOOD, "max_tokens": "ten"}, 400, "invalid_value"),
    "temperature out of range": ({**GOOD, "temperature": 2.5}, 400, "invalid_value"),
    "top_p out of range": ({**GOOD, "top_p": -0.1}, 400, "invalid_value"),
    "n above one": ({**GOOD, "n": 3}, 400, "invalid_value"),
    "max_tokens beyond the context": ({**GOOD, "max_tokens": 10**6}, 400, "context_length_exceeded"),
    "prompt plus max_tokens beyond the context": ({**GOOD, "max_tokens": 8190}, 400, "context_length_exceeded"),
    "prompt beyond the context": (
        {**GOOD, "messages": [{"role": "user", "content": "word " * 9000}]},
        400,
        "context_length_exceeded",
    ),
}


@pytest.mark.slow
def test_a_client_that_disconnects_stops_its_generation(server, references):
    # Thousands of tokens would take minutes here; closing the stream must stop the runtime at once.
    stream = server.client().chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": "Tell me a very long story."}],
        max_tokens=4000,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    for count, _chunk in enumerate(stream):
        if count >= 3:
            break
    stream.close()
    server.wait_for_log("cancelled: client went away")
    # A non-streamed request whose client gives up is stopped too.
    with pytest.raises(openai.APITimeoutError):
        server.client(timeout=2).chat.completions.create(
            model="demo",
            messages=[{"role": "user", "content": "Another long story, please."}],
            max_tokens=4000,
            extra_body={"ignore_eos": True},
        )
    deadline = time.monotonic() + 60
    while server.log().count("cancelled: client went away") < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert server.log().count("cancelled: client went away") == 2, server.log()
    # The slot is free: the next request is answered, and correctly.
    question = QUESTIONS[3]
    assert chat(server.client(timeout=90), question).choices[0].message.content == references[question].text
    status, health = server.raw("GET", "/health")
    assert status == 200 and not health["busy"] and health["waiting"] == 0


def test_a_taken_port_is_a_clean_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        done = run_phi3("serve", "--model", "demo", "--port", str(port), timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "already in use" in done.stderr and "--port" in done.stderr


# The pieces that need no server.


def test_serve_help_loads_no_server_or_runtime():
    from tests.test_cli import HEAVY, imported_modules

    names = imported_modules("serve", "--help")
    assert "typer" in names
    assert not names & {*HEAVY, "starlette", "uvicorn", "ray"}, names & {*HEAVY, "starlette", "uvicorn", "ray"}


def test_loopback_detection():
    from phi3cli.serve import is_loopback

    assert all(map(is_loopback, ["127.0.0.1", "localhost", "::1", "127.0.0.5"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "192.168.1.10", "example.org"]))


def test_validation_defaults_follow_openai():
    from phi3cli.serve.protocol import parse_chat, parse_completion

    chat_request = parse_chat({"messages": [{"role": "developer", "content": [{"type": "text", "text": "hi"}]}]}, 100)
    assert chat_request.messages == [{"role": "system", "content": "hi"}]
    assert chat_request.settings.temperature == 1.0 and chat_request.max_tokens is None
    assert chat_request.settings.max_new_tokens == 100  # until the context is full
    assert parse_completion({"prompt": ["x"]}, 100).max_tokens == 16
