"""The checks before a conversion (model size, memory and disk estimates, refusal) and before a load, and progress
lines in a log.

No model is converted here: the checks read config.json only, so a folder holding Phi-3-mini's real config.json
(32 layers) stands in for the model. A test-only memory limit (PHI3_MEMORY_LIMIT_GB) decides what is available.
"""

from __future__ import annotations

import io
import json
import struct

import pytest

from tests.conftest import run_phi3
from tests.fakes.scripted_model import write_fake_model

# Phi-3-mini-4k-instruct's widths with the demo's vocabulary, as scripts/make_shaped_model.py --layers 32 writes.
PHI3_MINI_SHAPED = {
    "architectures": ["Phi3ForCausalLM"],
    "model_type": "phi3",
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "num_hidden_layers": 32,
    "vocab_size": 49152,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
}


def test_parameter_count_of_phi3_mini_widths():
    from phi3cli.sizing import parameter_count

    # 3,926M: what Phi3ForCausalLM(config) reports for this config (scripts/make_shaped_model.py prints it)
    assert round(parameter_count(PHI3_MINI_SHAPED) / 1e6) == 3926


@pytest.mark.slow
def test_parameter_count_matches_the_demo_checkpoint(demo_source, store):
    """The estimate from config.json against the tensors actually stored in the demo's safetensors."""
    from phi3cli.sizing import model_config, parameter_count

    folder = demo_source.hf_dir(store)
    stored = 0
    for path in folder.glob("*.safetensors"):
        with path.open("rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        for name, entry in header.items():
            if name != "__metadata__":
                count = 1
                for dim in entry["shape"]:
                    count *= dim
                stored += count
    assert parameter_count(model_config(folder)) == stored


def _meta_count(model_class, config) -> int:
    import torch

    with torch.device("meta"):
        return sum(p.numel() for p in model_class(config).parameters())


@pytest.mark.slow  # imports torch and transformers
def test_a_multimodal_count_includes_its_encoders_at_the_real_widths():
    """Phi-4-multimodal at transformers' default widths (the released model's): the count from config.json against
    the parameters of transformers' own model, built on the meta device (no weights). It counted the language
    model alone before (4.4B)."""
    from transformers import (
        Phi4MultimodalAudioConfig,
        Phi4MultimodalConfig,
        Phi4MultimodalForCausalLM,
        Phi4MultimodalVisionConfig,
    )

    from phi3cli.sizing import decoder_parameters, encoder_parameters, parameter_count

    config = Phi4MultimodalConfig(
        vision_config=Phi4MultimodalVisionConfig().to_dict(), audio_config=Phi4MultimodalAudioConfig().to_dict()
    )
    counted = _meta_count(Phi4MultimodalForCausalLM, config)
    as_json = config.to_dict()
    assert parameter_count(as_json) == pytest.approx(counted, rel=0.01)
    assert encoder_parameters(as_json) == pytest.approx(counted - decoder_parameters(as_json), rel=0.02)
    assert encoder_parameters(as_json) > 0.85e9


@pytest.mark.slow  # imports torch and transformers
def test_phi35_vision_counts_the_clip_encoder_its_config_names():
    """Phi-3.5-vision's config.json names CLIP ViT-L/14-336 rather than giving its widths: the count phi3 adds for
    it against transformers' CLIPVisionModel of that size (the projection, 22M, comes on top)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from phi3cli.sizing import encoder_parameters

    clip = CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336,
        patch_size=14, projection_dim=768,
    )  # fmt: skip
    phi3_v = {"hidden_size": 3072, "img_processor": {"model_name": "openai/clip-vit-large-patch14-336"}}
    projection = 4 * 1024 * 3072 + 3072 * 3072
    assert encoder_parameters(phi3_v) - projection == pytest.approx(_meta_count(CLIPVisionModel, clip), rel=0.01)
    assert encoder_parameters({"hidden_size": 3072}) == 0


def test_size_decides_the_int4_default():
    from phi3cli.sizing import calibrated_by_default

    assert not calibrated_by_default(PHI3_MINI_SHAPED)
    assert calibrated_by_default(
        {
            **PHI3_MINI_SHAPED,
            "num_hidden_layers": 2,
            "hidden_size": 576,
            "intermediate_size": 1536,
            "num_attention_heads": 9,
            "num_key_value_heads": 3,
        }
    )


def test_estimates_of_both_converters():
    """What both converters were measured to need at this size (inside a memory limit: docs/results)."""
    from phi3cli.backends import get_backend
    from phi3cli.backends.base import ConvertRecipe

    openvino, onnx = get_backend("openvino"), get_backend("onnx")
    data_free = ConvertRecipe("int4")
    # an fp16 checkpoint is memory-mapped: OpenVINO converted inside 3 GB, ONNX inside 5 GB but not 3
    assert 2.3e9 < openvino.build_estimate(PHI3_MINI_SHAPED, data_free).peak_bytes <= 3e9
    assert 3e9 < onnx.build_estimate(PHI3_MINI_SHAPED, data_free).peak_bytes <= 5e9
    # a bfloat16 checkpoint (as Microsoft publishes Phi-3) is cast to fp16 by the OpenVINO export, in memory
    assert openvino.build_estimate({**PHI3_MINI_SHAPED, "torch_dtype": "bfloat16"}, data_free).peak_bytes > 7.85e9
    for backend in (openvino, onnx):  # calibration runs the model: 16.7 GB measured with OpenVINO
        assert backend.build_estimate(PHI3_MINI_SHAPED, ConvertRecipe("int4", preset="calibrated")).peak_bytes > 15e9


@pytest.mark.parametrize("backend", ["openvino", "onnx"])
def test_convert_refuses_what_does_not_fit(tmp_path, backend):
    model = write_fake_model(tmp_path / "phi3-mini-shaped", PHI3_MINI_SHAPED)
    out = tmp_path / "out"
    proc = run_phi3(
        "convert",
        str(model),
        "--to",
        backend,
        "--format",
        "int4",
        "-o",
        str(out),
        env={"PHI3_MEMORY_LIMIT_GB": "2"},
    )
    assert proc.returncode == 1, proc.stderr
    assert "GB of memory" in proc.stderr and "2.0 GB is available" in proc.stderr, proc.stderr
    assert "phi3 models catalog" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == [model]


@pytest.mark.parametrize("backend", ["openvino", "onnx"])
@pytest.mark.parametrize("into", ["folder", "store"])
def test_convert_refuses_what_the_disk_cannot_hold(tmp_path, backend, into):
    """int4 at Phi-3-mini's size writes about 2.7 GB (OpenVINO: 10 GB at its peak, with the fp16 IR it compresses):
    with 2 GB free where it writes, one line says so before anything is written, into a folder or the store."""
    model = write_fake_model(tmp_path / "phi3-mini-shaped", PHI3_MINI_SHAPED)
    home, out = tmp_path / "home", tmp_path / "out"
    where = ["-o", str(out)] if into == "folder" else []
    env = {"PHI3_DISK_FREE_GB": "2", "PHI3_MEMORY_LIMIT_GB": "64", "PHI3_HOME": str(home)}
    proc = run_phi3("convert", str(model), "--to", backend, "--format", "int4", *where, env=env)
    assert proc.returncode == 1, proc.stderr
    assert "2.0 GB is free on the disk holding" in proc.stderr, proc.stderr
    assert str(tmp_path if into == "folder" else home) in proc.stderr, proc.stderr
    assert "phi3 models rm" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists() and not list(home.glob("variants/*/*")), list(home.rglob("*"))


def test_disk_estimates_of_both_converters():
    """From the sizes of the 32-layer builds (docs/results/2026-12-05-real-size.md): OpenVINO's int4 IR 2.26 GB
    after its 7.85 GB fp16 IR, ONNX Runtime GenAI's int4 folder 2.67 GB."""
    from phi3cli.backends import get_backend
    from phi3cli.backends.base import ConvertRecipe

    openvino, onnx = get_backend("openvino"), get_backend("onnx")
    assert 10.1e9 <= openvino.build_estimate(PHI3_MINI_SHAPED, ConvertRecipe("int4")).disk_bytes < 11.5e9
    assert 2.67e9 <= onnx.build_estimate(PHI3_MINI_SHAPED, ConvertRecipe("int4")).disk_bytes < 3.2e9
    assert 7.85e9 <= openvino.build_estimate(PHI3_MINI_SHAPED, ConvertRecipe("fp16")).disk_bytes < 8.5e9


def _sparse_folder(folder, sizes: dict[str, int]):
    folder.mkdir()
    for name, size in sizes.items():
        with (folder / name).open("wb") as f:
            f.truncate(size)  # sparse: its length is what a load reads, and it takes no disk
    return folder


@pytest.mark.parametrize(
    "backend, files, ran, killed",
    [  # measured in memory cgroups at 32 layers of Phi-3-mini's widths (benchmarks/memory_floor.py, docs/results)
        ("openvino", {"openvino_model.bin": 2_255_782_261, "openvino_model.xml": 2_726_974}, 2.7e9, 2.6e9),
        ("onnx", {"model.onnx.data": 2_673_094_656, "model.onnx": 283_286}, 3.1e9, 3.0e9),
    ],
)
def test_a_cpu_load_is_estimated_at_what_it_was_measured_to_need(tmp_path, backend, files, ran, killed):
    """At least what the load ran in, and not so far above it that a machine it runs on well is refused."""
    from phi3cli.backends import get_backend
    from phi3cli.backends.base import LoadRequest

    folder = _sparse_folder(tmp_path / backend, files)
    estimate = get_backend(backend).load_estimate(folder, LoadRequest(source=None, device="cpu"))
    assert ran <= estimate.peak_bytes <= 1.15 * ran, estimate
    assert estimate.peak_bytes > killed
    assert get_backend(backend).load_estimate(folder, LoadRequest(source=None, device="gpu")) is None  # unmeasured


@pytest.mark.slow  # imports torch
@pytest.mark.parametrize(
    "layers, fmt, ran, killed",
    [(32, "bf16", 8.6e9, 8.0e9), (4, "fp32", 3.5e9, 3.2e9)],  # measured in memory cgroups (docs/results)
)
def test_a_torch_load_is_estimated_at_what_it_was_measured_to_need(tmp_path, layers, fmt, ran, killed):
    from phi3cli.backends import get_backend
    from phi3cli.backends.base import LoadRequest

    folder = write_fake_model(tmp_path / "model", {**PHI3_MINI_SHAPED, "num_hidden_layers": layers})
    estimate = get_backend("torch").load_estimate(folder, LoadRequest(source=None, device="cpu", format=fmt))
    assert killed < estimate.peak_bytes <= ran, estimate


@pytest.mark.slow  # builds the demo's int4 variants once for the session's store
@pytest.mark.parametrize("backend", ["openvino", "onnx"])
def test_a_load_that_does_not_fit_is_refused_before_the_runtime_reads_it(backend):
    proc = run_phi3(
        "chat", "-m", "demo", "-b", backend, "-f", "int4", "-n", "4", "Hi", env={"PHI3_MEMORY_LIMIT_GB": "0.1"}
    )
    assert proc.returncode == 1, proc.stderr
    line = next(line for line in proc.stderr.splitlines() if line.startswith("Error:"))
    assert f"Loading demo on cpu ({backend}, int4) needs about" in line, proc.stderr
    assert "0.1 GB is available, so it would be killed halfway" in line and "Traceback" not in proc.stderr
    assert "Close other programs, or run a smaller model." in proc.stderr  # the hint: it is int4 already
    assert "Loaded" not in proc.stderr + proc.stdout


def _cgroup_files(folder, files: dict[str, str]):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)


def test_a_cgroup_v1_limit_is_what_is_available(tmp_path):
    """cgroup v1, as this machine has it: the limit less what the group holds beyond the file pages no process maps
    (page cache, which stays charged to the group after the process that read it ends)."""
    from phi3cli.sizing import cgroup_available

    proc = tmp_path / "cgroup"
    proc.write_text("9:pids:/\n4:memory:/box/job\n0::/\n")
    stat = (
        "cache 900000000\ntotal_inactive_file 700000000\ntotal_active_file 300000000\ntotal_mapped_file 200000000\n"
        "hierarchical_memory_limit {}\n"
    )
    job = tmp_path / "fs" / "memory" / "box" / "job"
    _cgroup_files(job, {"memory.usage_in_bytes": "1500000000", "memory.stat": stat.format(4_000_000_000)})
    assert cgroup_available(proc, tmp_path / "fs") == 4_000_000_000 - (
        1_500_000_000 - (700_000_000 + 300_000_000 - 200_000_000)
    )
    _cgroup_files(job, {"memory.stat": stat.format(9223372036854771712)})  # no limit
    assert cgroup_available(proc, tmp_path / "fs") is None


def test_a_cgroup_v2_limit_anywhere_up_the_tree_counts(tmp_path):
    """cgroup v2 (not on this machine: its files as the kernel writes them): the tightest room of the group and
    its parents; "max" is no limit."""
    from phi3cli.sizing import cgroup_available

    proc = tmp_path / "cgroup"
    proc.write_text("0::/user.slice/app\n")
    fs = tmp_path / "fs"
    _cgroup_files(fs, {"cgroup.controllers": "cpu memory\n"})
    _cgroup_files(fs / "user.slice", {"memory.max": "3000000000\n", "memory.current": "2000000000\n",
                                      "memory.stat": "anon 1500000000\ninactive_file 500000000\nactive_file 100000000\nfile_mapped 50000000\n"})  # fmt: skip
    app = fs / "user.slice" / "app"
    _cgroup_files(app, {"memory.max": "max\n", "memory.current": "1000000000\n", "memory.stat": "inactive_file 0\n"})
    assert cgroup_available(proc, fs) == 3_000_000_000 - (2_000_000_000 - 550_000_000)
    (app / "memory.max").write_text("1200000000\n")
    assert cgroup_available(proc, fs) == 200_000_000
    assert cgroup_available(tmp_path / "absent", fs) is None  # not Linux


@pytest.mark.slow  # builds the demo's fp16 IR once for the session's store
def test_inside_a_memory_cgroup_a_load_is_refused_by_the_groups_limit(demo_source, store):
    """For real: `phi3 chat` in a memory cgroup of 0.45 GB (benchmarks/memory_floor.py makes it). The machine has
    GBs free, but the group's limit is what the kernel kills at, and the check reads it: one line, at once."""
    import os
    import sys

    from benchmarks.memory_floor import run_limited
    from phi3cli.backends import get_backend
    from phi3cli.backends.base import ConvertRecipe
    from phi3cli.convert import ensure_variant

    folder = ensure_variant(get_backend("openvino"), demo_source, ConvertRecipe("fp16"), store)
    chat = [sys.executable, "-m", "phi3cli", "chat", "-m", str(folder), "-b", "openvino", "-n", "4", "Hi"]
    try:
        row = run_limited(chat, 0.45, dict(os.environ))
    except OSError as exc:
        pytest.skip(f"no memory cgroup can be made here ({exc})")
    assert row["returncode"] == 1, row
    assert "needs about 0.4 GB of memory" in row["error"], row
    available = float(row["error"].split("; ")[1].split(" GB is available")[0])
    assert available < 0.45, row


def test_memory_limit_must_be_a_number(monkeypatch):
    from phi3cli.errors import ConversionError
    from phi3cli.sizing import MEMORY_LIMIT_ENV, available_memory

    monkeypatch.setenv(MEMORY_LIMIT_ENV, "lots")
    with pytest.raises(ConversionError, match="not a number"):
        available_memory()
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "2.5")
    assert available_memory() == 2_500_000_000


def test_progress_lines_when_piped(monkeypatch):
    """Piped (no terminal), a long phase prints its share done and the time left as plain lines."""
    from rich.console import Console

    from phi3cli.cli import render

    clock = [0.0]
    monkeypatch.setattr(render, "_now", lambda: clock[0])
    buffer = io.StringIO()
    with render.RichProgress(Console(file=buffer, force_terminal=False, width=200)) as progress:
        progress.phase("Compressing weights", total=4)
        for _ in range(4):
            clock[0] += 10
            progress.advance()
    lines = buffer.getvalue().splitlines()
    shares = [line for line in lines if line.strip().startswith("Compressing weights:")]
    assert shares, lines
    assert "50% after 20 s, about 20 s left" in shares[0]  # one line per 15 s at most: not at 10 s
    assert lines[-1].startswith("✓ Compressing weights (")
