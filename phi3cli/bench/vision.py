"""The image test (phi3 bench on a vision model): one image and a short question, as `phi3 chat --image` asks it.

It runs only on a model that reads images (image_capacity > 0). The prompt is built as chat builds it (placeholders,
the chat template, an ImagePrompt) and answered through generate_text, greedy with the end of text ignored, so the
figures are chat's: the runtime's own image-encoding time, the time to first token with the image (encoding
included) and the decode speed after it. The image is --image's, else a generated 448x448 picture (one crop of
Phi-4-multimodal's image processor), the same every run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from phi3cli.backends.base import GenerationSettings
from phi3cli.backends.vision import ImagePrompt, image_capacity, with_placeholders
from phi3cli.generation import generate_text
from phi3cli.progress import MORE_STEPS

from .stats import fmt_figure, summarize

if TYPE_CHECKING:
    from phi3cli.backends.base import LoadedModel
    from phi3cli.images import Image

QUESTION = "Describe this image."
SIDE = 448  # pixels: Phi-4-multimodal's crop size, so the generated image is one crop
IMAGE_KEYS = ("image", "gen_tokens", "tokens_counted", "image_ms", "ttft_ms", "decode_tps")


def bench_image(path: str | None) -> Image:
    """The image the test sends: the file at path, checked as chat checks it, else a generated test pattern."""
    from phi3cli.images import Image, read_image

    if path:
        return read_image(path)
    import numpy as np

    y, x = np.mgrid[0:SIDE, 0:SIDE]
    squares = ((x // 56 + y // 56) % 2) * 255  # a checkerboard over two gradients: edges and colour to encode
    pixels = np.stack([x * 255 // (SIDE - 1), y * 255 // (SIDE - 1), squares], axis=-1).astype(np.uint8)
    return Image("a generated picture", SIDE, SIDE, "image/png", pixels)


def image_prompt(model: LoadedModel, image: Image) -> ImagePrompt:
    """One user message with the image before the question, rendered and encoded as chat does."""
    messages, images = with_placeholders([{"role": "user", "content": QUESTION, "images": [image]}], model)
    text = model.chat_template.render(messages)
    return ImagePrompt(model.encode(text), text, images)


def measure_image(model: LoadedModel, job, report: Callable[[str], None]) -> dict | None:
    """The image test's repetitions after its warm-ups (None for a text-only model)."""
    if not image_capacity(model):
        return None
    image = bench_image(job.image)
    settings = GenerationSettings(max_new_tokens=job.gen_tokens, temperature=0.0, ignore_eos=True)
    report(f"{MORE_STEPS}{job.warmup + job.repetitions}")  # step_count could not know the model reads images
    reps = []
    for i in range(job.warmup + job.repetitions):
        phase = f"warm-up {i + 1}/{job.warmup}" if i < job.warmup else f"run {i - job.warmup + 1}/{job.repetitions}"
        report(f"one image + tg{job.gen_tokens} {phase}")
        stats = generate_text(model, image_prompt(model, image), settings)
        if i >= job.warmup:
            reps.append(
                {
                    "image_ms": None if stats.image_s is None else stats.image_s * 1000,
                    "ttft_ms": stats.ttft_s * 1000,
                    "decode_tps": stats.decode_tps,
                    "tokens": stats.generated_tokens,
                }
            )
    return {"image": image.describe(), "gen_tokens": job.gen_tokens, "reps": reps}


def image_figures(test: dict) -> dict:
    """Mean and spread of each figure over the repetitions (image_ms over those where the runtime reported it)."""
    reps = test["reps"]
    return {
        "image": test["image"],
        "gen_tokens": test["gen_tokens"],
        "tokens_counted": [r["tokens"] for r in reps],
        "image_ms": summarize([r["image_ms"] for r in reps if r["image_ms"] is not None]),
        "ttft_ms": summarize([r["ttft_ms"] for r in reps]),
        "decode_tps": summarize([r["decode_tps"] for r in reps]),
    }


def image_rows(report: dict):
    """(result, image test) for every configuration that ran one."""
    for row in report["results"]:
        if row["status"] == "ok" and row.get("image"):
            yield row, row["image"]


def image_label(test: dict) -> str:
    return f"1 image+tg{test['gen_tokens']}"


def image_csv(test: dict) -> dict:
    """The image test's cells of a CSV line: its figures in the columns the text tests use, and image_ms."""
    cells = {"test": image_label(test), "image": test["image"], "gen_tokens": test["gen_tokens"]}
    cells["tokens_counted"] = " ".join(map(str, test["tokens_counted"]))
    for name in ("image_ms", "ttft_ms", "decode_tps"):
        cells[f"{name}_mean"], cells[f"{name}_std"] = test[name]["mean"], test[name]["std"]
    return cells


def image_markdown(report: dict) -> list[str]:
    """The image test's table: encoding time, time to first token with the image, decode speed."""
    tests = list(image_rows(report))
    if not tests:
        return []
    lines = [
        "",
        f"One image ({tests[0][1]['image']}) and a question: the runtime's image-encoding time, the time to first "
        "token with it (encoding included), and decode speed.",
        "",
        "| device | backend | format | test | image encoding ms | TTFT ms | decode tok/s |",
        "|---|---|---|---|--:|--:|--:|",
    ]
    for row, test in tests:
        cells = [row["device"], row["backend"], row["format"], image_label(test)]
        cells += [fmt_figure(test["image_ms"], 0), fmt_figure(test["ttft_ms"], 0), fmt_figure(test["decode_tps"])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines
