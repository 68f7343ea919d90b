"""The one loading path (phi3cli.loading), driven with a FAKE backend registered for the test: no real runtime."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from phi3cli.store import ModelStore
from tests.conftest import plugin_env, run_phi3
from tests.fakes import scripted_model
from tests.fakes.scripted_model import BLOB, write_fake_model


@pytest.fixture
def fake_backend(monkeypatch):
    """The FAKE backend in this process's registry, with an empty record of what it loaded."""
    from phi3cli.backends import registry

    monkeypatch.setitem(registry(), "fake", scripted_model.SPEC)
    monkeypatch.setattr(scripted_model.FakeScriptedBackend, "loads", [])
    return scripted_model.FakeScriptedBackend


@pytest.fixture
def fake_store(tmp_path) -> ModelStore:
    return ModelStore(tmp_path / "home")


def test_bench_cold_load_starts_from_an_empty_runtime_cache_of_its_own(fake_backend, fake_store, tmp_path):
    from phi3cli.bench.measure import MeasureJob, measure_configuration

    folder = write_fake_model(tmp_path / "model")
    shared = fake_store.cache_dir("fake")
    (shared / BLOB).write_text("compiled by an earlier run")  # what makes a load warm
    job = MeasureJob(
        model=str(folder),
        backend="fake",
        device="cpu",
        format="fake",
        prompt_tokens=[8],
        gen_tokens=2,
        warmup=0,
        repetitions=1,
        quality=False,
    )
    result = measure_configuration(job, fake_store)
    (cold, cold_held), (warm, warm_held) = fake_backend.loads
    assert Path(cold.cache_dir) != shared and not cold_held  # cold: an empty cache of its own
    assert warm.cache_dir == cold.cache_dir and warm_held  # warm: what the cold load wrote
    assert not Path(cold.cache_dir).exists()  # removed afterwards
    assert result["load_cold_s"] >= 0 and result["runs"][0]["reps"][0]["tokens"] == 2


def test_a_route_taken_while_resolving_is_not_probed_again(fake_backend, fake_store, tmp_path, monkeypatch):
    """A hub repo's folder is chosen by routing; the loader takes that route instead of probing and routing again."""
    from phi3cli.loading import load
    from phi3cli.routing import Route
    from phi3cli.sources import ModelSource

    folder = write_fake_model(tmp_path / "model")
    kept = Route("fake", "cpu", "auto: picked cpu with fake while choosing the repo's folder")
    source = ModelSource("acme/fake", "folder", folder, "hub--acme--fake", kept)

    def no_probe(*args, **kwargs):
        raise AssertionError("probed again")

    monkeypatch.setattr("phi3cli.devices.probe", no_probe)
    model = load(source, store=fake_store)
    assert model.route is kept and model.device == "cpu"
    with pytest.raises(AssertionError, match="probed again"):  # asked for another backend: routed anew
        load(source, backend="torch", store=fake_store)


@pytest.fixture(scope="module")
def fake_plugin(tmp_path_factory) -> tuple[dict, Path]:
    """(environment, model folder): a `phi3` subprocess that has the FAKE backend, and a model folder it loads."""
    home = tmp_path_factory.mktemp("fake-plugin")
    env = plugin_env(home / "site", "fake", "tests.fakes.scripted_model:SPEC")
    return {**env, "PHI3_HOME": str(home / "store"), "COLUMNS": "200"}, write_fake_model(home / "model")


def test_chat_loads_through_the_one_path_and_says_the_route(fake_plugin):
    env, folder = fake_plugin
    done = run_phi3("chat", "-m", str(folder), "-b", "fake", "Hello there", env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "You said: Hello there\n"
    assert "auto: picked cpu with fake" in done.stderr and "fake on CPU" in done.stderr  # the route, then the figures


def test_a_device_the_backend_does_not_run_on_is_refused_before_loading(fake_plugin):
    env, folder = fake_plugin
    done = run_phi3("chat", "-m", str(folder), "-b", "fake", "-d", "gpu", "Hello", env=env)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "The fake backend runs on cpu, not gpu." in done.stderr and "Use --device cpu" in done.stderr


def test_serve_loads_through_the_one_path(fake_plugin, tmp_path):
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    from tests.test_serve import free_port

    env, folder = fake_plugin
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "phi3cli", "serve", "-m", str(folder), "-b", "fake", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
        )
        try:
            deadline = time.monotonic() + 60
            while True:
                assert server.poll() is None and time.monotonic() < deadline, log.read_text()
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as answer:
                        health = json.loads(answer.read())
                    break
                except OSError:
                    time.sleep(0.2)
        finally:
            server.send_signal(signal.SIGINT)
            server.wait(30)
    assert health["backend"] == "fake" and health["model"] == str(folder)
    text = log.read_text()
    assert "auto: picked cpu with fake" in text and "fake fake on CPU" in text and "Server stopped" in text
