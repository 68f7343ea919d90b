"""`phi3 chat`: a one-shot answer (pipe-friendly) or an interactive, streamed conversation."""

from __future__ import annotations

import contextlib
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.live import Live
from rich.markdown import Markdown
from rich.markup import escape

from phi3cli.backends.base import GenerationSettings
from phi3cli.chat import ChatSession, HistoryTrimmed
from phi3cli.cli.errors import user_errors
from phi3cli.cli.options import (
    BackendOpt,
    DeviceChoice,
    DeviceOpt,
    FormatOpt,
    ModelOpt,
    ThreadsOpt,
    TrustRemoteCodeOpt,
)
from phi3cli.cli.render import RichProgress, err_console, stats_line
from phi3cli.generation import ReplyStats, TokenEvent, open_model
from phi3cli.sources import DEFAULT_MODEL

HELP = """\
Commands: /reset clears the history · /system TEXT sets the system prompt · /stats shows the last reply's
figures · /model shows what is loaded · /clear clears the screen · \"\"\" starts and ends a multi-line message ·
/exit or Ctrl-D leaves · Ctrl-C stops a reply and keeps the session."""


@user_errors
def chat(
    prompt: Annotated[
        str | None, typer.Argument(help="Ask once and print only the answer (or pipe it on stdin).")
    ] = None,
    model: ModelOpt = DEFAULT_MODEL,
    device: DeviceOpt = DeviceChoice.auto,
    backend: BackendOpt = None,
    format: FormatOpt = None,
    system: Annotated[str | None, typer.Option("--system", "-s", help="System prompt.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", min=1, help="Longest reply.")] = 512,
    temperature: Annotated[
        float, typer.Option("--temperature", "-t", min=0.0, max=2.0, help="0 is greedy (deterministic).")
    ] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling.")] = 1.0,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed for sampling.")] = None,
    threads: ThreadsOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
) -> None:
    """Chat with a Phi-3 model, streaming the answer token by token.

    With a PROMPT (or text on stdin) it answers once and prints only the answer on stdout, so it pipes;
    the figures go to stderr. Without, it starts an interactive session.
    """
    if prompt is None and not sys.stdin.isatty():
        prompt = sys.stdin.read().strip()
        if not prompt:
            raise typer.BadParameter("stdin was empty; give a prompt.", param_hint="PROMPT")
    with RichProgress() as progress:
        loaded, route = open_model(
            model,
            backend=backend,
            device=device.value,
            format=format,
            threads=threads,
            trust_remote_code=trust_remote_code,
            progress=progress,
        )
    if device == DeviceChoice.auto:
        err_console.print(f"[dim]{escape(route.reason)}[/]", soft_wrap=True)
    session = ChatSession(
        loaded,
        GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed),
        system=system,
    )
    if prompt is not None:
        _answer_once(session, prompt)
    else:
        err_console.print(
            f"[bold]{model}[/] · {loaded.backend} on {loaded.executed_device} · loaded in "
            f"{loaded.load_seconds:.1f} s\n[dim]{HELP}[/]"
        )
        _interactive(session, Console(highlight=False))
    loaded.close()


def _answer_once(session: ChatSession, prompt: str) -> None:
    """Plain text on stdout as it streams; notices and figures on stderr."""
    out = sys.stdout
    for event in session.ask(prompt):
        if isinstance(event, TokenEvent):
            out.write(event.text)
            out.flush()
        elif isinstance(event, HistoryTrimmed):
            err_console.print(f"[yellow]{_trim_notice(event)}[/]")
        elif isinstance(event, ReplyStats):
            out.write("\n")
            out.flush()
            err_console.print(f"[dim]{stats_line(event)}[/]")


def _trim_notice(event: HistoryTrimmed) -> str:
    return f"Dropped the {event.messages} oldest messages to fit the context ({event.prompt_tokens} prompt tokens)."


def _read_message(console: Console) -> str:
    line = console.input("[bold green]>>> [/]")
    if line.strip() != '"""':
        return line
    lines = []
    while (more := console.input("[dim]... [/]")).strip() != '"""':
        lines.append(more)
    return "\n".join(lines)


def _interactive(session: ChatSession, console: Console) -> None:
    while True:
        try:
            text = _read_message(console).strip()
        except EOFError:
            console.print()
            return
        except KeyboardInterrupt:
            console.print("\n[dim]Use /exit or Ctrl-D to leave.[/]")
            continue
        if not text:
            continue
        if text.startswith("/"):
            if _command(session, text, console):
                return
            continue
        _stream(session, text, console)


def _stream(session: ChatSession, text: str, console: Console) -> None:
    answer = ""
    events = session.ask(text)
    with contextlib.closing(events), Live(console=console, refresh_per_second=12, vertical_overflow="visible") as live:
        try:
            for event in events:
                if isinstance(event, TokenEvent):
                    answer += event.text
                    live.update(Markdown(answer))
                elif isinstance(event, HistoryTrimmed):
                    console.print(f"[yellow]{_trim_notice(event)}[/]")
                elif isinstance(event, ReplyStats):
                    live.update(Markdown(event.text))
        except KeyboardInterrupt:
            live.update(Markdown(answer + "\n\n*[stopped]*"))
            return
    if session.last_stats:
        console.print(f"[dim]{stats_line(session.last_stats)}[/]")


def _command(session: ChatSession, text: str, console: Console) -> bool:
    """Run a slash command; True means leave."""
    name, _, arg = text.partition(" ")
    model = session.model
    if name in ("/exit", "/quit", "/bye"):
        return True
    if name == "/reset":
        session.reset()
        console.print("[dim]History cleared.[/]")
    elif name == "/system":
        session.system = arg.strip() or None
        console.print(f"[dim]System prompt {'set' if session.system else 'removed'}.[/]")
    elif name == "/stats":
        console.print(f"[dim]{stats_line(session.last_stats)}[/]" if session.last_stats else "[dim]No reply yet.[/]")
    elif name == "/model":
        console.print(
            f"[dim]{model.path} · {model.backend} · {model.format} · asked {model.device}, running on "
            f"{model.executed_device} · context {model.context_length} tokens · {len(session.messages)} messages[/]"
        )
    elif name == "/clear":
        console.clear()
    elif name == "/help":
        console.print(f"[dim]{HELP}[/]")
    else:
        console.print(f"[yellow]Unknown command {name}.[/] [dim]/help lists them.[/]")
    return False
