"""A backend added from outside phi3: one file (tests/toy_backend.py) and one entry point, nothing else.

A dist-info folder on PYTHONPATH declares `toy = tests.toy_backend:SPEC` in the `phi3cli.backends` group, exactly
as a plugin package's metadata would; the real `phi3` then finds it for `devices`, `chat` and `bench`.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import plugin_env as plugin_env_in
from tests.conftest import run_phi3


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory):
    return plugin_env_in(tmp_path_factory.mktemp("site"), "toy", "tests.toy_backend:SPEC")


def test_the_registry_finds_the_plugin_beside_the_built_in_ones(plugin_env):
    done = run_phi3("devices", env={**plugin_env, "COLUMNS": "200"})
    assert done.returncode == 0, done.stderr
    rows = {line.split("│")[1].strip() for line in done.stdout.splitlines() if line.count("│") > 3}
    assert {"toy", "openvino", "onnx", "torch"} <= rows, done.stdout
    assert "a greedy decode loop" in done.stdout or "toy backend" in done.stdout


def test_without_the_entry_point_there_is_no_toy_backend(config_only_model):
    done = run_phi3("chat", "-m", str(config_only_model), "-b", "toy", "Hi")
    assert done.returncode == 1 and "Unknown backend 'toy'" in done.stderr


@pytest.mark.slow
def test_chat_runs_on_the_plugin(plugin_env, demo_source):
    done = run_phi3("chat", "-m", "demo", "-b", "toy", "-n", "12", "What is the capital of France?", env=plugin_env)
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout
    assert "toy on CPU" in done.stderr


@pytest.mark.slow
def test_bench_measures_the_plugin(plugin_env, demo_source, tmp_path):
    out = tmp_path / "toy.json"
    args = ["bench", "-m", "demo", "-b", "toy", "-p", "8", "-n", "4", "-r", "1", "--warmup", "0", "--no-quality"]
    done = run_phi3(*args, "--json", str(out), env={**plugin_env, "COLUMNS": "200"})
    assert done.returncode == 0, done.stdout + done.stderr
    (row,) = json.loads(out.read_text())["results"]
    assert (row["backend"], row["device"], row["format"], row["status"]) == ("toy", "cpu", "fp32", "ok")
    assert row["runs"][0]["tokens_counted"] == [4]
