"""The bench report: one JSON document (schema SCHEMA), and the CSV and Markdown written from it.

Layout of a report (every key always present; figures are null where not measured)::

    schema        "phi3.bench/1"
    created       ISO 8601 time of the run
    model         {spec, kind, slug, fingerprint, timing_only}: fingerprint hashes config.json, so baselines
                  match models; timing_only (null for real models) says why answers and quality mean nothing
    machine       {cpu, cores_logical, cores_physical, memory_bytes, os, python}
    versions      {package: version} of phi3cli and every runtime library installed
    settings      {prompt_tokens, gen_tokens, warmup, repetitions, threads, timeout_s, quality,
                   quality_tokens, turns, cache_reuse, options, image, greedy, ignore_eos, reference}
                  options: the --option KEY=VALUE pairs, each given to the configurations whose backend takes it
                  image: --image, the image test's file (null: a generated 448x448 picture)
    results       one row per configuration:
        backend, device, format     what was asked
        status                      ok | failed | skipped
        reason                      why it failed or was skipped (null when ok)
        executed_device             what the runtime reports it ran on
        threads                     --threads (null: the runtime's default)
        path, size_bytes            the model folder loaded and its size on disk
        context_length              the context window the loaded model accepts, in tokens
        kv_cache_bytes              what an fp16 KV cache of that whole window takes (null if the folder
                                    does not say its attention shape)
        peak_rss_bytes              peak resident memory of the subprocess that ran it (before quality scoring)
        load_cold_s, load_warm_s    first load in a fresh process, compiled-model cache empty; second load,
                                    cache filled
        wall_s                      seconds the subprocess ran
        versions                    the backend's runtime versions
        runs                        one per --prompt-tokens value:
            prompt_tokens, gen_tokens, tokens_counted (per repetition),
            ttft_ms, prefill_tps, tpot_ms, decode_tps, e2e_tps: {mean, std, min, max, n, values}
        multi_turn                  with --turns N, one per --prompt-tokens value: repetitions of a conversation of
                                    N user messages of that length, each answered with gen_tokens tokens, through
                                    the chat session `phi3 chat` runs (empty without --turns):
            prompt_tokens, gen_tokens, turns,
            turn_prompt_tokens          the whole prompt at each turn (history included), mean over repetitions
            cached_tokens               of which the kept KV cache held, mean (0 with --no-cache-reuse)
            ttft_ms                     per turn: {mean, std, min, max, n, values}
            ttft_growth                 turn N's TTFT / turn 1's, per repetition: {mean, std, ...}
        image                       on a model that reads images (else null): one image and a question, as
                                    `phi3 chat --image` sends them, answered with gen_tokens tokens
                                    (phi3cli.bench.vision): image (what was sent), gen_tokens, tokens_counted,
                                    image_ms (the runtime's image-encoding time), ttft_ms (encoding included),
                                    decode_tps: {mean, std, min, max, n, values}
        quality                     {perplexity, perplexity_tokens, kl_divergence, top1, agreement,
                                     agreement_tokens, agreement_prompts, notes}:
            perplexity              of the shipped text (perplexity_tokens ids), teacher-forced
            kl_divergence, top1     on the same ids against the reference: mean KL(reference || this) of the
                                    next-token distributions (nats) and the share of positions with the same
                                    top token (phi3cli.bench.quality.next_token_divergence)
            agreement               free-running: the share of greedy answer tokens equal to the reference's
                                    (a weak signal: one early difference shifts every later token)
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from pathlib import Path

from phi3cli import __version__
from phi3cli.errors import Phi3Error
from phi3cli.sources import ModelSource
from phi3cli.util import package_versions

SCHEMA = "phi3.bench/1"
REPORT_KEYS = ("schema", "created", "model", "machine", "versions", "settings", "results")
MODEL_KEYS = ("spec", "kind", "slug", "fingerprint", "timing_only")
MACHINE_KEYS = ("cpu", "cores_logical", "cores_physical", "memory_bytes", "os", "python")
SETTINGS_KEYS = (
    "prompt_tokens",
    "gen_tokens",
    "warmup",
    "repetitions",
    "threads",
    "timeout_s",
    "quality",
    "quality_tokens",
    "turns",
    "cache_reuse",
    "options",
    "image",
    "greedy",
    "ignore_eos",
    "reference",
)
RESULT_KEYS = (
    "backend",
    "device",
    "format",
    "status",
    "reason",
    "executed_device",
    "threads",
    "path",
    "size_bytes",
    "context_length",
    "kv_cache_bytes",
    "peak_rss_bytes",
    "load_cold_s",
    "load_warm_s",
    "wall_s",
    "versions",
    "runs",
    "multi_turn",
    "image",
    "quality",
)
RUN_KEYS = (
    "prompt_tokens",
    "gen_tokens",
    "tokens_counted",
    "ttft_ms",
    "prefill_tps",
    "tpot_ms",
    "decode_tps",
    "e2e_tps",
)
MULTI_TURN_KEYS = (
    "prompt_tokens",
    "gen_tokens",
    "turns",
    "turn_prompt_tokens",
    "cached_tokens",
    "ttft_ms",
    "ttft_growth",
)
FIGURE_KEYS = ("mean", "std", "min", "max", "n", "values")
QUALITY_KEYS = (
    "perplexity",
    "perplexity_tokens",
    "kl_divergence",
    "top1",
    "agreement",
    "agreement_tokens",
    "agreement_prompts",
    "notes",
)

CSV_COLUMNS = (
    "backend",
    "device",
    "format",
    "status",
    "reason",
    "executed_device",
    "test",
    "prompt_tokens",
    "gen_tokens",
    "tokens_counted",
    *(f"{name}_{part}" for name in RUN_KEYS[3:] for part in ("mean", "std")),
    "turn_ttft_ms",
    "ttft_growth_mean",
    "ttft_growth_std",
    "image",
    "image_ms_mean",
    "image_ms_std",
    "load_cold_s",
    "load_warm_s",
    "peak_rss_bytes",
    "size_bytes",
    "context_length",
    "kv_cache_bytes",
    "perplexity",
    "kl_divergence",
    "top1",
    "agreement",
    "threads",
    "repetitions",
    "warmup",
    "model",
    "cpu",
    "cores_physical",
    "memory_bytes",
    "os",
    "runtime_versions",
    "created",
)


def empty_row(config) -> dict:
    """A result row with every key present and nothing measured."""
    row = dict.fromkeys(RESULT_KEYS)
    row.update(backend=config.backend, device=config.device, format=config.format, runs=[], multi_turn=[], versions={})
    row["quality"] = {**dict.fromkeys(QUALITY_KEYS), "notes": []}
    return row


def machine_info() -> dict:
    import psutil

    from phi3cli.devices import cpu_name

    return {
        "cpu": cpu_name(),
        "cores_logical": os.cpu_count(),
        "cores_physical": psutil.cpu_count(logical=False),
        "memory_bytes": psutil.virtual_memory().total,
        "os": platform.platform(),
        "python": platform.python_version(),
    }


def library_versions() -> dict:
    """Versions of phi3cli and of every library a registered backend names (where installed)."""
    from phi3cli.backends import registry

    names = ["phi3cli", *dict.fromkeys(lib for spec in registry().values() for lib in spec.libraries), "numpy"]
    found = package_versions(names)
    found.setdefault("phi3cli", __version__)
    return found


def model_fingerprint(folder: Path) -> str | None:
    """A hash of the model's config.json without the fields that change with the writing library."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for volatile in ("transformers_version", "_name_or_path", "torch_dtype", "dtype"):
        config.pop(volatile, None)
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def timing_only(folder: Path) -> str | None:
    """Why the model is for timing only (scripts/make_shaped_model.py marks its random-weight models), else None."""
    try:
        value = json.loads((folder / "config.json").read_text()).get("phi3_timing_only")
    except (OSError, ValueError, AttributeError):
        return None
    return str(value) if value else None


def build_report(source: ModelSource, settings, rows: list[dict]) -> dict:
    return {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": {
            "spec": source.spec,
            "kind": source.kind,
            "slug": source.slug,
            "fingerprint": model_fingerprint(source.path),
            "timing_only": timing_only(source.path),
        },
        "machine": machine_info(),
        "versions": library_versions(),
        "settings": settings.as_dict(),
        "results": rows,
    }


def load_report(path: Path) -> dict:
    """Read a report written by --json, refusing anything that is not one (or is of another schema)."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise Phi3Error(f"{path} does not exist.", hint="Write one with `phi3 bench --json FILE`.") from None
    except (OSError, ValueError) as exc:
        raise Phi3Error(
            f"{path} is not a JSON file: {exc}", hint="Give a file written by `phi3 bench --json`."
        ) from exc
    if not isinstance(data, dict) or "schema" not in data:
        raise Phi3Error(f"{path} is not a phi3 bench report (no schema field).", hint="Use `phi3 bench --json FILE`.")
    if data["schema"] != SCHEMA:
        raise Phi3Error(
            f"{path} is a {data['schema']!r} report; this phi3 reads {SCHEMA!r}.",
            hint="Record a new baseline with this version: `phi3 bench ... --json FILE`.",
        )
    missing = [k for k in REPORT_KEYS if k not in data]
    if missing:
        raise Phi3Error(f"{path} lacks {', '.join(missing)}; it is not a complete bench report.")
    # Written before the multi-turn test or --option existed: none was run, none was set.
    data["settings"].setdefault("turns", 0)
    data["settings"].setdefault("options", {})
    data["settings"].setdefault("image", None)
    for row in data["results"]:
        row.setdefault("multi_turn", [])
        row.setdefault("image", None)
    return data


def measured_rows(report: dict):
    """(result, run) for every measured prompt length of every configuration that ran."""
    for row in report["results"]:
        if row["status"] != "skipped":
            for run in row["runs"]:
                yield row, run


def run_label(run: dict) -> str:
    """llama-bench's name for a measurement: prompt processing + token generation."""
    return f"pp{run['prompt_tokens']}+tg{run['gen_tokens']}"
