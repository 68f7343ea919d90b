"""Saved chat sessions: a conversation, the model and settings it ran with, as a small JSON file.

A file written by `/save` or `--save` can be continued by `/load` or `phi3 chat --resume`; with the
same model, backend, format and greedy settings the next answer is the one the uninterrupted chat
would have given.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from phi3cli.backends import DEVICES
from phi3cli.backends.base import GenerationSettings, OutputConstraint
from phi3cli.backends.sampling import SamplingControls
from phi3cli.chat import ChatSession
from phi3cli.errors import SessionFileError
from phi3cli.util import write_atomically

SCHEMA = "phi3.chat-session/1"
_SCHEMA_NAME = SCHEMA.split("/")[0]
ROLES = ("user", "assistant")


@dataclass
class SavedSession:
    """What a session file holds."""

    model: str  # the model as given (a local path made absolute), so --resume finds it again
    backend: str
    device: str  # the device asked for: auto, cpu, gpu or npu
    executed_device: str  # what the runtime reported it ran on
    format: str
    messages: list[dict[str, str]] = field(default_factory=list)
    system: str | None = None
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    saved_at: float = 0.0

    def to_json(self) -> dict:
        settings = asdict(self.settings)
        settings["stop"] = list(settings["stop"])
        return {
            "schema": SCHEMA,
            "model": self.model,
            "backend": self.backend,
            "device": self.device,
            "executed_device": self.executed_device,
            "format": self.format,
            "system": self.system,
            "settings": settings,
            "messages": self.messages,
            "saved_at": self.saved_at,
        }


def model_spec(spec: str) -> str:
    """The model as a session records it: a local path made absolute, anything else (an id, `demo`) as is."""
    if spec == "demo":  # resolve_source takes `demo` before any folder of that name
        return spec
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def snapshot(session: ChatSession, *, model: str, device: str) -> SavedSession:
    """The session as it stands: its history, system prompt and settings, and the model that runs it."""
    loaded = session.model
    return SavedSession(
        model=model_spec(model),
        backend=loaded.backend,
        device=device,
        executed_device=loaded.executed_device,
        format=loaded.format,
        # An image's name is kept to say which turn had it; its pixels are not saved (a resumed chat is text).
        messages=[
            {**m, "images": [i.label for i in m["images"]]} if m.get("images") else dict(m) for m in session.messages
        ],
        system=session.system,
        settings=replace(session.settings),
        saved_at=time.time(),
    )


def check_saveable(path: Path | str) -> Path:
    """Refuse early a path that save_session would refuse: a folder, or a file that is not a phi3 session."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise SessionFileError(f"{path} is a folder.", hint="Give a file name, e.g. chat.json.")
    if path.exists():
        try:
            load_session(path)
        except SessionFileError:
            raise SessionFileError(
                f"{path} exists and is not a phi3 chat session; not overwriting it.",
                hint="Choose another file name.",
            ) from None
    return path


def save_session(path: Path | str, saved: SavedSession) -> Path:
    """Write the session file whole (a temporary file renamed into place); refuse to overwrite a foreign file."""
    path = check_saveable(path)
    try:
        return write_atomically(path, json.dumps(saved.to_json(), indent=2, ensure_ascii=False) + "\n")
    except OSError as exc:
        raise SessionFileError(f"Could not write {path}: {exc.strerror or exc}.") from exc


def load_session(path: Path | str) -> SavedSession:
    """Read a session file, checking it is ours and well formed; SessionFileError says what is wrong."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SessionFileError(f"No session file {path}.", hint="Save one with /save FILE or --save FILE.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SessionFileError(f"Cannot read {path}: {getattr(exc, 'strerror', None) or exc}.") from exc
    try:
        data = json.loads(text)
    except ValueError:
        raise SessionFileError(f"{path} is not a phi3 chat session (it is not JSON).") from None
    schema = data.get("schema") if isinstance(data, dict) else None
    if not isinstance(schema, str) or not schema.startswith(_SCHEMA_NAME + "/"):
        raise SessionFileError(
            f'{path} is not a phi3 chat session (no "schema": "{SCHEMA}").',
            hint="Give a file written by /save or --save.",
        )
    if schema != SCHEMA:
        raise SessionFileError(
            f"{path} is a {schema} session; this phi3 reads {SCHEMA}.", hint="Upgrade phi3 to read it."
        )
    try:
        messages = data["messages"]
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in messages
        ):
            raise ValueError("messages must be a list of {role: user|assistant, content: text}")
        known = {f.name for f in fields(GenerationSettings)}
        settings = {k: v for k, v in (data.get("settings") or {}).items() if k in known}
        settings["stop"] = tuple(settings.get("stop") or ())
        if isinstance(settings.get("constraint"), dict):
            settings["constraint"] = OutputConstraint(**settings["constraint"])
        if isinstance(sampling := settings.get("sampling"), dict):
            bias = tuple((int(t), float(b)) for t, b in sampling.get("logit_bias") or ())
            settings["sampling"] = SamplingControls(**{**sampling, "logit_bias": bias})
        return SavedSession(
            model=str(data["model"]),
            backend=str(data["backend"]),
            device=str(data.get("device") or "auto"),
            executed_device=str(data.get("executed_device") or ""),
            format=str(data["format"]),
            messages=[{"role": m["role"], "content": m["content"]} for m in messages],
            system=data.get("system"),
            settings=GenerationSettings(**settings),
            saved_at=float(data.get("saved_at") or 0.0),
        )
    except (KeyError, TypeError, ValueError) as exc:
        what = f"no {exc.args[0]!r}" if isinstance(exc, KeyError) else str(exc)
        raise SessionFileError(f"{path} is a damaged phi3 chat session: {what}.") from None


def restore(session: ChatSession, saved: SavedSession) -> None:
    """Put a saved conversation (history, system prompt, settings) into a running session."""
    session.messages[:] = [dict(m) for m in saved.messages]
    session.system = saved.system
    session.settings = replace(saved.settings)
    session.last_stats = None


@dataclass
class ResumeChoice:
    """What a chat runs with: the options given, and for those left unset what the resumed file decides."""

    model: str | None
    backend: str | None
    format: str | None
    device: str  # auto, cpu, gpu or npu
    settings: GenerationSettings
    from_file: dict[str, str] = field(default_factory=dict)  # flag -> the file's value, for errors to name the flag


def resume_choice(
    saved: SavedSession | None,
    *,
    model: str | None = None,
    backend: str | None = None,
    format: str | None = None,
    device: str = "auto",
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    seed: int | None = None,
) -> ResumeChoice:
    """Merge a saved session with the user's options: the options given (not None, device not auto) win."""
    from_file = {}
    if saved:
        from_file = {
            flag: value
            for flag, value, given in (
                ("--model", saved.model, model),
                ("--backend", saved.backend, backend),
                ("--format", saved.format, format),
                ("--device", saved.device, None if device == "auto" else device),
            )
            if given is None and value and value != "auto"
        }
        model = model or saved.model
        backend = backend or saved.backend
        format = format or saved.format
        if "--device" in from_file and saved.device in DEVICES:
            device = saved.device
    settings = GenerationSettings(**(saved.settings.__dict__ if saved else {}))
    given = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "seed": seed}
    for name, value in given.items():
        if value is not None:
            setattr(settings, name, value)
    return ResumeChoice(model, backend, format, device, settings, from_file)
