"""Images on ONNX Runtime GenAI: a folder whose genai_config.json names a vision model type (Microsoft's
Phi-4-multimodal-instruct-onnx, "phi4mm"; Phi-3.5-vision-instruct-onnx, "phi3v"), run through og.MultiModalProcessor.

The processor takes the rendered prompt as text, with `<|image_N|>` where image N goes, and the images as encoded
files: it decodes, resizes, crops and normalises them (ONNX Runtime Extensions' transforms, from the folder's
processor config) and expands each placeholder to the image's tokens. `Generator.set_inputs` then runs the whole
prefill (vision model, embedding model, decoder). ONNX Runtime GenAI reports no timings of its own, so the image
time phi3 reports is the processor's (decoding the images to the vision model's input tensors); the vision model's
run is part of the prefill, counted in the time to first token.

A prompt without images goes the text path (token ids appended to the Generator), which these folders take too.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path

import onnxruntime_genai as og

from phi3cli.backends.base import GenerationSettings, LoadRequest, RawToken
from phi3cli.backends.onnx.runtime import OnnxModel, open_folder
from phi3cli.backends.vision import ImagePrompt
from phi3cli.errors import ContextOverflowError, Phi3Error, UnsupportedModelError
from phi3cli.progress import Progress
from phi3cli.util import first_line

# genai_config.json's model type -> the placeholder its multimodal processor reads for image N
VISION_TYPES = {"phi4mm": "<|image_{}|>", "phi3v": "<|image_{}|>\n"}
MAX_IMAGES = 8  # per request, as on openvino: a Phi-4-multimodal image is up to 36 crops of 256 tokens


class OnnxVisionModel(OnnxModel):
    """An ONNX Runtime GenAI multimodal folder: images through its processor, text as token ids."""

    max_images = MAX_IMAGES

    def __init__(self, path: Path, model, fmt: str, device: str, genai: dict):
        super().__init__(path, model, fmt, device, genai, reuse=False)  # every prompt is read whole
        self.placeholder = VISION_TYPES[genai["model"]["type"]]
        self.processor = model.create_multimodal_processor()

    def image_placeholder(self, number: int) -> str:
        return self.placeholder.format(number)

    def constraint_refusal(self) -> str | None:
        return "phi3 does not constrain a vision model's output yet"

    def generate(self, prompt_ids: list[int], settings: GenerationSettings) -> Iterator[RawToken]:
        if isinstance(prompt_ids, ImagePrompt) and prompt_ids.images:
            return self._generate_with_images(prompt_ids, settings)
        return super().generate(prompt_ids, settings)

    def _generate_with_images(self, prompt: ImagePrompt, settings: GenerationSettings) -> Iterator[RawToken]:
        files = [encoded(image) for image in prompt.images]
        start = time.perf_counter()  # inside the iterator: the processor's time counts in the time to first token
        try:
            inputs = self.processor(prompt.text, images=og.Images.open_bytes(*files))
        except RuntimeError as exc:
            raise Phi3Error(f"ONNX Runtime GenAI's image processor failed: {first_line(exc)}") from exc
        prompt.image_seconds = time.perf_counter() - start
        length = int(inputs["input_ids"].shape()[-1])  # the text's tokens and every image's
        prompt.input_tokens = length
        if length >= self.context_length:
            raise ContextOverflowError(
                f"The prompt is {length} tokens with its images; the model's context is {self.context_length}.",
                hint="Send fewer or smaller images.",
            )
        new_tokens = min(settings.max_new_tokens, self.context_length - length)  # clipped, as for text prompts
        generator = og.Generator(self.model, self._params(length + new_tokens, settings))
        generator.set_inputs(inputs)  # the prefill: vision model, embeddings, decoder
        yield from self._tokens(generator, new_tokens)


def encoded(image) -> bytes:
    """A checked image's pixels as a PNG file (lossless), the form the runtime's processor decodes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image.pixels).save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def is_vision_folder(genai: dict) -> bool:
    return genai["model"].get("type") in VISION_TYPES


def load_vision(folder: Path, fmt: str, request: LoadRequest, progress: Progress) -> OnnxVisionModel:
    """Load a vision folder and make its multimodal processor (from the folder's processor config files)."""
    model, genai = open_folder(folder, fmt, request, progress)
    try:
        return OnnxVisionModel(folder, model, fmt, request.device, genai)
    except RuntimeError as exc:
        raise UnsupportedModelError(
            f"ONNX Runtime GenAI cannot make the image processor of {folder}: {first_line(exc)}",
            hint="A vision folder needs its processor config files (vision_processor.json or processor_config.json).",
        ) from exc
