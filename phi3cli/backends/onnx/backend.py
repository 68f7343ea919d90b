"""The onnx backend's facade: build with the model builder, quantize with MatMulNBits, load with og.Model."""

from __future__ import annotations

import sys
from pathlib import Path

from phi3cli.backends.base import Backend, ConvertRecipe, LoadedModel, LoadRequest
from phi3cli.backends.onnx.build import build_folder, nncf_settings
from phi3cli.backends.onnx.folder import detect_format, read_genai_config
from phi3cli.backends.onnx.providers import available_providers, choose_providers
from phi3cli.backends.onnx.quantize import quantize_folder
from phi3cli.backends.onnx.runtime import load_folder
from phi3cli.backends.onnx.vision import is_vision_folder, load_vision
from phi3cli.progress import Progress
from phi3cli.sizing import GB, Estimate, calibrated_by_default, parameter_count, variant_bytes


class OnnxBackend(Backend):
    recipe_version = "5"  # bump when what build() writes changes, so stored variants are rebuilt
    cpu_load_from_folder = True  # measured at 32 layers (docs/results/2026-12-06-memory.md)

    def build_target(self, device: str) -> str:
        """cpu, or the GPU execution provider this ONNX Runtime GenAI has (dml on Windows, else cuda); raises
        before anything is built when it has none. (A prebuilt folder's own providers are checked on loading.)"""
        if device == "cpu":
            return "cpu"
        return choose_providers(device, [], available_providers(), sys.platform).providers[0]

    def default_target(self) -> str:
        return "dml" if sys.platform == "win32" and "dml" in available_providers() else "cpu"

    def build(self, hf_dir: Path, recipe: ConvertRecipe, out: Path, progress: Progress, cache: Path) -> None:
        build_folder(hf_dir, recipe, out, progress, cache)

    def build_estimate(self, config: dict, recipe: ConvertRecipe) -> Estimate:
        # Fitted to conversions run inside memory limits (docs/results/2026-12-05-real-size.md).
        params = parameter_count(config)
        disk = variant_bytes(params, recipe.format)
        if recipe.format == "int4" and nncf_settings(recipe, calibrated_by_default(config)) is None:
            embeddings = 8 * int(config.get("vocab_size") or 0) * int(config["hidden_size"])  # float32, lm_head too
            peak = 0.6 * params + embeddings + 0.5 * GB  # the checkpoint itself is memory-mapped
            return Estimate(int(peak), "the quantized layers and the float32 embedding and lm_head", disk)
        if recipe.format == "int4":  # the builder's float32 graph, in the store's cache until NNCF compressed it
            peak = 12 * params + 0.5 * GB
            disk += variant_bytes(params, "fp32")
            return Estimate(int(peak), "NNCF compresses a float32 graph, which it also runs for calibration", disk)
        return Estimate(int(4.4 * params + 0.5 * GB), "the builder holds the model in float32", disk)

    def quantize(self, model_dir: Path, recipe: ConvertRecipe, out: Path, progress: Progress) -> None:
        quantize_folder(Path(model_dir), recipe, out, progress)

    def adapter_refusal(self, request: LoadRequest) -> str | None:
        """Why run-time LoRA adapters (phi3cli.backends.adapters) are refused here: always, with 0.13.2's builder."""
        # Multi-LoRA (og.Adapters, set_active_adapter) needs a graph whose LoRA weights are inputs and the adapters
        # as .onnx_adapter files. 0.13.2's builder, given adapter_path, bakes the weights in as constants
        # (make_matmul_lora) and writes no .onnx_adapter.
        return (
            "ONNX Runtime GenAI 0.13.2's model builder bakes an adapter into the graph (no LoRA inputs, no "
            ".onnx_adapter file), so its Multi-LoRA cannot switch adapters on a model phi3 builds"
        )

    def folder_format(self, folder: Path) -> str:
        return detect_format(folder, read_genai_config(folder)["model"]["decoder"]["filename"])

    def load(self, folder: Path, request: LoadRequest, progress: Progress) -> LoadedModel:
        load = load_vision if is_vision_folder(read_genai_config(folder)) else load_folder
        model = load(folder, request.format or self.folder_format(folder), request, progress)
        model.serial_reason = SERIAL_REASON if request.device == "cpu" else SERIAL_REASON_GPU
        return model


# og.Engine batches on the CPU, but once a request ends at its end-of-text token step() raises this and the engine
# fails later requests too (ONNX Runtime GenAI 0.13.2).
SERIAL_REASON = (
    "one request at a time: ONNX Runtime GenAI 0.13.2's og.Engine fails on CPU after a request ends at its "
    "end-of-text token ('Expected at least one request to be ready')"
)
SERIAL_REASON_GPU = "one request at a time: ONNX Runtime GenAI's og.Engine has not been tried on a GPU by phi3"
