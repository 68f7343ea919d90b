"""Model sources: .gguf files (dequantized once into the store), local folders, and their bad forms."""

from __future__ import annotations

import pytest

from phi3cli.errors import UnsupportedModelError
from phi3cli.sources import resolve_source
from tests.conftest import run_phi3
from tests.gguf_files import write_header_only_gguf, write_phi3_gguf


@pytest.fixture(scope="session")
def phi3_gguf(demo_source, tmp_path_factory):
    return write_phi3_gguf(demo_source.path, tmp_path_factory.mktemp("gguf") / "demo-phi3.gguf")


@pytest.mark.slow
def test_phi3_gguf_is_materialised_once_with_the_same_weights(phi3_gguf, store, torch_model):
    from phi3cli.loading import load
    from phi3cli.routing import given

    source = resolve_source(str(phi3_gguf), store)
    assert source.kind == "gguf" and source.runtime is None
    model = load(source, route=given("torch", "cpu"), store=store)
    assert model.path == store.source_dir(source.slug)
    assert type(model.model).__name__ == "Phi3ForCausalLM"
    ids = torch_model.encode(torch_model.chat_template.render([{"role": "user", "content": "Hi there"}]))
    ours, reference = model.token_logprobs(ids), torch_model.token_logprobs(ids)
    assert max(abs(a - b) for a, b in zip(ours, reference, strict=True)) < 1e-4
    # The second resolve reuses the materialised folder.
    before = model.path.stat().st_mtime_ns
    assert resolve_source(str(phi3_gguf), store).hf_dir(store) == model.path
    assert model.path.stat().st_mtime_ns == before
    model.close()


@pytest.mark.slow
def test_phi3_gguf_chats_through_the_cli(phi3_gguf):
    done = run_phi3("chat", "-m", str(phi3_gguf), "-b", "torch", "-n", "8", "Hi")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()


def test_gguf_of_another_architecture_is_refused(tmp_path):
    path = write_header_only_gguf(tmp_path / "llama.gguf", "llama")
    with pytest.raises(UnsupportedModelError, match="'llama' .gguf, not Phi-3"):
        resolve_source(str(path))


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    bogus = tmp_path / "weights.gguf"
    bogus.write_bytes(b"not a gguf at all")
    with pytest.raises(UnsupportedModelError, match="not a readable .gguf"):
        resolve_source(str(bogus))
    other = tmp_path / "model.bin"
    other.write_bytes(b"\0")
    with pytest.raises(UnsupportedModelError, match="not a .gguf model"):
        resolve_source(str(other))


@pytest.mark.slow
def test_local_hf_folder_is_a_source(demo_source):
    source = resolve_source(str(demo_source.path))
    assert source.kind == "folder" and source.path == demo_source.path.resolve()


def fake_hub_cache(hf_home, repo_id: str, files: dict) -> None:
    """Lay out huggingface-hub's cache for repo_id as a completed download would (snapshot + refs/main)."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    for name, target in files.items():
        (snapshot / name).symlink_to(target)


@pytest.mark.slow
def test_hub_id_resolves_from_the_hub_cache_offline(demo_source, tmp_path):
    files = {p.name: p for p in demo_source.path.iterdir() if p.is_file()}
    fake_hub_cache(tmp_path, "acme/phi3-demo", files)
    env = {"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    done = run_phi3("chat", "-m", "acme/phi3-demo", "-b", "torch", "What is the capital of France?", env=env)
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout


@pytest.mark.slow
def test_hub_model_without_safetensors_is_refused(demo_source, tmp_path):
    files = {p.name: p for p in demo_source.path.iterdir() if p.is_file() and p.suffix != ".safetensors"}
    fake_hub_cache(tmp_path, "acme/pickled-only", files)
    env = {"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    done = run_phi3("chat", "-m", "acme/pickled-only", "-b", "torch", "hi", env=env)
    assert done.returncode == 1 and "publishes no .safetensors" in done.stderr, done.stderr


def test_gguf_of_another_architecture_is_refused_through_the_cli(tmp_path):
    path = write_header_only_gguf(tmp_path / "llama.gguf", "llama")
    done = run_phi3("chat", "-m", str(path), "hi")
    assert done.returncode == 1 and "'llama' .gguf, not Phi-3" in done.stderr and "Traceback" not in done.stderr
