"""phi3 bench's tables at the terminal: results, the multi-turn test, a decode chart, and a --compare verdict."""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

# Columns that get a "fastest" mark, and whether higher is better.
_MARKED = {"ttft_ms": False, "prefill_tps": True, "tpot_ms": False, "decode_tps": True, "e2e_tps": True}
_DIGITS = {"ttft_ms": 0, "prefill_tps": 0, "tpot_ms": 1, "decode_tps": 1, "e2e_tps": 1}


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
    from phi3cli.backends import LISTING_ORDER

    items = []
    for row in report["results"]:
        for run in row["runs"] or [None]:
            rank = {"ok": 0, "failed": 1}.get(row["status"], 2)
            decode = run["decode_tps"]["mean"] if run and row["status"] == "ok" else 0.0
            group = LISTING_ORDER.index(row["device"]) if row["device"] in LISTING_ORDER else len(LISTING_ORDER)
            prompt = run["prompt_tokens"] if run else 0
            items.append(((group, rank, prompt, -(decode or 0.0)), row, run))
    items.sort(key=lambda item: item[0])
    return [(row, run) for _, row, run in items]


def _show_header(report: dict, console: Console) -> None:
    """The model, the machine and the settings every row shares."""
    s, m = report["settings"], report["machine"]
    options = " · " + " ".join(f"{k}={v}" for k, v in s["options"].items()) if s.get("options") else ""
    console.print(
        f"[bold]phi3 bench[/] · {escape(report['model']['spec'])} · {escape(m['cpu'] or '')} "
        f"({m['cores_physical']} cores) · {s['warmup']} warm-up + {s['repetitions']} runs · "
        f"threads {s['threads'] or 'runtime default'}{escape(options)} · greedy, end of text ignored · mean ± std",
        soft_wrap=True,
    )
    if report["model"].get("timing_only"):
        console.print(
            f"[yellow]timing only: {escape(report['model']['timing_only'])}[/] (answers and quality mean nothing)"
        )


def _legend(s: dict) -> str:
    legend = "★ best in its column among the configurations measured on the same test."
    if s["quality"]:
        legend += (
            f" On a fixed English text, teacher-forced: PPL its perplexity; KLD the mean KL divergence (nats) of "
            f"the next-token distributions from {s['reference']}'s; top-1 the share of positions with the same most "
            f"likely token. free-run agree: share of the first {s['quality_tokens']} greedy answer tokens equal to "
            "the reference's over fixed prompts (one early difference shifts all later ones)."
        )
    return legend


def show_report(report: dict, console: Console, *, chart: bool = True) -> None:
    """The results table, grouped by device and sorted by decode speed, best per column starred."""
    from phi3cli.bench.formats import fmt_agreement, fmt_context, fmt_divergence, fmt_perplexity, fmt_top1
    from phi3cli.bench.report import run_label

    s = report["settings"]
    _show_header(report, console)
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
            table.add_row(Text(row["device"].upper(), style="bold underline"))
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
    console.print(f"[dim]{_legend(s)}[/]", soft_wrap=True)
    if chart and ok:
        show_chart(ok, console)
    show_multi_turn(report, console)
    show_image(report, console)


def show_image(report: dict, console: Console) -> None:
    """The image test of a vision model: image-encoding time, time to first token with the image, decode speed."""
    from phi3cli.bench.stats import fmt_figure
    from phi3cli.bench.vision import image_label, image_rows

    tests = list(image_rows(report))
    if not tests:
        return
    table = Table(
        header_style="bold",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
        title=f"One image ({tests[0][1]['image']}): encoding, time to first token (encoding included) and decode",
        title_justify="left",
    )
    for i, name in enumerate(["device", "backend", "format", "test", "image ms", "TTFT ms", "decode tok/s"]):
        table.add_column(name, justify="left" if i < 4 else "right", no_wrap=True)
    for row, test in tests:
        figures = fmt_figure(test["image_ms"], 0), fmt_figure(test["ttft_ms"], 0), fmt_figure(test["decode_tps"])
        table.add_row(row["device"], row["backend"], row["format"], image_label(test), *figures)
    console.print(table)


def show_multi_turn(report: dict, console: Console) -> None:
    """Time to first token at each turn of the multi-turn test, and turn N's over turn 1's."""
    from phi3cli.bench.turns import multi_turn_label, multi_turn_rows

    tests = list(multi_turn_rows(report))
    if not tests:
        return
    turns = max(test["turns"] for _, test in tests)
    reuse = "kept between turns" if report["settings"].get("cache_reuse") else "read whole every turn"
    table = Table(
        header_style="bold",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
        title=f"Multi-turn: time to first token, ms (KV cache {reuse}); under it, prompt tokens / cached",
        title_justify="left",
    )
    for i, name in enumerate(["device", "backend", "format", "test", *(f"turn {t + 1}" for t in range(turns))]):
        table.add_column(name, justify="left" if i < 4 else "right", no_wrap=True)
    table.add_column("turn N /\nturn 1", justify="right", no_wrap=True)
    for row, test in tests:
        cells = []
        for i in range(turns):
            if i >= len(test["ttft_ms"]):
                cells.append(Text(""))
                continue
            cell = Text(f"{test['ttft_ms'][i]['mean']:.0f}")
            cell.append(f"\n{test['turn_prompt_tokens'][i]}/{test['cached_tokens'][i]}", style="dim")
            cells.append(cell)
        growth = test["ttft_growth"]
        grown = Text(f"{growth['mean']:.2f}×" if growth["mean"] is not None else "")
        table.add_row(row["device"], row["backend"], row["format"], multi_turn_label(test), *cells, grown)
    console.print(table)


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
        elif f.figure == "ttft_growth":
            base, now = f"{f.baseline:.2f}×", f"{f.current:.2f}×"
            change = f"{100 * f.change:+.1f} %"
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
