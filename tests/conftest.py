"""Shared fixtures: one model store for the whole test run, and the real demo model in it.

The store lives in .phi3-test-home/ at the repository root (or $PHI3_TEST_HOME), so the demo model
and converted variants are built once and reused by later runs; every build goes through the same
locks and atomic staging the tool uses.

Two tiers: `pytest -m "not slow"` runs in minutes and never builds or runs a real model (what only needs a model's
interface uses tests/fakes/scripted_model.py); plain `pytest` runs everything. A test that asks for the real demo
model (REAL_MODEL_FIXTURES) must be marked slow: collection stops otherwise, and a test that reaches the demo model
another way (request.getfixturevalue, a fixture of its own) fails when it first does.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TEST_HOME = Path(os.environ.get("PHI3_TEST_HOME", ROOT / ".phi3-test-home"))
os.environ["PHI3_HOME"] = str(TEST_HOME)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Questions whose greedy answers the backends are compared on.
PROMPTS = [
    "What is the capital of France?",
    "Name three colours of the rainbow.",
    "Write one sentence about the sea.",
]


# Fixtures that build or load the real demo model: a test that uses one is slow.
REAL_MODEL_FIXTURES = {"demo_source", "torch_model"}


def pytest_collection_modifyitems(config, items):
    unmarked = [
        item.nodeid
        for item in items
        if REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())) and not item.get_closest_marker("slow")
    ]
    if unmarked:
        raise pytest.UsageError(
            "These tests use the real demo model but are not marked slow (@pytest.mark.slow):\n  "
            + "\n  ".join(unmarked)
        )


RUNNING: list = []  # the test whose fixtures are being set up


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    RUNNING[:] = [item]


@pytest.fixture(scope="session")
def store():
    from phi3cli.store import ModelStore

    return ModelStore(TEST_HOME)


@pytest.fixture(scope="session")
def demo_source(store):
    """The real demo model (built from the PyPI wheel on first use)."""
    from phi3cli.sources import resolve_source

    if RUNNING and not RUNNING[0].get_closest_marker("slow"):
        pytest.fail(f"{RUNNING[0].nodeid} builds or loads the real demo model but is not marked slow")

    return resolve_source("demo", store)


@pytest.fixture(scope="session")
def torch_model(demo_source, store):
    """The reference: the demo model on transformers, fp32, CPU."""
    from phi3cli.loading import load
    from phi3cli.routing import given

    model = load(demo_source, route=given("torch", "cpu"), format="fp32", store=store)
    yield model
    model.close()


@pytest.fixture(scope="session")
def config_only_model(tmp_path_factory) -> Path:
    """A folder that resolves as a Phi-3 model (its config.json, no weights): for errors raised before loading."""
    from tests.fakes.scripted_model import write_fake_model

    return write_fake_model(tmp_path_factory.mktemp("config-only") / "model")


def tiny_multimodal_builder():
    """scripts/make_tiny_multimodal.py as a module: the builder users run (build, build_onnx)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_tiny_multimodal", ROOT / "scripts" / "make_tiny_multimodal.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _built_once(name: str, marker: str, store, build) -> str:
    """TEST_HOME/sources/name, built by build(staging) under the store's lock unless marker is already there."""
    from phi3cli.util import atomic_output

    final = TEST_HOME / "sources" / name
    with store.lock(name):
        if not (final / marker).is_file():
            with atomic_output(final, force=True) as staging:
                build(staging)
    return str(final)


@pytest.fixture(scope="session")
def tiny_multimodal(store) -> str:
    """The tiny Phi-4-multimodal's Hugging Face folder, built once into the test store (a few seconds)."""
    return _built_once("tiny-phi4-multimodal", "model.safetensors", store, tiny_multimodal_builder().build)


@pytest.fixture(scope="session")
def tiny_multimodal_onnx(tiny_multimodal, store) -> str:
    """The tiny Phi-4-multimodal as an ONNX Runtime GenAI folder (phi4mm), built once into the store (about 7 s)."""
    builder = tiny_multimodal_builder()
    return _built_once("tiny-phi4-multimodal-onnx", "genai_config.json", store,
                       lambda staging: builder.build_onnx(Path(tiny_multimodal), staging))  # fmt: skip


def png(seed: int, size=(60, 90)) -> bytes:
    """A PNG of random pixels (height x width), the same for the same seed."""
    import io

    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """Two different images, p1.png and p2.png (90x60)."""
    folder = tmp_path_factory.mktemp("pictures")
    for seed in (1, 2):
        (folder / f"p{seed}.png").write_bytes(png(seed))
    return folder


def plugin_env(site: Path, name: str, spec: str) -> dict:
    """Environment for a `phi3` subprocess that finds the backend `name = spec` through its entry point, exactly as
    a plugin package's metadata would declare it (a dist-info folder in site, on PYTHONPATH)."""
    dist = site / f"phi3_{name}_backend-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: phi3-{name}-backend\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[phi3cli.backends]\n{name} = {spec}\n")
    return {"PYTHONPATH": os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")])}


def run_phi3(*args: str, input: str | None = None, env: dict | None = None, timeout: float = 600):
    """Run the real `phi3` command in a subprocess, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "phi3cli", *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def in_cache(monkeypatch, tmp_path):
    """An empty hub cache for this test, offline, used in this process (HF_HUB_CACHE as huggingface-hub reads it)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hub"
