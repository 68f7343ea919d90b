"""The one loading path (phi3cli.loading), driven with a FAKE backend registered for the test: no real runtime."""

from __future__ import annotations

from pathlib import Path

import pytest

from phi3cli.store import ModelStore
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
    from phi3cli.bench.measure import Job, measure_configuration

    folder = write_fake_model(tmp_path / "model")
    shared = fake_store.cache_dir("fake")
    (shared / BLOB).write_text("compiled by an earlier run")  # what makes a load warm
    job = Job(
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
