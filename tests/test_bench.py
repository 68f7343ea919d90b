"""`phi3 bench` on the real demo model over torch, OpenVINO and ONNX: structure and consistency, never timings."""

from __future__ import annotations

import csv
import io
import json
import sys

import pytest

from phi3cli.backends.openvino.kvcache import BLOCK_TOKENS
from phi3cli.bench import report as schema
from phi3cli.bench.compare import parse_margin
from phi3cli.bench.config import (
    BenchSettings,
    Configuration,
    baseline_configurations,
    plan_configurations,
    settings_with_baseline,
)
from phi3cli.bench.quality import agreement, agreement_prompts, perplexity_text
from phi3cli.bench.stats import summarize
from phi3cli.devices import DeviceReport
from phi3cli.errors import Phi3Error
from tests.conftest import run_phi3

PROMPTS = (8, 16)
GEN = 4
REPS = 2
TURNS = 2
MEASURED = {("torch", "cpu", "fp32"), ("openvino", "cpu", "int4"), ("onnx", "cpu", "int4"), ("onnx", "cpu", "fp32")}
ARGS = [
    "bench",
    "--model",
    "demo",
    *("-b", "torch", "-b", "openvino", "-b", "onnx"),
    *("-d", "cpu", "-d", "npu"),  # no NPU here: openvino npu must fail alone, the others still run
    *("-f", "fp32", "-f", "int4"),
    *("-p", ",".join(map(str, PROMPTS)), "-n", str(GEN), "-r", str(REPS), "--warmup", "0"),
    *("--agreement-tokens", "16", "--threads", "2", "--turns", str(TURNS)),
    *("-o", "kv_cache_precision=f16"),  # openvino's CPU default: the figures are those without it
]


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """One real bench run with every output written; (completed process, report, folder)."""
    out = tmp_path_factory.mktemp("bench")
    files = ["--json", str(out / "run.json"), "--csv", str(out / "run.csv"), "--markdown", str(out / "run.md")]
    files += ["--plot", str(out / "run.png")]
    done = run_phi3(*ARGS, *files, env={"COLUMNS": "200"})
    assert done.returncode == 0, done.stdout + done.stderr
    return done, json.loads((out / "run.json").read_text()), out


def _rows(report):
    return {(r["backend"], r["device"], r["format"]): r for r in report["results"]}


@pytest.mark.slow
def test_schema_keys_are_the_documented_ones(bench_run):
    _, report, _ = bench_run
    assert report["schema"] == schema.SCHEMA
    assert tuple(report) == schema.REPORT_KEYS
    assert tuple(report["model"]) == schema.MODEL_KEYS
    assert tuple(report["machine"]) == schema.MACHINE_KEYS
    assert tuple(report["settings"]) == schema.SETTINGS_KEYS
    assert report["settings"]["options"] == {"kv_cache_precision": "f16"}  # given to openvino's rows, not the others
    for row in report["results"]:
        assert tuple(row) == schema.RESULT_KEYS, row["backend"]
        assert tuple(row["quality"]) == schema.QUALITY_KEYS
        for run in row["runs"]:
            assert tuple(run) == schema.RUN_KEYS
            for key in schema.RUN_KEYS[3:]:
                assert tuple(run[key]) == schema.FIGURE_KEYS
        for test in row["multi_turn"]:
            assert tuple(test) == schema.MULTI_TURN_KEYS
            assert all(tuple(figure) == schema.FIGURE_KEYS for figure in [*test["ttft_ms"], test["ttft_growth"]])
    # Every key the module docstring documents is in the report, and the other way round.
    keys = (*schema.REPORT_KEYS, *schema.SETTINGS_KEYS, *schema.RESULT_KEYS, *schema.RUN_KEYS, *schema.QUALITY_KEYS)
    for key in (*keys, *schema.MULTI_TURN_KEYS):
        assert key in schema.__doc__, key


@pytest.mark.slow
def test_every_backend_ran_and_counted_exactly_the_tokens_asked(bench_run):
    _, report, _ = bench_run
    rows = _rows(report)
    assert report["settings"]["prompt_tokens"] == list(PROMPTS)
    assert report["settings"]["threads"] == 2
    for key in MEASURED:
        row = rows[key]
        assert row["status"] == "ok", f"{key}: {row['reason']}"
        assert "CPU" in row["executed_device"].upper()
        assert row["image"] is None  # a text-only model runs no image test
        assert [run["prompt_tokens"] for run in row["runs"]] == list(PROMPTS)
        for run in row["runs"]:
            assert run["gen_tokens"] == GEN
            # Fails loudly when a backend does not honour ignore_eos.
            assert run["tokens_counted"] == [GEN] * REPS, f"{key} generated {run['tokens_counted']}, asked {GEN}"
            for name in ("ttft_ms", "prefill_tps", "tpot_ms", "decode_tps", "e2e_tps"):
                figure = run[name]
                assert figure["n"] == REPS and len(figure["values"]) == REPS
                assert all(v > 0 for v in figure["values"]), (key, name, figure)
                assert figure["min"] <= figure["mean"] <= figure["max"] and figure["std"] >= 0
            # The figures hang together: prefill rate is prompt over TTFT, decode rate the inverse of TPOT.
            ttft, prefill = run["ttft_ms"]["values"], run["prefill_tps"]["values"]
            assert all(
                abs(p * t / 1000 - run["prompt_tokens"]) < 1e-6 * run["prompt_tokens"]
                for p, t in zip(prefill, ttft, strict=True)
            )
            tpot, decode = run["tpot_ms"]["values"], run["decode_tps"]["values"]
            assert all(abs(d * t / 1000 - 1) < 1e-6 for d, t in zip(decode, tpot, strict=True))
        # The multi-turn test: TURNS turns per prompt length, each reading the whole conversation so far, of which
        # the kept cache held at least the first turn's prompt (OpenVINO's paged cache counts whole 32-token blocks).
        assert [test["prompt_tokens"] for test in row["multi_turn"]] == list(PROMPTS)
        for test in row["multi_turn"]:
            assert test["turns"] == TURNS and len(test["ttft_ms"]) == TURNS
            assert all(figure["n"] == REPS and figure["mean"] > 0 for figure in test["ttft_ms"])
            first, second = test["turn_prompt_tokens"]
            assert second > first + test["prompt_tokens"] and test["cached_tokens"][0] == 0
            block = BLOCK_TOKENS["cpu"] if key[0] == "openvino" else 1
            assert first - block < test["cached_tokens"][1] < second, (key, test)
            growth = test["ttft_growth"]
            assert growth["n"] == REPS and growth["mean"] == pytest.approx(
                sum(v2 / v1 for v1, v2 in zip(*(f["values"] for f in test["ttft_ms"]), strict=True)) / REPS
            )
        assert row["peak_rss_bytes"] > 50e6 and row["size_bytes"] > 50e6
        assert row["load_cold_s"] > 0 and row["load_warm_s"] > 0
        assert row["versions"], key
    # Each configuration ran in its own process: peak memory differs between runtimes.
    assert len({rows[k]["peak_rss_bytes"] for k in MEASURED}) > 1


@pytest.mark.slow
def test_quality_against_the_torch_reference(bench_run):
    _, report, _ = bench_run
    rows = _rows(report)
    assert rows[("torch", "cpu", "fp32")]["quality"]["agreement"] == 1.0
    for key in MEASURED:
        quality = rows[key]["quality"]
        assert 0.0 <= quality["agreement"] <= 1.0, key
        assert quality["agreement_tokens"] == 16 and quality["agreement_prompts"] == len(agreement_prompts())
        assert quality["perplexity"] is None or quality["perplexity"] > 1.0
    # torch implements next_token_logprobs: the reference's perplexity of plain English is finite and modest.
    assert 1.0 < rows[("torch", "cpu", "fp32")]["quality"]["perplexity"] < 1000
    # Teacher-forced against the reference: itself exactly, fp32 ONNX almost, int4 measurably off.
    reference = rows[("torch", "cpu", "fp32")]["quality"]
    assert (reference["kl_divergence"], reference["top1"]) == (0.0, 1.0)
    assert rows[("onnx", "cpu", "fp32")]["quality"]["kl_divergence"] < 1e-3
    for key in (("openvino", "cpu", "int4"), ("onnx", "cpu", "int4")):
        quality = rows[key]["quality"]
        assert 0.0 < quality["kl_divergence"] < 1.0 and 0.5 < quality["top1"] < 1.0, (key, quality)


@pytest.mark.slow
def test_skipped_and_failed_rows_carry_their_reason(bench_run):
    done, report, _ = bench_run
    rows = _rows(report)
    failed = rows[("openvino", "npu", "int4")]
    assert failed["status"] == "failed" and "NPU" in failed["reason"]
    assert rows[("torch", "cpu", "int4")]["status"] == "skipped"
    assert "fp32, bf16" in rows[("torch", "cpu", "int4")]["reason"]
    assert rows[("onnx", "npu", "int4")]["status"] == "skipped"
    assert {r["status"] for r in report["results"]} == {"ok", "failed", "skipped"}
    assert "FAILED" in done.stdout and "skipped" in done.stdout and "★" in done.stdout
    assert "decode tok/s" in done.stdout and "█" in done.stdout  # the terminal bar chart


@pytest.mark.slow
def test_csv_markdown_and_plot_written(bench_run):
    _, report, out = bench_run
    lines = list(csv.DictReader(io.StringIO((out / "run.csv").read_text())))
    assert tuple(lines[0]) == schema.CSV_COLUMNS
    measured = [line for line in lines if line["status"] == "ok" and line["test"].startswith("pp")]
    assert len(measured) == len(MEASURED) * len(PROMPTS)
    assert all(float(line["decode_tps_mean"]) > 0 and line["cpu"] for line in measured)
    chats = [line for line in lines if line["status"] == "ok" and line["test"].startswith("chat")]
    assert len(chats) == len(MEASURED) * len(PROMPTS)
    assert all(len(line["turn_ttft_ms"].split()) == TURNS and float(line["ttft_growth_mean"]) > 0 for line in chats)
    markdown = (out / "run.md").read_text()
    assert "| device | backend | format | test |" in markdown and "pp16+tg4" in markdown
    assert f"chat{TURNS}-pp16+tg4" in markdown and "turn N / turn 1" in markdown
    assert report["machine"]["cpu"] in markdown and "Library versions" in markdown
    assert (out / "run.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_compare_passes_on_the_real_baseline(bench_run):
    _, _, out = bench_run
    done = run_phi3("bench", "--load", str(out / "run.json"), "--compare", str(out / "run.json"), "--no-chart")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "No regression" in done.stdout


@pytest.mark.slow
def test_compare_fails_on_a_doctored_baseline(bench_run, tmp_path):
    _, report, out = bench_run
    faster = json.loads(json.dumps(report))
    for row in faster["results"]:
        for run in row["runs"]:
            run["decode_tps"]["mean"] *= 2  # the baseline claims twice the speed
    (tmp_path / "faster.json").write_text(json.dumps(faster))
    done = run_phi3("bench", "--load", str(out / "run.json"), "--compare", str(tmp_path / "faster.json"))
    assert done.returncode == 3, done.stdout + done.stderr
    assert "Regression" in done.stdout and "decode_tps" in done.stdout

    wiser = json.loads(json.dumps(report))
    row = next(r for r in wiser["results"] if r["status"] == "ok" and r["quality"]["agreement"] < 1.0)
    row["quality"]["agreement"] = 1.0  # the baseline agreed fully
    (tmp_path / "wiser.json").write_text(json.dumps(wiser))
    done = run_phi3("bench", "--load", str(out / "run.json"), "--compare", str(tmp_path / "wiser.json"))
    assert done.returncode == 3 and "agreement" in done.stdout, done.stdout + done.stderr

    closer = json.loads(json.dumps(report))
    row = next(r for r in closer["results"] if r["status"] == "ok" and (r["quality"]["kl_divergence"] or 0) > 0.01)
    row["quality"]["kl_divergence"] /= 2  # the baseline diverged half as much from the reference
    (tmp_path / "closer.json").write_text(json.dumps(closer))
    done = run_phi3("bench", "--load", str(out / "run.json"), "--compare", str(tmp_path / "closer.json"))
    assert done.returncode == 3 and "kl_divergence" in done.stdout, done.stdout + done.stderr

    flatter = json.loads(json.dumps(report))
    for row in flatter["results"]:
        for test in row["multi_turn"]:
            test["ttft_growth"]["mean"] /= 2  # the baseline's last turn came twice as soon, relative to its first
    (tmp_path / "flatter.json").write_text(json.dumps(flatter))
    args = ["bench", "--load", str(out / "run.json"), "--compare", str(tmp_path / "flatter.json"), "--no-chart"]
    done = run_phi3(*args, env={"COLUMNS": "200"})
    assert done.returncode == 3, done.stdout + done.stderr
    assert "ttft_growth" in done.stdout and f"chat{TURNS}-pp8+tg4" in done.stdout
    assert "turn2_ttft_ms" in done.stdout  # compared too (unchanged here)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r.update(schema="phi3.bench/0"), "phi3.bench/0"),
        (lambda r: r["model"].update(spec="microsoft/Phi-3-mini-4k-instruct", fingerprint="0123"), "Phi-3-mini"),
        (lambda r: r.pop("results"), "lacks results"),
    ],
)
@pytest.mark.slow
def test_foreign_baseline_is_refused(bench_run, tmp_path, change, message):
    _, report, out = bench_run
    other = json.loads(json.dumps(report))
    change(other)
    (tmp_path / "other.json").write_text(json.dumps(other))
    done = run_phi3("bench", "--load", str(out / "run.json"), "--compare", str(tmp_path / "other.json"))
    assert done.returncode == 1 and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["-r", "0"], "--repetitions"),
        (["-n", "0"], "--gen-tokens"),
        (["-p", "0"], "--prompt-tokens"),
        (["-p", "16,x"], "--prompt-tokens"),
        (["--warmup", "-1"], "--warmup"),
        (["--turns", "-1"], "--turns"),
        (["--max-regression", "lots"], "--max-regression"),
    ],
)
def test_bad_counts_are_refused(args, flag):
    done = run_phi3("bench", "--model", "demo", "-b", "torch", *args)
    assert done.returncode == 1 and flag in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_an_unreadable_image_is_refused_before_anything_runs(tmp_path):
    (tmp_path / "notes.png").write_text("not a picture")
    for path, words in ((tmp_path / "none.png", "No image at"), (tmp_path / "notes.png", "is not an image")):
        done = run_phi3("bench", "--model", "demo", "-b", "torch", "--image", str(path))
        assert done.returncode == 1 and words in done.stderr, done.stderr
        assert "Traceback" not in done.stderr and "Measuring" not in done.stderr


def test_an_image_where_it_does_not_apply_is_refused(tmp_path):
    picture = tmp_path / "p.png"
    for args, words in (
        (["--prompt-lookup"], "--image do not apply with --draft"),
        (["--load", str(tmp_path / "report.json")], "--image does not apply with --load"),
    ):
        done = run_phi3("bench", "--model", "demo", "--image", str(picture), *args)
        assert done.returncode == 1 and words in done.stderr, done.stderr
        assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_a_hang_becomes_a_failure_row():
    # One second is too short for any runtime to load: the worker is killed like a hung one.
    args = ["--model", "demo", "-b", "torch", "-p", "8", "-n", "2", "-r", "1", "--timeout", "1"]
    done = run_phi3("bench", *args, env={"COLUMNS": "200"})
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAILED" in done.stdout and "timed out after 1 s" in done.stdout
    assert "No configuration could be measured" in done.stderr


@pytest.mark.slow
def test_the_table_is_printed_whole_when_stdout_is_not_a_terminal():
    # 80 columns, as a CI log or `> file` gets them: headers and figures must not be cut to "…".
    args = ["--model", "demo", "-b", "torch", "-f", "fp32", "-p", "8", "-n", "2", "-r", "1", "--warmup", "0"]
    done = run_phi3("bench", *args, "--no-quality", "--no-chart", env={"COLUMNS": "80"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "…" not in done.stdout, done.stdout
    lines = done.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if "prefill" in line)
    for words, line in (
        (["TTFT", "prefill", "TPOT", "decode", "e2e", "load s", "peak", "size"], lines[header]),
        (["backend", "format", "test", "tok/s", "cold/warm", "RSS MB", "MB"], lines[header + 1]),
    ):
        assert all(word in line for word in words), line
    row = next(line for line in lines if line.lstrip().startswith("torch"))
    assert row.split()[:3] == ["torch", "fp32", "pp8+tg2"] and max(map(len, lines)) > 80


# Pure pieces, on real inputs.


def test_plan_lists_what_cannot_run_here():
    report = DeviceReport(cpu="test", present={"torch": ["cpu"], "openvino": ["cpu"], "onnx": ["cpu"]})
    planned = {p.config: p.skip for p in plan_configurations(report, everything=True)}
    assert planned[Configuration("torch", "cpu", "fp32")] is None
    assert planned[Configuration("openvino", "cpu", "int8")] is None
    assert "no npu here" in planned[Configuration("openvino", "npu", "any")]
    if sys.platform != "win32":
        assert "win32" in planned[Configuration("npu-lib", "npu", "any")]
    explicit = {p.config: p.skip for p in plan_configurations(report, backends=["openvino"], devices=["npu"])}
    assert explicit[Configuration("openvino", "npu", "int4")] is None  # asked for by name: attempted
    with pytest.raises(Phi3Error, match="Unknown backend"):
        plan_configurations(report, backends=["nope"])


def test_compare_fills_unset_settings_from_the_baseline():
    was = BenchSettings([64, 128], gen_tokens=32, warmup=0, repetitions=3, threads=2, timeout_s=60.0, quality=False)
    baseline = {"settings": {**was.as_dict(), "quality_tokens": 16}}
    settings = settings_with_baseline(baseline, repetitions=7, quality=True, timeout_s=300.0)
    assert settings == BenchSettings([64, 128], 32, 0, 7, 2, timeout_s=300.0, quality=True, quality_tokens=16)
    assert settings_with_baseline(baseline, prompt_tokens=[8]).timeout_s == 900.0  # the run's own, not the baseline's
    assert settings_with_baseline(None) == BenchSettings()
    assert settings_with_baseline({"settings": {}}, gen_tokens=4).gen_tokens == 4
    with pytest.raises(Phi3Error, match="--repetitions"):
        settings_with_baseline({"settings": {"repetitions": 0}})  # checked, whoever decided it


def test_compare_plans_the_configurations_the_baseline_measured():
    report = DeviceReport(cpu="test", present={"torch": ["cpu"], "openvino": ["cpu"], "onnx": ["cpu"]})
    results = [("torch", "cpu", "fp32", "ok"), ("onnx", "cpu", "int4", "failed"), ("openvino", "npu", "int4", "ok")]
    baseline = {"results": [dict(backend=b, device=d, format=f, status=s) for b, d, f, s in results]}
    planned = {p.config: p.skip for p in baseline_configurations(report, baseline)}
    # Failed rows are not planned again; a device the baseline had is attempted (the runtime says why not).
    assert planned == {Configuration("torch", "cpu", "fp32"): None, Configuration("openvino", "npu", "int4"): None}


def test_agreement_counts_positions_and_missing_tokens():
    assert agreement([[1, 2, 3, 4]], [[1, 2, 3, 4]], 4) == 1.0
    assert agreement([[1, 2, 3, 4]], [[1, 9, 3, 4]], 4) == 0.75
    assert agreement([[1, 2, 3, 4]], [[1, 2]], 4) == 0.5  # stopped early
    assert agreement([[1, 2]], [[1, 2, 3, 4]], 4) == 0.5  # ran on past the reference's end of text
    assert agreement([[1, 2], [5, 6]], [[1, 2], [0, 6]], 2) == 0.75
    assert agreement([], [[1]], 4) is None


def test_summary_and_margin():
    figure = summarize([1.0, 2.0, 3.0])
    assert (figure["mean"], figure["std"], figure["n"]) == (2.0, 1.0, 3)
    assert summarize([5.0])["std"] == 0.0
    assert parse_margin("10%") == parse_margin("10") == 0.10
    with pytest.raises(Phi3Error):
        parse_margin("150%")
    with pytest.raises(Phi3Error, match="--repetitions"):
        BenchSettings(repetitions=0).validate()


def test_shipped_quality_data():
    assert len(perplexity_text().split()) > 300
    assert len(agreement_prompts()) >= 5 and len(set(agreement_prompts())) == len(agreement_prompts())


@pytest.mark.slow
def test_plot_without_matplotlib_names_the_extra(bench_run, monkeypatch, tmp_path):
    from phi3cli.bench.plot import write_plot

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(Phi3Error) as err:
        write_plot(bench_run[1], tmp_path / "x.png")
    assert "phi3cli[plot]" in err.value.hint
    assert not (tmp_path / "x.png").exists()


@pytest.mark.slow
def test_an_error_inside_the_worker_becomes_a_failure_row():
    # The demo model's context is 8192 tokens: the worker loads it, then refuses, and says why.
    args = ["--model", "demo", "-b", "torch", "-f", "fp32", "-p", "9000", "-n", "4", "-r", "1", "--no-quality"]
    done = run_phi3("bench", *args, env={"COLUMNS": "200"})
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAILED [1]" in done.stdout and "exceed this model's context of 8192" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr


@pytest.mark.slow
def test_a_timing_only_model_is_labelled_so(demo_source, tmp_path):
    # scripts/make_shaped_model.py marks its random-weight models in config.json; bench says so on every output.
    folder = tmp_path / "shaped"
    folder.mkdir()
    for item in demo_source.path.iterdir():
        (folder / item.name).symlink_to(item)
    config = json.loads((demo_source.path / "config.json").read_text())
    (folder / "config.json").unlink()
    (folder / "config.json").write_text(json.dumps({**config, "phi3_timing_only": "random weights"}))
    args = ["--model", str(folder), "-b", "torch", "-f", "fp32", "-p", "8", "-n", "2", "-r", "1", "--warmup", "0"]
    files = ["--json", str(tmp_path / "run.json"), "--markdown", str(tmp_path / "run.md")]
    done = run_phi3("bench", *args, *files, "--no-quality", "--no-chart", env={"COLUMNS": "200"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "timing only: random weights" in done.stdout
    assert json.loads((tmp_path / "run.json").read_text())["model"]["timing_only"] == "random weights"
    assert "Timing only: random weights" in (tmp_path / "run.md").read_text()
    assert schema.timing_only(demo_source.path) is None
