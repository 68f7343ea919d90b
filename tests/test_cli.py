"""The `phi3` command as a user runs it: start-up cost, one-shot chat, and every bad input's message."""

from __future__ import annotations

import json
import re
import sys

import pytest

from tests.conftest import ROOT, run_phi3

HEAVY = (
    "torch",
    "transformers",
    "openvino",
    "openvino_genai",
    "onnxruntime",
    "onnxruntime_genai",
    "optimum",
    "nncf",
    "ray",
)


def imported_modules(*args: str, full: bool = False) -> set[str]:
    import subprocess

    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "phi3cli", *args], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    names = set()
    for line in done.stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+\d+ \|\s+(\S.*)$", line)
        if m:
            name = m.group(1).strip()
            names.add(name if full else name.split(".")[0])
    return names


@pytest.mark.parametrize("args", [["--help"], ["chat", "--help"], ["convert", "--help"]])
def test_help_imports_no_heavy_library(args):
    names = imported_modules(*args)
    assert "typer" in names  # the measurement works
    assert not names & set(HEAVY), names & set(HEAVY)


def test_top_level_help_builds_no_command():
    names = imported_modules("--help", full=True)
    assert "phi3cli.cli" in names  # the measurement works
    loaded = {n for n in names if n.startswith("phi3cli.cli.") or n.startswith("phi3cli.backends")}
    assert not loaded, loaded


def test_listed_lines_are_the_commands_own_help():
    from phi3cli.cli import COMMANDS, load_command

    for name, (_, _, line) in COMMANDS.items():
        command = load_command(name)
        assert command.name == name
        assert " ".join(command.help.split("\n\n")[0].split()) == line, name


@pytest.mark.slow
def test_one_shot_chat_prints_only_the_answer(demo_source):
    done = run_phi3("chat", "--model", "demo", "--backend", "torch", "What is the capital of France?")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "The capital of France is Paris."
    assert "tok/s" in done.stderr and "torch on CPU" in done.stderr


@pytest.mark.slow
def test_prompt_on_stdin(demo_source):
    done = run_phi3("chat", "-m", "demo", "-b", "torch", "-n", "16", input="What is the capital of France?\n")
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout


@pytest.mark.slow
def test_auto_device_says_what_it_picked(demo_source):
    done = run_phi3("chat", "-m", "demo", "--device", "auto", "-n", "8", "Hi")
    assert done.returncode == 0, done.stderr
    assert re.search(r"auto: picked cpu with \w+", done.stderr), done.stderr


def assert_clean_error(done, *needles):
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, done.stderr
    for needle in needles:
        assert needle in done.stderr, done.stderr


def test_unknown_path():
    assert_clean_error(run_phi3("chat", "-m", "./no/such/model", "hi"), "No model named", "--model demo")


def test_folder_that_is_not_a_model(tmp_path):
    assert_clean_error(run_phi3("chat", "-m", str(tmp_path), "hi"), "holds no model")


def test_non_phi3_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    assert_clean_error(run_phi3("chat", "-m", str(tmp_path), "hi"), "'llama' model", "Phi3ForCausalLM")


def test_offline_hub_with_nothing_cached(tmp_path):
    done = run_phi3(
        "chat", "-m", "microsoft/Phi-3-mini-4k-instruct", "hi", env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    )
    assert_clean_error(done, "not in the local hub cache", "HF_HUB_OFFLINE")


def test_device_not_present(config_only_model):
    assert_clean_error(
        run_phi3("chat", "-m", str(config_only_model), "--device", "gpu", "hi"),
        "No GPU found",
        "This machine has: CPU",
        f"phi3 chat -m {config_only_model} --device cpu hi",
    )


def test_backend_whose_extra_is_missing(config_only_model):
    import subprocess

    code = (
        "import sys; sys.modules['openvino_genai'] = None; sys.argv = ['phi3'] + sys.argv[1:]; "
        "from phi3cli.cli import main; main()"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, "chat", "-m", str(config_only_model), "--backend", "openvino", "hi"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert_clean_error(done, "openvino_genai not installed", "pip install 'phi3cli[openvino]'")


@pytest.mark.slow
def test_prompt_longer_than_the_context(demo_source):
    done = run_phi3("chat", "-m", "demo", "-b", "torch", input="word " * 9000)
    assert_clean_error(done, "the model accepts")


def test_debug_shows_the_traceback():
    done = run_phi3("--debug", "chat", "-m", "./no/such/model", "hi")
    assert done.returncode != 0
    assert "Traceback" in done.stderr and "ModelNotFoundError" in done.stderr


def test_devices_runs_without_loading_models():
    done = run_phi3("devices")
    assert done.returncode == 0, done.stderr
    assert "CPU:" in done.stdout and "torch" in done.stdout and "npu-lib" in done.stdout


def test_cli_reference_is_up_to_date():
    import subprocess

    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_cli_docs.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
