"""`phi3 quantize`: compress a model's weights with one runtime's own quantizer, into a new folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from phi3cli.backends import DEVICES, FORMATS
from phi3cli.cli.errors import user_errors
from phi3cli.cli.options import choices
from phi3cli.cli.render import RichProgress
from phi3cli.errors import Phi3Error, UnsupportedModelError

QuantizeFormat = choices("QuantizeFormat", FORMATS[: FORMATS.index("fp16") + 1])  # what the quantizers write
QuantizeTarget = choices("QuantizeTarget", DEVICES)


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + "."


@user_errors
def quantize(
    model: Annotated[
        str,
        typer.Argument(
            help="What to quantize. npu-lib: a Hugging Face model (folder, hub id, .gguf or `demo`); "
            "openvino: an OpenVINO IR folder; onnx: an ONNX Runtime GenAI folder (both fp16 or fp32).",
            show_default=False,
        ),
    ],
    backend: Annotated[
        str,
        typer.Option(
            "--backend", "-b", help="Whose quantizer to use: openvino, onnx or npu-lib (see above).", show_default=False
        ),
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder to write.", show_default=False)],
    format: Annotated[QuantizeFormat, typer.Option("--format", "-f", help="Weight format to produce.")] = (
        QuantizeFormat.int4
    ),
    target: Annotated[
        QuantizeTarget | None,
        typer.Option("--device", "--target", "-d", help="openvino: the device the IR is for (npu: its NPU recipe)."),
    ] = None,
    group_size: Annotated[
        int | None, typer.Option("--group-size", help="openvino/onnx: int4 group (block) size.")
    ] = None,
    ratio: Annotated[
        float | None, typer.Option("--ratio", min=0.0, max=1.0, help="openvino: share of layers in int4.")
    ] = None,
    sym: Annotated[bool | None, typer.Option("--sym/--asym", help="openvino/onnx: symmetric int4.")] = None,
    awq: Annotated[
        bool, typer.Option("--awq", help="Data-aware AWQ, on phi3's calibration text unless --dataset gives another.")
    ] = False,
    dataset: Annotated[
        str | None,
        typer.Option(
            "--dataset",
            help="Calibration text for --awq instead of phi3's: a text file, paragraphs split by blank lines; openvino also takes a hub data set name or auto.",
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output folder.")] = False,
) -> None:
    """Quantize a model's weights to int4, int8 or fp16 with a runtime's own quantizer.

    [bold]openvino[/]: NNCF weight compression of an existing IR (for example fp16 to int4), without going back to the original model.

    [bold]onnx[/]: ONNX Runtime's int4 weight quantizer on an fp16 or fp32 ONNX Runtime GenAI folder.

    [bold]npu-lib[/] (Windows only): the Intel NPU Acceleration Library's quantization and compilation, as in Intel's Phi-3 AI PC sample. The library's own cache pickles the whole model, which recent torch refuses to load; phi3 stores the compiled weights as safetensors plus a JSON layer map instead, so loading never unpickles anything. Run the result with `phi3 chat --model DIR --backend npu-lib --device npu`.

    The output folder appears only when complete; a failure or Ctrl-C leaves nothing behind.
    """
    from phi3cli.backends import get_backend, get_spec, registry
    from phi3cli.backends.base import ConvertRecipe
    from phi3cli.convert import quantize as quantize_model
    from phi3cli.sources import resolve_source
    from phi3cli.store import ModelStore
    from phi3cli.util import dir_size

    spec = get_spec(backend)
    name = spec.name
    if spec.quantizes is None:
        others = [s.name for s in registry().values() if s.quantizes]
        raise Phi3Error(f"The {name} backend has no quantizer.", hint=f"Use --backend {' or '.join(others)}.")
    impl = get_backend(name)  # says why it is unavailable (and what to use instead) before any work
    recipe = ConvertRecipe(
        format=format.value,
        target=target.value if target else impl.default_target(),
        group_size=group_size,
        ratio=ratio,
        sym=sym,
        awq=awq,
        dataset=dataset,
    )
    store = ModelStore()
    with RichProgress() as progress:
        source = resolve_source(model, store, progress=progress)
        takes_source = spec.quantizes == "source"
        if source.runtime != (None if takes_source else name):
            what = f"an {source.runtime} model" if source.runtime else "a Hugging Face model"
            hints = []
            if source.runtime and (get_spec(source.runtime).quantizes == "folder"):
                hints.append(f"quantize it with --backend {source.runtime}")
            make = spec.quantize_make.format(model=model)
            hints.append(f"make one first: {make}" if make else "give the original model")
            raise UnsupportedModelError(
                f"{model} is {what}; --backend {name} quantizes {spec.quantize_input}.",
                hint=_sentence(" or ".join(hints)),
            )
        model_dir = source.hf_dir(store, progress) if takes_source else source.path
        path = quantize_model(model_dir, name, recipe, output, force=force, progress=progress)
    Console(highlight=False).print(
        f"[green]Quantized[/] {escape(model)} → [bold]{escape(str(path))}[/] ({name}, {format.value}, "
        f"{dir_size(path) / 1e6:.0f} MB)",
        soft_wrap=True,
    )
