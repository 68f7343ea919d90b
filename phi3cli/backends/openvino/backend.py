"""The openvino backend's facade: build (export + compress), quantize an existing IR, and load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import openvino as ov

from phi3cli.backends.base import BATCHING, Backend, ConvertRecipe, LoadedModel, LoadRequest
from phi3cli.backends.openvino.export import compress_ir, ensure_tokenizers, export_ir
from phi3cli.backends.openvino.ir import SUPPORT_FILES, TOKENIZER_FILES, check_ir, ir_format, main_xml, weight_summary
from phi3cli.backends.openvino.recipe import RECIPE_VERSION, resolve_recipe
from phi3cli.backends.openvino.runtime import load_ir, ov_device_for
from phi3cli.backends.openvino.vision import export_vision, is_vision_config, is_vision_ir, load_vision
from phi3cli.errors import ConversionError, UnsupportedModelError
from phi3cli.progress import Progress, SilentProgress
from phi3cli.sizing import GB, Estimate, checkpoint_dtype, parameter_count, variant_bytes
from phi3cli.util import copy_missing


class OpenVINOBackend(Backend):
    recipe_version = RECIPE_VERSION
    cpu_load_from_folder = True  # measured at 32 layers (docs/results/2026-12-06-memory.md)

    def check_device(self, device: str) -> None:
        ov_device_for(device, list(ov.Core().available_devices))

    def build(self, hf_dir: Path, recipe: ConvertRecipe, out: Path, progress: Progress, cache: Path) -> None:
        config = json.loads((hf_dir / "config.json").read_text())
        settings = resolve_recipe(recipe, config, progress)
        if is_vision_config(config):
            export_vision(hf_dir, out, settings, progress, recipe.trust_remote_code)
        elif settings is None:
            export_ir(hf_dir, out, progress)
        else:
            exported = out / ".fp16-export"
            export_ir(hf_dir, exported, progress)
            compress_ir(exported, settings, out, progress)
            copy_missing(exported, out, TOKENIZER_FILES + SUPPORT_FILES)
            shutil.rmtree(exported)
        ensure_tokenizers(out, hf_dir, progress)
        copy_missing(hf_dir, out, SUPPORT_FILES)
        _note_weights(out, progress)

    def build_estimate(self, config: dict, recipe: ConvertRecipe) -> Estimate:
        # Fitted to conversions run inside memory limits (docs/results/2026-12-05-real-size.md).
        params = parameter_count(config)
        # on disk: the variant, and before it the fp16 IR it is compressed from (removed once it is)
        disk = variant_bytes(params, recipe.format) + (0 if recipe.format == "fp16" else variant_bytes(params, "fp16"))
        if checkpoint_dtype(config) == "float16":  # the export maps it and the IR's constants share it
            export = Estimate(int(0.6 * params + 0.5 * GB), "the compressed weights, held until written", disk)
        else:
            export = Estimate(int(2.2 * params + 0.5 * GB), "the export casts the weights to fp16 in memory", disk)
        settings = resolve_recipe(recipe, config, SilentProgress())
        if settings is not None and settings.get("dataset") is not None:
            calibrated = Estimate(int(4.4 * params + 0.5 * GB), "calibration runs the model beside its fp16 copy", disk)
            return max(export, calibrated, key=lambda e: e.peak_bytes)
        return export

    def quantize(self, model_dir: Path, recipe: ConvertRecipe, out: Path, progress: Progress) -> None:
        model_dir = Path(model_dir)
        check_ir(model_dir)
        if is_vision_ir(model_dir):
            raise ConversionError(
                f"{model_dir} is a vision model; phi3 compresses its submodels while converting.",
                hint="Convert the original model: phi3 convert MODEL --to openvino --format int4.",
            )
        if recipe.format == "fp16":
            raise ConversionError(
                "Quantizing compresses weights to int4 or int8; fp16 comes from exporting.",
                hint="Use --format int4 or int8, or `phi3 convert MODEL --to openvino --format fp16`.",
            )
        if not (model_dir / "config.json").is_file():
            raise UnsupportedModelError(
                f"{model_dir} has no config.json; NNCF compression through optimum-intel needs it.",
                hint="Export the model with `phi3 convert` or optimum-cli, which write it.",
            )
        current = ir_format(model_dir / "openvino_model.xml")
        if current in ("int4", "int8"):
            raise ConversionError(
                f"{model_dir} is already compressed ({current}); compressing it again would lose accuracy.",
                hint="Quantize an fp16 IR (phi3 convert MODEL --to openvino --format fp16).",
            )
        config = json.loads((model_dir / "config.json").read_text())
        settings = resolve_recipe(recipe, config, progress)
        compress_ir(model_dir, settings, out, progress)
        copy_missing(model_dir, out, TOKENIZER_FILES + SUPPORT_FILES)
        _note_weights(out, progress)

    def adapter_refusal(self, request: LoadRequest) -> str | None:
        """Run-time LoRA adapters (phi3cli.backends.adapters): OpenVINO GenAI's, on LLMPipeline."""
        from phi3cli.backends.openvino.adapters import adapter_refusal

        return adapter_refusal(request)

    def folder_format(self, folder: Path) -> str:
        check_ir(folder)
        return ir_format(folder / main_xml(folder))

    def load(self, folder: Path, request: LoadRequest, progress: Progress) -> LoadedModel:
        check_ir(folder)
        fmt = request.format or self.folder_format(folder)
        if is_vision_ir(folder):
            return load_vision(folder, fmt, request, progress)
        if request.options.get(BATCHING) is not None and request.device != "npu":
            from phi3cli.backends.openvino.batching import load_batched  # only `phi3 serve` asks for it

            return load_batched(folder, fmt, request, progress)
        model = load_ir(folder, fmt, request, progress)
        if request.device == "npu":
            model.serial_reason = "one request at a time: the NPU pipeline is compiled for static shapes"
        else:
            model.serial_reason = "one request at a time: OpenVINO GenAI's LLMPipeline, as phi3 chat runs it"
        return model


def _note_weights(out: Path, progress: Progress) -> None:
    progress.phase("Reading back the weight precisions of the IR")
    shares = weight_summary(out / main_xml(out))
    progress.note("Weights stored as " + ", ".join(f"{k} {v:.0%}" for k, v in shares.items() if v >= 0.005) + ".")
