"""`phi3 convert`: a Hugging Face model, folder or .gguf into OpenVINO IR or an ONNX Runtime GenAI folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from phi3cli import DEFAULT_MODEL
from phi3cli.cli.errors import user_errors
from phi3cli.cli.options import TrustRemoteCodeOpt
from phi3cli.cli.render import RichProgress
from phi3cli.errors import Phi3Error


@user_errors
def convert(
    model: Annotated[
        str,
        typer.Argument(
            help="A name from `phi3 models catalog` (its source checkpoint is converted), Hugging Face id, local "
            "folder, .gguf file, or `demo`."
        ),
    ] = DEFAULT_MODEL,
    to: Annotated[
        str | None,
        typer.Option(
            "--to",
            help="Runtime format to produce: a backend that converts (`phi3 devices` lists the backends and their "
            "formats). Default: the preferred one, OpenVINO IR.",
            show_default=False,
        ),
    ] = None,
    format: Annotated[
        str | None,
        typer.Option(
            "--format", "-f", help="Weights: int4, int8, fp16 or fp32, as the runtime offers. Default: its first."
        ),
    ] = None,
    device: Annotated[
        str | None,
        typer.Option(
            "--device",
            "--target",
            "-d",
            help="Device the model is built for. OpenVINO: cpu, gpu, npu (npu switches to OpenVINO's NPU recipe). "
            "ONNX Runtime GenAI: cpu, dml (DirectML) or cuda; default dml on Windows with the DirectML package, else cpu.",
        ),
    ] = None,
    recipe_name: Annotated[
        str | None,
        typer.Option(
            "--recipe",
            help="A named int4 recipe instead of the default; the options below override it. calibrated (the "
            "default up to 1B parameters): scales fitted on phi3's calibration text (NNCF scale estimation; slow and "
            "about twice the fp16 size in memory for a 3.8B model). data-free (the default above 1B): no calibration "
            "pass (OpenVINO: every layer int4, asymmetric, group 64; ONNX Runtime GenAI: its builder's "
            "round-to-nearest, made layer by layer). cookbook: the Phi-3 Cookbook's (OpenVINO --group-size 128 "
            "--ratio 0.6 --sym; ONNX Runtime GenAI: its builder's defaults). rtn (ONNX Runtime GenAI): as data-free.",
            show_default=False,
        ),
    ] = None,
    group_size: Annotated[
        int | None,
        typer.Option("--group-size", help="int4 group size (default: the backend's recipe; -1 is channel-wise)."),
    ] = None,
    ratio: Annotated[
        float | None,
        typer.Option(
            "--ratio", min=0.0, max=1.0, help="Share of the weights in int4, the rest int8 (OpenVINO; ONNX on the CPU)."
        ),
    ] = None,
    sym: Annotated[
        bool | None, typer.Option("--sym/--asym", help="Symmetric or asymmetric int4 (default: the recipe's).")
    ] = None,
    awq: Annotated[
        bool,
        typer.Option(
            "--awq", help="Data-aware AWQ scaling, on phi3's calibration text unless --dataset gives another."
        ),
    ] = False,
    dataset: Annotated[
        str | None,
        typer.Option(
            "--dataset",
            help="Calibration text instead of phi3's (for scale estimation and --awq): a text file, paragraphs split by blank lines; OpenVINO also takes a hub data set name or auto.",
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Output folder (default: the model store, reused by chat and bench)."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output folder.")] = False,
    adapter: Annotated[
        list[str] | None,
        typer.Option(
            "--adapter",
            help="Merge a LoRA adapter (a PEFT folder: adapter_config.json + adapter_model.safetensors) into the "
            "weights before converting: DIR or DIR:ALPHA (0 to 4, default 1); repeat it to merge several. The merged "
            "model is stored apart from the base. For backends and devices without run-time adapters.",
        ),
    ] = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
) -> None:
    """Convert a Phi-3 model to OpenVINO IR or ONNX Runtime GenAI at int4, int8 or fp16.

    The output folder appears only when the conversion is complete; a failure or Ctrl-C leaves nothing behind.
    """
    from phi3cli.adapters import AdapterChoice
    from phi3cli.backends import converters, get_backend, get_spec
    from phi3cli.backends.base import ConvertRecipe
    from phi3cli.convert import convert as convert_model
    from phi3cli.sources import resolve_source
    from phi3cli.util import dir_size

    choices = [s.name for s in converters()]
    spec = get_spec(to) if to else converters()[0]
    if not spec.convert_targets:
        raise Phi3Error(f"The {spec.name} backend does not convert models.", hint=f"Use --to {' or '.join(choices)}.")
    format = format or spec.default_format
    if why := spec.refusal(format=format):
        raise Phi3Error(why, hint="Change --format.")
    if device and device not in spec.convert_targets:
        raise Phi3Error(
            f"--to {spec.name} builds for {', '.join(spec.convert_targets)}, not {device}.", hint="Change --device."
        )
    backend = get_backend(spec.name)
    recipe = ConvertRecipe(
        format=format,
        target=device or backend.default_target(),
        group_size=group_size,
        ratio=ratio,
        sym=sym,
        awq=awq,
        dataset=dataset,
        preset=recipe_name,
        trust_remote_code=trust_remote_code,
    )
    choices = [AdapterChoice.parse(a) for a in adapter or []]  # bad input fails here, before anything is fetched
    with RichProgress() as progress:
        # a catalogue name: its source checkpoint
        source = resolve_source(model, progress=progress, convert=True, trust_remote_code=trust_remote_code)
        if choices:
            from phi3cli.adapter_store import merged_source
            from phi3cli.store import ModelStore

            source = merged_source(source, choices, ModelStore(), progress)
        path = convert_model(source, spec.name, recipe, output, force=force, progress=progress)
    Console(highlight=False).print(
        f"[green]Converted[/] {model}{''.join(f' + {a}' for a in adapter or [])} → [bold]{path}[/] ({spec.name}, {format}, {recipe.target}, "
        f"{dir_size(path) / 1e6:.0f} MB)"
    )
