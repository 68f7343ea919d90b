"""The NPU: the npu-lib backend against a FAKE of the Intel NPU Acceleration Library, and the real no-NPU paths.

The real library installs only on Windows (win_amd64 wheels), and this machine has no NPU. So the adapter is
checked against tests/fakes/intel_npu_acceleration_library, a fake that mirrors the library's public API,
records how it is called and computes its "NPU" layers on the CPU. What these tests prove: phi3 calls the
library the way Intel's Phi-3 sample and the library's documentation do, stores the result without pickle,
rebuilds it without unpickling, and streams tokens. They prove nothing about real NPU hardware.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import struct
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from phi3cli.backends import registry
from phi3cli.backends.base import GenerationSettings
from phi3cli.errors import DeviceUnavailableError
from phi3cli.generation import ReplyStats, TokenEvent, generate_text, stream_reply
from phi3cli.loading import load
from phi3cli.progress import SilentProgress
from phi3cli.routing import given
from phi3cli.sources import resolve_source
from tests.conftest import run_phi3

FAKES = Path(__file__).parent / "fakes"
LINEAR_LAYERS = 30 * 4 + 1  # demo model: qkv_proj, o_proj, gate_up_proj, down_proj per layer, and lm_head


@pytest.fixture(scope="module")
def fake_lib():
    """The fake library on sys.path, and the registry's win32-only check bypassed explicitly for it."""
    mp = pytest.MonkeyPatch()
    mp.syspath_prepend(str(FAKES))
    mp.setitem(registry(), "npu-lib", dataclasses.replace(registry()["npu-lib"], platforms=()))
    import intel_npu_acceleration_library as lib
    from intel_npu_acceleration_library import _fake

    assert Path(lib.__file__).is_relative_to(FAKES) and lib.__version__.endswith("-fake")
    _fake.reset(npu_present=True)
    yield lib
    mp.undo()
    for name in [n for n in sys.modules if n.split(".")[0] == "intel_npu_acceleration_library"]:
        del sys.modules[name]


def _calls(name: str) -> list[tuple[tuple, dict]]:
    from intel_npu_acceleration_library import _fake

    return [(args, kwargs) for called, args, kwargs in _fake.CALLS if called == name]


@pytest.fixture(scope="module")
def int4_run(fake_lib, demo_source, tmp_path_factory):
    """`phi3 quantize demo --backend npu-lib --format int4 -o DIR`, in-process (the fake is not installed)."""
    from intel_npu_acceleration_library import _fake

    from phi3cli.cli import app

    _fake.reset(npu_present=True)
    out = tmp_path_factory.mktemp("npu") / "demo-int4"
    result = CliRunner().invoke(app, ["quantize", "demo", "--backend", "npu-lib", "--format", "int4", "-o", str(out)])
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return out, result, list(_fake.CALLS)


@pytest.mark.slow
def test_quantize_calls_the_library_like_the_seed(fake_lib, int4_run, demo_source):
    out, result, calls = int4_run
    loads = [(args, kwargs) for name, args, kwargs in calls if name == "NPUModel.from_pretrained"]
    assert len(loads) == 1
    args, kwargs = loads[0]
    # The seed: NPUModelForCausalLM.from_pretrained(model_id, use_cache=True, config=CompilerConfig(dtype=int4),
    # attn_implementation="sdpa"); plus export=False, so the library does not torch.save a pickle of the model.
    assert args == (str(demo_source.path),)
    assert kwargs.pop("config").dtype is fake_lib.int4
    assert kwargs == {"use_cache": True, "attn_implementation": "sdpa", "export": False}
    assert not Path("cache/models").exists()  # where the library's own (pickling) cache would have gone
    assert "Compiling model" in result.stderr and "Compiling model" not in result.stdout  # stdout stays clean
    assert f"Quantized demo → {out}" in result.stdout


@pytest.mark.slow
def test_quantized_model_is_stored_without_pickle(int4_run):
    out = int4_run[0]
    names = {p.name for p in out.iterdir()}
    assert {"npu_model.json", "npu_weights.safetensors", "config.json", "tokenizer.json"} <= names
    assert not [n for n in names if n.endswith((".pt", ".pth", ".bin", ".pkl", ".pickle"))]
    for file in out.iterdir():
        head = file.read_bytes()[:4]
        assert head[:1] != b"\x80" and head != b"PK\x03\x04", file  # neither a pickle nor torch.save's zip
    raw = (out / "npu_weights.safetensors").read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + size])
    manifest = json.loads((out / "npu_model.json").read_text())
    assert manifest["schema"] == "phi3.npu-lib/1" and manifest["format"] == "int4"
    assert manifest["library"] == "v1.4.0-fake"
    assert len(manifest["layers"]) == LINEAR_LAYERS
    assert {layer["type"] for layer in manifest["layers"].values()} == {"QuantizedLinear"}
    qkv = "model.layers.0.self_attn.qkv_proj"
    assert header[f"{qkv}.weight"]["dtype"] == "U8"  # two int4 values per byte
    assert header[f"{qkv}.weight"]["shape"] == [manifest["layers"][qkv]["out"], manifest["layers"][qkv]["in"] // 2]
    assert header[f"{qkv}.scale"]["dtype"] == "F16"


@pytest.mark.slow
def test_stored_weights_are_exactly_what_the_library_made(fake_lib, int4_run, demo_source):
    import torch
    from intel_npu_acceleration_library.quantization import compress_to_i4, quantize_tensor
    from safetensors.torch import load_file

    stored = load_file(str(int4_run[0] / "npu_weights.safetensors"))
    original = load_file(str(demo_source.path / "model.safetensors"))
    name = "model.layers.3.mlp.down_proj"
    weight = original[f"{name}.weight"].float()
    q, scale = quantize_tensor(weight, (fake_lib.int4.min, fake_lib.int4.max))
    assert torch.equal(stored[f"{name}.weight"], compress_to_i4(q))
    assert torch.equal(stored[f"{name}.scale"], scale * weight.shape[1] ** 0.5)
    assert torch.equal(stored["model.embed_tokens.weight"], original["model.embed_tokens.weight"])


@pytest.mark.slow
def test_loading_never_unpickles_and_tokens_stream(fake_lib, int4_run, store, monkeypatch):
    import torch
    from intel_npu_acceleration_library import nn as npu_nn

    def refuse(*args, **kwargs):
        raise AssertionError("something tried to unpickle")

    for target, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(target, name, refuse)
    source = resolve_source(str(int4_run[0]), store)
    assert source.kind == "npu-lib"
    model = load(source, route=given("npu-lib", "npu"), store=store)
    assert (model.backend, model.device, model.executed_device, model.format) == ("npu-lib", "npu", "NPU", "int4")
    assert isinstance(model.model.model.layers[0].self_attn.qkv_proj, npu_nn.QuantizedLinear)
    assert isinstance(model.model.lm_head, npu_nn.QuantizedLinear)
    prompt = model.chat_template.render([{"role": "user", "content": "Write one sentence about the sea."}])
    events = list(stream_reply(model, prompt, GenerationSettings(max_new_tokens=12, ignore_eos=True)))
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    stats = events[-1]
    assert isinstance(stats, ReplyStats) and stats.generated_tokens == 12 and stats.backend == "npu-lib"
    assert len(tokens) >= 3 and "".join(t.text for t in tokens) == stats.text
    assert [t.elapsed for t in tokens] == sorted(t.elapsed for t in tokens)
    assert tokens[0].elapsed < tokens[-1].elapsed  # one at a time, not all at the end
    model.close()


@pytest.mark.slow
def test_fp16_keeps_the_library_linear_layers(fake_lib, demo_source, tmp_path):
    from intel_npu_acceleration_library import nn as npu_nn

    from phi3cli.backends.npu_lib.backend import load_quantized, quantize_with_library

    quantize_with_library(demo_source.path, "fp16", tmp_path, SilentProgress())
    layers = json.loads((tmp_path / "npu_model.json").read_text())["layers"]
    assert {layer["type"] for layer in layers.values()} == {"Linear"} and len(layers) == LINEAR_LAYERS
    model = load_quantized(tmp_path, SilentProgress())
    proj = model.model.layers[0].mlp.down_proj
    assert isinstance(proj, npu_nn.Linear) and str(proj.weight.dtype) == "torch.float16"


@pytest.mark.slow
def test_chat_through_the_store_answers_and_does_not_recompile(fake_lib, store):
    """--backend npu-lib with a Hugging Face model quantizes once into the store; the next run reuses it."""
    from intel_npu_acceleration_library import _fake

    _fake.reset(npu_present=True)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    model = load("demo", backend="npu-lib", device="npu", format="int8", store=store)
    assert (model.route.backend, model.route.device) == ("npu-lib", "npu")
    stats = generate_text(model, model.chat_template.render(question), GenerationSettings(max_new_tokens=24))
    assert "Paris" in stats.text
    assert model.path.parent.parent == store.variants_dir and (model.path / "npu_model.json").is_file()
    model.close()
    _fake.reset(npu_present=True)
    model = load("demo", backend="npu-lib", device="npu", format="int8", store=store)
    assert not _calls("NPUModel.from_pretrained")  # loaded from the stored safetensors, not compiled again
    assert _calls("npu_available")  # but the NPU was checked again
    model.close()


@pytest.mark.slow
def test_no_npu_is_an_error_not_a_silent_fallback(fake_lib, int4_run, store):
    from intel_npu_acceleration_library import _fake

    _fake.reset(npu_present=False)
    try:
        source = resolve_source(str(int4_run[0]), store)
        with pytest.raises(DeviceUnavailableError, match=r"npu_available\(\) is False"):
            load(source, route=given("npu-lib", "npu"), store=store)
        with pytest.raises(DeviceUnavailableError, match="No NPU for the npu-lib backend found") as info:
            load(str(int4_run[0]), device="npu", store=store)
        assert "npu_available(): False" in info.value.message
    finally:
        _fake.reset(npu_present=True)


@pytest.mark.slow
def test_npu_lib_runs_only_on_the_npu(fake_lib, int4_run, store):

    source = resolve_source(str(int4_run[0]), store)
    with pytest.raises(DeviceUnavailableError, match="runs on npu, not cpu"):
        load(source, route=given("npu-lib", "cpu"), store=store)


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--group-size", "64"], ["per channel", "--group-size does not apply"]),
        (["--asym"], ["--asym does not apply"]),
    ],
)
def test_npu_lib_quantize_refuses_options_it_cannot_honour(fake_lib, config_only_model, tmp_path, args, needles):
    from phi3cli.cli import app

    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["quantize", str(config_only_model), "--backend", "npu-lib", "-o", str(out), *args]
    )
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    for needle in needles:
        assert needle in result.stderr
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))


@pytest.mark.slow
def test_npu_lib_quantize_needs_a_hugging_face_model(fake_lib, int4_run, tmp_path):
    from phi3cli.cli import app

    result = CliRunner().invoke(app, ["quantize", str(int4_run[0]), "--backend", "npu-lib", "-o", str(tmp_path / "x")])
    assert result.exit_code == 1
    assert "is an npu-lib model; --backend npu-lib quantizes a Hugging Face model" in result.stderr


@pytest.mark.skipif(sys.platform == "win32", reason="the library installs on Windows")
def test_unavailable_here_says_why_and_what_to_use_instead(config_only_model):
    done = run_phi3("chat", "--model", str(config_only_model), "--backend", "npu-lib", "hi")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    for needle in ("npu-lib installs only on win32", "OpenVINO 2024.4", "Ubuntu", "--backend openvino --device npu"):
        assert needle in done.stderr, done.stderr


def _machine_has_npu() -> bool:
    try:
        import openvino as ov
    except ImportError:
        return False
    return any(d.startswith("NPU") for d in ov.Core().available_devices)


@pytest.mark.skipif(_machine_has_npu(), reason="this machine has an NPU")
def test_no_npu_message_names_both_checks_and_the_command_to_run_instead(config_only_model):
    done = run_phi3("chat", "--model", str(config_only_model), "--device", "npu", "hi")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, done.stderr
    for needle in ("No NPU found", "OpenVINO devices: CPU", "npu_available()", "This machine has: CPU"):
        assert needle in errors[0], done.stderr
    assert f"Run it on the CPU instead: phi3 chat --model {config_only_model} --device cpu hi" in done.stderr
    assert done.stdout == ""


def test_devices_shows_both_npu_checks():
    done = run_phi3("devices")
    assert done.returncode == 0, done.stderr
    assert "OpenVINO's device list" in done.stdout and "npu_available()" in done.stdout
