"""Chat sessions that last: /save, /load and --resume give the answer the uninterrupted chat would have."""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from dataclasses import replace

import pytest

from phi3cli.backends.base import GenerationSettings
from phi3cli.chat import ChatSession, HistoryTrimmed
from phi3cli.errors import SessionFileError
from phi3cli.generation import ReplyStats, prompt_budget
from phi3cli.sessions import SCHEMA, SavedSession, load_session, restore, resume_choice, save_session, snapshot
from tests.conftest import run_phi3
from tests.fakes.scripted_model import FakeScriptedModel

QUESTIONS = ["What is the capital of France?", "And of Italy?", "Which of the two cities is bigger?"]


def ask(session: ChatSession, text: str) -> str:
    stats = [e for e in session.ask(text) if isinstance(e, ReplyStats)]
    return stats[-1].text


@pytest.fixture(scope="module")
def uninterrupted(torch_model):
    """The three answers of one greedy chat that was never saved, with default settings."""
    session = ChatSession(torch_model, GenerationSettings())
    return [ask(session, q) for q in QUESTIONS]


def test_save_load_resume_gives_the_same_next_prompt(tmp_path):
    """What the model is asked after a resume is exactly what the uninterrupted chat asks it (on a FAKE model)."""
    uninterrupted = FakeScriptedModel(["Paris.", "Rome.", "Paris is bigger."])
    whole = ChatSession(uninterrupted, GenerationSettings())
    for q in QUESTIONS:
        ask(whole, q)
    model = FakeScriptedModel(["Paris.", "Rome.", "Paris is bigger."])
    first = ChatSession(model, GenerationSettings(), system=None)
    for q in QUESTIONS[:2]:
        ask(first, q)
    path = save_session(tmp_path / "chat.json", snapshot(first, model="demo", device="cpu"))

    data = json.loads(path.read_text())
    assert data["schema"] == SCHEMA
    assert [m["role"] for m in data["messages"]] == ["user", "assistant", "user", "assistant"]
    assert (data["model"], data["backend"], data["format"], data["executed_device"]) == ("demo", "fake", "fake", "CPU")
    assert data["settings"]["temperature"] == 0.0 and data["settings"]["max_new_tokens"] == 512

    resumed = ChatSession(model, GenerationSettings(max_new_tokens=3, temperature=0.7))
    restore(resumed, load_session(path))
    assert resumed.messages == first.messages
    assert resumed.settings == GenerationSettings()  # the saved settings, not the ones it started with
    assert ask(resumed, QUESTIONS[2]) == "Paris is bigger."
    assert model.prompts[-1] == uninterrupted.prompts[-1] and model.settings[-1] == uninterrupted.settings[-1]


@pytest.mark.slow
def test_resume_through_the_cli_gives_the_same_next_answer(demo_source, uninterrupted, tmp_path):
    chat = tmp_path / "chat.json"
    first = run_phi3("chat", "-m", "demo", "-b", "torch", "--save", str(chat), QUESTIONS[0])
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == uninterrupted[0]
    second = run_phi3("chat", "--resume", str(chat), "--save", str(chat), QUESTIONS[1])
    assert second.returncode == 0, second.stderr
    assert "Resumed" in second.stderr and "2 messages" in second.stderr
    assert second.stdout.strip() == uninterrupted[1]
    third = run_phi3("chat", "--resume", str(chat), QUESTIONS[2])  # model, backend, format come from the file
    assert third.returncode == 0, third.stderr
    assert third.stdout.strip() == uninterrupted[2]
    assert "torch on CPU" in third.stderr
    assert len(json.loads(chat.read_text())["messages"]) == 4  # without --save the file is left as it was


@pytest.mark.parametrize(
    "content, needle",
    [
        ("this is not json", "not JSON"),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}]}), "is not a phi3 chat session"),
        (json.dumps(["a", "list"]), "is not a phi3 chat session"),
        (json.dumps({"schema": "phi3.chat-session/9", "messages": []}), "this phi3 reads"),
        (json.dumps({"schema": SCHEMA, "model": "demo", "backend": "torch", "format": "fp32"}), "no 'messages'"),
        (
            json.dumps(
                {"schema": SCHEMA, "model": "demo", "backend": "torch", "format": "fp32", "messages": [{"role": "x"}]}
            ),
            "damaged",
        ),
    ],
)
def test_a_file_that_is_not_our_session_is_refused_clearly(tmp_path, content, needle):
    path = tmp_path / "foreign.json"
    path.write_text(content)
    with pytest.raises(SessionFileError, match=needle):
        load_session(path)


def test_missing_session_file():
    with pytest.raises(SessionFileError, match="No session file"):
        load_session("/no/such/chat.json")


def test_save_never_overwrites_a_foreign_file(tmp_path):
    precious = tmp_path / "notes.json"
    precious.write_text('{"my": "data"}')
    session = ChatSession(FakeScriptedModel())
    with pytest.raises(SessionFileError, match="not a phi3 chat session; not overwriting"):
        save_session(precious, snapshot(session, model="demo", device="cpu"))
    assert precious.read_text() == '{"my": "data"}'
    assert os.listdir(tmp_path) == ["notes.json"]  # no temporary file left behind


def saved_file(tmp_path, **changes) -> str:
    data = {
        "schema": SCHEMA,
        "model": "demo",
        "backend": "torch",
        "device": "cpu",
        "format": "fp32",
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
        **changes,
    }
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(data))
    return str(path)


def assert_clean_error(done, *needles):
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    assert len([line for line in done.stderr.splitlines() if line.startswith("Error:")]) == 1, done.stderr
    for needle in needles:
        assert needle in done.stderr, done.stderr


def test_cli_refuses_a_foreign_session_file(tmp_path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"conversation": []}))
    assert_clean_error(run_phi3("chat", "--resume", str(path), "hi"), "is not a phi3 chat session")


@pytest.mark.slow
def test_cli_session_naming_a_missing_model_suggests_model(demo_source, tmp_path):
    path = saved_file(tmp_path, model=str(tmp_path / "gone-model"))
    assert_clean_error(run_phi3("chat", "--resume", path, "hi"), "gone-model", "not available here", "--model")
    # With --model the conversation goes on.
    done = run_phi3("chat", "--resume", path, "--model", "demo", "-n", "8", "What is the capital of France?")
    assert done.returncode == 0, done.stderr
    assert "Resumed" in done.stderr


def test_resume_choice_takes_from_the_file_what_the_options_leave_unset():
    saved = SavedSession(
        model="demo",
        backend="onnx",
        device="cpu",
        executed_device="CPU",
        format="int4",
        settings=GenerationSettings(max_new_tokens=64, temperature=0.5, seed=3),
    )
    chosen = resume_choice(saved, format="fp32", temperature=0.0)
    assert (chosen.model, chosen.backend, chosen.format, chosen.device) == ("demo", "onnx", "fp32", "cpu")
    assert chosen.from_file == {"--model": "demo", "--backend": "onnx", "--device": "cpu"}  # not --format: given
    assert chosen.settings == GenerationSettings(max_new_tokens=64, temperature=0.0, seed=3)
    assert saved.settings.temperature == 0.5  # the file's settings are copied, not changed

    given = resume_choice(saved, model="other", backend="torch", device="npu", max_new_tokens=8, top_p=0.9, seed=1)
    assert (given.model, given.backend, given.device) == ("other", "torch", "npu")
    assert given.from_file == {"--format": "int4"}
    assert (given.settings.max_new_tokens, given.settings.top_p, given.settings.seed) == (8, 0.9, 1)

    # An "auto" or unknown device in the file leaves the device to routing; an unknown one is still named.
    assert resume_choice(replace(saved, device="auto")).device == "auto"
    odd = resume_choice(replace(saved, device="xpu"))
    assert odd.device == "auto" and odd.from_file["--device"] == "xpu"

    fresh = resume_choice(None, model="demo", seed=5)
    assert (fresh.model, fresh.backend, fresh.format, fresh.device, fresh.from_file) == ("demo", None, None, "auto", {})
    assert fresh.settings == GenerationSettings(seed=5)


def test_history_trimming_respects_a_prompt_limit():
    """An NPU's static prompt length (max_prompt_tokens) trims history like the context does, with a notice."""
    from phi3cli.cli.render import trim_notice as _trim_notice

    fake = FakeScriptedModel()
    session = ChatSession(fake, GenerationSettings(max_new_tokens=8))
    for q in QUESTIONS[:2]:
        ask(session, q)
    whole = len(fake.encode(fake.chat_template.render(session.conversation_with(session.messages, "x"))))
    assert whole + 8 < fake.context_length  # the context alone would not trim
    fake.max_prompt_tokens = whole - 5
    events = list(session.ask("And of Spain?"))
    trimmed = [e for e in events if isinstance(e, HistoryTrimmed)]
    assert trimmed and trimmed[0].messages == 2 and trimmed[0].prompt_tokens <= prompt_budget(fake)
    assert events[-1].prompt_tokens <= whole - 5
    assert f"prompt limit of {whole - 5} tokens" in _trim_notice(trimmed[0], session)


# The interactive loop, driven through a pseudo-terminal as a user types.


ANSI = re.compile(r"\x1b(\[[0-9;?]*[A-Za-z]|\][^\x07]*\x07|[()][A-Z0-9])")


class Terminal:
    """`phi3 ARGS` in a pseudo-terminal: type lines, wait for text to appear."""

    def __init__(self, *args: str, cwd, env: dict | None = None, rows: int = 50, columns: int = 200):
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))  # 200 columns: no wrapping
        env = {**os.environ, "TERM": "xterm", **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "phi3cli", *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            cwd=cwd,
            env=env,
            close_fds=True,
        )
        os.close(slave)
        self.master, self.seen = master, ""

    def expect(self, pattern: str, timeout: float = 120) -> str:
        end = time.monotonic() + timeout
        while not (m := re.search(pattern, self.seen)):
            if (
                time.monotonic() > end
                or self.proc.poll() is not None
                and not select.select([self.master], [], [], 0)[0]
            ):
                raise AssertionError(f"{pattern!r} never appeared:\n{self.seen[-3000:]}")
            if select.select([self.master], [], [], 0.2)[0]:
                try:
                    self.seen += ANSI.sub("", os.read(self.master, 65536).decode(errors="replace"))
                except OSError:
                    pass
        self.seen = self.seen[m.end() :]
        return m.group(0)

    def type(self, line: str) -> None:
        os.write(self.master, (line + "\n").encode())

    def close(self) -> int:
        try:
            return self.proc.wait(timeout=60)
        finally:
            os.close(self.master)


@pytest.mark.slow
def test_interactive_save_load_model_and_multiline(demo_source, uninterrupted, tmp_path):
    first = Terminal("chat", "-m", "demo", "-b", "torch", cwd=tmp_path)
    first.expect(r">>> ")
    first.type(QUESTIONS[0])
    first.expect(r"tok/s")
    first.type('"""')  # a multi-line message, as in Ollama
    first.type("And")
    first.type('of Italy?"""')
    first.expect(r"tok/s")
    first.type("/model")
    first.expect(r"asked cpu, running on CPU")
    first.type("/save chat.json")
    first.expect(r"Saved 4 messages")
    first.type("/exit")
    assert first.close() == 0
    saved = json.loads((tmp_path / "chat.json").read_text())
    assert saved["messages"][1]["content"] == uninterrupted[0]  # the interactive path answers as one-shot does
    assert saved["messages"][2]["content"] == "And\nof Italy?"

    # A new chat loads it and goes on; --save keeps the file up to date after each reply.
    second = Terminal("chat", "-m", "demo", "-b", "torch", "--save", "after.json", cwd=tmp_path)
    second.expect(r">>> ")
    second.type("/load chat.json")
    second.expect(r"Loaded 4 messages")
    second.type("/load missing.json")
    second.expect(r"No session file")  # an error does not end the chat
    second.type("/stats")
    second.expect(r"No reply yet")
    second.type(QUESTIONS[2])
    second.expect(r"tok/s")
    second.type("/stats")
    second.expect(r"torch on CPU")
    second.type("/exit")
    assert second.close() == 0
    after = json.loads((tmp_path / "after.json").read_text())
    assert len(after["messages"]) == 6


@pytest.mark.slow
def test_a_reply_taller_than_the_terminal_is_printed_once(demo_source, tmp_path):
    # A live view redraws the lines that scrolled away each time it refreshes; streamed text is printed once.
    rows = 12
    term = Terminal("chat", "-m", "demo", "-b", "torch", "-n", "150", "--save", "chat.json", cwd=tmp_path, rows=rows)
    term.expect(r">>> ")
    term.type("Write a poem about the sea.")
    shown = term.expect(r"(?s).*?tok/s").replace("\r\n", "\n")
    term.expect(r">>> ")
    term.type("Another one.")  # Ctrl-C stops a reply with a mark and keeps the session
    term.expect(r"Another one\.\s*\n\s*\S")
    term.proc.send_signal(signal.SIGINT)
    term.expect(r"\[stopped\]")
    term.expect(r">>> ")
    term.type("/exit")
    assert term.close() == 0
    messages = json.loads((tmp_path / "chat.json").read_text())["messages"]
    assert len(messages) == 2  # the stopped turn is not kept
    answer = messages[1]["content"]
    first = answer.splitlines()[0]
    assert len(answer.splitlines()) > rows and answer.count(first) == 1  # taller than the terminal
    assert shown.count(first) == 1, shown
    assert answer in shown


@pytest.mark.slow
def test_cli_names_the_session_file_when_its_backend_is_missing_here(demo_source, tmp_path):
    path = saved_file(tmp_path, backend="npu-lib", device="npu", format="int4")
    assert_clean_error(
        run_phi3("chat", "--resume", path, "hi"), "npu-lib backend is not available", "chose --backend npu-lib"
    )
