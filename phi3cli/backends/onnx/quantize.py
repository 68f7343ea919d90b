"""`phi3 quantize --backend onnx`: int4 from an fp32 or fp16 folder.

An fp32 folder for the CPU gets the CPU int4 default (NNCF, as `phi3 convert` builds it); an fp16 folder, or one
built for a GPU provider, ONNX Runtime's MatMulNBits quantizer (round to nearest).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from phi3cli.backends.base import ConvertRecipe
from phi3cli.backends.onnx.build import INT4_BLOCK_SIZES, nncf_settings, quantizer_logs
from phi3cli.backends.onnx.folder import detect_format, read_genai_config
from phi3cli.backends.onnx.providers import configured_providers
from phi3cli.errors import ConversionError
from phi3cli.progress import Progress
from phi3cli.util import first_line


def quantize_folder(model_dir: Path, recipe: ConvertRecipe, out: Path, progress: Progress) -> None:
    """Write an int4 copy of an fp16/fp32 ONNX Runtime GenAI folder into out."""
    if recipe.format != "int4":
        raise ConversionError(f"ONNX quantize makes int4 weights, not {recipe.format}.", hint="Use --format int4.")
    genai = read_genai_config(model_dir)
    filename = genai["model"]["decoder"]["filename"]
    source_format = detect_format(model_dir, filename)
    if source_format == "int4":
        raise ConversionError(
            f"{model_dir} is already int4.", hint="Quantize an fp16 or fp32 folder (phi3 convert --format fp32)."
        )
    nncf = nncf_settings(recipe) if source_format == "fp32" and not configured_providers(genai) else None
    if nncf is not None:
        from phi3cli.backends.onnx.compress import compress_model

        compress_model(model_dir, filename, nncf, out, progress)
        _copy_the_rest(model_dir, out, filename, set())
        return
    block = recipe.group_size if recipe.group_size is not None else 32
    if block not in INT4_BLOCK_SIZES or recipe.ratio is not None or recipe.awq:
        raise ConversionError(
            "ONNX int4 quantization of an fp16 or GPU folder takes --group-size "
            f"{'/'.join(map(str, INT4_BLOCK_SIZES))} and --sym/--asym only (no --ratio or --awq).",
            hint="Change the options, or quantize an fp32 CPU folder (NNCF: --ratio, --awq, --dataset).",
        )
    try:
        _quantize_int4(model_dir, genai, filename, source_format, block, recipe, out, progress)
    except ConversionError:
        raise
    except Exception as exc:
        raise ConversionError(
            f"Quantizing {model_dir} to int4 failed: {first_line(exc, typed=True)}",
            hint="Run again with --debug for the traceback.",
        ) from exc


def _quantize_int4(model_dir, genai, filename, source_format, block, recipe, out, progress) -> None:
    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    with quantizer_logs():
        from onnxruntime.quantization import QuantFormat
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    progress.phase(f"Reading {filename} ({source_format})")
    model = onnx.load(str(model_dir / filename), load_external_data=False)
    external = {
        entry.value for init in model.graph.initializer for entry in init.external_data if entry.key == "location"
    }
    load_external_data_for_model(model, str(model_dir))
    weights = {init.name for init in model.graph.initializer}
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in weights]
    progress.phase(f"Quantizing {len(matmuls)} MatMul weights to int4 (block {block})", total=len(matmuls))
    quantizer = MatMulNBitsQuantizer(
        model,
        bits=4,
        block_size=block,
        is_symmetric=recipe.sym if recipe.sym is not None else True,
        # int8 activations on the CPU provider, as the builder does for CPU models
        accuracy_level=0 if configured_providers(genai) else 4,
        quant_format=QuantFormat.QOperator,
        op_types_to_quantize=("MatMul",),
    )
    with quantizer_logs(progress):
        quantizer.process()
    progress.phase(f"Writing the int4 {filename}")
    onnx.save_model(
        quantizer.model.model,
        str(out / filename),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=f"{filename}.data",
        size_threshold=0,
    )
    _copy_the_rest(model_dir, out, filename, external)


def _copy_the_rest(model_dir: Path, out: Path, filename: str, external: set[str]) -> None:
    """Copy what is not the graph or its weights (genai_config.json, the tokenizer) and check the result."""
    skip = {filename, f"{filename}.data", *external}
    for item in model_dir.iterdir():
        if item.is_file() and item.name not in skip and not (out / item.name).exists():
            shutil.copy2(item, out / item.name)
    read_genai_config(out)
