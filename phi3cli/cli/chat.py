"""`phi3 chat`: a one-shot answer (pipe-friendly) or an interactive, streamed conversation."""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape

from phi3cli import DEFAULT_MODEL
from phi3cli.backends.base import GenerationSettings
from phi3cli.cli.errors import user_errors
from phi3cli.cli.options import (
    AllowFallbackOpt,
    BackendOpt,
    CacheReuseOpt,
    ConvertOpt,
    DeviceChoice,
    DeviceOpt,
    FormatOpt,
    InferencePrecisionOpt,
    MaxPromptLenOpt,
    MinResponseLenOpt,
    ModelOpt,
    NpuHintOpt,
    ThreadsOpt,
    TrustRemoteCodeOpt,
    openvino_options,
)
from phi3cli.cli.render import RichProgress, err_console, stats_line, trim_notice
from phi3cli.cli.sampling import FrequencyPenaltyOpt, MinPOpt, PresencePenaltyOpt, RepeatPenaltyOpt, apply_sampling
from phi3cli.errors import (
    BackendUnavailableError,
    DeviceUnavailableError,
    ModelNotFoundError,
    OfflineError,
    Phi3Error,
    SessionFileError,
    UnsupportedModelError,
)

if TYPE_CHECKING:  # imported where used, so `phi3 --help` does not load the core
    from phi3cli.chat import ChatSession
    from phi3cli.sessions import SavedSession

HELP = """\
Commands: /reset clears the history · /system TEXT sets the system prompt · /stats shows the last reply's
figures · /model shows what is loaded and where it runs · /save [FILE] and /load FILE keep and restore the
conversation · /clear clears the screen · \"\"\" starts and ends a multi-line message · /exit or Ctrl-D leaves ·
Ctrl-C stops a reply and keeps the session."""

DEFAULTS = GenerationSettings()


@dataclass
class _ChatState:
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


@user_errors
def chat(
    prompt: Annotated[
        str | None, typer.Argument(help="Ask once and print only the answer (or pipe it on stdin).")
    ] = None,
    model: ModelOpt = None,
    convert: ConvertOpt = False,
    device: DeviceOpt = DeviceChoice.auto,
    backend: BackendOpt = None,
    format: FormatOpt = None,
    system: Annotated[str | None, typer.Option("--system", "-s", help="System prompt.")] = None,
    max_new_tokens: Annotated[
        int | None,
        typer.Option("--max-new-tokens", "-n", min=1, help="Longest reply.", show_default=str(DEFAULTS.max_new_tokens)),
    ] = None,
    temperature: Annotated[
        float | None,
        typer.Option(
            "--temperature",
            "-t",
            min=0.0,
            max=2.0,
            help="0 is greedy (deterministic).",
            show_default=str(DEFAULTS.temperature),
        ),
    ] = None,
    top_p: Annotated[
        float | None,
        typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling.", show_default=str(DEFAULTS.top_p)),
    ] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed for sampling.")] = None,
    repeat_penalty: RepeatPenaltyOpt = 1.0,
    frequency_penalty: FrequencyPenaltyOpt = 0.0,
    presence_penalty: PresencePenaltyOpt = 0.0,
    min_p: MinPOpt = 0.0,
    threads: ThreadsOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    allow_fallback: AllowFallbackOpt = False,
    max_prompt_len: MaxPromptLenOpt = None,
    min_response_len: MinResponseLenOpt = None,
    npu_hint: NpuHintOpt = None,
    inference_precision: InferencePrecisionOpt = None,
    cache_reuse: CacheReuseOpt = True,
    resume: Annotated[
        Path | None,
        typer.Option(
            "--resume",
            "-r",
            help="Continue a chat saved with /save or --save: its history, model, backend, format, device and "
            "settings (options given here override them). With a PROMPT, answers it as the next turn.",
        ),
    ] = None,
    json_schema: Annotated[
        Path | None,
        typer.Option(
            "--json-schema",
            help="Answer with JSON valid against the JSON schema in this file, enforced while generating (the "
            "runtime's grammar engine, on backends that have one). The one-shot answer on stdout pipes into jq.",
            rich_help_panel="Structured output",
        ),
    ] = None,
    json_object: Annotated[
        bool,
        typer.Option(
            "--json", help="Answer with a JSON object (any), enforced while generating.", rich_help_panel="Structured output"
        ),
    ] = False,
    save: Annotated[
        Path | None,
        typer.Option(
            "--save",
            help="Write the conversation to this file after every reply (JSON), so `--resume` can continue it. "
            '`--resume chat.json --save chat.json "next question"` builds a conversation from the shell.',
        ),
    ] = None,
) -> None:
    """Chat with a Phi-3 model, streaming the answer token by token.

    With a PROMPT (or text on stdin) it answers once and prints only the answer on stdout, so it pipes;
    the figures go to stderr. Without, it starts an interactive session. The model defaults to phi-3-mini
    (a ready-made variant of microsoft/Phi-3-mini-4k-instruct for the device), or the one a --resume file names.
    """
    from phi3cli.chat import ChatSession
    from phi3cli.loading import load
    from phi3cli.sessions import check_saveable, load_session, restore, resume_choice
    from phi3cli.structured import constraining_hint, output_constraint

    if prompt is None and not sys.stdin.isatty():
        prompt = sys.stdin.read().strip()
        if not prompt:
            raise typer.BadParameter("stdin was empty; give a prompt.", param_hint="PROMPT")
    constraint = output_constraint(json_schema, json_object)
    saved = load_session(resume) if resume else None
    if save:
        check_saveable(save)
    chosen = resume_choice(
        saved,
        model=model,
        backend=backend,
        format=format,
        device=device.value,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
    )
    model, backend, format, device = chosen.model, chosen.backend, chosen.format, DeviceChoice(chosen.device)
    from_file = chosen.from_file  # named in errors, so the user knows which flag overrides the file
    model = model or DEFAULT_MODEL
    try:
        with RichProgress() as progress:
            loaded = load(
                model,
                backend=backend,
                device=device.value,
                format=format,
                threads=threads,
                trust_remote_code=trust_remote_code,
                allow_fallback=allow_fallback,
                options=openvino_options(max_prompt_len, min_response_len, npu_hint, inference_precision),
                cache_reuse=cache_reuse and prompt is None,  # one answer: no next turn to reuse it
                progress=progress,
                convert=convert,
            )
    except (ModelNotFoundError, OfflineError, UnsupportedModelError) as exc:
        if saved and "--model" in from_file:
            raise SessionFileError(
                f"{resume} continues a chat with {model}, which is not available here: {exc.message}",
                hint="Pass --model to continue the conversation with another model.",
            ) from exc
        raise
    except (BackendUnavailableError, DeviceUnavailableError) as exc:
        if saved and (flags := [f for f in ("--backend", "--device", "--format") if f in from_file]):
            chosen = ", ".join(f"{f} {from_file[f]}" for f in flags)
            exc.hint = f"{exc.hint + ' ' if exc.hint else ''}{resume} chose {chosen}; pass another to override it."
        raise
    if device == DeviceChoice.auto:
        err_console.print(f"[dim]{escape(loaded.route.reason)}[/]", soft_wrap=True)
    apply_sampling(chosen.settings, loaded, repeat_penalty, presence_penalty, frequency_penalty, min_p)
    session = ChatSession(loaded, chosen.settings)
    state = _ChatState(session, model, device.value, autosave=save, file=resume)
    if saved:
        restore(session, saved)
        err_console.print(f"[dim]{escape(_resumed_line(resume, saved, loaded))}[/]", soft_wrap=True)
    if system is not None:
        session.system = system
    if constraint is not None:
        if why := loaded.constraint_refusal():
            loaded.close()
            raise Phi3Error(f"Cannot constrain the answer to JSON: {why}.", hint=constraining_hint())
        session.settings.constraint = constraint
    try:
        if prompt is not None:
            _answer_once(state, prompt)
        else:
            err_console.print(
                f"[bold]{escape(model)}[/] · {loaded.backend} on {loaded.executed_device} · loaded in "
                f"{loaded.load_seconds:.1f} s\n[dim]{HELP}[/]"
            )
            _interactive(state, Console(highlight=False))
    finally:
        loaded.close()


def _resumed_line(path: Path, saved: SavedSession, loaded) -> str:
    line = (
        f"Resumed {path}: {len(saved.messages)} messages, saved with {saved.model} "
        f"({saved.backend}, {saved.format}, ran on {saved.executed_device or saved.device})"
    )
    if (loaded.backend, loaded.format) != (saved.backend, saved.format):
        line += f"; continuing with {loaded.backend} {loaded.format}, so answers may differ"
    return line + "."


def _answer_once(state: _ChatState, prompt: str) -> None:
    """Plain text on stdout as it streams; notices and figures on stderr."""
    from phi3cli.chat import HistoryTrimmed
    from phi3cli.generation import ReplyStats, TokenEvent

    out = sys.stdout
    session = state.session
    for event in session.ask(prompt):
        if isinstance(event, TokenEvent):
            out.write(event.text)
            out.flush()
        elif isinstance(event, HistoryTrimmed):
            err_console.print(f"[yellow]{trim_notice(event, session)}[/]")
        elif isinstance(event, ReplyStats):
            out.write("\n")
            out.flush()
            err_console.print(f"[dim]{stats_line(event)}[/]")
    if state.autosave:
        err_console.print(f"[dim]Saved {len(session.messages)} messages to {escape(str(state.save()))}.[/]")


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


def _interactive(state: _ChatState, console: Console) -> None:
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


def _command(state: _ChatState, text: str, console: Console) -> bool:
    """Run a slash command; True means leave."""
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
            f"prompt up to {prompt_budget(model)} · {len(session.messages)} messages[/]"
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
    elif name == "/clear":
        console.clear()
    elif name == "/help":
        console.print(f"[dim]{HELP}[/]")
    else:
        console.print(f"[yellow]Unknown command {name}.[/] [dim]/help lists them.[/]")
    return False

