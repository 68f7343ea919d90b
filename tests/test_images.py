"""Images for vision models, checked in the core: every bad input is one line, found before any model runs.

The chat bookkeeping (which turn had which image, placeholders numbered through the conversation, a text-only
model refusing images) runs on tests/fakes/scripted_model.py (a FAKE model, named as such); what a real vision
model does with the images is in tests/test_vision.py.
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest

from phi3cli.backends.base import GenerationSettings
from phi3cli.backends.vision import ImagePrompt
from phi3cli.chat import ChatSession
from phi3cli.generation import ReplyStats
from phi3cli.images import ImageError, ImageLimits, check_count, decode_data_url, read_image
from tests.fakes.scripted_model import FakeScriptedModel


def png_bytes(seed: int = 0, size: tuple[int, int] = (24, 32), kind: str = "PNG") -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=kind)
    return buffer.getvalue()


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64," + base64.b64encode(data).decode()


def test_an_image_file_is_read_as_rgb_pixels(tmp_path):
    path = tmp_path / "cat.png"
    path.write_bytes(png_bytes(size=(24, 32)))
    image = read_image(path)
    assert (image.width, image.height, image.media_type) == (32, 24, "image/png")
    assert image.pixels.shape == (24, 32, 3) and image.pixels.dtype == np.uint8
    assert image.describe() == "cat.png (32x24)"


@pytest.mark.parametrize(
    "content, words",
    [
        (b"just some text, not pixels", "is not an image phi3 can read"),
        (png_bytes()[:120], "damaged or truncated"),
    ],
    ids=["not-an-image", "truncated"],
)
def test_a_bad_image_file_is_one_line(tmp_path, content, words):
    path = tmp_path / "broken.png"
    path.write_bytes(content)
    with pytest.raises(ImageError, match=words) as caught:
        read_image(path)
    assert "\n" not in caught.value.message and "broken.png" in caught.value.message


def test_a_missing_file_and_a_folder_are_named(tmp_path):
    with pytest.raises(ImageError, match="No image at"):
        read_image(tmp_path / "absent.png")
    with pytest.raises(ImageError, match="is a folder"):
        read_image(tmp_path)


def test_an_image_over_the_pixel_limit_is_refused_and_the_limit_reported(tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(png_bytes(size=(40, 50)))
    with pytest.raises(ImageError, match=r"50x40 \(2,000 pixels\), over the limit of 1,999 pixels") as caught:
        read_image(path, ImageLimits(max_pixels=1999))
    assert "--max-image-pixels" in caught.value.hint
    assert read_image(path, ImageLimits(max_pixels=2000)).width == 50


@pytest.mark.parametrize("kind, media_type", [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")])
def test_data_urls_of_png_jpeg_and_webp_decode(kind, media_type):
    image = decode_data_url(data_url(png_bytes(kind=kind), media_type), "part 1")
    assert image.media_type == media_type and image.pixels.shape == (24, 32, 3)


@pytest.mark.parametrize(
    "url, words",
    [
        ("https://example.com/cat.png", "not a data: URL"),
        (data_url(b"hello", "text/plain"), "media type 'text/plain'"),
        (data_url(png_bytes(), "image/gif"), "media type 'image/gif'"),
        ("data:image/png,rawbytes", "not base64-encoded"),
        ("data:image/png;base64,@@@@", "not valid base64"),
        (data_url(png_bytes(kind="JPEG"), "image/png"), "says it is image/png but holds image/jpeg"),
        (data_url(b"not an image"), "not an image phi3 can read"),
    ],
    ids=["remote", "text", "gif", "not-base64", "bad-base64", "mislabelled", "not-an-image"],
)
def test_a_bad_data_url_is_one_line(url, words):
    with pytest.raises(ImageError, match=words) as caught:
        decode_data_url(url, "messages[0] image 1")
    assert caught.value.message.startswith("messages[0] image 1") and "\n" not in caught.value.message


def test_counts_a_text_only_model_and_too_many_images():
    with pytest.raises(ImageError, match="phi-3-mini reads no images: it is a text-only model"):
        check_count(1, "phi-3-mini", 0)
    check_count(0, "phi-3-mini", 0)  # no images: nothing to refuse
    with pytest.raises(ImageError, match="3 images in one request; tiny takes at most 2"):
        check_count(3, "tiny", 2)
    with pytest.raises(ImageError, match="takes at most 1"):
        check_count(2, "tiny", 8, ImageLimits(max_images=1))


class FakeVisionModel(FakeScriptedModel):
    """A FAKE model that says it reads images: for the chat's bookkeeping only."""

    max_images = 2


def image(seed: int, label: str):
    return decode_data_url(data_url(png_bytes(seed)), label)


def ask(session: ChatSession, text: str) -> ReplyStats:
    return [e for e in session.ask(text) if isinstance(e, ReplyStats)][-1]


def test_a_text_only_model_refuses_an_image_before_generating():
    model = FakeScriptedModel()
    session = ChatSession(model, name="demo")
    with pytest.raises(ImageError, match="demo reads no images"):
        session.attach(image(1, "a.png"))
    assert not session.pending_images and not model.prompts


def test_history_keeps_which_turn_had_which_image_and_numbers_them_through_the_conversation():
    model = FakeVisionModel(["A cat.", "A dog.", "Welcome."])
    session = ChatSession(model, GenerationSettings(max_new_tokens=8), name="tiny")
    first, second = image(1, "a.png"), image(2, "b.png")
    session.attach(first)
    stats = ask(session, "What is this?")
    assert stats.images == 1
    session.attach(second)
    ask(session, "And this one?")
    ask(session, "Thanks.")
    assert [m.get("images") for m in session.messages[::2]] == [[first], [second], None]
    prompt = model.prompts[-1]
    assert isinstance(prompt, ImagePrompt) and prompt.images == [first, second]
    assert "<|user|>\n<|image_1|>What is this?<|end|>" in prompt.text
    assert "<|user|>\n<|image_2|>And this one?<|end|>" in prompt.text
    assert "<|image_3|>" not in prompt.text and prompt.text.count("<|image_") == 2


def test_the_oldest_image_turns_go_when_the_conversation_holds_more_images_than_the_model_takes():
    model = FakeVisionModel()
    session = ChatSession(model, name="tiny")
    for seed in range(3):
        session.attach(image(seed, f"{seed}.png"))
        ask(session, f"Picture {seed}?")
    assert [img.label for img in model.prompts[-1].images] == ["1.png", "2.png"]
    with pytest.raises(ImageError, match="tiny takes at most 2"):
        session.attach(image(7, "x.png"), image(8, "y.png"), image(9, "z.png"))


def test_a_saved_session_names_its_images_and_resumes_as_text(tmp_path):
    from phi3cli.sessions import load_session, save_session, snapshot

    model = FakeVisionModel()
    session = ChatSession(model, name="tiny")
    session.attach(image(1, "a.png"))
    ask(session, "What is this?")
    path = save_session(tmp_path / "chat.json", snapshot(session, model="tiny", device="cpu"))
    assert json.loads(path.read_text())["messages"][0]["images"] == ["a.png"]
    assert load_session(path).messages[0] == {"role": "user", "content": "What is this?"}


def test_without_pillow_reading_an_image_names_the_extra(monkeypatch, tmp_path):
    import sys

    from phi3cli.errors import BackendUnavailableError

    picture = tmp_path / "p.png"
    picture.write_bytes(b"\x89PNG\r\n\x1a\n")
    monkeypatch.setitem(sys.modules, "PIL", None)  # import PIL raises ImportError, as where it is not installed
    with pytest.raises(BackendUnavailableError) as caught:
        read_image(picture)
    assert "needs PIL" in caught.value.message and "phi3cli[openvino]" in caught.value.hint
