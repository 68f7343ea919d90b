"""Running a bench: conversions first (in this process, with progress), then one subprocess per configuration.

Each configuration runs in `python -m phi3cli.bench.worker` with a timeout, so a crash or a hang
becomes a failure row and the rest still runs, and each peak memory figure is that runtime's alone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from phi3cli.backends import get_spec, reference_spec
from phi3cli.backends.options import check_declared, check_options, options_for
from phi3cli.errors import Phi3Error
from phi3cli.loading import prepare as prepare_model
from phi3cli.progress import Progress, SilentProgress, more_steps
from phi3cli.routing import given
from phi3cli.sources import ModelSource, resolve_source
from phi3cli.store import ModelStore

from .config import BenchSettings, Configuration, PlannedConfiguration, reference_configuration, sort_key
from .measure import MeasureJob, step_count
from .quality import agreement, agreement_prompts
from .report import build_report, empty_row
from .stats import summarize
from .turns import multi_turn_figures
from .vision import image_figures
from .worker import PROGRESS_PREFIX

FIGURES = ("ttft_ms", "prefill_tps", "tpot_ms", "decode_tps", "e2e_tps")


def prepare(config: Configuration, source: ModelSource, settings: BenchSettings, store: ModelStore, progress) -> None:
    """Build (convert) what the configuration loads, here in the parent with progress, so each subprocess only loads."""
    route = given(config.backend, config.device)
    prepare_model(source, route=route, format=config.format, threads=settings.threads, store=store, progress=progress)


def _check_options(settings: BenchSettings, runnable: list[Configuration]) -> None:
    """--option: each key one a measured backend takes, each value one it accepts (a one-line error before anything
    runs); a configuration whose backend does not take a key runs without it."""
    if not settings.options:
        return
    specs = {c.backend: get_spec(c.backend) for c in runnable}
    check_declared(specs.values(), settings.options)
    for spec in specs.values():
        check_options(spec, options_for(spec, settings.options))


def run_worker(job: MeasureJob, store: ModelStore, timeout_s: float, on_progress: Callable[[str], None]) -> dict:
    """Measure one job in a fresh subprocess; a crash, a hang past timeout_s or an error comes back as ok=False."""
    env = {"PHI3_HOME": str(store.root)}
    return run_isolated("phi3cli.bench.worker", asdict(job), timeout_s, on_progress, env=env)


def run_isolated(
    module: str,
    job: dict,
    timeout_s: float,
    on_progress: Callable[[str], None] = lambda _: None,
    *,
    env: dict[str, str] | None = None,
) -> dict:
    """Run `python -m MODULE JOB.json RESULT.json` in a fresh process (its own group, killed whole on a timeout or
    Ctrl-C) and return the JSON it wrote, with its wall time; a crash or hang comes back as {"ok": False, "error"}.

    Its stdout lines starting with PROGRESS_PREFIX go to on_progress. bench's worker runs this way, and so can any
    other worker (a benchmark's runtime loop), so each one's memory, threads and crashes are its own.
    """
    with tempfile.TemporaryDirectory(prefix="phi3-bench-") as tmp:
        job_path, result_path, log_path = Path(tmp, "job.json"), Path(tmp, "result.json"), Path(tmp, "stderr.log")
        job_path.write_text(json.dumps(job))
        env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, "-m", module, str(job_path), str(result_path)]
        start = time.perf_counter()
        with open(log_path, "w") as log:
            kwargs: dict = {"start_new_session": True} if os.name == "posix" else {}
            if os.name == "nt":
                kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP
            proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, text=True, env=env, **kwargs
            )
            reader = threading.Thread(target=_relay, args=(proc, on_progress), daemon=True)
            reader.start()
            timed_out = False
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill(proc)
            except BaseException:  # Ctrl-C: the measurement dies with us
                _kill(proc)
                raise
            reader.join(timeout=5)
        wall = time.perf_counter() - start
        if timed_out:
            return {"ok": False, "error": f"timed out after {timeout_s:g} s (hung or too slow; see --timeout)"}
        if result_path.is_file():
            result = json.loads(result_path.read_text())
            result["wall_s"] = wall
            return result
        tail = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()][-1:]
        why = f"exit code {proc.returncode}" if proc.returncode >= 0 else f"killed by {_signal_name(-proc.returncode)}"
        return {
            "ok": False,
            "error": f"crashed ({why})" + (f": {tail[0].strip()[:200]}" if tail else ""),
            "wall_s": wall,
        }


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name  # SIGSEGV: a crash in the runtime
    except ValueError:
        return f"signal {number}"


def _relay(proc: subprocess.Popen, on_progress: Callable[[str], None]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(PROGRESS_PREFIX):
            on_progress(line[len(PROGRESS_PREFIX) :].strip())


def _kill(proc: subprocess.Popen) -> None:
    """Kill the worker and anything it started (it leads its own process group)."""
    try:
        if os.name == "posix":
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _job(
    model: str, config: Configuration, settings: BenchSettings, *, measure_speed: bool = True, convert: bool = False
) -> MeasureJob:
    return MeasureJob(
        model=model,
        convert=convert,
        backend=config.backend,
        device=config.device,
        format=config.format,
        prompt_tokens=list(settings.prompt_tokens),
        gen_tokens=settings.gen_tokens,
        warmup=settings.warmup,
        repetitions=settings.repetitions,
        threads=settings.threads,
        measure_speed=measure_speed,
        quality=settings.quality,
        quality_tokens=settings.quality_tokens,
        reference=config.is_reference,
        turns=settings.turns,
        cache_reuse=settings.cache_reuse,
        options=options_for(get_spec(config.backend), settings.options),
        image=settings.image,
    )


def _row_from(config: Configuration, result: dict, settings: BenchSettings) -> dict:
    row = empty_row(config)
    row["threads"] = settings.threads
    row["wall_s"] = result.get("wall_s")
    if not result.get("ok"):
        row.update(status="failed", reason=result.get("error", "failed"))
        return row
    measured = ("executed_device", "path", "size_bytes", "context_length", "kv_cache_bytes", "peak_rss_bytes")
    for key in (*measured, "load_cold_s", "load_warm_s", "versions"):
        row[key] = result.get(key)
    for run in result.get("runs", []):
        reps = run["reps"]
        row["runs"].append(
            {
                "prompt_tokens": run["prompt_tokens"],
                "gen_tokens": run["gen_tokens"],
                "tokens_counted": [r["tokens"] for r in reps],
                **{name: summarize([r[name] for r in reps]) for name in FIGURES},
            }
        )
    row["multi_turn"] = [multi_turn_figures(test) for test in result.get("multi_turn", [])]
    row["image"] = image_figures(result["image"]) if result.get("image") else None
    short = [
        f"{n} of {run['gen_tokens']}" for run in row["runs"] for n in run["tokens_counted"] if n != run["gen_tokens"]
    ]
    short += [
        f"{turn['tokens']} of {test['gen_tokens']}"
        for test in result.get("multi_turn", [])
        for rep in test["reps"]
        for turn in rep
        if turn["tokens"] != test["gen_tokens"]
    ]
    if short:
        row.update(
            status="failed",
            reason=f"generated {short[0]} tokens asked: the backend does not honour ignore_eos",
        )
    else:
        row["status"] = "ok"
    quality = result.get("quality") or {}
    row["quality"].update({k: quality.get(k) for k in ("perplexity", "perplexity_tokens", "kl_divergence", "top1")})
    row["quality"]["notes"] = list(quality.get("notes", []))
    row["_tokens"] = quality.get("tokens") or []
    return row


def run_bench(
    model: str,
    planned: list[PlannedConfiguration],
    settings: BenchSettings,
    *,
    store: ModelStore | None = None,
    progress: Progress | None = None,
    source: ModelSource | None = None,
) -> dict:
    """Measure every runnable configuration and return the report (see phi3cli.bench.report for its schema)."""
    settings.validate()
    store = store or ModelStore()
    progress = progress or SilentProgress()
    source = source or resolve_source(model, store, progress=progress)
    rows = {i.config: {**empty_row(i.config), "status": "skipped", "reason": i.skip} for i in planned if i.skip}
    runnable = list(dict.fromkeys(i.config for i in planned if not i.skip))
    _check_options(settings, runnable)

    for config in runnable:
        progress.phase(f"Preparing {config.label}")
        try:
            prepare(config, source, settings, store, progress)
        except Phi3Error as exc:
            rows[config] = {**empty_row(config), "status": "failed", "reason": f"preparing: {exc.message}"}

    reference = reference_configuration()
    todo = [c for c in runnable if c not in rows]
    todo.sort(key=lambda c: (not c.is_reference, sort_key(c)))  # the reference first: the others compare with it
    reference_tokens: list[list[int]] = []
    reference_note = None
    if settings.quality and reference not in todo:
        spec = reference_spec()
        if reference is None:
            reference_note = "no reference: no backend is registered as the full-precision reference"
        elif source.runtime and source.runtime != reference.backend:
            reference_note = (
                f"no reference: the model is a {source.runtime} folder, which {reference.backend} cannot run"
            )
        elif reason := spec.missing():
            reference_note = f"no reference: {reason}"
        else:
            progress.phase(f"Reference answers ({reference.label})")
            job = _job(model, reference, settings, measure_speed=False, convert=source.runtime is None)
            result = run_worker(job, store, settings.timeout_s, _noop)
            if result.get("ok"):
                reference_tokens = (result.get("quality") or {}).get("tokens") or []
            else:
                reference_note = f"no reference: {reference.label} failed ({result.get('error')})"

    for i, config in enumerate(todo, 1):
        job = _job(model, config, settings, convert=source.runtime is None)
        progress.phase(f"[{i}/{len(todo)}] Measuring {config.label}", total=step_count(job))

        def relay(message: str) -> None:
            if (more := more_steps(message)) is not None:  # the image test, on a model that reads images
                progress.grow(more)
            else:
                progress.advance()

        result = run_worker(job, store, settings.timeout_s, relay)
        row = _row_from(config, result, settings)
        if config.is_reference and row["status"] == "ok":
            reference_tokens = row["_tokens"]
        rows[config] = row

    for row in rows.values():
        tokens = row.pop("_tokens", None)
        if row["status"] != "ok" or not settings.quality:
            continue
        quality = row["quality"]
        quality["agreement_tokens"] = settings.quality_tokens
        quality["agreement_prompts"] = len(agreement_prompts())
        if reference_note:
            quality["notes"].append(reference_note)
        elif not reference_tokens:
            quality["notes"].append(f"agreement n/a: the reference ({reference.label}) did not run")
        elif not tokens:
            quality["notes"].append("agreement n/a: no token ids from this backend")
        else:
            quality["agreement"] = agreement(reference_tokens, tokens, settings.quality_tokens)
        if quality["perplexity"] is not None and quality["kl_divergence"] is None and not reference_note:
            quality["notes"].append(
                "KL divergence n/a: no reference log-probabilities for the text as this backend tokenizes it"
            )

    ordered = [rows[c] for c in sorted(rows, key=sort_key)]
    return build_report(source, settings, ordered)


def _noop(message: str) -> None:
    pass
