"""Images in chat requests: OpenAI `image_url` content parts, decoded and checked before a request is queued.

protocol.py keeps each user message's image URLs as given (`message["image_urls"]`); `resolve_images` turns them into
phi3cli.images.Image objects (a `data:` URL, PNG, JPEG or WebP in base64; an http(s) URL only when the server was
started with --allow-image-urls, fetched with a size and time limit), and refuses with a 400 naming the model
when it reads no images. phi3cli.backends.vision.with_placeholders
writes each image's placeholder into its message for the chat template.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from phi3cli.backends.base import LoadedModel
from phi3cli.backends.vision import image_capacity
from phi3cli.images import Image, ImageError, ImageLimits, check_count, decode_data_url, decode_image
from phi3cli.serve.protocol import ApiError
from phi3cli.util import human_size

FETCH_BYTES = 20 << 20  # the most a remote image may weigh
FETCH_SECONDS = 10.0  # the longest its whole fetch may take
CHUNK = 1 << 16


@dataclass(frozen=True)
class ImageOptions:
    """What `phi3 serve` accepts as images."""

    limits: ImageLimits = ImageLimits()
    allow_urls: bool = False  # fetch http(s) image URLs (else only data: URLs)
    fetch_bytes: int = FETCH_BYTES
    fetch_seconds: float = FETCH_SECONDS


def _fetch(url: str, label: str, options: ImageOptions) -> Image:
    """An http(s) image, read within the size limit and within the time limit for the whole fetch (a server that
    sends slowly is cut off at the deadline, not only one that stops sending)."""
    import time
    import urllib.request

    deadline = time.monotonic() + options.fetch_seconds
    data = bytearray()
    try:
        with urllib.request.urlopen(url, timeout=options.fetch_seconds) as response:  # noqa: S310 (http(s) checked)
            while chunk := response.read1(CHUNK):  # what has arrived, so the deadline is checked as it trickles
                data += chunk
                if len(data) > options.fetch_bytes:
                    raise ImageError(f"{label} at {url} is over {human_size(options.fetch_bytes)}.")
                if time.monotonic() > deadline:
                    raise ImageError(f"{label} at {url} took over {options.fetch_seconds:g} s to fetch.")
    except OSError as exc:
        raise ImageError(f"{label} could not be fetched from {url}: {exc}.") from exc
    return decode_image(bytes(data), label, options.limits)


def resolve_images(messages: list[dict[str, Any]], model: LoadedModel, name: str, options: ImageOptions) -> int:
    """Decode every message's image URLs into message["images"]; returns how many. Raises ApiError (400)."""
    count = sum(len(m.get("image_urls", ())) for m in messages)
    if not count:
        return 0
    try:
        check_count(count, name, image_capacity(model), options.limits)
    except ImageError as exc:
        raise ApiError(exc.message, param="messages", code="invalid_image") from None
    number = 0
    for index, message in enumerate(messages):
        images = []
        for url in message.pop("image_urls", ()):
            number += 1
            label = f"messages[{index}] image {number}"
            try:
                if url.startswith(("http://", "https://")):
                    if not options.allow_urls:
                        raise ImageError(
                            f"{label} is a remote URL; this server takes images as data: URLs only.",
                            hint="Start the server with --allow-image-urls to fetch them.",
                        )
                    images.append(_fetch(url, label, options))
                else:
                    images.append(decode_data_url(url, label, options.limits))
            except ImageError as exc:
                message_text = exc.message + (f" {exc.hint}" if exc.hint else "")
                raise ApiError(message_text, param=f"messages[{index}].content", code="invalid_image") from None
        if images:
            message["images"] = images
    return count
