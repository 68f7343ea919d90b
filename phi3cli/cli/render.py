"""Rich rendering shared by the commands: progress for long work and the figures after a reply."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

if TYPE_CHECKING:
    from phi3cli.generation import ReplyStats

err_console = Console(stderr=True, highlight=False)

UNLIMITED_WIDTH = 10_000  # wider than any table we print


def out_console() -> Console:
    """stdout: as wide as the terminal, or, piped or redirected, without a width limit so tables come out whole."""
    console = Console(highlight=False)
    if not console.is_terminal:
        console.width = UNLIMITED_WIDTH
    return console


class RichProgress:
    """The core's Progress protocol drawn on stderr: a spinner per phase, a bar with the share done and an estimate
    of the time left when the size is known. Piped, a plain line every PLAIN_EVERY_S seconds says the same."""

    PLAIN_EVERY_S = 15.0

    def __init__(self, console: Console = err_console):
        self.console = console
        self._progress: Progress | None = None
        self._task = None
        self._last_line = 0.0  # when the current phase last printed a plain line (piped)

    def __enter__(self) -> RichProgress:
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            TextColumn("· left"),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
            disable=not self.console.is_terminal,  # piped: plain lines instead of redraws (tasks still count)
            get_time=_now,
        )
        self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress:
            if exc[0] is None:
                self._finish_task()
            self._progress.stop()
            self._progress = None

    def phase(self, description: str, total: float | None = None) -> None:
        if not self._progress:
            return
        self._finish_task()
        self._task = self._progress.add_task(description, total=total)
        self._last_line = _now()

    def _finish_task(self) -> None:
        if self._progress and self._task is not None:
            task = self._progress.tasks[-1]
            self.console.print(
                f"[green]✓[/] [dim]{escape(task.description)} ({task.elapsed or 0:.1f} s)[/]", soft_wrap=True
            )
            self._progress.remove_task(self._task)
            self._task = None

    def advance(self, amount: float = 1.0) -> None:
        if self._progress and self._task is not None:
            self._progress.advance(self._task, amount)
            if not self.console.is_terminal and (line := self._plain_line()):
                self.console.print(f"  {escape(line)}", soft_wrap=True, highlight=False)

    def grow(self, amount: float) -> None:
        if self._progress and self._task is not None:
            task = self._progress.tasks[-1]
            self._progress.update(self._task, total=(task.total or 0) + amount)

    def _plain_line(self) -> str | None:
        """The phase's share done and time left, at most every PLAIN_EVERY_S seconds (for a log, where no bar is drawn)."""
        task, now = self._progress.tasks[-1], _now()
        if not task.total or now - self._last_line < self.PLAIN_EVERY_S:
            return None
        self._last_line = now
        share, elapsed = min(task.completed / task.total, 1.0), task.elapsed or 0.0
        estimate = f", about {_duration(elapsed * (1 - share) / share)} left" if share > 0 else ""
        return f"{task.description}: {share:.0%} after {_duration(elapsed)}{estimate}"

    def note(self, message: str) -> None:
        self.console.print(f"[yellow]{escape(message)}[/]", soft_wrap=True)


def _now() -> float:
    return time.monotonic()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def stats_line(stats: ReplyStats) -> str:
    """One dim line after a reply: what ran where, and how fast."""
    return (
        f"{stats.backend} on {stats.executed_device} · TTFT {stats.ttft_s * 1000:.0f} ms{image_part(stats)} · "
        f"{stats.decode_tps:.1f} tok/s · {stats.generated_tokens} tokens "
        f"({prompt_part(stats)}{f', {stats.cached_tokens} cached' if stats.cached_tokens else ''}) · "
        f"{stats.finish_reason}{speculation_figures(stats)}"
    )


def prompt_part(stats: ReplyStats) -> str:
    """The prompt's size: '120 prompt'; with images, the runtime's own count of what it read ('1331 prompt with
    images'), or where it gives none, the text's, saying so ('120 prompt text, images not counted')."""
    if not stats.images:
        return f"{stats.prompt_tokens} prompt"
    if stats.input_tokens is None:
        return f"{stats.prompt_tokens} prompt text, images not counted"
    return f"{stats.input_tokens} prompt with images"


def image_part(stats: ReplyStats) -> str:
    """What the images in a prompt cost, inside the TTFT: ' (2 images, encoded in 85 ms)'."""
    if not stats.images:
        return ""
    count = f"{stats.images} image{'s' if stats.images > 1 else ''}"
    return f" ({count}, encoded in {stats.image_s * 1000:.0f} ms)" if stats.image_s is not None else f" ({count})"


def speculation_figures(stats: ReplyStats) -> str:
    """Acceptance after a speculative reply (counted from the stream: tokens per pass of the model), else ''."""
    if stats.acceptance is None:
        return ""
    return f" · {stats.acceptance:.0%} accepted ({stats.generated_tokens / stats.steps:.1f} tokens a pass)"


def trim_notice(event, session) -> str:
    """The notice shown when a chat's oldest messages were dropped to fit."""
    from phi3cli.generation import prompt_budget

    model = session.model
    limit = prompt_budget(model)
    why = (
        f"the prompt limit of {limit} tokens (the device's static prompt length)"
        if model.max_prompt_tokens and limit == model.max_prompt_tokens
        else f"the {model.context_length}-token context with room for the reply"
    )
    notice = (
        f"Dropped the {event.messages} oldest messages to fit {why}; the prompt is now {event.prompt_tokens} tokens"
    )
    if model.prompt_cache and model.prompt_cache.enabled:
        notice += ", read again past the system prompt (the kept cache began with the dropped messages)"
    return notice + "."


def write_outputs(outputs) -> None:
    """Each (path, render) pair whose path was given: render()'s text written whole there, then "Wrote PATH"."""
    from phi3cli.util import write_atomically

    for path, render in outputs:
        if path:
            write_atomically(path, render())
            err_console.print(f"[dim]Wrote {escape(str(path))}[/]")
