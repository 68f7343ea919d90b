"""`phi3 chat`'s interactive session: reading messages, streaming replies, and the slash commands."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape

from phi3cli.cli.render import stats_line, trim_notice
from phi3cli.errors import Phi3Error

if TYPE_CHECKING:  # imported where used, so `phi3 --help` does not load the core
    from phi3cli.chat import ChatSession

HELP = """\
Commands: /reset clears the history · /system TEXT sets the system prompt · /image FILE goes with the next message ·
/stats shows the last reply's figures · /model shows what is loaded and where it runs · /save [FILE] and /load FILE
keep and restore the conversation · /adapter [NAME[:ALPHA] ...|none] lists or switches the LoRA adapters · /clear
clears the screen · \"\"\" starts and ends a multi-line message · /exit or Ctrl-D leaves · Ctrl-C stops a reply and
keeps the session."""


@dataclass
class ChatState:
    """The session plus what /save needs to write it: the model as named, the device asked, the files."""

    session: ChatSession
    model_spec: str
    device_asked: str
    autosave: Path | None = None  # --save: written after every reply
    file: Path | None = None  # the last file resumed, loaded or saved: where a bare /save writes without --save

    def save(self, path: Path | None = None) -> Path:
        from phi3cli.sessions import save_session, snapshot

        path = path or self.autosave or self.file
        assert path is not None
        written = save_session(path, snapshot(self.session, model=self.model_spec, device=self.device_asked))
        if path != self.autosave:
            self.file = written
        return written


def _read_message(console: Console) -> str:
    """One message; \"\"\" opens and closes a multi-line one (as in Ollama), on its own line or around text."""
    line = console.input("[bold green]>>> [/]")
    if not line.lstrip().startswith('"""'):
        return line
    first = line.lstrip()[3:]
    if first.rstrip().endswith('"""'):
        return first.rstrip()[:-3]
    lines = [first] if first.strip() else []
    while True:
        more = console.input("[dim]... [/]")
        if more.rstrip().endswith('"""'):
            if last := more.rstrip()[:-3]:
                lines.append(last)
            return "\n".join(lines)
        lines.append(more)


def interactive(state: ChatState, console: Console) -> None:
    session = state.session
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
            try:
                if _command(state, text, console):
                    return
            except Phi3Error as exc:  # a bad file name must not end the chat
                console.print(
                    f"[bold red]Error:[/] {escape(exc.message)}" + (f" [dim]{escape(exc.hint)}[/]" if exc.hint else "")
                )
            continue
        _stream(session, text, console)
        if state.autosave and session.last_stats:
            state.save()


def _stream(session: ChatSession, text: str, console: Console) -> None:
    """Print the reply once, as it streams (as llama.cpp and mlx-lm do); a live view redraws a tall one."""
    from phi3cli.chat import HistoryTrimmed
    from phi3cli.generation import TokenEvent

    answer = ""
    events = session.ask(text)
    with contextlib.closing(events):  # closing stops the runtime when Ctrl-C ends the loop
        try:
            for event in events:
                if isinstance(event, TokenEvent):
                    answer += event.text
                    console.out(event.text, end="", highlight=False)
                elif isinstance(event, HistoryTrimmed):
                    console.print(f"[yellow]{trim_notice(event, session)}[/]")
        except KeyboardInterrupt:
            console.print(("\n" if answer and not answer.endswith("\n") else "") + "[dim]\\[stopped][/]")
            return
    if answer and not answer.endswith("\n"):
        console.out("")
    if session.last_stats:
        console.print(f"[dim]{stats_line(session.last_stats)}[/]")


def _command(state: ChatState, text: str, console: Console) -> bool:
    """Run a slash command; True means leave."""
    from phi3cli.backends.adapters import adapter_command, adapters_note
    from phi3cli.context import describe_context
    from phi3cli.generation import prompt_budget
    from phi3cli.sessions import load_session, restore

    name, _, arg = text.partition(" ")
    session = state.session
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
            f"[dim]{escape(state.model_spec)} ({escape(str(model.path))}) · {model.backend} · {model.format} · "
            f"asked {model.device}, running on {model.executed_device} · "
            f"{describe_context(model.context_length, model.path)}, "
            f"prompt up to {prompt_budget(model)} · {len(session.messages)} messages{escape(adapters_note(model))}[/]"
        )
    elif name == "/save":
        path = Path(arg.strip()).expanduser() if arg.strip() else state.autosave or state.file
        if path is None:
            console.print("[yellow]Usage: /save FILE[/] [dim](JSON; continue it with /load FILE or --resume)[/]")
        else:
            console.print(f"[dim]Saved {len(session.messages)} messages to {escape(str(state.save(path)))}.[/]")
    elif name == "/load":
        if not arg.strip():
            console.print("[yellow]Usage: /load FILE[/]")
        else:
            path = Path(arg.strip()).expanduser()
            saved = load_session(path)
            restore(session, saved)
            state.file = path
            console.print(f"[dim]Loaded {len(saved.messages)} messages from {escape(str(path))}.[/]")
            if (saved.backend, saved.format) != (model.backend, model.format) or saved.model != state.model_spec:
                console.print(
                    f"[yellow]It was saved with {escape(saved.model)} ({saved.backend}, {saved.format}); continuing "
                    f"with the loaded {escape(state.model_spec)} ({model.backend}, {model.format}).[/] "
                    f"[dim]To use its model: phi3 chat --resume {escape(str(path))}[/]"
                )
    elif name == "/image":
        from phi3cli.cli.images import image_command

        image_command(session, arg, console)
    elif name == "/adapter":
        console.print(f"[dim]{escape(adapter_command(model, arg))}[/]")
    elif name == "/clear":
        console.clear()
    elif name == "/help":
        console.print(f"[dim]{HELP}[/]")
    else:
        console.print(f"[yellow]Unknown command {name}.[/] [dim]/help lists them.[/]")
    return False
