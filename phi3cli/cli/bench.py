"""`phi3 bench`: every backend, format and device side by side, speed and quality in one table."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from phi3cli import DEFAULT_MODEL
from phi3cli.cli.errors import user_errors
from phi3cli.cli.options import ThreadsOpt
from phi3cli.cli.render import RichProgress, err_console, out_console
from phi3cli.errors import Phi3Error

EXIT_REGRESSION = 3


class BenchDevice(str, Enum):
    cpu = "cpu"
    gpu = "gpu"
    npu = "npu"


def _ints(values: list[str] | None, flag: str) -> list[int] | None:
    """Values of a repeatable integer option; each may also be a comma-separated list (-p 128,512)."""
    if not values:
        return None
    out = []
    for value in values:
        for part in value.split(","):
            try:
                out.append(int(part))
            except ValueError:
                raise Phi3Error(f"{flag} takes whole numbers, not {part!r}.", hint=f"For example {flag} 512.") from None
    return out


@user_errors
def bench(
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="Model to measure: Hugging Face id, folder, .gguf or `demo` (default: the --compare baseline's "
            f"model, else {DEFAULT_MODEL}).",
        ),
    ] = None,
    backend: Annotated[
        list[str] | None, typer.Option("--backend", "-b", help="Backend to measure; repeat for several.")
    ] = None,
    device: Annotated[
        list[BenchDevice] | None, typer.Option("--device", "-d", help="Device to measure; repeat for several.")
    ] = None,
    format: Annotated[
        list[str] | None, typer.Option("--format", "-f", help="Weight format to measure; repeat for several.")
    ] = None,
    everything: Annotated[
        bool,
        typer.Option(
            "--all",
            help="Every installed backend x format x device present here; what cannot run is listed with the reason.",
        ),
    ] = False,
    prompt_tokens: Annotated[
        list[str] | None,
        typer.Option(
            "--prompt-tokens",
            "-p",
            help="Prompt length in tokens; repeat or comma-separate for several (like llama-bench -p).",
            show_default="512",
        ),
    ] = None,
    gen_tokens: Annotated[
        int | None,
        typer.Option("--gen-tokens", "-n", help="Tokens generated per run, end of text ignored.", show_default="128"),
    ] = None,
    warmup: Annotated[
        int | None, typer.Option("--warmup", help="Unmeasured runs after loading.", show_default="1")
    ] = None,
    repetitions: Annotated[
        int | None, typer.Option("--repetitions", "-r", help="Measured runs per prompt length.", show_default="5")
    ] = None,
    threads: ThreadsOpt = None,
    timeout: Annotated[
        float,
        typer.Option("--timeout", help="Seconds one configuration may take (loading and quality included)."),
    ] = 900.0,
    quality: Annotated[
        bool | None,
        typer.Option(
            "--quality/--no-quality",
            help="Also measure quality against torch fp32: perplexity, KL divergence and top-1 agreement on a "
            "fixed text (teacher-forced), and free-running agreement of greedy answers.",
            show_default="quality",
        ),
    ] = None,
    agreement_tokens: Annotated[
        int | None,
        typer.Option(
            "--agreement-tokens",
            help="Greedy tokens per prompt compared with torch fp32 (free-running agreement).",
            show_default="64",
        ),
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the full report (for --compare).")] = None,
    csv_out: Annotated[Path | None, typer.Option("--csv", help="Write one CSV line per configuration.")] = None,
    markdown_out: Annotated[Path | None, typer.Option("--markdown", help="Write a Markdown table.")] = None,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Draw decode tok/s and TTFT to a PNG (needs phi3cli\\[plot]).")
    ] = None,
    compare: Annotated[
        Path | None,
        typer.Option(
            "--compare",
            help="Baseline report (--json). Unset options and the configurations come from it; exits 3 on a "
            "regression.",
        ),
    ] = None,
    max_regression: Annotated[
        str, typer.Option("--max-regression", help="Worst decode tok/s or TTFT change --compare accepts.")
    ] = "10%",
    load: Annotated[
        Path | None,
        typer.Option("--load", help="Show, export or compare a saved report (--json) instead of measuring."),
    ] = None,
    chart: Annotated[bool, typer.Option("--chart/--no-chart", help="Bar chart of decode tok/s and TTFT.")] = True,
) -> None:
    """Measure load time, time to first token, prefill and decode speed, memory, size and answer quality.

    Each configuration runs in its own process, on the code path `phi3 chat` uses, with a new synthetic prompt
    every run. Figures are mean ± standard deviation. Missing variants are converted into the model store first.
    """
    from phi3cli.bench import (
        baseline_configurations,
        load_report,
        parse_margin,
        plan_configurations,
        run_bench,
        settings_with_baseline,
    )
    from phi3cli.bench import compare as compare_reports

    margin = parse_margin(max_regression)
    baseline = load_report(compare) if compare else None
    console = out_console()

    if load:
        report = load_report(load)
    else:
        settings = settings_with_baseline(
            baseline,
            prompt_tokens=_ints(prompt_tokens, "--prompt-tokens"),
            gen_tokens=gen_tokens,
            warmup=warmup,
            repetitions=repetitions,
            threads=threads,
            quality=quality,
            quality_tokens=agreement_tokens,
            timeout_s=timeout,
        )
        spec = model or (baseline["model"]["spec"] if baseline else DEFAULT_MODEL)
        selected = bool(backend or device or format or everything)
        from phi3cli.bench.config import default_configuration
        from phi3cli.devices import probe
        from phi3cli.sources import resolve_source

        with RichProgress() as progress:
            source = resolve_source(spec, progress=progress)
            progress.phase("Looking for devices")
            found = probe()
            if baseline and not selected:  # the baseline's configurations, each checked against this machine
                planned = baseline_configurations(found, baseline, source)
            else:
                planned = plan_configurations(
                    found,
                    backends=backend or (),
                    devices=[d.value for d in device or ()],
                    formats=format or (),
                    everything=everything,
                    default=default_configuration(found, source),
                    source=source,
                )
            report = run_bench(spec, planned, settings, progress=progress, source=source)

    show_report(report, console, chart=chart)
    _write_outputs(report, json_out, csv_out, markdown_out, plot)
    if baseline is not None:
        findings = compare_reports(report, baseline, margin, baseline_name=str(compare))
        if show_comparison(findings, margin, console):
            raise typer.Exit(EXIT_REGRESSION)
    if not load and not any(r["status"] == "ok" for r in report["results"]):
        raise Phi3Error("No configuration could be measured; the table says why.")


def _write_outputs(report: dict, json_out, csv_out, markdown_out, plot) -> None:
    from phi3cli.bench import to_csv, to_json, to_markdown
    from phi3cli.util import write_atomically

    for path, render in ((json_out, to_json), (csv_out, to_csv), (markdown_out, to_markdown)):
        if path:
            write_atomically(path, render(report))
            err_console.print(f"[dim]Wrote {escape(str(path))}[/]")
    if plot:
        from phi3cli.bench.plot import write_plot

        write_plot(report, plot)
        err_console.print(f"[dim]Wrote {escape(str(plot))}[/]")


# Columns that get a "fastest" mark, and whether higher is better.
_MARKED = {"ttft_ms": False, "prefill_tps": True, "tpot_ms": False, "decode_tps": True, "e2e_tps": True}
_DIGITS = {"ttft_ms": 0, "prefill_tps": 0, "tpot_ms": 1, "decode_tps": 1, "e2e_tps": 1}
_DEVICE_TITLES = {"npu": "NPU", "gpu": "GPU", "cpu": "CPU"}


def _cell(figure: dict | None, digits: int, best: bool) -> Text:
    if not figure or figure.get("mean") is None:
        return Text("")
    text = Text(f"{figure['mean']:.{digits}f}", style="bold green" if best else "")
    if best:
        text.append(" ★", style="bold green")
    text.append(f"\n±{figure['std']:.{digits}f}", style="dim")
    return text


def _sorted_rows(report: dict) -> list[tuple[dict, dict | None]]:
    """(row, run) grouped by device (NPU, GPU, CPU), measured ones fastest first, then failures, then skips."""
    from phi3cli.bench.config import DEVICE_ORDER

    items = []
    for row in report["results"]:
        for run in row["runs"] or [None]:
            rank = {"ok": 0, "failed": 1}.get(row["status"], 2)
            decode = run["decode_tps"]["mean"] if run and row["status"] == "ok" else 0.0
            group = DEVICE_ORDER.index(row["device"]) if row["device"] in DEVICE_ORDER else len(DEVICE_ORDER)
            prompt = run["prompt_tokens"] if run else 0
            items.append(((group, rank, prompt, -(decode or 0.0)), row, run))
    items.sort(key=lambda item: item[0])
    return [(row, run) for _, row, run in items]


def show_report(report: dict, console: Console, *, chart: bool = True) -> None:
    """The results table, grouped by device and sorted by decode speed, best per column starred."""
    from phi3cli.bench.report import fmt_agreement, fmt_context, fmt_divergence, fmt_perplexity, fmt_top1, run_label

    s, m = report["settings"], report["machine"]
    console.print(
        f"[bold]phi3 bench[/] · {escape(report['model']['spec'])} · {escape(m['cpu'] or '')} "
        f"({m['cores_physical']} cores) · {s['warmup']} warm-up + {s['repetitions']} runs · "
        f"threads {s['threads'] or 'runtime default'} · greedy, end of text ignored · mean ± std",
        soft_wrap=True,
    )
    if report["model"].get("timing_only"):
        console.print(
            f"[yellow]timing only: {escape(report['model']['timing_only'])}[/] (answers and quality mean nothing)"
        )
    rows = _sorted_rows(report)
    ok = [(r, run) for r, run in rows if r["status"] == "ok" and run]
    best = _best_per_column(ok)

    columns = ["backend", "format", "test", "TTFT\nms", "prefill\ntok/s", "TPOT\nms", "decode\ntok/s", "e2e\ntok/s"]
    columns += ["load s\ncold/warm", "peak\nRSS MB", "size\nMB", "context\ntokens"]
    columns += ["PPL", "KLD", "top-1\n%", "free-run\nagree %"] if s["quality"] else []
    table = Table(header_style="bold", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for i, name in enumerate(columns):
        table.add_column(name, justify="left" if i < 3 else "right", no_wrap=True)
    notes: list[str] = []  # footnotes: why a row was skipped or failed, what could not be measured

    def footnote(text: str) -> str:
        if text not in notes:
            notes.append(text)
        return f"[{notes.index(text) + 1}]"

    previous_device = None
    for row, run in rows:
        if row["device"] != previous_device:
            if previous_device is not None:
                table.add_section()
            table.add_row(Text(_DEVICE_TITLES.get(row["device"], row["device"]), style="bold underline"))
        previous_device = row["device"]
        format_cell = Text(row["format"])
        executed = row["executed_device"]
        if executed and row["device"].lower() not in executed.lower():
            format_cell.append(f"\nran on {executed}", style="yellow")
        measured = row["status"] == "ok" and run is not None
        if measured:
            label = run_label(run)
            test = Text(label)
            marks = {k: best.get((k, label)) == [id(run)] for k in _MARKED}
        else:
            failed = row["status"] == "failed"
            test = Text("FAILED" if failed else "skipped", style="bold red" if failed else "dim")
            marks = dict.fromkeys(_MARKED, False)
        if row["reason"]:
            test.append(" " + footnote(row["reason"]), style="dim")
        # A failure may still carry figures (too few tokens generated): shown, never starred.
        figures = [_cell(run[k], _DIGITS[k], marks[k]) if run else Text("") for k in _MARKED]
        extra = ["", "", "", ""]
        if measured:
            load = f"{row['load_cold_s']:.2f}\n{row['load_warm_s']:.2f}" if row["load_warm_s"] is not None else ""
            extra = [load, _mb(row["peak_rss_bytes"]), _mb(row["size_bytes"]), fmt_context(row, "\n")]
        if s["quality"]:
            q = row["quality"]
            quality = [fmt_perplexity(q), fmt_divergence(q), fmt_top1(q), fmt_agreement(q)] if measured else [""] * 4
            if measured and row["quality"]["notes"]:
                quality[-1] += " " + "".join(footnote(n) for n in row["quality"]["notes"])
            extra += quality
        table.add_row(row["backend"], format_cell, test, *figures, *extra)
    console.print(table)
    for i, text in enumerate(notes, 1):
        console.print(f"[dim]\\[{i}][/] {escape(text)}", soft_wrap=True)
    legend = "★ best in its column among the configurations measured on the same test."
    if s["quality"]:
        legend += (
            f" On a fixed English text, teacher-forced: PPL its perplexity; KLD the mean KL divergence (nats) of "
            f"the next-token distributions from {s['reference']}'s; top-1 the share of positions with the same most "
            f"likely token. free-run agree: share of the first {s['quality_tokens']} greedy answer tokens equal to "
            "the reference's over fixed prompts (one early difference shifts all later ones)."
        )
    console.print(f"[dim]{legend}[/]", soft_wrap=True)
    if chart and ok:
        show_chart(ok, console)


def _mb(value: int | None) -> str:
    return f"{value / 1e6:.0f}" if value else ""


def _best_per_column(ok: list[tuple[dict, dict]]) -> dict[tuple[str, str], list[int]]:
    """(column, test) -> [id of the best run], only where at least two configurations ran that test."""
    from phi3cli.bench.report import run_label

    best: dict[tuple[str, str], list[int]] = {}
    for key, higher in _MARKED.items():
        by_test: dict[str, list[dict]] = {}
        for _row, run in ok:
            if run[key]["mean"] is not None:
                by_test.setdefault(run_label(run), []).append(run)
        for label, runs in by_test.items():
            if len(runs) > 1:
                pick = max if higher else min
                best[(key, label)] = [id(pick(runs, key=lambda r, key=key: r[key]["mean"]))]
    return best


def show_chart(ok: list[tuple[dict, dict]], console: Console, width: int = 40) -> None:
    """Terminal bars: decode tok/s (longer is better) and time to first token (shorter is better)."""
    from phi3cli.bench.report import run_label

    labels = [f"{r['backend']} {r['format']} {r['device']} {run_label(run)}" for r, run in ok]
    pad = max(len(label) for label in labels)
    for key, title, color, digits in (
        ("decode_tps", "decode tok/s (longer is better)", "cyan", 1),
        ("ttft_ms", "time to first token, ms (shorter is better)", "magenta", 0),
    ):
        console.print(f"[bold]{title}[/]")
        values = [run[key]["mean"] or 0.0 for _, run in ok]
        top = max(values) or 1.0
        order = sorted(range(len(ok)), key=lambda i: -values[i] if key == "decode_tps" else values[i])
        for i in order:
            bar = "█" * max(1, round(width * values[i] / top))
            console.print(f"  {escape(labels[i]).ljust(pad)} [{color}]{bar}[/] {values[i]:.{digits}f}")


def show_comparison(findings, margin: float, console: Console) -> bool:
    """The comparison with the baseline; returns True when something regressed."""
    regressed = [f for f in findings if f.regressed]
    if not findings:
        console.print("[yellow]Nothing in this run matches a configuration measured in the baseline.[/]")
        return False
    table = Table("configuration", "test", "figure", "baseline", "now", "change", title="Against the baseline")
    for f in findings:
        if f.figure == "status":
            change, base, now = "", str(f.baseline), str(f.current)
        elif f.figure in ("agreement", "top1"):
            base, now = f"{100 * f.baseline:.1f} %", f"{100 * f.current:.1f} %"
            change = f"{100 * f.change:+.1f} pt"
        elif f.figure == "kl_divergence":
            base, now = f"{f.baseline:.4f}", f"{f.current:.4f}"
            change = f"{100 * f.change:+.1f} %" if f.change is not None else ""
        else:
            base, now = f"{f.baseline:.1f}", f"{f.current:.1f}"
            change = f"{100 * f.change:+.1f} %"
        style = "bold red" if f.regressed else ""
        table.add_row(f.config, f.test, f.figure, base, now, Text(change, style=style or "green"), style=style)
    console.print(table)
    if regressed:
        console.print(
            f"[bold red]Regression:[/] {len(regressed)} figure(s) worse than the baseline by more than "
            f"{100 * margin:g} % (or KL divergence higher by more than that, top-1 or agreement lower, or a "
            "configuration failing)."
        )
        return True
    console.print(f"[green]No regression beyond {100 * margin:g} %.[/]")
    return False
