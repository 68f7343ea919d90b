"""`phi3 bench --adapter`: its option, and the side-by-side table of the base without and with a run-time adapter."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

BenchAdapterOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--adapter",
        help="Measure one configuration without and with this LoRA adapter (a PEFT folder) applied at run time, "
        "side by side: decode tok/s, time to first token and their ratio, and the KL divergence and top-1 agreement "
        "of each against the adapter merged into the weights (as `phi3 convert --adapter` does) on the perplexity "
        "text. DIR or DIR:ALPHA; repeat it to apply several, summed. OpenVINO on the CPU or GPU.",
        rich_help_panel="Adapters",
    ),
]


def adapter_table(report: dict) -> Table:
    """bench's side-by-side table: the base without and with the adapter, the speed ratio, and quality vs merged."""
    from phi3cli.bench.stats import fmt_figure

    table = Table(
        title=f"Run-time adapter: {report['adapter']} · {report['backend']} {report['format']} on {report['device']} "
        f"· prompt {report['prompt_tokens']} tokens",
        title_justify="left",
        caption=f"KLD and top-1 against the {report['reference']} model, on {report['quality_tokens']} tokens.",
        caption_justify="left",
    )
    table.add_column("adapter")
    for name in ("decode tok/s", "TTFT ms", "speed", "KLD vs merged", "top-1 vs merged"):
        table.add_column(name, justify="right")
    for row in report["rows"]:
        ttft = {key: 1000 * value for key, value in row["ttft_s"].items() if key in ("mean", "std")}
        table.add_row(
            row["adapter"],
            fmt_figure(row["decode_tps"]),
            fmt_figure(ttft, 0),
            f"{1.0 if row['adapter'] == 'without' else report['ratio']:.2f}×",
            f"{row['kl_divergence']:.2g}",
            f"{row['top1']:.1%}",
        )
    return table


def bench_adapter(values: list[str], *, markdown_out, json_out, **how) -> None:
    """`phi3 bench --adapter`: measure without and with, print the table, write what was asked."""
    import json

    from phi3cli.adapters import AdapterChoice
    from phi3cli.bench.adapter import adapter_markdown, run_adapter_bench
    from phi3cli.cli.render import RichProgress, out_console, write_outputs

    choices = tuple(AdapterChoice.parse(v) for v in values)  # bad input fails here, before anything loads
    with RichProgress() as progress:
        report = run_adapter_bench(choices=choices, progress=progress, **how)
    out_console().print(adapter_table(report))
    write_outputs(((markdown_out, lambda: adapter_markdown(report)), (json_out, lambda: json.dumps(report, indent=2))))
