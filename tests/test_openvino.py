"""The OpenVINO backend on the real demo model: build (optimum-intel + NNCF), run (OpenVINO GenAI), bad input.

Variants are built once into the shared test store through ensure_variant, as `phi3 chat --backend openvino`
builds them, and reused by later tests and later runs.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from phi3cli.backends import get_backend
from phi3cli.backends.base import ConvertRecipe, GenerationSettings
from phi3cli.backends.nncf_weights import calibration_samples
from phi3cli.backends.streaming import IncrementalDecoder
from phi3cli.chat import ChatSession
from phi3cli.convert import ensure_variant, quantize
from phi3cli.errors import ConversionError, DeviceUnavailableError, UnsupportedModelError
from phi3cli.generation import generate_text
from phi3cli.loading import load
from phi3cli.progress import SilentProgress
from phi3cli.routing import given
from phi3cli.sources import resolve_source
from phi3cli.util import dir_size
from tests.conftest import PROMPTS, ROOT, run_phi3

ov = pytest.importorskip("openvino")
pytest.importorskip("openvino_genai")
from phi3cli.backends.openvino import export as ov_export  # noqa: E402
from phi3cli.backends.openvino import ir as ov_ir  # noqa: E402
from phi3cli.backends.openvino import recipe as ov_recipe  # noqa: E402
from phi3cli.backends.openvino import runtime as ov_runtime  # noqa: E402

GREEDY_32 = GenerationSettings(max_new_tokens=32)


def variant(demo_source, store, fmt: str) -> Path:
    return ensure_variant(get_backend("openvino"), demo_source, ConvertRecipe(format=fmt), store)


@pytest.fixture(scope="session")
def ov_fp16(demo_source, store):
    return variant(demo_source, store, "fp16")


@pytest.fixture(scope="session")
def ov_int8(demo_source, store):
    return variant(demo_source, store, "int8")


@pytest.fixture(scope="session")
def ov_int4(demo_source, store):
    return variant(demo_source, store, "int4")


@pytest.fixture(scope="session")
def fp16_model(ov_fp16, demo_source, store):
    """The fp16 IR on OpenVINO GenAI, CPU (loaded through the store, as chat does)."""
    model = load(demo_source, route=given("openvino", "cpu"), format="fp16", store=store)
    yield model
    model.close()


def prompt_ids(model, question: str) -> list[int]:
    return model.encode(model.chat_template.render([{"role": "user", "content": question}]))


def assert_clean_error(done, *needles):
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    assert sum(line.startswith("Error:") for line in done.stderr.splitlines()) == 1, done.stderr
    for needle in needles:
        assert needle in done.stderr, done.stderr


# ------------------------------------------------------------------------------------------- answers


@pytest.mark.slow
def test_fp16_greedy_matches_torch(fp16_model, torch_model):
    assert fp16_model.executed_device == "CPU" and fp16_model.format == "fp16"
    for question in PROMPTS:
        ids = prompt_ids(torch_model, question)
        assert prompt_ids(fp16_model, question) == ids  # same template, same tokenizer: same prompt
        ours, reference = generate_text(fp16_model, ids, GREEDY_32), generate_text(torch_model, ids, GREEDY_32)
        assert ours.token_ids == reference.token_ids, (question, ours.text, reference.text)
        assert ours.text == reference.text


@pytest.mark.slow
def test_multi_turn_matches_torch(fp16_model, torch_model):
    turns = ["What is the capital of France?", "And what is the capital of Germany?", "Which of the two is larger?"]
    ours, reference = ChatSession(fp16_model, GREEDY_32), ChatSession(torch_model, GREEDY_32)
    for turn in turns:
        list(ours.ask(turn)), list(reference.ask(turn))
        assert ours.last_stats.token_ids == reference.last_stats.token_ids, (turn, ours.messages, reference.messages)
    assert ours.messages == reference.messages and len(ours.messages) == 6


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.slow
def test_compressed_variants_answer(fmt, demo_source, store, request):
    request.getfixturevalue(f"ov_{fmt}")
    model = load(demo_source, route=given("openvino", "cpu"), format=fmt, store=store)
    try:
        assert model.format == fmt and model.executed_device == "CPU"
        stats = generate_text(model, prompt_ids(model, PROMPTS[0]), GREEDY_32)
        assert stats.text.strip() and stats.generated_tokens > 0
        assert model.last_perf.get_num_generated_tokens() == stats.generated_tokens  # the runtime agrees
    finally:
        model.close()


@pytest.mark.slow
def test_sizes_and_recipes(ov_fp16, ov_int8, ov_int4):
    assert dir_size(ov_int4) < dir_size(ov_int8) < dir_size(ov_fp16)
    for folder in (ov_fp16, ov_int8, ov_int4):
        ov_ir.check_ir(folder)  # IR and OpenVINO tokenizer
        for name in ("config.json", "generation_config.json", "tokenizer_config.json", "tokenizer.json"):
            assert (folder / name).is_file(), name  # what templates.py and the context length read
    assert [ov_ir.ir_format(f / "openvino_model.xml") for f in (ov_fp16, ov_int8, ov_int4)] == ["fp16", "int8", "int4"]
    int4 = ov_ir.weight_summary(ov_int4 / "openvino_model.xml")
    assert 0.4 < int4["int4"] < 0.7 and int4["int8"] > 0.3  # ratio 0.6 of the layers, the rest int8
    import json

    config = json.loads((ov_int4 / "openvino_config.json").read_text())["quantization_config"]
    assert (config["bits"], config["group_size"], config["ratio"], config["sym"]) == (4, 64, 0.6, False)
    assert config["scale_estimation"] is True  # fitted on the calibration text shipped in the package


@pytest.mark.slow
def test_tokens_decode_to_exact_text_with_multibyte_characters(fp16_model):
    text = "Café naïve, 東京 and 🙂 — ça marche."
    ids = fp16_model.encode(text)
    for decoder in (
        IncrementalDecoder(fp16_model.decode),
        IncrementalDecoder(fp16_model.decode, fp16_model.decode_pair),
    ):
        pieces = [decoder.push(i) for i in ids]
        assert "".join(pieces) == fp16_model.decode(ids) == text
        assert "" in pieces  # some tokens end inside a character and wait for the next


@pytest.mark.slow
def test_closing_the_stream_stops_the_runtime(fp16_model):
    tokens = fp16_model.generate(prompt_ids(fp16_model, PROMPTS[2]), GenerationSettings(200, ignore_eos=True))
    for _, _token in zip(range(3), tokens, strict=False):
        pass
    tokens.close()
    assert fp16_model.last_perf.get_num_generated_tokens() < 20


@pytest.mark.slow
def test_sampling_follows_the_seed(fp16_model):
    ids = prompt_ids(fp16_model, "Tell me a story.")
    runs = [
        generate_text(fp16_model, ids, GenerationSettings(24, temperature=1.0, top_p=0.95, top_k=50, seed=s)).token_ids
        for s in (7, 7, 8)
    ]
    assert runs[0] == runs[1] and runs[0] != runs[2]


@pytest.mark.slow
def test_token_logprobs_match_torch(fp16_model, torch_model):
    ids = torch_model.encode("The capital of France is Paris. It lies on the Seine.")
    ours, reference = fp16_model.token_logprobs(ids), torch_model.token_logprobs(ids)
    assert len(ours) == len(reference) == len(ids) - 1
    assert max(abs(a - b) for a, b in zip(ours, reference, strict=True)) < 0.1


@pytest.mark.slow
def test_compiled_model_cache_is_written(fp16_model, store):
    assert any(store.cache_dir("openvino").glob("*.blob"))


@pytest.mark.slow
def test_chat_cli_answers_paris(ov_int4):
    done = run_phi3("chat", "--model", "demo", "--backend", "openvino", "What is the capital of France?")
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout
    assert "openvino on CPU" in done.stderr


# --------------------------------------------------------------------------- folders made elsewhere


@pytest.mark.slow
def test_optimum_cli_export_runs_as_model_folder(demo_source, tmp_path):
    out = tmp_path / "optimum-int4"
    cmd = [sys.executable, "-m", "optimum.commands.optimum_cli", "export", "openvino", "--model", str(demo_source.path)]
    cmd += ["--task", "text-generation-with-past", "--weight-format", "int4", "--group-size", "64", "--sym", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    done = run_phi3("chat", "--model", str(out), "--device", "cpu", "-n", "32", "What is the capital of France?")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() and "openvino on CPU" in done.stderr


@pytest.mark.slow
def test_quantize_fp16_ir_to_int4(ov_fp16, tmp_path, store):
    out = tmp_path / "int4"
    progress = SilentProgress()
    quantize(ov_fp16, "openvino", ConvertRecipe(format="int4"), out, progress=progress)
    assert ov_ir.ir_format(out / "openvino_model.xml") == "int4"
    assert dir_size(out) < 0.6 * dir_size(ov_fp16)
    assert any(note.startswith("Weights stored as int8") for note in progress.notes), progress.notes  # ratio 0.6
    model = load(resolve_source(str(out), store), route=given("openvino", "cpu"), store=store)
    try:
        assert model.format == "int4" and generate_text(model, prompt_ids(model, PROMPTS[0]), GREEDY_32).text.strip()
    finally:
        model.close()
    with pytest.raises(ConversionError, match="already compressed"):
        quantize(out, "openvino", ConvertRecipe(format="int4"), tmp_path / "again")
    assert not (tmp_path / "again").exists()


# ------------------------------------------------------------------------------------------ recipes


def test_group_size_falls_back_to_one_that_divides_every_width():
    config = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9}
    progress = SilentProgress()
    settings = ov_recipe.resolve_recipe(ConvertRecipe(format="int4", group_size=128), config, progress)
    assert (settings["bits"], settings["group_size"], settings["ratio"], settings["sym"]) == (4, 64, 0.6, False)
    assert "Group size 128 does not divide" in progress.notes[0] and "using 64" in progress.notes[0]
    phi3_mini = {"hidden_size": 3072, "intermediate_size": 8192, "num_attention_heads": 32}
    default = ov_recipe.resolve_recipe(ConvertRecipe(format="int4"), phi3_mini, SilentProgress())
    assert default["group_size"] == 64 and default["scale_estimation"]
    assert default["dataset"] == calibration_samples() and len(default["dataset"]) > 10
    texts = ov_recipe.resolve_recipe(ConvertRecipe(format="int4", dataset="auto"), phi3_mini, SilentProgress())
    assert texts["dataset"] == "auto" and texts["scale_estimation"]  # --dataset replaces the shipped text
    with pytest.raises(ConversionError, match="No int4 group size") as info:
        ov_recipe.fit_group_size(128, [577])
    assert "--group-size -1" in info.value.hint


def test_the_cookbook_recipe_stays_available_by_name():
    config = {"hidden_size": 3072, "intermediate_size": 8192, "num_attention_heads": 32}
    settings = ov_recipe.resolve_recipe(ConvertRecipe(format="int4", preset="cookbook"), config, SilentProgress())
    assert (settings["group_size"], settings["ratio"], settings["sym"]) == (128, 0.6, True)
    assert "scale_estimation" not in settings and "dataset" not in settings  # data-free, as the Cookbook has it
    overridden = ConvertRecipe(format="int4", preset="cookbook", ratio=1.0)
    assert ov_recipe.resolve_recipe(overridden, config, SilentProgress())["ratio"] == 1.0
    assert ConvertRecipe(format="int4").canonical() != ConvertRecipe(format="int4", preset="cookbook").canonical()
    with pytest.raises(ConversionError, match="no recipe named 'best'"):
        ov_recipe.resolve_recipe(ConvertRecipe(format="int4", preset="best"), config, SilentProgress())


def test_npu_recipe_is_symmetric_channel_wise_all_int4():
    config = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9}
    settings = ov_recipe.resolve_recipe(ConvertRecipe(format="int4", target="npu"), config, SilentProgress())
    assert (settings["group_size"], settings["ratio"], settings["sym"]) == (-1, 1.0, True)
    assert ov_recipe.resolve_recipe(ConvertRecipe(format="int8"), config, SilentProgress())["bits"] == 8
    assert ov_recipe.resolve_recipe(ConvertRecipe(format="fp16"), config, SilentProgress()) is None


@pytest.mark.parametrize(
    "recipe, message",
    [
        (ConvertRecipe(format="fp32"), "not fp32"),
        (ConvertRecipe(format="int4", ratio=1.5), "between 0 and 1"),
        (ConvertRecipe(format="int4", group_size=0), "positive number or -1"),
        (ConvertRecipe(format="int4", target="dml"), "cpu, gpu or npu"),
        (ConvertRecipe(format="int4", awq=True, dataset="no-such-set"), "Unknown calibration data set"),
        (ConvertRecipe(format="fp16", awq=True, dataset="auto"), "fp16 compresses nothing"),
    ],
)
def test_bad_recipes_are_refused(recipe, message):
    with pytest.raises((ConversionError, UnsupportedModelError), match=message):
        ov_recipe.resolve_recipe(recipe, {"hidden_size": 576, "intermediate_size": 1536}, SilentProgress())


def test_hub_calibration_set_needs_datasets_and_says_what_works_offline():
    import importlib.util

    if importlib.util.find_spec("datasets") is not None:
        pytest.skip("the datasets package is installed here")
    with pytest.raises(ConversionError, match="datasets") as info:
        ov_recipe.resolve_recipe(
            ConvertRecipe("int4", awq=True, dataset="wikitext2"), {"hidden_size": 576}, SilentProgress()
        )
    assert "--dataset auto" in info.value.hint


def test_calibration_text_file(tmp_path):
    data = tmp_path / "calib.txt"
    data.write_text("First sample.\n\nSecond sample.\n")
    settings = ov_recipe.resolve_recipe(
        ConvertRecipe("int4", awq=True, dataset=str(data)), {"hidden_size": 64}, SilentProgress()
    )
    assert settings["dataset"] == ["First sample.", "Second sample."] and settings["quant_method"] == "awq"
    # --awq alone calibrates on phi3's shipped text, by paragraph, as the ONNX path does
    alone = ov_recipe.resolve_recipe(ConvertRecipe("int4", awq=True), {"hidden_size": 64}, SilentProgress())
    assert alone["quant_method"] == "awq" and alone["dataset"] == calibration_samples() and len(alone["dataset"]) > 1


def test_convert_cli_bounds_ratio_and_format(tmp_path):
    from phi3cli.cli import app

    out = tmp_path / "out"
    args = ["convert", "demo", "--to", "openvino", "--ratio", "1.5", "-o", str(out)]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "--ratio" in result.output and "less than or equal to 1" in result.output
    assert_clean_error(run_phi3("convert", "demo", "--to", "openvino", "--format", "fp32", "-o", str(out)), "not fp32")
    assert not out.exists()


@pytest.mark.slow
def test_load_refuses_fp32(demo_source, store):
    with pytest.raises(UnsupportedModelError, match="not fp32"):
        load(demo_source, route=given("openvino", "cpu"), format="fp32", store=store)


# ------------------------------------------------------------------------------------------ devices


@pytest.mark.slow
def test_npu_asked_here_gives_a_clear_message(demo_source, store):
    if "NPU" in ov.Core().available_devices:
        pytest.skip("this machine has an NPU")
    with pytest.raises(DeviceUnavailableError, match="OpenVINO sees no NPU") as info:
        load(demo_source, route=given("openvino", "npu"), store=store)
    assert "CPU" in info.value.message and "--device cpu" in info.value.hint
    done = run_phi3("chat", "--model", "demo", "--backend", "openvino", "--device", "npu", "hi")
    assert_clean_error(done, "NPU")
    assert "VCL" not in done.stderr and "Exception from" not in done.stderr


def test_auto_routes_openvino_to_the_best_device_it_sees():
    from phi3cli.devices import DeviceReport, probe
    from phi3cli.routing import choose_route

    report = probe()
    here = choose_route(report, device="auto", backend="openvino")
    assert (here.backend, here.device) == ("openvino", report.present["openvino"][0])
    ai_pc = DeviceReport(cpu="x", present={"openvino": ["npu", "gpu", "cpu"]})
    assert choose_route(ai_pc, device="auto", backend="openvino").device == "npu"
    no_npu = DeviceReport(cpu="x", present={"openvino": ["gpu", "cpu"]})
    assert choose_route(no_npu, device="auto", backend="openvino").device == "gpu"


def test_device_names_and_npu_properties():
    assert ov_runtime.ov_device_for("gpu", ["CPU", "GPU.0", "GPU.1"]) == "GPU.0"
    with pytest.raises(DeviceUnavailableError, match=r"no NPU .*lists: CPU, GPU"):
        ov_runtime.ov_device_for("npu", ["CPU", "GPU"])
    assert ov_runtime.npu_properties({}) == {
        "MAX_PROMPT_LEN": 1024,
        "MIN_RESPONSE_LEN": 128,
        "GENERATE_HINT": "FAST_COMPILE",
    }
    props = ov_runtime.npu_properties({"max_prompt_len": 2048, "generate_hint": "best_perf", "prefill_hint": "static"})
    assert props == {
        "MAX_PROMPT_LEN": 2048,
        "MIN_RESPONSE_LEN": 128,
        "GENERATE_HINT": "BEST_PERF",
        "PREFILL_HINT": "STATIC",
    }
    assert ov_runtime.precision_properties("cpu", {}) == {"INFERENCE_PRECISION_HINT": "f32"}
    assert (
        ov_runtime.precision_properties("gpu", {}) == {}
        and ov_runtime.precision_properties("cpu", {"inference_precision": "auto"}) == {}
    )
    assert ov_runtime.decode_properties("cpu") == {"KV_CACHE_PRECISION": "f16"}
    assert ov_runtime.decode_properties("gpu") == ov_runtime.decode_properties("npu") == {}


def test_execution_devices_are_read_from_the_compile_log():
    log = ["Model: OV Tokenizer", "  EXECUTION_DEVICES: CPU", "Model: Stateful LLM model", "  EXECUTION_DEVICES: NPU"]
    assert ov_runtime.execution_devices(log) == "NPU"
    assert ov_runtime.execution_devices(["nothing useful"]) is None


# ------------------------------------------------------------------------------ broken model folders


def link_copy(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.is_file() and f.name not in skip and f.name != "variant.json":
            os.link(f, dst / f.name)
    return dst


@pytest.mark.parametrize(
    "skip, needles",
    [
        (("openvino_model.bin",), ["not a complete OpenVINO model", "openvino_model.bin", "phi3 convert"]),
        (("openvino_detokenizer.xml", "openvino_detokenizer.bin"), ["no OpenVINO tokenizer", "convert_tokenizer"]),
    ],
)
@pytest.mark.slow
def test_partial_ir_is_refused_clearly(ov_int4, tmp_path, skip, needles):
    folder = link_copy(ov_int4, tmp_path / "partial", skip)
    assert_clean_error(run_phi3("chat", "--model", str(folder), "--device", "cpu", "hi"), *needles)


@pytest.mark.slow
def test_truncated_weights_are_refused_clearly(ov_int4, tmp_path, store):
    folder = link_copy(ov_int4, tmp_path / "truncated", ("openvino_model.bin",))
    with open(ov_int4 / "openvino_model.bin", "rb") as src:
        (folder / "openvino_model.bin").write_bytes(src.read(1 << 20))
    with pytest.raises(UnsupportedModelError, match="cannot be read as an OpenVINO model: Incorrect weights") as info:
        load(resolve_source(str(folder), store), route=given("openvino", "cpu"), store=store)
    assert len(str(info.value).splitlines()) == 1 and "phi3 convert" in info.value.hint


@pytest.mark.slow
def test_tokenizer_that_cannot_be_converted_stops_clearly(demo_source, tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    shutil.copy2(demo_source.path / "config.json", hf)
    (hf / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
    (hf / "tokenizer.json").write_text('{"model": {"type": "NoSuchModel"}}')
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ConversionError, match="tokenizer of hf cannot be converted to OpenVINO") as info:
        ov_export.ensure_tokenizers(out, hf, SilentProgress())
    assert "openvino_tokenizer.xml" in info.value.message and "--backend torch" in info.value.hint
    assert list(out.iterdir()) == []


# --------------------------------------------------------------------------- nothing half-written


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
@pytest.mark.slow
def test_interrupted_convert_leaves_no_output(demo_source, tmp_path, sig):
    work, out = tmp_path / "work", tmp_path / "work" / "ir"
    work.mkdir()
    with open(tmp_path / "stderr.txt", "w+") as log:
        cmd = [
            sys.executable,
            "-m",
            "phi3cli",
            "convert",
            "demo",
            "--to",
            "openvino",
            "--format",
            "int4",
            "-o",
            str(out),
        ]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, cwd=ROOT)
        staging = work / f".ir.partial-{proc.pid}"
        deadline = time.monotonic() + 300
        # Part way: the export has begun writing into the staging folder.
        while not any(staging.rglob("*")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None and any(staging.rglob("*")), (tmp_path / "stderr.txt").read_text()
        proc.send_signal(sig)
        proc.wait(timeout=120)
    assert not out.exists()
    if sig == signal.SIGTERM:
        assert proc.returncode == 130, (tmp_path / "stderr.txt").read_text()
        assert list(work.iterdir()) == []
    else:
        from phi3cli.util import remove_stale_partials

        assert remove_stale_partials(work) == [staging]  # the next build there sweeps the dead one's leftovers
        assert list(work.iterdir()) == []


@pytest.mark.slow
def test_disk_full_during_build_leaves_nothing(demo_source, tmp_path, monkeypatch):
    def export_fills_the_disk(hf_dir, out, progress):
        (out / "openvino_model.bin").write_bytes(b"\0" * 1024)
        raise OSError(errno.ENOSPC, "No space left on device")

    from phi3cli.backends.openvino import backend as ov_backend

    monkeypatch.setattr(ov_backend, "export_ir", export_fills_the_disk)
    from phi3cli.convert import convert

    with pytest.raises(ConversionError, match="No space left") as info:
        convert(demo_source, "openvino", ConvertRecipe(format="fp16"), tmp_path / "out")
    assert "-o" in info.value.hint
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_disk_full_on_a_real_small_disk(demo_source, tmp_path):
    """OpenVINO reports a full disk only as an iostream error; it must still read as 'no space', and leave nothing."""
    from phi3cli.util import atomic_output

    disk = tmp_path / "disk"
    disk.mkdir()
    if sys.platform != "linux" or shutil.which("mount") is None:
        pytest.skip("needs Linux tmpfs")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        with pytest.raises(ConversionError, match="No space left"):
            with atomic_output(disk / "out") as staging:
                ov_export.ensure_tokenizers(staging, demo_source.path, SilentProgress())  # 2.5 MB of OpenVINO IR
        assert list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", str(disk)], check=True)
