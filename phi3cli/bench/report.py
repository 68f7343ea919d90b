"""The bench report: one JSON document (schema SCHEMA), and the CSV and Markdown written from it.

Layout of a report (every key always present; figures are null where not measured)::

    schema        "phi3.bench/1"
    created       ISO 8601 time of the run
    model         {spec, kind, slug, fingerprint}: fingerprint hashes config.json, so baselines match models
    machine       {cpu, cores_logical, cores_physical, memory_bytes, os, python}
    versions      {package: version} of phi3cli and every runtime library installed
    settings      {prompt_tokens, gen_tokens, warmup, repetitions, threads, timeout_s, quality,
                   quality_tokens, turns, cache_reuse, greedy, ignore_eos, reference}
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
        quality                     {agreement, agreement_tokens, agreement_prompts, perplexity,
                                     perplexity_tokens, notes}
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import platform
import time
from pathlib import Path

from phi3cli import __version__
from phi3cli.context import LONG_CONTEXT, fmt_memory
from phi3cli.errors import Phi3Error
from phi3cli.sources import ModelSource
from phi3cli.util import package_versions

from .stats import fmt_figure
from .turns import multi_turn_label, multi_turn_markdown

SCHEMA = "phi3.bench/1"
REPORT_KEYS = ("schema", "created", "model", "machine", "versions", "settings", "results")
MODEL_KEYS = ("spec", "kind", "slug", "fingerprint")
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
QUALITY_KEYS = ("agreement", "agreement_tokens", "agreement_prompts", "perplexity", "perplexity_tokens", "notes")


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


def build_report(source: ModelSource, settings, rows: list[dict]) -> dict:
    return {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": {
            "spec": source.spec,
            "kind": source.kind,
            "slug": source.slug,
            "fingerprint": model_fingerprint(source.path),
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
    # Written before the multi-turn test existed: none was run.
    data["settings"].setdefault("turns", 0)
    for row in data["results"]:
        row.setdefault("multi_turn", [])
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


def to_json(report: dict) -> str:
    return json.dumps(report, indent=2) + "\n"


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
    "load_cold_s",
    "load_warm_s",
    "peak_rss_bytes",
    "size_bytes",
    "context_length",
    "kv_cache_bytes",
    "agreement",
    "perplexity",
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


def to_csv(report: dict) -> str:
    """One line per configuration and prompt length (skipped and failed configurations included).

    Machine, settings and versions repeat on each line, so the file stands alone.
    """
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    machine, settings = report["machine"], report["settings"]
    for row in report["results"]:
        base = {k: row[k] for k in ("backend", "device", "format", "status", "reason", "executed_device")}
        base.update(
            load_cold_s=row["load_cold_s"],
            load_warm_s=row["load_warm_s"],
            peak_rss_bytes=row["peak_rss_bytes"],
            size_bytes=row["size_bytes"],
            context_length=row.get("context_length"),
            kv_cache_bytes=row.get("kv_cache_bytes"),
            agreement=row["quality"]["agreement"],
            perplexity=row["quality"]["perplexity"],
            threads=settings["threads"] or "auto",
            repetitions=settings["repetitions"],
            warmup=settings["warmup"],
            model=report["model"]["spec"],
            cpu=machine["cpu"],
            cores_physical=machine["cores_physical"],
            memory_bytes=machine["memory_bytes"],
            os=machine["os"],
            runtime_versions=" ".join(f"{k}={v}" for k, v in (row["versions"] or {}).items()),
            created=report["created"],
        )
        for run in row["runs"] or [None]:
            line = dict(base)
            if run:
                line.update(
                    test=run_label(run),
                    prompt_tokens=run["prompt_tokens"],
                    gen_tokens=run["gen_tokens"],
                    tokens_counted=" ".join(map(str, run["tokens_counted"])),
                )
                for name in RUN_KEYS[3:]:
                    line[f"{name}_mean"], line[f"{name}_std"] = run[name]["mean"], run[name]["std"]
            writer.writerow(line)
        for test in row.get("multi_turn") or []:
            line = dict(base)
            line.update(
                test=multi_turn_label(test),
                prompt_tokens=test["prompt_tokens"],
                gen_tokens=test["gen_tokens"],
                turn_ttft_ms=" ".join(f"{t['mean']:.1f}" for t in test["ttft_ms"]),
                ttft_growth_mean=test["ttft_growth"]["mean"],
                ttft_growth_std=test["ttft_growth"]["std"],
            )
            writer.writerow(line)
    return out.getvalue()


def fmt_bytes(value: int | None) -> str:
    return f"{value / 1e6:.0f} MB" if value else ""


def fmt_context(row: dict, separator: str = " ") -> str:
    """The context window in tokens, and for a long one the fp16 KV cache that fills it."""
    context, kv = row.get("context_length"), row.get("kv_cache_bytes")
    if not context:
        return ""
    return f"{context}{separator}(KV {fmt_memory(kv)})" if kv and context > LONG_CONTEXT else str(context)


def fmt_agreement(quality: dict) -> str:
    return f"{100 * quality['agreement']:.1f}" if quality.get("agreement") is not None else "n/a"


def fmt_perplexity(quality: dict) -> str:
    return f"{quality['perplexity']:.2f}" if quality.get("perplexity") is not None else "n/a"


def to_markdown(report: dict) -> str:
    """A self-contained Markdown page: the table, the machine, the versions and the exact settings."""
    s, m = report["settings"], report["machine"]
    lines = [
        f"# phi3 bench: {report['model']['spec']}",
        "",
        f"{report['created']} · {m['cpu']}, {m['cores_physical']} physical / {m['cores_logical']} logical cores, "
        f"{(m['memory_bytes'] or 0) / 2**30:.0f} GiB, {m['os']}, Python {m['python']}",
        "",
        f"Settings: prompt tokens {', '.join(map(str, s['prompt_tokens']))}; {s['gen_tokens']} generated tokens "
        f"(eos ignored, greedy); {s['warmup']} warm-up + {s['repetitions']} repetitions; threads "
        f"{s['threads'] or 'runtime default'}; agreement over the first {s['quality_tokens']} tokens against "
        f"{s['reference']}. Figures are mean ± standard deviation.",
        "",
        "| device | backend | format | test | TTFT ms | prefill tok/s | TPOT ms | decode tok/s | e2e tok/s "
        "| load cold/warm s | peak RSS | size | context | agreement % | perplexity | note |",
        "|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for row in report["results"]:
        quality = row["quality"]
        load = (
            f"{row['load_cold_s']:.2f} / {row['load_warm_s']:.2f}"
            if row["load_cold_s"] is not None and row["load_warm_s"] is not None
            else ""
        )
        note = (row["reason"] or "").replace("|", "/")
        device = row["device"] + (f" ({row['executed_device']})" if row["executed_device"] else "")
        for run in row["runs"] or [None]:
            cells = [device, row["backend"], row["format"], run_label(run) if run else row["status"]]
            if run:
                cells += [
                    fmt_figure(run["ttft_ms"]),
                    fmt_figure(run["prefill_tps"]),
                    fmt_figure(run["tpot_ms"], 2),
                    fmt_figure(run["decode_tps"]),
                    fmt_figure(run["e2e_tps"]),
                    load,
                    fmt_bytes(row["peak_rss_bytes"]),
                    fmt_bytes(row["size_bytes"]),
                    fmt_context(row),
                    fmt_agreement(quality),
                    fmt_perplexity(quality),
                ]
            else:
                cells += [""] * 11
            lines.append("| " + " | ".join(cells + [note]) + " |")
    lines += multi_turn_markdown(report)
    lines += ["", "Library versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()), ""]
    return "\n".join(lines)
