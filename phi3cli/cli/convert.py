"""`phi3 convert`: a Hugging Face model, folder or .gguf into OpenVINO IR or an ONNX Runtime GenAI folder."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from phi3cli.backends import get_backend, get_spec
from phi3cli.backends.base import ConvertRecipe
from phi3cli.cli.errors import user_errors
from phi3cli.cli.render import RichProgress
from phi3cli.convert import convert as convert_model
from phi3cli.errors import Phi3Error
from phi3cli.sources import DEFAULT_MODEL, resolve_source
from phi3cli.store import dir_size


class Runtime(str, Enum):
    openvino = "openvino"
    onnx = "onnx"


class Target(str, Enum):
    cpu = "cpu"
    gpu = "gpu"
    npu = "npu"
    dml = "dml"
    cuda = "cuda"


@user_errors
def convert(
    model: Annotated[str, typer.Argument(help="Hugging Face id, local folder, .gguf file, or `demo`.")] = DEFAULT_MODEL,
    to: Annotated[Runtime, typer.Option("--to", help="Runtime format to produce.")] = Runtime.openvino,
    format: Annotated[str, typer.Option("--format", "-f", help="Weights: int4, int8, fp16 (onnx also fp32).")] = "int4",
    device: Annotated[
        Target | None,
        typer.Option(
            "--device",
            "--target",
            "-d",
            help="Device the model is built for. openvino: cpu, gpu, npu (npu switches to OpenVINO's NPU recipe). "
            "onnx: cpu, dml (DirectML) or cuda; default dml on Windows with the DirectML package, else cpu.",
        ),
    ] = None,
    group_size: Annotated[
        int | None,
        typer.Option("--group-size", help="int4 group size (default 128; -1 is channel-wise)."),
    ] = None,
    ratio: Annotated[
        float | None,
        typer.Option("--ratio", min=0.0, max=1.0, help="Share of layers in int4, the rest int8 (default 0.6)."),
    ] = None,
    sym: Annotated[bool | None, typer.Option("--sym/--asym", help="Symmetric int4 (default: symmetric).")] = None,
    awq: Annotated[bool, typer.Option("--awq", help="Data-aware AWQ scaling (needs --dataset).")] = False,
    dataset: Annotated[str | None, typer.Option("--dataset", help="Calibration data set for --awq.")] = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Output folder (default: the model store, reused by chat and bench)."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output folder.")] = False,
) -> None:
    """Convert a Phi-3 model to OpenVINO IR or ONNX Runtime GenAI at int4, int8 or fp16.

    The output folder appears only when the conversion is complete; a failure or Ctrl-C leaves nothing behind.
    """
    spec = get_spec(to.value)
    if format not in spec.formats:
        raise Phi3Error(f"--to {to.value} builds {', '.join(spec.formats)}, not {format}.", hint="Change --format.")
    if awq and not dataset:
        raise Phi3Error("--awq needs calibration data.", hint="Add --dataset (for example wikitext2).")
    backend = get_backend(to.value)
    recipe = ConvertRecipe(
        format=format,
        target=device.value if device else backend.default_target(),
        group_size=group_size,
        ratio=ratio,
        sym=sym,
        awq=awq,
        dataset=dataset,
    )
    with RichProgress() as progress:
        source = resolve_source(model, progress=progress)
        path = convert_model(source, to.value, recipe, output, force=force, progress=progress)
    Console(highlight=False).print(
        f"[green]Converted[/] {model} → [bold]{path}[/] ({to.value}, {format}, {recipe.target}, "
        f"{dir_size(path) / 1e6:.0f} MB)"
    )
