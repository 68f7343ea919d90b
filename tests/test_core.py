"""The core pieces every backend shares: templates, incremental decoding, push-to-pull, atomic output, history."""

from __future__ import annotations

import errno
import threading
import time

import pytest

from phi3cli.backends.base import GenerationSettings, RawToken
from phi3cli.backends.streaming import IncrementalDecoder, pull_from_push
from phi3cli.chat import ChatSession, HistoryTrimmed
from phi3cli.errors import ContextOverflowError, ConversionError, OutputExistsError
from phi3cli.generation import ReplyStats
from phi3cli.templates import PHI3_TEMPLATE, ChatTemplate, load_chat_template
from phi3cli.util import atomic_output, on_interrupt, remove_stale_partials
from tests.fakes.scripted_model import FakeScriptedModel

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "What is 2+2?"},
]


@pytest.mark.slow
def test_template_renders_like_transformers(torch_model):
    ours = load_chat_template(torch_model.path).render(CONVERSATION)
    theirs = torch_model.tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert ours == theirs


def test_phi3_template_matches_phi3_format():
    text = ChatTemplate(PHI3_TEMPLATE, eos_token="<|endoftext|>").render(CONVERSATION)
    assert text == (
        "<|system|>\nYou are terse.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello.<|end|>\n"
        "<|user|>\nWhat is 2+2?<|end|>\n<|assistant|>\n"
    )


def test_template_falls_back_to_phi3_when_folder_has_none(tmp_path):
    assert load_chat_template(tmp_path).source == PHI3_TEMPLATE


@pytest.mark.slow
def test_incremental_decoder_matches_full_decode(torch_model):
    text = "Ça coûte 5 €, 東京 🙂 and naïve — done."
    ids = torch_model.encode(text)
    decoder = IncrementalDecoder(lambda x: torch_model.tokenizer.decode(x))
    pieces = [decoder.push(i) for i in ids]
    assert "".join(pieces) == text
    assert any(p == "" for p in pieces)  # a multi-byte character was held back until complete


def test_pull_from_push_stops_the_producer_when_closed():
    produced = []

    def producer(emit):
        for i in range(10_000):
            produced.append(i)
            if not emit(RawToken(str(i))):
                return
            time.sleep(0.001)

    tokens = pull_from_push(producer)
    first = [next(tokens).text for _ in range(3)]
    tokens.close()
    assert first == ["0", "1", "2"]
    assert len(produced) < 100
    assert not [t for t in threading.enumerate() if t.name == "phi3-generate"]


def test_pull_from_push_reraises_producer_errors():
    def producer(emit):
        emit(RawToken("a"))
        raise RuntimeError("runtime failed")

    tokens = pull_from_push(producer)
    assert next(tokens).text == "a"
    with pytest.raises(RuntimeError, match="runtime failed"):
        next(tokens)


def test_atomic_output_leaves_nothing_on_failure(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt), atomic_output(final) as staging:
        (staging / "half.bin").write_bytes(b"x" * 100)
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_commits_nothing_after_a_swallowed_interrupt(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt), atomic_output(final) as staging:
        (staging / "whole.bin").write_bytes(b"x" * 100)
        try:  # what a KeyboardInterrupt raised inside a __del__ amounts to: printed, never propagated
            on_interrupt(2, None)
        except KeyboardInterrupt:
            pass
    assert list(tmp_path.iterdir()) == []
    with atomic_output(final) as staging:  # the next write, with no interrupt during it, commits
        (staging / "whole.bin").write_bytes(b"x")
    assert [p.name for p in final.iterdir()] == ["whole.bin"]


def test_atomic_output_needs_force_and_replaces(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old").write_text("old")
    with pytest.raises(OutputExistsError, match="already exists") as info, atomic_output(final):
        pass
    assert "--force" in info.value.hint
    with atomic_output(final, force=True) as staging:
        (staging / "new").write_text("new")
    assert [p.name for p in final.iterdir()] == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_output_reports_a_full_disk(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(ConversionError, match="No space left"), atomic_output(final):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_stale_partials_of_dead_processes_are_removed(tmp_path):
    dead = tmp_path / ".out.partial-999999999"
    dead.mkdir()
    assert remove_stale_partials(tmp_path) == [dead]
    assert not dead.exists()


def test_history_is_trimmed_oldest_first_with_a_notice():
    fake = FakeScriptedModel()
    session = ChatSession(fake, GenerationSettings(max_new_tokens=8), system="Be brief.")
    for question in ["What is the capital of France?", "And of Italy?"]:
        list(session.ask(question))
    assert len(session.messages) == 4
    full = len(
        session.model.encode(session.model.chat_template.render(session.conversation_with(session.messages, "x")))
    )
    fake.context_length = full + 4  # room for the newest exchange only
    events = list(session.ask("And of Spain?"))
    trimmed = [e for e in events if isinstance(e, HistoryTrimmed)]
    assert trimmed and trimmed[0].messages == 2
    assert session.messages[0]["content"] == "And of Italy?"
    assert isinstance(events[-1], ReplyStats)


def test_a_message_longer_than_the_context_is_refused():
    session = ChatSession(FakeScriptedModel(context_length=64), GenerationSettings(max_new_tokens=8))
    with pytest.raises(ContextOverflowError, match="accepts"):
        list(session.ask("word " * 200))


@pytest.mark.slow
def test_closing_a_reply_stops_generation_and_keeps_history_clean(torch_model):
    session = ChatSession(torch_model, GenerationSettings(max_new_tokens=200, ignore_eos=True))
    events = session.ask("Count to one hundred.")
    next(e for e in events if not isinstance(e, HistoryTrimmed))
    events.close()  # what Ctrl-C does in chat
    assert session.messages == []
    assert not [t for t in threading.enumerate() if t.name == "phi3-generate"]


def test_stop_holdback_never_passes_a_stop_sequence():
    from phi3cli.generation import StopHoldback

    hold = StopHoldback(["<END>", "\n\n"])
    sent = "".join(hold.push(p) for p in ["Hello", " wor", "ld <", "EN", "D>", " more"])
    assert hold.stopped and sent == "Hello world " and sent + hold.finish() == hold.final_text == "Hello world "
    hold = StopHoldback(["<END>"])
    sent = "".join(hold.push(p) for p in ["a <", "b", "c"])
    assert not hold.stopped and sent + hold.finish() == "a <bc"


def test_closing_a_reply_stops_the_fake_generation_and_keeps_history_clean():
    fake = FakeScriptedModel(token_delay=0.01)
    session = ChatSession(fake, GenerationSettings(max_new_tokens=200, ignore_eos=True))
    events = session.ask("Count to one hundred.")
    next(e for e in events if not isinstance(e, HistoryTrimmed))
    events.close()  # what Ctrl-C does in chat
    assert session.messages == [] and session.last_stats is None
    assert fake.stopped.is_set()
    assert not [t for t in threading.enumerate() if t.name == "phi3-generate"]


def test_stream_reply_stops_at_a_stop_sequence_without_streaming_it():
    from phi3cli.generation import TokenEvent, stream_reply

    fake = FakeScriptedModel(["The capital of France is Paris. Paris is big."])
    prompt = fake.chat_template.render([{"role": "user", "content": "What is the capital of France?"}])
    events = list(stream_reply(fake, prompt, GenerationSettings(max_new_tokens=32, stop=["Paris"])))
    stats = events[-1]
    streamed = "".join(e.text for e in events if isinstance(e, TokenEvent))
    assert stats.finish_reason == "stop"
    assert streamed == stats.text == "The capital of France is "
