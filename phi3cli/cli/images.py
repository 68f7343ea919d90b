"""`--image` and `/image` for `phi3 chat`: images read and checked before the model loads, attached to a message."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.markup import escape

from phi3cli.images import ImageLimits, read_image


def read_images(paths: list[Path] | None, max_pixels: int | None) -> tuple[ImageLimits, list]:
    """The limits --max-image-pixels sets, and each --image file read and checked (before the model loads)."""
    limits = ImageLimits(max_pixels=max_pixels) if max_pixels else ImageLimits()
    return limits, [read_image(path, limits) for path in paths or ()]


def image_command(session, arg: str, console: Console) -> None:
    """/image FILE: the image goes with the next message."""
    if not arg.strip():
        console.print("[yellow]Usage: /image FILE[/] [dim](sent with your next message, to a vision model)[/]")
        return
    picture = read_image(arg.strip(), session.image_limits)
    session.attach(picture)
    console.print(f"[dim]{escape(picture.describe())} goes with your next message.[/]")
