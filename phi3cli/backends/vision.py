"""What a vision model adds to the backend interface: prompts that carry images, and how many a model reads.

A vision model's prompt is still the token ids of the rendered chat (so budgets, trimming and timing work as for
text), as an `ImagePrompt`: a list of ids that also carries the rendered text, with the model's placeholder
for each image (`<|image_1|>`...), and the images in placeholder order. A backend whose model reads images sets
`LoadedModel.max_images` (text-only models keep 0) and `image_placeholder`, and after a generate reports the
seconds its runtime spent encoding the images in `ImagePrompt.image_seconds` and, where the runtime counts them,
the input tokens it read (text and image tokens) in `ImagePrompt.input_tokens`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from phi3cli.backends.base import LoadedModel
    from phi3cli.images import Image


class ImagePrompt(list):
    """Prompt token ids with the rendered text they came from and the images its placeholders stand for."""

    def __init__(self, ids: Sequence[int], text: str, images: Sequence[Image] = ()):
        super().__init__(ids)
        self.text = text
        self.images = list(images)
        self.image_seconds: float | None = None  # set by the backend: the runtime's image-encoding time
        self.input_tokens: int | None = None  # set by the backend: the tokens the runtime read, images' included


def image_capacity(model: LoadedModel) -> int:
    """How many images one request to this model may carry (0: a text-only model)."""
    return int(getattr(model, "max_images", 0) or 0)


def image_placeholder(model: LoadedModel, number: int) -> str:
    """The text that stands for image `number` (from 1) in a message, as the model's processor writes it."""
    write = getattr(model, "image_placeholder", None)
    return write(number) if write else f"<|image_{number}|>"


def with_placeholders(messages: list[dict], model: LoadedModel) -> tuple[list[dict], list[Image]]:
    """The messages as the chat template takes them, each image's placeholder before its message's text (numbered
    through the conversation), and the images in that order. A message's images are its "images" key."""
    out: list[dict] = []
    images: list[Image] = []
    for message in messages:
        pictures = message.get("images") or []
        marks = "".join(image_placeholder(model, len(images) + k + 1) for k in range(len(pictures)))
        images += pictures
        out.append({k: v for k, v in message.items() if k != "images"} | {"content": marks + message["content"]})
    return out, images
