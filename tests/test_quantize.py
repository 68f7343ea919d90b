"""`phi3 quantize` with OpenVINO (NNCF on an existing IR) and ONNX Runtime (int4 weight quantizer), end to end.

Each test quantizes a real demo-model variant through the real CLI and then chats with the result.
The npu-lib path is in test_npu.py (against a fake of the library, which installs only on Windows).
"""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from phi3cli.backends import get_backend
from phi3cli.backends.base import ConvertRecipe
from phi3cli.convert import ensure_variant
from phi3cli.util import dir_size
from tests.conftest import run_phi3


@pytest.fixture(scope="session")
def openvino_fp16(demo_source, store):
    """The demo model as an fp16 OpenVINO IR, built once into the test store."""
    return ensure_variant(get_backend("openvino"), demo_source, ConvertRecipe(format="fp16"), store)


@pytest.fixture(scope="session")
def onnx_fp32(demo_source, store):
    """The demo model as an fp32 ONNX Runtime GenAI folder, built once into the test store."""
    return ensure_variant(get_backend("onnx"), demo_source, ConvertRecipe(format="fp32"), store)


def quantize_cli(*args: str):
    from phi3cli.cli import app

    return CliRunner().invoke(app, ["quantize", *args])


def answer(model_dir) -> str:
    done = run_phi3("chat", "--model", str(model_dir), "--device", "cpu", "-n", "32", "What is the capital of France?")
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("backend, fixture", [("openvino", "openvino_fp16"), ("onnx", "onnx_fp32")])
@pytest.mark.slow  # its fixture (taken by name) converts the real demo model
def test_quantize_to_int4_and_chat(backend, fixture, tmp_path, request):
    source = request.getfixturevalue(fixture)
    out = tmp_path / f"{backend}-int4"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier run")
    done = run_phi3("quantize", str(source), "--backend", backend, "--format", "int4", "-o", str(out), "--force")
    assert done.returncode == 0, done.stderr
    assert f"({backend}, int4," in done.stdout and "Traceback" not in done.stderr
    assert not (out / "stale.txt").exists() and not list(tmp_path.glob(f".{out.name}.*"))  # replaced whole
    assert dir_size(out) < 0.6 * dir_size(source)  # int4 weights, not a copy
    assert "Paris" in answer(out)


@pytest.mark.slow
def test_existing_output_needs_force(onnx_fp32, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = quantize_cli(str(onnx_fp32), "--backend", "onnx", "-o", str(out))
    assert result.exit_code == 1 and "already exists" in result.stderr and "--force" in result.stderr
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "model, args, needles",
    [
        *[  # these resolve or convert the real demo model
            pytest.param(*case, marks=pytest.mark.slow)
            for case in [
                (
                    "demo",
                    ["--backend", "openvino"],
                    ["demo is a Hugging Face model", "phi3 convert demo --to openvino"],
                ),
                ("demo", ["--backend", "onnx"], ["quantizes an ONNX Runtime GenAI folder", "--to onnx --format fp32"]),
                ("onnx_fp32", ["--backend", "openvino"], ["is an onnx model", "Quantize it with --backend onnx"]),
                ("openvino_fp16", ["--backend", "npu-lib"], ["npu-lib"]),  # unavailable here, or the wrong input
                ("onnx_fp32", ["--backend", "onnx", "--format", "int8"], ["int4"]),
                ("openvino_fp16", ["--backend", "openvino", "--format", "fp16"], ["int4 or int8"]),
            ]
        ],
        ("./no/such/model", ["--backend", "onnx"], ["No model named"]),
    ],
)
def test_quantize_refuses_what_it_cannot_do(model, args, needles, tmp_path, request):
    if model in ("onnx_fp32", "openvino_fp16"):
        model = str(request.getfixturevalue(model))
    out = tmp_path / "out"
    result = quantize_cli(model, *args, "-o", str(out))
    assert result.exit_code == 1, result.stdout
    assert "Traceback" not in result.stderr and result.stderr.count("Error:") == 1, result.stderr
    for needle in needles:
        assert needle in result.stderr
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_format_must_be_one_it_knows():
    result = quantize_cli("demo", "--backend", "onnx", "--format", "fp32", "-o", "x")
    assert result.exit_code == 2 and "fp32" in result.stderr


def test_help_imports_no_heavy_library():
    from tests.test_cli import HEAVY, imported_modules

    names = imported_modules("quantize", "--help")
    assert "typer" in names and not names & set(HEAVY), names & set(HEAVY)
