"""The ONNX Runtime GenAI backend on the real demo model: build, run, DirectML on the CPU, and bad input.

Variants are built once through the store (int4, fp16, fp32 for the CPU, int4 for DirectML) and reused by
later runs. DirectML itself cannot run here (Windows only): its folder is built for real and run on the CPU
with the providers cleared, and the provider wiring is checked on the og.Config calls it makes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import PROMPTS, TEST_HOME, run_phi3

og = pytest.importorskip("onnxruntime_genai")

from phi3cli.backends import get_backend  # noqa: E402
from phi3cli.backends.base import ConvertRecipe, GenerationSettings  # noqa: E402
from phi3cli.backends.onnx.folder import GENAI_CONFIG, read_genai_config  # noqa: E402
from phi3cli.backends.onnx.providers import (  # noqa: E402
    ProviderChoice,
    apply_providers,
    available_providers,
    choose_providers,
)
from phi3cli.errors import (  # noqa: E402
    ContextOverflowError,
    ConversionError,
    DeviceUnavailableError,
    UnsupportedModelError,
)
from phi3cli.generation import generate_text, stream_reply  # noqa: E402
from phi3cli.loading import load  # noqa: E402
from phi3cli.progress import SilentProgress  # noqa: E402
from phi3cli.routing import given  # noqa: E402
from phi3cli.sources import ModelSource, resolve_source  # noqa: E402
from phi3cli.templates import load_chat_template  # noqa: E402
from phi3cli.util import dir_size, remove_stale_partials  # noqa: E402

BUILDS = [("int4", "cpu"), ("fp16", "cpu"), ("fp32", "cpu"), ("int4", "dml")]
GPU_HERE = bool(available_providers())


@pytest.fixture(scope="session")
def onnx_backend():
    return get_backend("onnx")


@pytest.fixture(scope="session")
def onnx_variant(onnx_backend, demo_source, store):
    """The stored folder for (format, target), built on first use and reused."""
    from phi3cli.convert import ensure_variant

    def variant(fmt: str, target: str = "cpu") -> Path:
        return ensure_variant(onnx_backend, demo_source, ConvertRecipe(format=fmt, target=target), store)

    return variant


@pytest.fixture(scope="session")
def onnx_models(onnx_variant, store):
    """Loaded models per (format, target), all on the CPU; a DirectML folder is loaded as `--model DIR`."""
    loaded = {}

    def get(fmt: str, target: str = "cpu"):
        if (fmt, target) not in loaded:
            folder = onnx_variant(fmt, target)
            loaded[fmt, target] = load(resolve_source(str(folder), store), route=given("onnx", "cpu"), store=store)
        return loaded[fmt, target]

    yield get
    for model in loaded.values():
        model.close()


def prompt_ids(model, question: str) -> list[int]:
    return model.encode(model.chat_template.render([{"role": "user", "content": question}]))


# --- build and run ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_fp32_greedy_matches_the_torch_reference(onnx_models, torch_model):
    model = onnx_models("fp32")
    for question in PROMPTS:
        ids = prompt_ids(torch_model, question)
        assert prompt_ids(model, question) == ids  # same template, same tokenizer
        settings = GenerationSettings(max_new_tokens=32)
        ours, reference = generate_text(model, ids, settings), generate_text(torch_model, ids, settings)
        assert ours.token_ids[:32] == reference.token_ids[:32], (ours.text, reference.text)
        assert ours.text == reference.text


@pytest.mark.parametrize("fmt, target", BUILDS)
@pytest.mark.slow
def test_each_build_answers_on_the_cpu(onnx_models, fmt, target):
    model = onnx_models(fmt, target)
    assert model.format == fmt
    assert model.executed_device == "CPU"  # read back from og.Model.device_type
    stats = generate_text(model, prompt_ids(model, PROMPTS[0]), GenerationSettings(max_new_tokens=24))
    assert stats.text.strip(), stats
    assert stats.executed_device == "CPU"
    if fmt != "int4":
        assert "Paris" in stats.text


@pytest.mark.slow
def test_builds_keep_the_chat_template_and_context(onnx_variant, demo_source):
    source_template = load_chat_template(demo_source.path)
    hf_config = json.loads((demo_source.path / "config.json").read_text())
    for fmt, target in BUILDS:
        folder = onnx_variant(fmt, target)
        assert load_chat_template(folder) == source_template
        genai = read_genai_config(folder)
        assert genai["model"]["context_length"] == hf_config["max_position_embeddings"]
        providers = genai["model"]["decoder"]["session_options"]["provider_options"]
        assert providers == ([{"dml": {}}] if target == "dml" else [])


@pytest.mark.slow
def test_folders_shrink_with_precision(onnx_variant):
    sizes = {fmt: dir_size(onnx_variant(fmt)) for fmt in ("int4", "fp16", "fp32")}
    assert sizes["int4"] < sizes["fp16"] < sizes["fp32"], sizes


@pytest.mark.slow
def test_variants_are_reused(onnx_backend, onnx_variant, demo_source, store):
    from phi3cli.convert import ensure_variant

    first = onnx_variant("int4")
    stamp = (first / "model.onnx").stat().st_mtime_ns
    progress = SilentProgress()
    again = ensure_variant(onnx_backend, demo_source, ConvertRecipe(format="int4", target="cpu"), store, progress)
    assert again == first and (again / "model.onnx").stat().st_mtime_ns == stamp
    assert not progress.notes  # no "Converting ..." note: nothing was built


@pytest.mark.slow
def test_load_through_the_store_uses_the_same_variant(onnx_variant, demo_source, store):
    model = load(demo_source, route=given("onnx", "cpu"), store=store)  # the default format is int4
    try:
        assert model.path == onnx_variant("int4") and model.format == "int4"
    finally:
        model.close()


@pytest.mark.slow
def test_sampling_is_seeded_and_ignore_eos_fills_the_budget(onnx_models):
    model = onnx_models("int4")
    ids = prompt_ids(model, PROMPTS[2])
    sampled = GenerationSettings(max_new_tokens=16, temperature=0.8, top_p=0.9, top_k=40, seed=7)
    first, second = generate_text(model, ids, sampled), generate_text(model, ids, sampled)
    assert first.token_ids == second.token_ids and first.text
    other = generate_text(model, ids, GenerationSettings(**{**sampled.__dict__, "seed": 8}))
    greedy = generate_text(model, ids, GenerationSettings(max_new_tokens=16))
    assert len({tuple(first.token_ids), tuple(other.token_ids), tuple(greedy.token_ids)}) > 1
    full = generate_text(model, prompt_ids(model, PROMPTS[0]), GenerationSettings(max_new_tokens=40, ignore_eos=True))
    assert full.generated_tokens == 40 and full.finish_reason == "length"


@pytest.mark.slow
def test_closing_the_stream_stops_and_the_model_stays_usable(onnx_models):
    model = onnx_models("int4")
    ids = prompt_ids(model, PROMPTS[1])
    tokens = model.generate(ids, GenerationSettings(max_new_tokens=64, ignore_eos=True))
    got = [next(tokens) for _ in range(3)]
    tokens.close()
    assert len(got) == 3 and all(t.token_id is not None for t in got)
    with pytest.raises(StopIteration):
        next(tokens)
    assert generate_text(model, ids, GenerationSettings(max_new_tokens=8)).generated_tokens > 0


@pytest.mark.slow
def test_prefill_happens_inside_the_iterator(onnx_models, monkeypatch):
    """append_tokens (the prefill) runs on the first next(), inside the time stream_reply measures to the
    first token, not when generate() is called."""
    model = onnx_models("int4")
    calls = []
    real = og.Generator

    class SpyGenerator:  # wraps the real og.Generator, recording when the prompt is appended
        def __init__(self, *args):
            calls.append("Generator")
            self._real = real(*args)

        def append_tokens(self, ids):
            calls.append("append_tokens")
            return self._real.append_tokens(ids)

        def __getattr__(self, name):
            return getattr(self._real, name)

    monkeypatch.setattr(og, "Generator", SpyGenerator)
    tokens = model.generate(prompt_ids(model, "Hi"), GenerationSettings(max_new_tokens=4))
    assert calls == []
    first = next(tokens)
    assert calls == ["Generator", "append_tokens"] and first.token_id is not None
    tokens.close()


@pytest.mark.slow
def test_cpu_int4_default_is_nncf_mixed_int4_int8(onnx_variant):
    """The CPU int4 default: NNCF's int4 and int8 weights packed as MatMulNBits, nothing left to dequantize per
    step, and the tied embedding a GatherBlockQuantized on lm_head's own int8 weights (stored once)."""
    import onnx
    from onnx import helper

    proto = onnx.load(str(onnx_variant("int4") / "model.onnx"), load_external_data=False)
    nodes = {n.op_type: n for n in proto.graph.node}
    params = {4: 0, 8: 0}  # weights per width, lm_head aside (NNCF keeps it int8 outside the ratio)
    for node in proto.graph.node:
        if node.op_type == "MatMulNBits" and node.output[0] != "logits":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            params[attrs["bits"]] += attrs["K"] * attrs["N"]
    assert "DequantizeLinear" not in nodes and "MatMul" not in nodes
    assert 0.4 < params[4] / (params[4] + params[8]) < 0.6, params  # half int4, the most sensitive int8
    gather = nodes["GatherBlockQuantized"]
    lm_head = next(n for n in proto.graph.node if n.op_type == "MatMulNBits" and n.output[0] == "logits")
    reshape = next(n for n in proto.graph.node if n.output[0] == gather.input[0])
    assert reshape.input[0] == lm_head.input[1] and gather.input[2] == lm_head.input[2]


@pytest.mark.slow
def test_cpu_int4_default_diverges_less_than_the_builders_rtn(onnx_variant, onnx_models, torch_model, store):
    from phi3cli.bench.quality import next_token_divergence, perplexity_text
    from phi3cli.convert import ensure_variant

    ids = torch_model.encode(perplexity_text())[:240]
    reference = torch_model.next_token_logprobs(ids)
    rtn_folder = ensure_variant(
        get_backend("onnx"), resolve_source("demo", store), ConvertRecipe(format="int4", preset="rtn"), store
    )
    rtn = load(resolve_source(str(rtn_folder), store), route=given("onnx", "cpu"), store=store)
    try:
        kld_rtn, _ = next_token_divergence(reference, rtn.next_token_logprobs(ids))
    finally:
        rtn.close()
    kld_default, top1 = next_token_divergence(reference, onnx_models("int4").next_token_logprobs(ids))
    assert 0 < kld_default < kld_rtn, (kld_default, kld_rtn)
    assert top1 > 0.7, top1


@pytest.mark.slow
def test_token_logprobs_match_torch(onnx_models, torch_model):
    ids = prompt_ids(torch_model, PROMPTS[0]) + torch_model.encode("The capital of France is Paris.")
    ours, reference = onnx_models("fp32").token_logprobs(ids), torch_model.token_logprobs(ids)
    assert len(ours) == len(ids) - 1
    assert max(abs(a - b) for a, b in zip(ours, reference, strict=True)) < 1e-3


@pytest.mark.slow
def test_quantize_fp32_to_int4(onnx_variant, store, tmp_path):
    from phi3cli.convert import quantize

    fp32 = onnx_variant("fp32")
    out = quantize(fp32, "onnx", ConvertRecipe(format="int4"), tmp_path / "q4")
    assert dir_size(out) < dir_size(fp32) / 2
    assert not (out / "variant.json").exists()  # the store's manifest belongs to the store's folder only
    assert load_chat_template(out) == load_chat_template(fp32)
    model = load(resolve_source(str(out), store), route=given("onnx", "cpu"), store=store)
    try:
        assert model.format == "int4"  # read from the graph: MatMulNBits
        stats = generate_text(model, prompt_ids(model, PROMPTS[0]), GenerationSettings(max_new_tokens=16))
        assert stats.text.strip()
    finally:
        model.close()
    with pytest.raises(ConversionError, match="already int4"):
        quantize(out, "onnx", ConvertRecipe(format="int4"), tmp_path / "again")
    assert not (tmp_path / "again").exists()


@pytest.mark.parametrize("precision, provider", [("fp32", "cpu"), ("fp16", "dml")])
@pytest.mark.slow
def test_a_builder_made_folder_runs_as_model_dir(demo_source, tmp_path, precision, provider):
    """A folder made by the builder module itself (as a user or Microsoft would) runs through the real CLI."""
    out = tmp_path / f"{precision}-{provider}"
    built = subprocess.run(
        [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(demo_source.path), "-o", str(out)]
        + ["-p", precision, "-e", provider, "-c", str(tmp_path / "cache"), "--extra_options", "hf_remote=false"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    done = run_phi3("chat", "--model", str(out), "-n", "24", "What is the capital of France?")
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout
    assert "onnx on CPU" in done.stderr
    if provider == "dml":
        assert "targets DirectML; running it on the CPU" in done.stderr


# --- providers: DirectML and CUDA without the hardware ---------------------------------------------------


class RecordingConfig:
    """A fake of og.Config's provider methods (clear_providers, append_provider) that records the calls."""

    def __init__(self):
        self.calls = []

    def clear_providers(self):
        self.calls.append(("clear_providers",))

    def append_provider(self, name):
        self.calls.append(("append_provider", name))


@pytest.mark.parametrize(
    "device, configured, available, platform, providers, clear, calls",
    [
        ("cpu", ["dml"], set(), "linux", (), True, [("clear_providers",)]),
        ("cpu", [], {"dml"}, "win32", (), True, [("clear_providers",)]),
        ("gpu", [], {"dml", "cuda"}, "win32", ("dml",), True, [("clear_providers",), ("append_provider", "dml")]),
        ("gpu", [], {"cuda"}, "win32", ("cuda",), True, [("clear_providers",), ("append_provider", "cuda")]),
        ("gpu", [], {"cuda"}, "linux", ("cuda",), True, [("clear_providers",), ("append_provider", "cuda")]),
        ("gpu", ["dml"], {"dml"}, "win32", ("dml",), False, []),  # the folder's own DirectML options are kept
        ("gpu", ["cuda"], {"cuda"}, "linux", ("cuda",), False, []),
    ],
)
def test_provider_choice(device, configured, available, platform, providers, clear, calls):
    choice = choose_providers(device, configured, available, platform)
    assert (choice.providers, choice.clear) == (providers, clear)
    config = RecordingConfig()
    apply_providers(config, choice)
    assert config.calls == calls


@pytest.mark.parametrize(
    "configured, available, platform, needles",
    [
        ([], set(), "linux", ["onnxruntime-genai-directml", "onnxruntime-genai-cuda", "no GPU"]),
        ([], {"dml"}, "linux", ["onnxruntime-genai-cuda"]),  # DirectML is for Windows only
        (["dml"], set(), "linux", ["asks for the DirectML", "onnxruntime-genai-directml (Windows only)"]),
        (["dml"], {"cuda"}, "linux", ["asks for the DirectML", "onnxruntime-genai-directml"]),
        (["cuda"], {"dml"}, "win32", ["asks for the CUDA", "onnxruntime-genai-cuda"]),
        (["qnn"], set(), "win32", ["asks for the qnn", "no ONNX Runtime GenAI package phi3 knows"]),
    ],
)
def test_a_missing_provider_names_its_package(configured, available, platform, needles):
    with pytest.raises(DeviceUnavailableError) as caught:
        choose_providers("gpu", configured, available, platform)
    for needle in needles:
        assert needle in caught.value.message
    assert "--device cpu" in caught.value.hint


def test_cpu_choice_notes_the_cleared_provider():
    assert "DirectML" in choose_providers("cpu", ["dml"], set(), "linux").note
    assert choose_providers("cpu", [], set(), "linux").note is None


@pytest.mark.slow
def test_a_directml_folder_needs_its_providers_cleared_here(onnx_variant):
    """The real og.Config: as built, the DirectML folder asks for DML, which this build lacks; cleared, it runs."""
    folder = str(onnx_variant("int4", "dml"))
    if not GPU_HERE:
        with pytest.raises(RuntimeError, match="DML"):
            og.Model(folder)
    config = og.Config(folder)
    apply_providers(config, ProviderChoice((), clear=True))
    assert og.Model(config).device_type == "CPU"


@pytest.mark.skipif(GPU_HERE, reason="this ONNX Runtime GenAI has a GPU provider")
@pytest.mark.slow
def test_gpu_asked_without_a_gpu_provider(onnx_backend, onnx_variant, demo_source, store):
    with pytest.raises(DeviceUnavailableError, match="onnxruntime-genai-cuda"):
        load(demo_source, route=given("onnx", "gpu"), store=store)
    dml = resolve_source(str(onnx_variant("int4", "dml")), store)
    with pytest.raises(DeviceUnavailableError, match="onnxruntime-genai-directml"):
        load(dml, route=given("onnx", "gpu"), store=store)


@pytest.mark.skipif(GPU_HERE, reason="this ONNX Runtime GenAI has a GPU provider")
@pytest.mark.slow
def test_cli_gpu_names_the_packages(onnx_variant):
    done = run_phi3("chat", "--model", str(onnx_variant("int4", "dml")), "--device", "gpu", "Hi")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "onnxruntime-genai-directml" in done.stderr and "onnxruntime-genai-cuda" in done.stderr


def test_default_target_is_cpu_off_windows(onnx_backend):
    expected = "dml" if sys.platform == "win32" and "dml" in available_providers() else "cpu"
    assert onnx_backend.default_target() == expected


# --- bad input ----------------------------------------------------------------------------------------


@pytest.fixture
def copy_of(onnx_variant, tmp_path):
    """A folder that links to a built variant's files, with its own genai_config.json to break."""

    def make(fmt: str = "int4", target: str = "cpu") -> Path:
        source = onnx_variant(fmt, target)
        folder = tmp_path / f"copy-{fmt}-{target}"
        folder.mkdir()
        for item in source.iterdir():
            if item.name == GENAI_CONFIG:
                (folder / item.name).write_text(item.read_text())
            elif item.name != "variant.json":
                (folder / item.name).symlink_to(item)
        return folder

    return make


def onnx_source(folder: Path) -> ModelSource:
    return ModelSource(str(folder), "onnx", folder, "test-" + folder.name)


def load_folder(onnx_backend, store, folder: Path):
    return load(onnx_source(folder), route=given("onnx", "cpu"), store=store)


def edit_config(folder: Path, edit) -> None:
    path = folder / GENAI_CONFIG
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.slow
def test_missing_genai_config(onnx_backend, store, copy_of):
    folder = copy_of()
    (folder / GENAI_CONFIG).unlink()
    with pytest.raises(UnsupportedModelError, match="has no genai_config.json") as caught:
        load_folder(onnx_backend, store, folder)
    assert "phi3 convert" in caught.value.hint
    done = run_phi3("chat", "--model", str(folder), "Hi")  # the CLI does not even take it for a model
    assert done.returncode == 1 and "genai_config.json" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow
def test_malformed_genai_config(onnx_backend, store, copy_of):
    folder = copy_of()
    (folder / GENAI_CONFIG).write_text('{"model": {"context_length": 8192,,}')
    with pytest.raises(UnsupportedModelError, match=r"is not valid JSON \(line 1"):
        load_folder(onnx_backend, store, folder)
    done = run_phi3("chat", "--model", str(folder), "Hi")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "genai_config.json is not valid JSON" in done.stderr


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda d: d["model"].pop("context_length"), "lacks what ONNX Runtime GenAI needs"),
        (lambda d: d["model"]["decoder"].pop("filename"), "lacks what ONNX Runtime GenAI needs"),
        (lambda d: d["model"].update(context_length="long"), "lacks what ONNX Runtime GenAI needs"),
        (lambda d: d["model"]["decoder"].update(filename="missing.onnx"), "names missing.onnx, which is not in"),
        (lambda d: d["search"].update(no_such_option=1), "ONNX Runtime GenAI cannot load"),
    ],
)
@pytest.mark.slow
def test_incomplete_genai_config(onnx_backend, store, copy_of, edit, needle):
    folder = copy_of()
    edit_config(folder, edit)
    with pytest.raises(UnsupportedModelError, match=needle):
        load_folder(onnx_backend, store, folder)


@pytest.mark.skipif(GPU_HERE, reason="this ONNX Runtime GenAI has a GPU provider")
@pytest.mark.slow
def test_config_naming_a_provider_not_installed(onnx_backend, store, copy_of):
    folder = copy_of()
    edit_config(folder, lambda d: d["model"]["decoder"]["session_options"].update(provider_options=[{"cuda": {}}]))
    with pytest.raises(DeviceUnavailableError, match="asks for the CUDA .* onnxruntime-genai-cuda"):
        load(onnx_source(folder), route=given("onnx", "gpu"), store=store)
    model = load_folder(onnx_backend, store, folder)  # --device cpu clears it and runs
    try:
        assert model.executed_device == "CPU"
    finally:
        model.close()


@pytest.mark.slow
def test_context_length_comes_from_genai_config(onnx_backend, store, copy_of):
    folder = copy_of()
    edit_config(folder, lambda d: d["model"].update(context_length=64))
    model = load_folder(onnx_backend, store, folder)
    try:
        assert model.context_length == 64
        with pytest.raises(ContextOverflowError, match="at most 63"):
            next(stream_reply(model, list(range(100, 180)), GenerationSettings(max_new_tokens=8)))
        ids = prompt_ids(model, "Write a long story about the sea, please.")
        stats = generate_text(model, ids, GenerationSettings(max_new_tokens=100, ignore_eos=True))
        assert stats.generated_tokens == 64 - len(ids)  # the reply is cut at the context, not past it
    finally:
        model.close()


@pytest.mark.slow
def test_recipe_options_the_builder_cannot_honour(demo_source):
    for args, needle in [
        (["--recipe", "rtn", "--ratio", "0.5"], "--ratio apply to OpenVINO and to the CPU int4 default"),
        (["--dataset", "no-such-text.txt"], "calibrates on a text file"),
        (["--group-size", "48"], "not 48"),
        (["--format", "fp16", "--group-size", "64"], "apply to int4 only"),
    ]:
        done = run_phi3("convert", "demo", "--to", "onnx", *args, "-o", str(TEST_HOME / "never-written"))
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        assert needle in done.stderr, done.stderr
        assert not (TEST_HOME / "never-written").exists()


def start_convert(out: Path) -> subprocess.Popen:
    """`phi3 convert demo --to onnx -o OUT` in a subprocess, returned once the builder has started working."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "phi3cli", "convert", "demo", "--to", "onnx", "--format", "fp32", "-o", str(out)],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env={**os.environ},
    )
    seen = []
    for line in proc.stderr:  # RichProgress prints a ✓ line as each phase ends
        seen.append(line)
        if "model builder" in line:
            break
    assert any("model builder" in line for line in seen), (proc.poll(), seen)
    time.sleep(1.0)  # into the layer-by-layer build
    assert proc.poll() is None, "the conversion finished before it could be interrupted"
    return proc


def builder_scratch(pid: int) -> list[Path]:
    return list((TEST_HOME / "cache" / "onnx-builder").glob(f".build-*.partial-{pid}"))


@pytest.mark.slow
def test_an_interrupted_build_leaves_nothing(demo_source, tmp_path):
    out = tmp_path / "interrupted"
    proc = start_convert(out)
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 130, rest
    assert "Interrupted; nothing was left half-written." in rest
    assert "Traceback" not in rest
    assert list(tmp_path.iterdir()) == []  # neither the output nor its staging folder
    assert builder_scratch(proc.pid) == []


@pytest.mark.slow
def test_a_killed_build_leaves_no_output_and_its_staging_is_cleaned(demo_source, tmp_path):
    out = tmp_path / "killed"
    proc = start_convert(out)
    proc.kill()
    proc.wait(timeout=60)
    proc.stderr.close()
    assert not out.exists()
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert leftovers == [f".killed.partial-{proc.pid}"]
    assert remove_stale_partials(tmp_path) and list(tmp_path.iterdir()) == []  # what the next convert does
    scratch = builder_scratch(proc.pid)  # the builder's scratch in the store goes the same way
    assert all(p in remove_stale_partials(scratch[0].parent) for p in scratch)


@pytest.mark.slow
def test_a_failing_build_is_one_error_and_leaves_nothing(demo_source, store, tmp_path):
    from phi3cli.convert import convert

    broken = tmp_path / "broken-model"
    broken.mkdir()
    for item in demo_source.path.iterdir():
        if item.name == "model.safetensors":
            (broken / item.name).write_bytes(item.read_bytes()[: 1 << 20])  # cut short, as by a failed download
        elif item.is_file():
            (broken / item.name).symlink_to(item)
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match="model builder failed on") as caught:
        convert(resolve_source(str(broken), store), "onnx", ConvertRecipe(format="int4"), out)
    assert "--debug" in caught.value.hint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken-model"]
