"""Short model names from the catalogue, run offline from a real hub cache laid out under the catalogue's real repo
ids and subfolders (the demo's converted folders stand in for the publishers' weights).

A name (or its source repo's id) runs the ready-made variant for the device routing picks, reading that folder
alone; offline, only what the cache holds counts and an empty cache says what to pull and which folder to copy;
`phi3 models catalog` marks what is on disk; an unknown name suggests close ones.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.conftest import run_phi3
from tests.hub_repos import demo_variants, publish, resolve

pytest.importorskip("openvino_genai")
pytest.importorskip("onnxruntime_genai")

from phi3cli.backends import (
    DEVICES,  # noqa: E402
    registry,  # noqa: E402
)
from phi3cli.catalog import catalog, choose, find  # noqa: E402
from phi3cli.devices import DeviceReport  # noqa: E402
from phi3cli.hub import HUB_ID  # noqa: E402
from phi3cli.sources import OTHER_PHI_MODELS, SUPPORTED_MODEL_TYPES, vision_model_types  # noqa: E402

IR = "OpenVINO/Phi-3-mini-4k-instruct-int4-ov"
ONNX = "microsoft/Phi-3-mini-4k-instruct-onnx"
CPU_ACC = "cpu_and_mobile/cpu-int4-rtn-block-32-acc-level-4"
CPU_RTN = "cpu_and_mobile/cpu-int4-rtn-block-32"
DML = "directml/directml-int4-awq-block-128"
NPU_35 = "OpenVINO/Phi-3.5-mini-instruct-int4-cw-ov"
SOURCE = "microsoft/Phi-3-mini-4k-instruct"
REASONING = "microsoft/Phi-4-mini-reasoning"  # a name whose only variant is for GPUs
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def built(demo_source, store):
    return demo_variants(demo_source, store)


def publish_mini(cache, built, *, ir: bool = True, onnx: bool = True) -> None:
    """phi-3-mini's IR repo and its multi-variant ONNX repo (a CPU folder twice, a DirectML one)."""
    if ir:
        publish(cache, IR, {"": built["ir"]})
    if onnx:
        publish(cache, ONNX, {CPU_ACC: built["cpu"], CPU_RTN: built["cpu"], DML: built["dml"]})


@pytest.fixture(scope="module")
def hub_env(built, demo_source, tmp_path_factory):
    root = tmp_path_factory.mktemp("catalog")
    publish_mini(root / "hub", built)
    publish(root / "hub", NPU_35, {"": built["ir"]})
    publish(root / "hub", REASONING, {"": demo_source.path})
    env = {"HF_HUB_CACHE": str(root / "hub"), "HF_HUB_OFFLINE": "1", "PHI3_HOME": str(root / "home")}
    return {**env, "COLUMNS": "250"}


def test_every_entry_is_well_formed_and_cites_its_sources():
    models = catalog()
    assert {"phi-3-mini", "phi-3-mini-128k", "phi-3-medium", "phi-3-medium-128k", "phi-3.5-mini", "phi-4-mini"} <= set(
        models
    )
    assert {"phi-3.5-vision", "phi-4-multimodal"} <= set(models)
    for model in models.values():
        assert HUB_ID.match(model.source) and model.source_cited, model.name
        assert model.source_type in (*SUPPORTED_MODEL_TYPES, *vision_model_types(), *OTHER_PHI_MODELS), model.name
        assert model.variants, model.name
        for v in model.variants:
            assert HUB_ID.match(v.repo) and not v.folder.startswith("/"), v
            assert v.runtime in registry() and set(v.devices) <= set(DEVICES) and v.devices, v
            assert v.precision in ("int4", "int8", "fp16") and v.provider in (None, "dml", "cuda"), v
            assert v.cited and all(u.startswith("https://") for u in v.cited), v
            assert (v.size_gb is None) == (v.size_of is None), v
    assert find("PHI-3-MINI") is find("microsoft/phi-3-mini-4k-instruct") is models["phi-3-mini"]


def report(**present: list[str]) -> DeviceReport:
    return DeviceReport(cpu="test CPU", present={b: devs for b, devs in present.items()})


BOTH_CPU = {"openvino": ["cpu"], "onnx": ["cpu"]}


@pytest.mark.parametrize(
    "name, present, device, backend, expected, on",
    [
        ("phi-3-mini", BOTH_CPU, "auto", None, IR, "cpu"),  # int4 on the CPU, OpenVINO ranked first there
        ("phi-3-mini", BOTH_CPU, "cpu", "onnx", f"{ONNX}:{CPU_ACC}", "cpu"),
        ("phi-3-mini", {"openvino": ["npu", "cpu"], "onnx": ["cpu"]}, "npu", None, "-int4-cw-ov", "npu"),
        ("phi-3-mini", {"openvino": ["npu", "cpu"], "onnx": ["cpu"]}, "auto", None, "-int4-cw-ov", "npu"),
        ("phi-3-mini", {"openvino": ["cpu"], "onnx": ["gpu", "cpu"]}, "gpu", None, f"{ONNX}:{DML}", "gpu"),
        ("phi-3-mini", {"openvino": ["gpu", "cpu"], "onnx": ["gpu", "cpu"]}, "gpu", None, IR, "gpu"),
        ("phi-3-medium-128k", BOTH_CPU, "auto", None, "-onnx-cpu:cpu-int4-rtn-block-32-acc-level-4", "cpu"),
        (
            "phi-3.5-mini",
            {"openvino": ["cpu"], "onnx": ["gpu", "cpu"]},
            "gpu",
            None,
            ":gpu/gpu-int4-awq-block-128",
            "gpu",
        ),
        ("phi-3.5-vision", BOTH_CPU, "auto", None, "OpenVINO/Phi-3.5-vision-instruct-int4-ov", "cpu"),
        ("phi-3.5-vision", BOTH_CPU, "cpu", "onnx", "-onnx:cpu_and_mobile/cpu-int4-rtn-block-32-acc-level-4", "cpu"),
        (
            "phi-3.5-vision",
            {"openvino": ["cpu"], "onnx": ["gpu", "cpu"]},
            "gpu",
            None,
            ":gpu/gpu-int4-rtn-block-32",
            "gpu",
        ),
        (
            "phi-4-multimodal",
            {"openvino": ["cpu"], "onnx": ["gpu", "cpu"]},
            "auto",
            None,
            "-onnx:gpu/gpu-int4-rtn-block-32",
            "gpu",
        ),
    ],
)
def test_the_variant_follows_the_device_routing_picks(name, present, device, backend, expected, on):
    chosen = choose(catalog()[name], report(**present), device=device, backend=backend)
    assert chosen is not None and chosen[0].spec.endswith(expected) and chosen[1] == on, chosen


def test_a_folder_for_a_provider_missing_here_is_passed_over():
    """Where DirectML is not installed (what the onnx spec reads from the folder's genai_config.json), CUDA's."""
    chosen = choose(
        catalog()["phi-3-mini"],
        report(onnx=["gpu", "cpu"]),
        device="gpu",
        fits=lambda v, on: v.provider != "dml",
    )
    assert chosen is not None and chosen[0].folder == "cuda/cuda-int4-rtn-block-32"
    assert choose(catalog()["phi-4-mini-reasoning"], report(**BOTH_CPU), device="cpu") is None
    assert choose(catalog()["phi-4-multimodal"], report(**BOTH_CPU)) is None  # Microsoft's only folder is for GPUs


@pytest.mark.slow
def test_format_picks_the_variant_at_that_precision_or_none(built, demo_source, in_cache, tmp_path):
    chosen = choose(catalog()["phi-3-mini"], report(**BOTH_CPU), device="cpu", precision="int8")
    assert chosen is not None and chosen[0].repo == "OpenVINO/Phi-3-mini-4k-instruct-int8-ov"
    publish_mini(in_cache, built)
    publish(in_cache, SOURCE, {"": demo_source.path})
    source, notes = resolve("phi-3-mini", tmp_path, device="cpu", format="fp16")  # no fp16 variant for the CPU
    assert source.spec == SOURCE and any("at fp16" in n and "converting its source" in n for n in notes), notes


@pytest.mark.slow
def test_a_name_runs_the_ready_made_variant_for_the_device(hub_env):
    done = run_phi3("chat", "-m", "phi-3-mini", "-d", "cpu", "-n", "24", QUESTION, env=hub_env)
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout and "Converting" not in done.stderr
    picked = [line for line in done.stderr.splitlines() if line.startswith("phi-3-mini →")]
    assert len(picked) == 1 and f"{IR} (openvino int4, 2.15 GB)" in picked[0], done.stderr
    assert "routing runs openvino on cpu" in picked[0] and "--convert" in picked[0]
    assert f"Reading {IR} from the hub cache" in done.stderr


@pytest.mark.slow
def test_the_source_id_behaves_as_the_name(hub_env):
    done = run_phi3("chat", "-m", SOURCE, "-d", "cpu", "-b", "onnx", "-n", "24", QUESTION, env=hub_env)
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout and f"phi-3-mini → {ONNX}:{CPU_ACC}" in done.stderr
    assert f"Reading {ONNX}:{CPU_ACC} from the hub cache" in done.stderr


@pytest.mark.slow
def test_only_the_chosen_folder_is_read(built, in_cache, tmp_path, monkeypatch):
    import huggingface_hub

    publish_mini(in_cache, built)
    asked, real = [], huggingface_hub.snapshot_download

    def spy(repo, *args, **kwargs):  # the real snapshot_download, recording what it is asked for
        asked.append((repo, kwargs.get("allow_patterns")))
        return real(repo, *args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    source, _ = resolve("phi-3-mini", tmp_path, device="cpu", backend="onnx")
    assert source.kind == "onnx" and source.spec == f"{ONNX}:{CPU_ACC}"
    fetched = [patterns for repo, patterns in asked if repo == ONNX and patterns != ["\0"]]
    assert fetched and all(p.startswith(CPU_ACC + "/") for p in fetched[-1]), fetched
    assert {p.rsplit("/", 1)[1] for p in fetched[-1]} == {p.name for p in built["cpu"].iterdir()} - {"variant.json"}
    assert all(p.startswith(CPU_ACC + "/") for patterns in fetched for p in patterns)  # nor another folder's marker
    assert {repo for repo, _ in asked} == {ONNX}


@pytest.mark.slow
def test_offline_with_nothing_cached_says_what_to_pull_and_which_folder_to_copy(hub_env, tmp_path):
    env = {**hub_env, "HF_HUB_CACHE": str(tmp_path / "empty")}
    done = run_phi3("chat", "-m", "phi-3.5-mini", "-d", "cpu", "Hi", env=env)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    text = " ".join(done.stderr.split())
    assert "phi-3.5-mini is not in the local hub cache and HF_HUB_OFFLINE is set" in text
    assert "OpenVINO/Phi-3.5-mini-instruct-int4-ov" in text
    assert "phi3 models pull phi-3.5-mini --device cpu" in text
    assert "models--OpenVINO--Phi-3.5-mini-instruct-int4-ov" in text and str(tmp_path / "empty") in text


@pytest.mark.slow
def test_offline_the_variant_the_cache_holds_is_taken(built, in_cache, tmp_path):
    publish_mini(in_cache, built, ir=False)  # the IR preferred on the CPU is not there; the ONNX folders are
    source, notes = resolve("phi-3-mini", tmp_path, device="cpu")
    assert source.spec == f"{ONNX}:{CPU_ACC}"
    assert any(f"{IR}, preferred here, is not" in n and "offline" in n for n in notes), notes


@pytest.mark.slow
def test_with_no_variant_for_the_device_the_cached_source_is_converted(demo_source, in_cache, tmp_path):
    publish(in_cache, REASONING, {"": demo_source.path})
    source, notes = resolve("phi-4-mini-reasoning", tmp_path, device="cpu")
    assert source.kind == "hub" and source.spec == REASONING
    assert any(f"converting its source {REASONING} instead" in n for n in notes), notes


@pytest.mark.slow
def test_convert_takes_the_source(built, demo_source, in_cache, tmp_path):
    publish_mini(in_cache, built)
    publish(in_cache, SOURCE, {"": demo_source.path})
    source, notes = resolve("phi-3-mini", tmp_path, device="cpu", convert=True)
    assert source.kind == "hub" and source.spec == SOURCE and "converting its source" in notes[0]


@pytest.mark.slow
def test_models_catalog_marks_what_is_on_disk(hub_env):
    done = run_phi3("models", "catalog", "--json", env=hub_env)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    on_disk = {(v["repo"], v["folder"]) for m in data["models"] for v in m["variants"] if v["on_disk"]}
    assert on_disk == {(IR, ""), (ONNX, CPU_ACC), (ONNX, CPU_RTN), (ONNX, DML), (NPU_35, "")}
    sources = {m["name"]: m["source"]["on_disk"] for m in data["models"]}
    assert sources["phi-4-mini-reasoning"] and not sources["phi-3-mini"]
    assert all(v["cited"] for m in data["models"] for v in m["variants"])
    table = run_phi3("models", "catalog", env=hub_env).stdout
    row = next(line for line in table.splitlines() if line.strip().startswith(IR))
    assert re.search(r"openvino int4\s+cpu, gpu\s+2.15 GB\s+yes", row), row


@pytest.mark.slow
def test_pull_fetches_the_variant_for_a_device_this_machine_lacks(hub_env):
    done = run_phi3("models", "pull", "phi-3.5-mini", "--device", "npu", env=hub_env)
    assert done.returncode == 0, done.stderr
    assert f"Pulled phi-3.5-mini → {NPU_35}" in " ".join(done.stdout.split())
    assert "models--OpenVINO--Phi-3.5-mini-instruct-int4-cw-ov" in " ".join(done.stdout.split())
    assert "this machine cannot run it" in done.stderr


@pytest.mark.parametrize(
    "args, needles",
    [
        (["-m", "phi-3-mni"], ["No model named 'phi-3-mni'", "Did you mean phi-3-mini"]),
        (["-m", "phi-3-mini", "-d", "gpu"], ["phi-3-mini has no GPU variant that runs here", "Windows with DirectML"]),
    ],
)
@pytest.mark.slow
def test_bad_names_and_devices_give_one_line(hub_env, args, needles):
    done = run_phi3("chat", *args, "Hi", env=hub_env)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    error = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and all(n in error[0] for n in needles), done.stderr
