"""A bench report written out: JSON, CSV and Markdown, and the cell formatters the terminal table shares."""

from __future__ import annotations

import csv
import io
import json

from phi3cli.context import LONG_CONTEXT, fmt_memory

from .report import CSV_COLUMNS, RUN_KEYS, run_label
from .stats import fmt_figure
from .turns import multi_turn_label, multi_turn_markdown
from .vision import image_csv, image_markdown


def to_json(report: dict) -> str:
    return json.dumps(report, indent=2) + "\n"


def to_csv(report: dict) -> str:
    """One line per configuration and test (skipped and failed configurations included).

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
        if test := row.get("image"):
            writer.writerow(base | image_csv(test))
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
    lines += multi_turn_markdown(report)
    lines += image_markdown(report)
    lines += ["", "Library versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()), ""]
    return "\n".join(lines)
