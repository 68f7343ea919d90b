"""The speculative-decoding options `phi3 chat`, `phi3 serve` and `phi3 bench` share, and bench's table of them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

if TYPE_CHECKING:
    from phi3cli.speculation import Speculation

PANEL = "Speculative decoding"

DraftOpt = Annotated[
    str | None,
    typer.Option(
        "--draft",
        help="Decode speculatively with this draft model (any model phi3 loads: a catalogue name, hub id, folder, "
        ".gguf, demo) proposing tokens that the model verifies several at a time. It runs on the same backend and "
        "device and must share the model's tokenizer. Greedy answers stay the same, token for token.",
        rich_help_panel=PANEL,
    ),
]
PromptLookupOpt = Annotated[
    bool,
    typer.Option(
        "--prompt-lookup",
        help="Decode speculatively by prompt lookup: propose the tokens that followed the last matching n-gram of "
        "the prompt and history (no draft model). Pays where the answer repeats its input: rewriting, extracting, "
        "editing code. Greedy answers stay the same, token for token.",
        rich_help_panel=PANEL,
    ),
]
AssistantTokensOpt = Annotated[
    int | None,
    typer.Option(
        "--num-assistant-tokens",
        min=1,
        help="Tokens proposed per pass of the model, with --draft or --prompt-lookup.",
        show_default="5",
        rich_help_panel=PANEL,
    ),
]
NgramOpt = Annotated[
    int | None,
    typer.Option(
        "--max-ngram-size",
        min=1,
        help="With --prompt-lookup: the longest n-gram matched.",
        show_default="3",
        rich_help_panel=PANEL,
    ),
]


def speculation_table(report: dict) -> Table:
    """bench's side-by-side table: each task without and with speculation, the speed ratio and the acceptance."""
    from phi3cli.bench.stats import fmt_figure

    table = Table(title=f"Speculative decoding: {report['speculation']}", title_justify="left")
    for name in ("task", "prompt", "decode tok/s without", "decode tok/s with", "speed-up", "accepted", "tokens/pass"):
        table.add_column(name, justify="left" if name == "task" else "right")
    table.add_column("same answer")
    for row in report["tasks"]:
        accepted = row["acceptance"]
        table.add_row(
            row["task"],
            str(row["prompt_tokens"]),
            fmt_figure(row["without"]["decode_tps"]),
            fmt_figure(row["with"]["decode_tps"]),
            f"{row['ratio']:.2f}×",
            "n/a" if accepted is None else f"{accepted:.0%}",
            f"{row['tokens_per_pass']:.2f}",
            "yes" if row["same_answer"] else "NO",
        )
    return table


def requested(draft: str | None, prompt_lookup: bool, num_assistant_tokens: int | None, max_ngram_size: int | None):
    """The Speculation the options ask for, or None (phi3cli.speculation.requested, imported when called)."""
    from phi3cli.speculation import requested as core_requested

    return core_requested(draft, prompt_lookup, num_assistant_tokens, max_ngram_size)


def describe(speculation: Speculation | None) -> str:
    return f" · speculative: {speculation.describe()}" if speculation else ""


def bench_speculation(speculation: Speculation, *, markdown_out, json_out, **how) -> None:
    """`phi3 bench --draft/--prompt-lookup`: measure without and with, print the table, write what was asked."""
    import json

    from phi3cli.bench.speculative import run_speculation_bench, speculation_markdown
    from phi3cli.cli.render import RichProgress, out_console, write_outputs
    from phi3cli.errors import Phi3Error

    with RichProgress() as progress:
        report = run_speculation_bench(speculation=speculation, progress=progress, **how)
    out_console().print(speculation_table(report))
    write_outputs(
        ((markdown_out, lambda: speculation_markdown(report)), (json_out, lambda: json.dumps(report, indent=2)))
    )
    if not all(row["same_answer"] for row in report["tasks"]):
        raise Phi3Error("A greedy answer differed with speculation; the table says which task.")
