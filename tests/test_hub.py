"""Pre-converted hub repos run by id, offline, from a real hub cache built of the demo's converted variants.

An OpenVINO IR repo (the IR at its root, as OpenVINO's org publishes them) and a multi-variant ONNX Runtime GenAI
repo (a CPU and a DirectML subfolder, as Microsoft's *-onnx repos) run as they are; bad repo shapes are refused in
one line; `phi3 models` lists and deletes hub models only as asked.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_phi3
from tests.hub_repos import demo_variants, publish

pytest.importorskip("openvino_genai")
pytest.importorskip("onnxruntime_genai")

from phi3cli.devices import DeviceReport  # noqa: E402
from phi3cli.hub import HubVariant, choose_variant  # noqa: E402

IR_REPO = "OpenVINO/demo-int4-ov"
ONNX_REPO = "microsoft/demo-instruct-onnx"
CPU_DIR = "cpu_and_mobile/cpu-int4-rtn-block-32-acc-level-4"
DML_DIR = "directml/directml-int4-awq-block-128"
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def built(demo_source, store):
    """The demo's converted folders in the shared test store: IR int4, ONNX int4 for the CPU and for DirectML."""
    return demo_variants(demo_source, store)


def publish_all(cache, built) -> None:
    readme = {"README.md": b"# a demo repo\n"}
    publish(cache, IR_REPO, {"": built["ir"]}, readme)
    publish(cache, ONNX_REPO, {CPU_DIR: built["cpu"], DML_DIR: built["dml"]}, readme)


@pytest.fixture(scope="module")
def hub_env(built, tmp_path_factory):
    """HF_HUB_CACHE holding both repos, offline, and a model store of its own (uses are recorded there)."""
    root = tmp_path_factory.mktemp("hub")
    publish_all(root / "hub", built)
    env = {"HF_HUB_CACHE": str(root / "hub"), "HF_HUB_OFFLINE": "1", "PHI3_HOME": str(root / "home")}
    return {**env, "COLUMNS": "200"}  # progress lines unwrapped


@pytest.mark.slow
def test_an_ir_repo_runs_by_its_id(hub_env):
    done = run_phi3("chat", "-m", IR_REPO, "-n", "24", QUESTION, env=hub_env)
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout
    assert f"Reading {IR_REPO} from the hub cache" in done.stderr and "openvino on CPU" in done.stderr
    assert "Converting" not in done.stderr


@pytest.mark.slow
def test_a_multi_variant_onnx_repo_picks_the_cpu_folder(hub_env):
    unreachable = {**hub_env, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}  # read from the cache
    done = run_phi3("chat", "-m", ONNX_REPO, "-d", "cpu", "-n", "24", QUESTION, env=unreachable)
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout and "onnx on CPU" in done.stderr
    picked = next(line for line in done.stderr.splitlines() if "running" in line)
    assert f"running {CPU_DIR} (int4, built for cpu" in picked and f"it also has {DML_DIR}" in picked
    assert f"--model {ONNX_REPO}:SUBFOLDER" in picked
    assert "targets DirectML" not in done.stderr
    missing = run_phi3("chat", "-m", "acme/not-cached", "Hi", env=unreachable)
    assert missing.returncode == 1 and "Could not download acme/not-cached" in missing.stderr, missing.stderr


@pytest.mark.slow
def test_repo_colon_subfolder_picks_the_other(hub_env):
    done = run_phi3("chat", "-m", f"{ONNX_REPO}:{DML_DIR}", "-d", "cpu", "-n", "24", QUESTION, env=hub_env)
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout
    assert f"Reading {ONNX_REPO}:{DML_DIR} from the hub cache" in done.stderr
    assert "targets DirectML; running it on the CPU" in done.stderr


@pytest.mark.parametrize(
    "repo, files, needle",
    [
        ("acme/pickled", {"config.json": b"{}", "pytorch_model.bin": b"\x80\x02"}, "publishes no .safetensors"),
        ("acme/readme-only", {"README.md": b"# soon\n"}, "nor a folder phi3 runs as it is"),
        ("acme/no-config", {"model.safetensors": b"\0" * 8}, "has no config.json"),
        (f"{ONNX_REPO}:cuda/cuda-fp16", None, "has no folder 'cuda/cuda-fp16' that phi3 runs"),
        (ONNX_REPO, "--backend openvino", "has folders for onnx only, not for --backend openvino"),
        (ONNX_REPO, "--device gpu", "No GPU for the onnx backend found"),
    ],
)
@pytest.mark.slow
def test_each_bad_repo_shape_gives_one_line(hub_env, repo, files, needle):
    if isinstance(files, dict):
        publish(hub_env["HF_HUB_CACHE"], repo, files=files)
    extra = files.split() if isinstance(files, str) else []
    done = run_phi3("chat", "-m", repo, *extra, "Hi", env=hub_env)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    error = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and needle in error[0], done.stderr


def variant(folder: str, devices: tuple[str, ...] | None, backend: str = "onnx") -> HubVariant:
    return HubVariant(folder, backend, (f"{folder}/model.onnx",), devices)


@pytest.mark.parametrize(
    "device, gpu_here, expected",
    [
        ("cpu", False, "cpu-int4"),
        ("auto", False, "cpu-int4"),
        ("gpu", True, "directml-int4"),  # DirectML installed: the DirectML folder
        ("auto", True, "directml-int4"),  # routing's ranks: onnx on a GPU before the CPU
        ("cpu", True, "cpu-int4"),
    ],
)
def test_variant_choice_follows_the_device_and_routing(device, gpu_here, expected):
    # What the onnx spec's folder_devices reads from each folder's genai_config.json, where DirectML is (not) here.
    variants = [
        variant("cuda-fp16", ()),
        variant("cpu-fp32", ("cpu",)),
        variant("cpu-int4", ("cpu",)),
        variant("directml-int4", ("gpu",) if gpu_here else ()),
    ]
    report = DeviceReport(cpu="test CPU", present={"onnx": (["gpu"] if gpu_here else []) + ["cpu"]})
    chosen, route = choose_variant(variants, device=device, backend=None, report=report)
    assert chosen.folder == expected
    assert (route.backend, route.device) == ("onnx", "gpu" if gpu_here and device != "cpu" else "cpu")


@pytest.mark.slow
def test_only_the_chosen_folder_is_fetched(built, tmp_path, monkeypatch):
    """What resolve asks huggingface-hub for: the marker files to choose, then the chosen folder's files alone."""
    import huggingface_hub
    from huggingface_hub import constants

    from phi3cli.sources import resolve_source
    from phi3cli.store import ModelStore

    publish(tmp_path / "hub", ONNX_REPO, {CPU_DIR: built["cpu"], DML_DIR: built["dml"]}, {"pytorch_model.bin": b"x"})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    asked, real = [], huggingface_hub.snapshot_download

    def spy(*args, **kwargs):  # the real snapshot_download, recording what it is asked for
        asked.append(kwargs.get("allow_patterns"))
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    source = resolve_source(ONNX_REPO, ModelStore(tmp_path / "home"), device="cpu")
    assert source.kind == "onnx" and source.path.name == CPU_DIR.rsplit("/", 1)[1]
    fetched = asked[-1]
    assert fetched and all(p.startswith(CPU_DIR + "/") for p in fetched), fetched
    assert {p.rsplit("/", 1)[1] for p in fetched} == {p.name for p in built["cpu"].iterdir()} - {"variant.json"}
    assert [f"{CPU_DIR}/genai_config.json", f"{DML_DIR}/genai_config.json"] in asked  # read to choose


@pytest.mark.slow
def test_models_list_shows_hub_models_and_rm_asks_for_hub_cache(built, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from phi3cli.sources import resolve_source
    from phi3cli.store import ModelStore

    cache, home = tmp_path / "hub", tmp_path / "home"
    publish_all(cache, built)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    for model in (IR_REPO, ONNX_REPO, f"{ONNX_REPO}:{DML_DIR}"):  # what chat resolves first, each use recorded
        resolve_source(model, ModelStore(home), device="cpu")
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PHI3_HOME": str(home)}
    hub = {
        (h["repo"], h["variant"]): h for h in json.loads(run_phi3("models", "list", "--json", env=env).stdout)["hub"]
    }
    assert set(hub) == {(IR_REPO, ""), (ONNX_REPO, CPU_DIR), (ONNX_REPO, DML_DIR)}
    assert hub[IR_REPO, ""]["runs_with"] == "openvino" and hub[ONNX_REPO, DML_DIR]["runs_with"] == "onnx"
    assert hub[ONNX_REPO, CPU_DIR]["size_bytes"] >= sum(p.stat().st_size for p in built["cpu"].iterdir())
    table = run_phi3("models", "list", env={**env, "COLUMNS": "200"}).stdout
    assert "Hub models phi3 ran" in table and DML_DIR in table and "--hub-cache" in table

    refused = run_phi3("models", "rm", f"{ONNX_REPO}:{DML_DIR}", "--yes", env=env)
    assert refused.returncode == 1 and "only when asked" in refused.stderr and "--hub-cache" in refused.stderr
    repo_dir = cache / ("models--" + ONNX_REPO.replace("/", "--"))
    blobs = len(list((repo_dir / "blobs").iterdir()))
    removed = run_phi3("models", "rm", hub[ONNX_REPO, DML_DIR]["id"], "--hub-cache", "--yes", env=env)
    assert removed.returncode == 0, removed.stderr
    assert not (repo_dir / "snapshots" / hub[ONNX_REPO, DML_DIR]["revision"] / DML_DIR).exists()
    published = [p for p in built["dml"].iterdir() if p.name != "variant.json"]
    assert len(list((repo_dir / "blobs").iterdir())) == blobs - len(published)
    assert all(p.is_file() for p in published)  # the store's own files (hard-linked): untouched
    again = run_phi3("chat", "-m", ONNX_REPO, "-d", "cpu", "-n", "24", QUESTION, env=env)  # the other still runs
    assert again.returncode == 0 and "Paris" in again.stdout, again.stderr
    assert f"running {CPU_DIR}" not in again.stderr  # one folder left in the cache: nothing to choose
    whole = run_phi3("models", "rm", IR_REPO, "--hub-cache", "--yes", env=env)  # the whole cached revision
    assert whole.returncode == 0, whole.stderr
    assert not (cache / ("models--" + IR_REPO.replace("/", "--"))).exists() and repo_dir.is_dir()
    left = {(h["repo"], h["variant"]) for h in json.loads(run_phi3("models", "list", "--json", env=env).stdout)["hub"]}
    assert left == {(ONNX_REPO, CPU_DIR)}


def test_rm_by_hub_id_names_the_variants_converted_from_it(tmp_path):
    from phi3cli.inventory import StoreInventory
    from phi3cli.store import ModelStore, VariantKey

    store = ModelStore(tmp_path / "home")
    key = VariantKey(source="hub--acme--phi3", backend="onnx", format="int4", target="cpu")
    with store.build_variant(key, source_spec="acme/phi3", versions={}) as out:
        (out / "genai_config.json").write_text("{}")
    found = StoreInventory(store).find_entries("acme/phi3")
    assert [e.path for e in found] == [store.variant_dir(key)]
