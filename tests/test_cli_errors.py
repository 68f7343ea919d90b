"""The CLI's error table: one test per rule (exception type -> message, hint, exit code)."""

from __future__ import annotations

import pytest

from phi3cli.cli.errors import EXIT_INTERRUPTED, RULES, message_for
from phi3cli.errors import DeviceUnavailableError, ModelNotFoundError, Phi3Error


def test_no_rule_is_hidden_by_an_earlier_one():
    kinds = [kind for kind, _ in RULES]
    for i, later in enumerate(kinds):
        assert not any(issubclass(later, earlier) for earlier in kinds[:i]), later
    assert kinds[-1] is BaseException  # every exception gets a line


def test_device_unavailable_names_the_command_on_the_device_present(monkeypatch):
    monkeypatch.setattr("sys.argv", ["phi3", "chat", "-m", "demo", "-d", "npu", "hi there"])
    exc = DeviceUnavailableError("No NPU here.", instead="cpu")
    assert message_for(exc) == (
        "No NPU here.",
        "Run it on the CPU instead: phi3 chat -m demo -d cpu 'hi there'",
        1,
    )
    assert message_for(DeviceUnavailableError("No NPU here.", "Its own hint.", instead="cpu"))[1] == "Its own hint."
    assert message_for(DeviceUnavailableError("No NPU here."))[1] is None


def test_phi3_errors_carry_their_message_hint_and_exit_code():
    assert message_for(ModelNotFoundError("No model nope.", hint="phi3 models list")) == (
        "No model nope.",
        "phi3 models list",
        1,
    )

    class Refused(Phi3Error):
        exit_code = 4

    assert message_for(Refused("No.")) == ("No.", None, 4)


def test_ctrl_c_says_nothing_was_left_half_written():
    assert message_for(KeyboardInterrupt()) == ("Interrupted; nothing was left half-written.", None, EXIT_INTERRUPTED)
    assert EXIT_INTERRUPTED == 130


def test_out_of_memory_suggests_a_smaller_format():
    assert message_for(MemoryError()) == ("Out of memory.", "Try a smaller --format (int4) or close other programs.", 1)


@pytest.mark.parametrize(
    ("exc", "message"),
    [
        (ValueError("bad value\nsecond line"), "Unexpected error: ValueError: bad value"),
        (RuntimeError("Exception from src/core/x.cpp:12:\nno kernel"), "Unexpected error: RuntimeError: no kernel"),
        (RuntimeError(), "Unexpected error: RuntimeError"),
    ],
)
def test_anything_else_is_unexpected_with_the_debug_hint(exc, message):
    assert message_for(exc) == (message, "Run again with --debug (or PHI3_DEBUG=1) for the traceback.", 1)
