"""Options every command spells the same way."""

from __future__ import annotations

from collections.abc import Iterable
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from phi3cli.backends import DEVICES, FORMATS


def choices(name: str, values: Iterable[str]) -> type[Enum]:
    """A Typer choice type over values (the registry's devices, formats), so --help lists them from the one list."""
    return Enum(name, {v: v for v in values}, type=str)


DeviceChoice = choices("DeviceChoice", ("auto", *DEVICES))


ModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="A name from `phi3 models catalog` (phi-3-mini, phi-3.5-mini, phi-4-mini...: the ready-made variant "
        "for the device is downloaded, its folder alone), a Hugging Face id (a safetensors checkpoint, or a repo "
        "of ready-to-run IR or ONNX folders, run as they are: OWNER/NAME:SUBFOLDER picks one of several), local "
        "model folder, .gguf file, a folder made by `phi3 convert`, or `demo` (a 135M Phi-3-architecture model "
        "built offline).",
    ),
]
ConvertOpt = Annotated[
    bool,
    typer.Option(
        "--convert",
        help="For a catalogue name (or its source repo's id): convert its source checkpoint instead of running a "
        "ready-made variant.",
    ),
]
DeviceOpt = Annotated[
    DeviceChoice,
    typer.Option("--device", "-d", help="Where to run: auto picks NPU, then GPU, then CPU among what is present."),
]
BackendOpt = Annotated[
    str | None,
    typer.Option(
        "--backend", "-b", help="Runtime to use; `phi3 devices` lists the backends (default: the best one present)."
    ),
]
FormatOpt = Annotated[
    str | None,
    typer.Option(
        "--format",
        "-f",
        help=f"Weight format: {', '.join(FORMATS[:-1])} or {FORMATS[-1]}, as the backend offers (`phi3 devices` lists "
        "them). "
        "Default: the backend's first.",
    ),
]
ThreadsOpt = Annotated[int | None, typer.Option("--threads", help="CPU threads for the runtime.", min=1)]
TrustRemoteCodeOpt = Annotated[
    bool,
    typer.Option(
        "--trust-remote-code",
        help="Run Python code shipped with the model. Phi-3 and Phi-4-multimodal are built into transformers; only "
        "converting Phi-3.5-vision (`phi3 convert`, or `models pull --convert` to fetch its source) needs it.",
    ),
]
AllowFallbackOpt = Annotated[
    bool,
    typer.Option(
        "--allow-fallback",
        help="Run even if the runtime reports another device than the one asked (printed in yellow). "
        "Without it, phi3 stops rather than silently running on the CPU.",
    ),
]


def _options_help() -> str:
    from phi3cli.backends import registry

    takes = "; ".join(f"{s.name}: {', '.join(o.name for o in s.options)}" for s in registry().values() if s.options)
    return (
        "A setting of the backend, KEY=VALUE; repeat for several. The backend declares what it takes and phi3 "
        f"checks it before loading ({takes or 'none takes any'}). `phi3 devices` lists each with its values."
    )


OptionOpt = Annotated[
    list[str] | None, typer.Option("--option", "-o", metavar="KEY=VALUE", help=_options_help(), show_default=False)
]


def backend_options(pairs: list[str] | None, **shorthands) -> dict[str, str]:
    """--option KEY=VALUE pairs as a dict, with the shorthand flags given (--npu-hint X is --option generate_hint=X)."""
    from phi3cli.backends.options import parse_pairs

    given = {key: str(value) for key, value in shorthands.items() if value is not None}
    return {**given, **parse_pairs(pairs or [])}


AdapterOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--adapter",
        help="A LoRA adapter (a PEFT folder: adapter_config.json + adapter_model.safetensors) applied at run time to "
        "the base model, which is converted once and shared: DIR, DIR:ALPHA (0 to 4, default 1) or NAME=DIR[:ALPHA]. "
        "Repeat it to load several (all apply, summed; /adapter switches them). OpenVINO on the CPU or GPU; elsewhere "
        "merge it with `phi3 convert --adapter`.",
        rich_help_panel="Adapters",
    ),
]


def adapter_options(values: list[str] | None) -> dict:
    """LoadRequest.options for --adapter (empty when none is given)."""
    if not values:
        return {}
    from phi3cli.adapters import AdapterChoice
    from phi3cli.backends.adapters import ADAPTERS

    return {ADAPTERS: tuple(AdapterChoice.parse(v) for v in values)}


# Flags from before --option, kept working (hidden from --help): each sets the backend option named in the comment.
MaxPromptLenOpt = Annotated[int | None, typer.Option("--max-prompt-len", hidden=True)]  # max_prompt_len
MinResponseLenOpt = Annotated[int | None, typer.Option("--min-response-len", hidden=True)]  # min_response_len
NpuHintOpt = Annotated[str | None, typer.Option("--npu-hint", hidden=True)]  # generate_hint
InferencePrecisionOpt = Annotated[str | None, typer.Option("--inference-precision", hidden=True)]  # inference_precision


CacheReuseOpt = Annotated[
    bool,
    typer.Option(
        "--cache-reuse/--no-cache-reuse",
        help="Keep the model's KV cache between turns where its runtime can, so each turn reads only what the "
        "conversation gained. --no-cache-reuse reads the whole conversation every turn.",
    ),
]


ImageOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--image",
        "-i",
        help="An image (PNG, JPEG, WebP...) to send with the first message, for a vision model such as "
        "Phi-4-multimodal; repeat it for several. In a session, /image FILE attaches one to the next message.",
        rich_help_panel="Images",
    ),
]
MaxImagePixelsOpt = Annotated[
    int | None,
    typer.Option(
        "--max-image-pixels",
        min=1,
        help="Refuse an image with more pixels (width x height).",
        show_default="50,000,000",
        rich_help_panel="Images",
    ),
]
AllowImageUrlsOpt = Annotated[
    bool,
    typer.Option(
        "--allow-image-urls",
        help="Fetch http(s) image URLs in image_url parts (at most 20 MB each, fetched within 10 s). Without it a vision model "
        "takes images as data: URLs only (base64 PNG, JPEG or WebP).",
        rich_help_panel="Images",
    ),
]
