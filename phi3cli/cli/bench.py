"""`phi3 bench`: every backend, format and device side by side, speed and quality in one table."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from phi3cli import DEFAULT_MODEL
from phi3cli.backends import DEVICES
from phi3cli.cli.bench_adapter import BenchAdapterOpt
from phi3cli.cli.bench_tables import show_comparison, show_report
from phi3cli.cli.errors import user_errors
from phi3cli.cli.options import ConvertOpt, OptionOpt, ThreadsOpt, backend_options, choices
from phi3cli.cli.render import RichProgress, err_console, out_console, write_outputs
from phi3cli.cli.speculate import AssistantTokensOpt, DraftOpt, NgramOpt, PromptLookupOpt
from phi3cli.errors import Phi3Error

EXIT_REGRESSION = 3


BenchDevice = choices("BenchDevice", DEVICES)


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
            help="Model to measure: a name from `phi3 models catalog`, Hugging Face id, folder, .gguf or `demo` "
            f"(default: the --compare baseline's model, else {DEFAULT_MODEL}).",
        ),
    ] = None,
    convert: ConvertOpt = False,
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
    option: OptionOpt = None,
    turns: Annotated[
        int | None,
        typer.Option(
            "--turns",
            help="Also run a multi-turn test: conversations of N user messages of each prompt length, each "
            "answered with --gen-tokens tokens, as `phi3 chat` runs them; reports the time to first token of every "
            "turn and turn N's over turn 1's.",
            show_default="0 (none)",
        ),
    ] = None,
    cache_reuse: Annotated[
        bool | None,
        typer.Option(
            "--cache-reuse/--no-cache-reuse",
            help="In the multi-turn test, keep each model's KV cache between turns, as `phi3 chat` does "
            "(--no-cache-reuse: read the whole conversation at every turn, to compare). One-prompt tests always "
            "read their prompt whole.",
            show_default="cache-reuse",
        ),
    ] = None,
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
    draft: DraftOpt = None,
    prompt_lookup: PromptLookupOpt = False,
    num_assistant_tokens: AssistantTokensOpt = None,
    max_ngram_size: NgramOpt = None,
    image: Annotated[
        Path | None,
        typer.Option(
            "--image",
            help="On a vision model, the image of the image test (image-encoding time, time to first token with "
            "one image, decode speed), which runs beside the text tests. Text-only models skip that test.",
            show_default="a generated 448x448 picture",
        ),
    ] = None,
    adapter: BenchAdapterOpt = None,
) -> None:
    """Measure load time, time to first token, prefill and decode speed, memory, size and answer quality.

    Each configuration runs in its own process, on the code path `phi3 chat` uses, with a new synthetic prompt
    every run. Figures are mean ± standard deviation. Missing variants are converted into the model store first.
    With --draft or --prompt-lookup it measures one configuration without and with speculative decoding, side by
    side, on the synthetic prompt and on an input-grounded task (copying a given text). With --adapter, one
    configuration without and with a run-time LoRA adapter, and the quality of each against the adapter merged.
    """
    from phi3cli.bench import compare as compare_reports
    from phi3cli.bench import load_report, parse_margin, settings_with_baseline
    from phi3cli.speculation import requested

    speculation = requested(draft, prompt_lookup, num_assistant_tokens, max_ngram_size)
    if adapter or speculation:
        one = dict(  # --adapter, --draft, --prompt-lookup: one configuration, without and with
            model=model or DEFAULT_MODEL,
            format=(format or [None])[0],
            threads=threads,
            prompt_tokens=(_ints(prompt_tokens, "-p") or [512])[0],
            gen_tokens=gen_tokens or 128,
            warmup=1 if warmup is None else warmup,
            repetitions=repetitions or 3,
            options=backend_options(option) if option else None,
            backend=(backend or [None])[0],
            device=device[0].value if device else "auto",
        )
    if adapter:
        from phi3cli.cli.bench_adapter import bench_adapter

        if everything or compare or load or turns or csv_out or plot or image or speculation:
            raise Phi3Error("--all, --compare, --load, --turns, --csv, --plot, --image, --draft and "
                            "--prompt-lookup do not apply with --adapter, which measures one configuration "
                            "without and with.")  # fmt: skip
        return bench_adapter(adapter, markdown_out=markdown_out, json_out=json_out, **one)
    if speculation:
        from phi3cli.cli.speculate import bench_speculation

        if everything or compare or load or turns or csv_out or plot or image:
            raise Phi3Error("--all, --compare, --load, --turns, --csv, --plot and --image do not apply with --draft "
                            "or --prompt-lookup, which measure one configuration without and with.")  # fmt: skip
        return bench_speculation(speculation, markdown_out=markdown_out, json_out=json_out, **one)
    margin = parse_margin(max_regression)
    baseline = load_report(compare) if compare else None
    console = out_console()

    if load:
        if image:
            raise Phi3Error("--image does not apply with --load, which shows a report already measured.")
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
            turns=turns,
            cache_reuse=cache_reuse,
            options=backend_options(option) if option else None,
            image=_image_file(image),
        )
        convert = convert or (model is None and baseline is not None)  # a baseline's model as it was measured
        selection = dict(backends=backend or [], devices=[d.value for d in device or ()], formats=format or [])
        report = _measure(model, baseline, settings, selection, everything=everything, convert=convert)

    show_report(report, console, chart=chart)
    _write_outputs(report, json_out, csv_out, markdown_out, plot)
    if baseline is not None:
        findings = compare_reports(report, baseline, margin, baseline_name=str(compare))
        if show_comparison(findings, margin, console):
            raise typer.Exit(EXIT_REGRESSION)
    if not load and not any(r["status"] == "ok" for r in report["results"]):
        raise Phi3Error("No configuration could be measured; the table says why.")


def _image_file(path: Path | None) -> str | None:
    """--image, read and checked here (a one-line error before anything runs), as an absolute path for the workers."""
    if path is None:
        return None
    from phi3cli.images import read_image

    read_image(path)
    return str(path.expanduser().resolve())


def _measure(model, baseline: dict | None, settings, selection: dict, *, everything: bool, convert: bool) -> dict:
    """Resolve the model, plan the configurations (those asked, the baseline's, or what chat would run) and run them."""
    from phi3cli.bench import baseline_configurations, plan_configurations, run_bench
    from phi3cli.bench.config import default_configuration
    from phi3cli.devices import probe
    from phi3cli.sources import resolve_source

    spec = model or (baseline["model"]["spec"] if baseline else DEFAULT_MODEL)
    only = {key[:-1]: values[0] if len(values) == 1 else None for key, values in selection.items()}
    with RichProgress() as progress:
        source = resolve_source(
            spec,
            progress=progress,
            device=only["device"] or "auto",
            backend=only["backend"],
            format=only["format"],
            convert=convert,
        )
        spec = source.spec  # a catalogue name: the hub repo (and folder) it stands for, which every worker loads
        progress.phase("Looking for devices")
        found = probe()
        if baseline and not (everything or any(selection.values())):  # the baseline's, each checked against here
            planned = baseline_configurations(found, baseline, source)
        else:
            default = default_configuration(found, source)
            planned = plan_configurations(found, **selection, everything=everything, default=default, source=source)
        return run_bench(spec, planned, settings, progress=progress, source=source)


def _write_outputs(report: dict, json_out, csv_out, markdown_out, plot) -> None:
    from phi3cli.bench import to_csv, to_json, to_markdown

    write_outputs((path, partial(render, report)) for path, render in
                  ((json_out, to_json), (csv_out, to_csv), (markdown_out, to_markdown)))  # fmt: skip
    if plot:
        from phi3cli.bench.plot import write_plot

        write_plot(report, plot)
        err_console.print(f"[dim]Wrote {escape(str(plot))}[/]")
