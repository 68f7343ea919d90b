"""Options every command spells the same way."""

from __future__ import annotations

from collections.abc import Iterable
from enum import Enum
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
        help="Run Python code shipped with the model. Phi-3 is built into transformers; you should not need this.",
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


class NpuHint(str, Enum):
    fast_compile = "fast_compile"
    best_perf = "best_perf"


class InferencePrecision(str, Enum):
    auto = "auto"
    f32 = "f32"
    bf16 = "bf16"
    f16 = "f16"


MaxPromptLenOpt = Annotated[
    int | None,
    typer.Option(
        "--max-prompt-len",
        min=1,
        help="OpenVINO on NPU: the longest prompt, chat history included, the static-shape model is compiled "
        "for (default 1024).",
        rich_help_panel="OpenVINO",
    ),
]
MinResponseLenOpt = Annotated[
    int | None,
    typer.Option(
        "--min-response-len",
        min=1,
        help="OpenVINO on NPU: room kept for the reply beyond the prompt (default 128).",
        rich_help_panel="OpenVINO",
    ),
]
NpuHintOpt = Annotated[
    NpuHint | None,
    typer.Option(
        "--npu-hint",
        help="OpenVINO on NPU: fast_compile (default) starts sooner; best_perf compiles longer for faster tokens.",
        rich_help_panel="OpenVINO",
    ),
]
InferencePrecisionOpt = Annotated[
    InferencePrecision | None,
    typer.Option(
        "--inference-precision",
        help="OpenVINO: precision of the computation. Default f32 on the CPU (answers match the reference); "
        "bf16 is faster on CPUs that have it; auto leaves OpenVINO's choice (the default on GPU and NPU).",
        rich_help_panel="OpenVINO",
    ),
]


def openvino_options(
    max_prompt_len: int | None = None,
    min_response_len: int | None = None,
    npu_hint: NpuHint | None = None,
    inference_precision: InferencePrecision | None = None,
) -> dict:
    """LoadRequest.options for the OpenVINO backend, from the options above (only those given)."""
    given = {
        "max_prompt_len": max_prompt_len,
        "min_response_len": min_response_len,
        "generate_hint": npu_hint.value if npu_hint else None,
        "inference_precision": inference_precision.value if inference_precision else None,
    }
    return {k: v for k, v in given.items() if v is not None}


CacheReuseOpt = Annotated[
    bool,
    typer.Option(
        "--cache-reuse/--no-cache-reuse",
        help="Keep the model's KV cache between turns where its runtime can, so each turn reads only what the "
        "conversation gained. --no-cache-reuse reads the whole conversation every turn.",
    ),
]
