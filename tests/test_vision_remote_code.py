"""Phi-3.5-vision's conversion gate: `phi3 convert` runs a phi3_v checkpoint's own code only with
--trust-remote-code, says so before it starts, and refuses in one line otherwise.

The real conversion never ran here: Phi-3.5-vision's modelling code is not available offline (and is not copied
into this repository). The checkpoint below is a config.json naming its code in auto_map, as the real one does,
and a stand-in configuration module of ours whose only effect is to leave a mark when it is run and then stop.
That shows the gate, and that optimum-intel's export is the one running the checkpoint's code, nothing more.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_phi3

CONFIG = {
    "model_type": "phi3_v",
    "architectures": ["Phi3VForCausalLM"],
    "auto_map": {
        "AutoConfig": "configuration_phi3_v.Phi3VConfig",
        "AutoModelForCausalLM": "modeling_phi3_v.Phi3VForCausalLM",
    },
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "vocab_size": 1000,
    "torch_dtype": "float32",
}
STAND_IN = (
    "import os, pathlib\n"
    "pathlib.Path(os.environ['PHI3_TEST_MARK']).write_text('ran')\n"
    "raise RuntimeError('stand-in checkpoint code: it only leaves a mark')\n"
)


@pytest.fixture
def checkpoint(tmp_path):
    folder = tmp_path / "phi35-vision"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CONFIG))
    return folder


def convert(folder, tmp_path, *extra):
    env = {"PHI3_TEST_MARK": str(tmp_path / "mark"), "HF_MODULES_CACHE": str(tmp_path / "modules")}
    return run_phi3("convert", str(folder), "--to", "openvino", "-o", str(tmp_path / "out"), *extra, env=env)


def one_line_error(result) -> str:
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    return line


def test_without_the_flag_it_refuses_in_one_line_naming_it(checkpoint, tmp_path):
    for name in ("configuration_phi3_v.py", "modeling_phi3_v.py"):
        (checkpoint / name).write_text(STAND_IN)
    line = one_line_error(convert(checkpoint, tmp_path))
    assert "Phi-3.5-vision" in line and "--trust-remote-code" in line
    assert not (tmp_path / "mark").exists() and not (tmp_path / "out").exists()


def test_with_the_flag_but_no_code_it_says_which_files_are_missing(checkpoint, tmp_path):
    (checkpoint / "configuration_phi3_v.py").write_text(STAND_IN)
    line = one_line_error(convert(checkpoint, tmp_path, "--trust-remote-code"))
    assert "no modelling code to run" in line and "modeling_phi3_v.py" in line
    assert "configuration_phi3_v.py" not in line  # that one is there
    assert not (tmp_path / "mark").exists() and not (tmp_path / "out").exists()


def test_a_text_model_with_the_flag_is_still_refused_as_not_phi3(tmp_path):
    folder = tmp_path / "llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    line = one_line_error(convert(folder, tmp_path, "--trust-remote-code"))
    assert "'llama' model" in line and "not Phi-3" in line


def test_chat_refuses_it_and_points_at_convert(checkpoint, tmp_path):
    result = run_phi3("chat", "Hi", "--model", str(checkpoint), "--trust-remote-code")
    line = one_line_error(result)
    assert "Phi-3.5-vision" in line and "`phi3 convert` is given --trust-remote-code" in line


@pytest.mark.slow  # imports optimum-intel and transformers in the subprocess
def test_with_the_flag_the_export_runs_the_checkpoints_code_and_says_so_first(checkpoint, tmp_path):
    for name in ("configuration_phi3_v.py", "modeling_phi3_v.py"):
        (checkpoint / name).write_text(STAND_IN)
    result = convert(checkpoint, tmp_path, "--trust-remote-code", "--format", "fp16")
    line = one_line_error(result)
    assert "stand-in checkpoint code" in line  # optimum-intel's export ran it, and its failure is one line
    assert (tmp_path / "mark").read_text() == "ran"
    said = result.stderr.index("The export runs the code phi35-vision ships")
    assert "(configuration_phi3_v.py, modeling_phi3_v.py), as --trust-remote-code asks" in result.stderr[said:]
    assert said < result.stderr.index(line)
    assert not (tmp_path / "out").exists()


def test_another_backend_is_refused_naming_the_one_that_converts_it(checkpoint, tmp_path):
    for name in ("configuration_phi3_v.py", "modeling_phi3_v.py"):
        (checkpoint / name).write_text(STAND_IN)
    env = {"PHI3_TEST_MARK": str(tmp_path / "mark")}
    result = run_phi3(
        "convert", str(checkpoint), "--to", "onnx", "--trust-remote-code", "-o", str(tmp_path / "o"), env=env
    )
    line = one_line_error(result)
    assert "the onnx backend does not convert it" in line and "Use --to openvino." in result.stderr
    assert not (tmp_path / "mark").exists() and not (tmp_path / "o").exists()
