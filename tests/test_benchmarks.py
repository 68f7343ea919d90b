"""The research tools in benchmarks/: the peer benchmark's planning and figures, on phi3cli.bench's own pieces.

llama.cpp (llama-cpp-python) is a benchmark tool, never a phi3 dependency: the test that runs it skips without it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from benchmarks import bench_peers
from benchmarks import peer_builds as pb
from phi3cli.bench.stats import median_ratio, rotation
from phi3cli.generation import ReplyStats

ROOT = Path(__file__).resolve().parent.parent


def test_configurations_are_planned_with_the_baseline_and_bad_ones_refused():
    args = bench_peers.parse_args(["demo", "--config", "phi3:openvino", "--config", "ov:sym-g128-r0.6@kv=f16"])
    configs = bench_peers.plan(args)
    assert [c.name for c in configs] == ["llama:Q4_K_M", "phi3:openvino", "ov:sym-g128-r0.6@kv=f16"]
    assert configs[1].artifact == "phi3-ov" and configs[1].backend == "ov"
    assert configs[2].knobs == {"kv": "f16"} and configs[2].artifact == "ov-sym-g128-r0.6"
    for bad, words in [
        ("llama:Q3_X", "llama.cpp types here"),
        ("phi3:torch", "converting backends"),
        ("phi3:openvino@kv=u8", "threads=N only"),
        ("ov:sym-g128-zz", "unknown token"),
    ]:
        with pytest.raises(ValueError, match=words):
            pb.parse_config(bad)


def test_interleaved_rounds_rotate_and_ratios_are_medians_of_per_round_ratios():
    assert [rotation("abc", r) for r in range(4)] == [list("abc"), list("bca"), list("cab"), list("abc")]
    own = [[10.0, 12.0], [30.0], []]  # a slow round (the machine busy): both sides slow together
    base = [[5.0, 6.0], [10.0], [4.0]]
    assert median_ratio(own, base) == pytest.approx(2.5)  # median of 2.0 and 3.0; the empty round left out
    assert median_ratio([[]], [[1.0]]) is None


def test_a_workers_token_times_are_figured_as_phi3_bench_figures_them():
    run = bench_peers.timed({"prompt_tokens": 100, "times": [0.5, 0.6, 0.7, 0.9]})
    stats = ReplyStats.from_times(100, [0.5, 0.6, 0.7, 0.9])
    assert run["prefill_tps"] == pytest.approx(200.0) == stats.prefill_tps
    assert run["decode_tps"] == pytest.approx(7.5) and run["tokens"] == 4 and "times" not in run


def test_benchmarks_use_no_private_phi3cli_names_and_no_sys_path():
    for path in sorted((ROOT / "benchmarks").glob("*.py")) + sorted((ROOT / "scripts").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("phi3cli"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private and "._" not in node.module, (path.name, node.module, private)
            if isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", "") == "sys":
                raise AssertionError(f"{path.name} changes sys.path")


def measured(tmp_path, monkeypatch, *argv: str) -> dict:
    monkeypatch.chdir(ROOT)  # the workers run as `python -m benchmarks.peer_workers`
    args = bench_peers.parse_args(
        ["demo", "--work", str(tmp_path), "--prompt-tokens", "24", "--gen-tokens", "6", *argv]
    )
    return bench_peers.measure_model("demo", bench_peers.plan(args), args)


@pytest.mark.slow
def test_the_peer_benchmark_measures_phi3_and_a_bare_loop_on_the_demo(demo_source, tmp_path, monkeypatch):
    argv = ["--baseline", "phi3:openvino", "--config", "ov:phi3@kv=u8", "--rounds", "2", "--reps", "1"]
    result = measured(tmp_path, monkeypatch, *argv)
    rows = {row["config"]: row for row in result["rows"]}
    assert set(rows) == {"phi3:openvino", "ov:phi3@kv=u8"} and not any(r["errors"] for r in rows.values())
    phi3, bare = rows["phi3:openvino"], rows["ov:phi3@kv=u8"]
    assert phi3["path"] == bare["path"] and phi3["size_mb"] > 0  # the same variant, run two ways
    assert phi3["decode_ratio"] == pytest.approx(1.0)  # the baseline against itself, round by round
    assert all(len(row["runs"]) == 2 and row["decode_tps"] > 0 and row["prefill_tps"] > 0 for row in rows.values())
    # phi3's own settings, as the runtime compiled them: its KV cache in f16 on the CPU; the knob asked for u8
    assert phi3["properties"]["KV_CACHE_PRECISION"] == "f16" and bare["properties"]["KV_CACHE_PRECISION"] == "u8"
    assert phi3["kv_mb"] > bare["kv_mb"] > 0
    scores = result["quality"]
    assert scores["phi3:openvino"] == scores["ov:phi3@kv=u8"]  # one artifact, scored once
    assert scores["reference"]["ppl"] > 1 and 0 < scores["phi3:openvino"]["top1"] <= 1
    table = bench_peers.table(result["rows"], 1e10, scores)
    assert "| phi3:openvino |" in table and "transformers fp32 (reference)" in table


@pytest.mark.slow
def test_the_peer_benchmark_runs_llama_cpp_when_it_is_installed(demo_source, tmp_path, monkeypatch):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is a benchmark tool, not a phi3 dependency")
    pytest.importorskip("gguf", reason="writing the f16 .gguf needs the gguf package")
    result = measured(tmp_path, monkeypatch, "--config", "llama:Q4_0", "--baseline", "llama:Q4_0", "--no-quality")
    (row,) = result["rows"]
    assert not row["errors"] and row["decode_tps"] > 0 and row["size_mb"] > 0
    assert (tmp_path / "demo" / "gguf" / "Q4_0.gguf").is_file()
