"""The catalogue's vision names (`phi-3.5-vision`, `phi-4-multimodal`), offline, from a real hub cache laid out under
the catalogue's real repo ids and subfolders.

The tiny random Phi-4-multimodal stands in for the publishers' weights: its IR (converted by phi3) under OpenVINO's
Phi-3.5-vision repo id, its ONNX Runtime GenAI folder under Microsoft's Phi-3.5-vision folder. What is checked is the
choice of repo and folder, and that the chosen folder runs with an image. A name whose only ready-made variant does
not fit here and whose source phi3 does not convert (Phi-4-multimodal's carries its own code) is refused in one
line, before anything is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_phi3
from tests.hub_repos import publish, resolve

pytest.importorskip("openvino_genai")
pytest.importorskip("onnxruntime_genai")

IR = "OpenVINO/Phi-3.5-vision-instruct-int4-ov"
ONNX = "microsoft/Phi-3.5-vision-instruct-onnx"
CPU_FOLDER = "cpu_and_mobile/cpu-int4-rtn-block-32-acc-level-4"
QUESTION = "What is in this picture?"


@pytest.mark.slow
def test_a_vision_name_resolves_to_the_variant_the_cache_holds(tiny_multimodal, tiny_multimodal_onnx, store, in_cache,
                                                               tmp_path):  # fmt: skip
    from phi3cli.backends import get_backend
    from phi3cli.backends.base import ConvertRecipe
    from phi3cli.convert import ensure_variant
    from phi3cli.sources import resolve_source

    publish(in_cache, ONNX, {CPU_FOLDER: Path(tiny_multimodal_onnx)})
    source, notes = resolve("phi-3.5-vision", tmp_path, device="cpu")  # OpenVINO's IR, preferred here, is not there
    assert source.kind == "onnx" and source.spec == f"{ONNX}:{CPU_FOLDER}"
    assert any(f"{IR}, preferred here, is not" in n for n in notes), notes

    ir = ensure_variant(get_backend("openvino"), resolve_source(tiny_multimodal, store), ConvertRecipe("int4"), store)
    publish(in_cache, IR, {"": ir})  # a vision IR: openvino_language_model.xml, no openvino_model.xml
    source, notes = resolve("phi-3.5-vision", tmp_path, device="cpu")
    assert source.kind == "openvino" and source.spec == IR, notes
    source, _ = resolve("microsoft/Phi-3.5-vision-instruct", tmp_path, device="cpu", backend="onnx")
    assert source.spec == f"{ONNX}:{CPU_FOLDER}"


@pytest.mark.slow
def test_a_vision_name_chats_with_an_image(tiny_multimodal_onnx, pictures, tmp_path):
    publish(tmp_path / "hub", ONNX, {CPU_FOLDER: Path(tiny_multimodal_onnx)})
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "PHI3_HOME": str(tmp_path / "home")}

    def chat(model: str, image: str, **kw):
        done = run_phi3("chat", QUESTION, "-m", model, "-b", "onnx", "-n", "8", "--image", str(pictures / image), **kw)
        assert done.returncode == 0, done.stderr
        return done

    by_name = chat("phi-3.5-vision", "p1.png", env=env)
    assert f"phi-3.5-vision → {ONNX}:{CPU_FOLDER} (onnx int4, 3.22 GB)" in " ".join(by_name.stderr.split())
    assert by_name.stdout == chat(tiny_multimodal_onnx, "p1.png").stdout
    assert by_name.stdout != chat("phi-3.5-vision", "p2.png", env=env).stdout


@pytest.mark.parametrize(
    "args, needles, absent",
    [
        (
            ["chat", "-m", "phi-4-multimodal", "-d", "cpu", "Hi"],
            ["phi-4-multimodal: no ready-made variant fits", "its source cannot be converted", "Phi4MMForCausalLM"],
            "not in the local hub cache",  # not "pull the source": it would be refused after the download
        ),
        (
            ["chat", "-m", "microsoft/Phi-4-multimodal-instruct", "-d", "cpu", "Hi"],
            ["phi-4-multimodal: no ready-made variant fits", "its source cannot be converted"],
            "Traceback",
        ),
        (
            ["chat", "-m", "phi-4-multimodal", "-d", "gpu", "Hi"],
            ["phi-4-multimodal has no GPU variant that runs here", "a GPU with CUDA or DirectML"],
            "Run it on the CPU instead",  # nothing of it would run there either
        ),
        (
            ["convert", "phi-3.5-vision", "--to", "openvino"],
            ["phi-3.5-vision: --convert asks for its source, which cannot be converted", "--trust-remote-code"],
            "Traceback",
        ),
        (
            ["models", "pull", "phi-3.5-vision", "--convert", "--trust-remote-code"],  # taken: offline, it says so
            ["microsoft/Phi-3.5-vision-instruct is not in the local hub cache"],
            "cannot be converted",
        ),
        (
            ["models", "pull", "phi-4-multimodal", "--convert"],
            ["--convert asks for its source, which cannot be converted", "phi4_multimodal"],
            "Traceback",
        ),
    ],
)
def test_what_cannot_run_or_convert_here_is_one_line(args, needles, absent, tmp_path):
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "PHI3_HOME": str(tmp_path / "home")}
    done = run_phi3(*args, env={**env, "COLUMNS": "250"})
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    error = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and all(n in error[0] for n in needles), done.stderr
    assert absent not in done.stderr and not (tmp_path / "hub").exists(), done.stderr


def test_models_catalog_says_how_each_source_converts(tmp_path):
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "PHI3_HOME": str(tmp_path / "home")}
    done = run_phi3("models", "catalog", "--json", env=env)
    assert done.returncode == 0, done.stderr
    sources = {m["name"]: m["source"] for m in json.loads(done.stdout)["models"]}
    assert sources["phi-4-multimodal"]["model_type"] == "phi4mm" and sources["phi-4-multimodal"]["convert"] is None
    assert sources["phi-3.5-vision"]["convert"] == "--trust-remote-code" and sources["phi-3-mini"]["convert"] == ""
    table = run_phi3("models", "catalog", env={**env, "COLUMNS": "250"}).stdout
    rows = [line for line in table.splitlines() if line.strip().startswith("source ")]
    assert any("microsoft/Phi-4-multimodal-instruct " in r and "not converted" in r for r in rows), table
    assert any("Phi-3.5-vision-instruct " in r and "convert --trust-remote-code" in r for r in rows), table
