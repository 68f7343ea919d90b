"""`phi3 chat`: a one-shot answer (pipe-friendly) or an interactive, streamed conversation."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape

from phi3cli import DEFAULT_MODEL
from phi3cli.backends.base import GenerationSettings
from phi3cli.cli.chat_repl import HELP, ChatState, interactive
from phi3cli.cli.errors import user_errors
from phi3cli.cli.images import read_images
from phi3cli.cli.options import (
    AdapterOpt,
    AllowFallbackOpt,
    BackendOpt,
    CacheReuseOpt,
    ConvertOpt,
    DeviceChoice,
    DeviceOpt,
    FormatOpt,
    ImageOpt,
    InferencePrecisionOpt,
    MaxImagePixelsOpt,
    MaxPromptLenOpt,
    MinResponseLenOpt,
    ModelOpt,
    NpuHintOpt,
    OptionOpt,
    ThreadsOpt,
    TrustRemoteCodeOpt,
    adapter_options,
    backend_options,
)
from phi3cli.cli.render import RichProgress, err_console, stats_line, trim_notice
from phi3cli.cli.sampling import FrequencyPenaltyOpt, MinPOpt, PresencePenaltyOpt, RepeatPenaltyOpt, apply_sampling
from phi3cli.cli.speculate import AssistantTokensOpt, DraftOpt, NgramOpt, PromptLookupOpt, describe, requested
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
    from phi3cli.sessions import ResumeChoice, SavedSession

DEFAULTS = GenerationSettings()


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
    option: OptionOpt = None,
    adapter: AdapterOpt = None,
    max_prompt_len: MaxPromptLenOpt = None,
    min_response_len: MinResponseLenOpt = None,
    npu_hint: NpuHintOpt = None,
    inference_precision: InferencePrecisionOpt = None,
    cache_reuse: CacheReuseOpt = True,
    draft: DraftOpt = None,
    prompt_lookup: PromptLookupOpt = False,
    num_assistant_tokens: AssistantTokensOpt = None,
    max_ngram_size: NgramOpt = None,
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
            "--json",
            help="Answer with a JSON object (any), enforced while generating.",
            rich_help_panel="Structured output",
        ),
    ] = False,
    image: ImageOpt = None,
    max_image_pixels: MaxImagePixelsOpt = None,
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
    from phi3cli.sessions import check_saveable, load_session, resume_choice
    from phi3cli.structured import output_constraint

    prompt = _prompt_or_stdin(prompt)
    constraint = output_constraint(json_schema, json_object)
    images = read_images(image, max_image_pixels)  # checked before the model loads
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
    options = backend_options(
        option,
        max_prompt_len=max_prompt_len,
        min_response_len=min_response_len,
        generate_hint=npu_hint,
        inference_precision=inference_precision,
    ) | adapter_options(adapter)
    how = dict(
        threads=threads,
        trust_remote_code=trust_remote_code,
        allow_fallback=allow_fallback,
        options=options,
        cache_reuse=cache_reuse and prompt is None,  # one answer: no next turn to reuse it
        convert=convert,
        speculation=requested(draft, prompt_lookup, num_assistant_tokens, max_ngram_size),
    )
    loaded = _load(chosen, saved, resume, how)
    try:
        apply_sampling(chosen.settings, loaded, repeat_penalty, presence_penalty, frequency_penalty, min_p)
        state = _start(loaded, chosen, saved, resume, save, system, constraint, images)
        if prompt is not None:
            _answer_once(state, prompt)
        else:
            err_console.print(
                f"[bold]{escape(state.model_spec)}[/] · {loaded.backend} on {loaded.executed_device} · loaded in "
                f"{loaded.load_seconds:.1f} s{escape(describe(loaded.speculation))}\n[dim]{HELP}[/]"
            )
            interactive(state, Console(highlight=False))
    finally:
        loaded.close()


def _prompt_or_stdin(prompt: str | None) -> str | None:
    """The prompt given, else text piped on stdin (one answer), else None (an interactive session)."""
    if prompt is None and not sys.stdin.isatty():
        prompt = sys.stdin.read().strip()
        if not prompt:
            raise typer.BadParameter("stdin was empty; give a prompt.", param_hint="PROMPT")
    return prompt


def _load(chosen: ResumeChoice, saved: SavedSession | None, resume: Path | None, how: dict):
    """Load the model chosen; an error caused by what a --resume file chose says which flag overrides it."""
    from phi3cli.loading import load

    from_file = chosen.from_file  # named in errors, so the user knows which flag overrides the file
    model = chosen.model or DEFAULT_MODEL
    try:
        with RichProgress() as progress:
            loaded = load(
                model, backend=chosen.backend, device=chosen.device, format=chosen.format, progress=progress, **how
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
            named = ", ".join(f"{f} {from_file[f]}" for f in flags)
            exc.hint = f"{exc.hint + ' ' if exc.hint else ''}{resume} chose {named}; pass another to override it."
        raise
    if chosen.device == DeviceChoice.auto.value:
        err_console.print(f"[dim]{escape(loaded.route.reason)}[/]", soft_wrap=True)
    return loaded


def _start(loaded, chosen: ResumeChoice, saved, resume, save, system, constraint, images) -> ChatState:
    """The session on the loaded model: the saved history restored, the system prompt and the JSON constraint set,
    and the --image files (limits, images) attached to the first message."""
    from phi3cli.chat import ChatSession
    from phi3cli.sessions import restore
    from phi3cli.structured import constraining_hint

    limits, pictures = images
    session = ChatSession(loaded, chosen.settings, name=chosen.model or DEFAULT_MODEL, image_limits=limits)
    state = ChatState(session, chosen.model or DEFAULT_MODEL, chosen.device, autosave=save, file=resume)
    if saved:
        restore(session, saved)
        err_console.print(f"[dim]{escape(_resumed_line(resume, saved, loaded))}[/]", soft_wrap=True)
    if system is not None:
        session.system = system
    if constraint is not None:
        if why := loaded.constraint_refusal():
            raise Phi3Error(f"Cannot constrain the answer to JSON: {why}.", hint=constraining_hint())
        session.settings.constraint = constraint
    session.attach(*pictures)
    return state


def _resumed_line(path: Path, saved: SavedSession, loaded) -> str:
    line = (
        f"Resumed {path}: {len(saved.messages)} messages, saved with {saved.model} "
        f"({saved.backend}, {saved.format}, ran on {saved.executed_device or saved.device})"
    )
    if (loaded.backend, loaded.format) != (saved.backend, saved.format):
        line += f"; continuing with {loaded.backend} {loaded.format}, so answers may differ"
    return line + "."


def _answer_once(state: ChatState, prompt: str) -> None:
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
