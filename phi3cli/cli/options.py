"""Options every command spells the same way."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer


class DeviceChoice(str, Enum):
    auto = "auto"
    cpu = "cpu"
    gpu = "gpu"
    npu = "npu"


ModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="Hugging Face id, local model folder, .gguf file, a folder made by `phi3 convert`, or `demo` "
        "(a 135M Phi-3-architecture model built offline).",
    ),
]
DeviceOpt = Annotated[
    DeviceChoice,
    typer.Option("--device", "-d", help="Where to run: auto picks NPU, then GPU, then CPU among what is present."),
]
BackendOpt = Annotated[
    str | None,
    typer.Option("--backend", "-b", help="Runtime: openvino, onnx, torch or npu-lib (default: the best present)."),
]
FormatOpt = Annotated[
    str | None,
    typer.Option("--format", "-f", help="Weight format: int4, int8, fp16 (fp32/bf16 for torch). Default per backend."),
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
