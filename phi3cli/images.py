"""Images a user gives a vision model: read from a file or a data: URL, checked, and kept as RGB pixels.

Everything that can be wrong with an image is found here, before any model sees it: not an image, a truncated
file, more pixels than the limit (a decompression bomb as much as a mistake), a data URL with a media type that
is not an image phi3 reads. Each is an ImageError with one line that names the image. Pillow is imported only
when an image is read.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phi3cli.errors import BackendUnavailableError, Phi3Error

DEFAULT_MAX_PIXELS = 50_000_000  # width x height; Phi-4-multimodal reads at most 36 crops of 448x448 (7.2 Mpx)
DATA_URL_TYPES = ("image/png", "image/jpeg", "image/webp")
FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif", "BMP": "image/bmp"}
_DATA_URL = re.compile(r"data:(?P<type>[^;,]*)(?P<params>(;[^;,]*)*?)(?P<b64>;base64)?,(?P<data>.*)", re.S)


class ImageError(Phi3Error):
    """An image that cannot be given to the model: unreadable, truncated, too large, or too many."""


@dataclass(frozen=True)
class ImageLimits:
    """What phi3 accepts: the pixels of one image (width x height) and, when set, the images of one request."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    max_images: int | None = None


@dataclass(frozen=True, eq=False)
class Image:
    """One decoded image: its RGB pixels (height x width x 3, uint8) and where it came from."""

    label: str  # the file name, or "image N" for one sent inline
    width: int
    height: int
    media_type: str
    pixels: Any = field(repr=False)  # numpy.ndarray, uint8, (height, width, 3)

    def describe(self) -> str:
        return f"{self.label} ({self.width}x{self.height})"


def decode_image(data: bytes, label: str, limits: ImageLimits) -> Image:
    """Image bytes (any format Pillow reads), decoded to RGB and checked against the limits."""
    try:
        import numpy as np
        from PIL import Image as PILImage
        from PIL import UnidentifiedImageError
    except ImportError as exc:
        raise BackendUnavailableError(
            f"Reading images needs {exc.name}, which is not installed.",
            hint="pip install 'phi3cli[openvino]' (vision models run on OpenVINO; it brings Pillow and numpy).",
        ) from exc

    PILImage.MAX_IMAGE_PIXELS = None  # phi3's own limit below, reported as one line, replaces Pillow's warning
    try:
        with PILImage.open(io.BytesIO(data)) as img:
            width, height, kind = img.width, img.height, img.format or ""
            if width * height > limits.max_pixels:
                raise ImageError(
                    f"{label} is {width}x{height} ({width * height:,} pixels), over the limit of "
                    f"{limits.max_pixels:,} pixels.",
                    hint="Scale the image down, or raise the limit with --max-image-pixels.",
                )
            img.load()
            pixels = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except UnidentifiedImageError as exc:
        raise ImageError(f"{label} is not an image phi3 can read (PNG, JPEG, WebP, GIF or BMP).") from exc
    except (OSError, SyntaxError, ValueError) as exc:  # Pillow's words for a truncated or corrupt file
        raise ImageError(f"{label} is a damaged or truncated image: {str(exc).splitlines()[0]}.") from exc
    return Image(label, width, height, FORMATS.get(kind, f"image/{kind.lower()}"), pixels)


def read_image(path: str | Path, limits: ImageLimits | None = None) -> Image:
    """An image file, decoded and checked."""
    path = Path(path).expanduser()
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise ImageError(f"No image at {path}.") from exc
    except IsADirectoryError as exc:
        raise ImageError(f"{path} is a folder, not an image file.") from exc
    except OSError as exc:
        raise ImageError(f"{path} cannot be read: {exc.strerror or exc}.") from exc
    return decode_image(data, path.name, limits or ImageLimits())


def decode_data_url(url: str, label: str = "the image", limits: ImageLimits | None = None) -> Image:
    """A `data:image/png;base64,...` URL (PNG, JPEG or WebP), decoded and checked."""
    match = _DATA_URL.fullmatch(url.strip())
    if match is None:
        raise ImageError(f"{label} is not a data: URL (data:image/png;base64,...).")
    media_type = match["type"].lower() or "text/plain"
    if media_type not in DATA_URL_TYPES:
        raise ImageError(f"{label} has media type {media_type!r}; phi3 reads {', '.join(DATA_URL_TYPES)}.")
    if not match["b64"]:
        raise ImageError(f"{label} is not base64-encoded (data:{media_type};base64,...).")
    try:
        data = base64.b64decode(re.sub(r"\s+", "", match["data"]), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError(f"{label} is not valid base64: {exc}.") from exc
    image = decode_image(data, label, limits or ImageLimits())
    if image.media_type != media_type:
        raise ImageError(f"{label} says it is {media_type} but holds {image.media_type} data.")
    return image


def check_count(count: int, model_name: str, capacity: int, limits: ImageLimits | None = None) -> None:
    """Refuse images for a model that reads none, or more than the model (or the limits) take in one request."""
    if count and capacity <= 0:
        raise ImageError(
            f"{model_name} reads no images: it is a text-only model.",
            hint="Use a vision model (Phi-4-multimodal), or send the message without images.",
        )
    most = min(capacity, limits.max_images) if limits and limits.max_images else capacity
    if count > most:
        raise ImageError(f"{count} images in one request; {model_name} takes at most {most}.")
