"""The bench report: one JSON document (schema SCHEMA), and the CSV and Markdown written from it.

Layout of a report (every key always present; figures are null where not measured)::

    schema        "phi3.bench/1"
    created       ISO 8601 time of the run
    model         {spec, kind, slug, fingerprint, timing_only}: fingerprint hashes config.json, so baselines
                  match models; timing_only (null for real models) says why answers and quality mean nothing
    machine       {cpu, cores_logical, cores_physical, memory_bytes, os, python}
    versions      {package: version} of phi3cli and every runtime library installed
    settings      {prompt_tokens, gen_tokens, warmup, repetitions, threads, timeout_s, quality,
                   quality_tokens, greedy, ignore_eos, reference}
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

def empty_row(config) -> dict:
    """A result row with every key present and nothing measured."""
    row = dict.fromkeys(RESULT_KEYS)
    row.update(backend=config.backend, device=config.device, format=config.format, runs=[], versions={})
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
            perplexity=row["quality"]["perplexity"],
            kl_divergence=row["quality"].get("kl_divergence"),
            top1=row["quality"].get("top1"),
            agreement=row["quality"]["agreement"],
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
    return out.getvalue()


def fmt_figure(figure: dict | None, digits: int = 1) -> str:
    if not figure or figure.get("mean") is None:
        return ""
    return f"{figure['mean']:.{digits}f} ± {figure['std']:.{digits}f}"


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


def fmt_divergence(quality: dict) -> str:
    return f"{quality['kl_divergence']:.4f}" if quality.get("kl_divergence") is not None else "n/a"


def fmt_top1(quality: dict) -> str:
    return f"{100 * quality['top1']:.1f}" if quality.get("top1") is not None else "n/a"


def to_markdown(report: dict) -> str:
    """A self-contained Markdown page: the table, the machine, the versions and the exact settings."""
    s, m = report["settings"], report["machine"]
    lines = [
        f"# phi3 bench: {report['model']['spec']}",
        "",
        *(
            [f"**Timing only: {report['model']['timing_only']}** (answers and quality mean nothing).", ""]
            if report["model"].get("timing_only")
            else []
        ),
        f"{report['created']} · {m['cpu']}, {m['cores_physical']} physical / {m['cores_logical']} logical cores, "
        f"{(m['memory_bytes'] or 0) / 2**30:.0f} GiB, {m['os']}, Python {m['python']}",
        "",
        f"Settings: prompt tokens {', '.join(map(str, s['prompt_tokens']))}; {s['gen_tokens']} generated tokens "
        f"(eos ignored, greedy); {s['warmup']} warm-up + {s['repetitions']} repetitions; threads "
        f"{s['threads'] or 'runtime default'}. Quality against {s['reference']}, teacher-forced on a fixed text: "
        "perplexity, mean KL divergence of the next-token distributions (nats) and top-1 agreement; free-running "
        f"agreement over the first {s['quality_tokens']} greedy tokens of fixed prompts (a weaker signal). "
        "Figures are mean ± standard deviation.",
        "",
        "| device | backend | format | test | TTFT ms | prefill tok/s | TPOT ms | decode tok/s | e2e tok/s "
        "| load cold/warm s | peak RSS | size | context | perplexity | KL divergence | top-1 % | free-run agreement % | note |",
        "|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
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
                    fmt_perplexity(quality),
                    fmt_divergence(quality),
                    fmt_top1(quality),
                    fmt_agreement(quality),
                ]
            else:
                cells += [""] * 13
            lines.append("| " + " | ".join(cells + [note]) + " |")
    lines += ["", "Library versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()), ""]
    return "\n".join(lines)
