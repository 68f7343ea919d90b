"""The Intel NPU Acceleration Library backend (Windows wheels only; the library is no longer developed).

Quantizing goes through the library exactly as Intel's Phi-3 AI PC sample does:
``NPUModelForCausalLM.from_pretrained(model, use_cache=True, config=CompilerConfig(dtype=int4),
attn_implementation="sdpa")``. The library's own cache (``export=True``) torch.save's the whole compiled
model and torch.load's it back, which unpickles arbitrary objects (recent torch refuses it by default).
phi3 passes ``export=False`` and stores the result itself: every tensor of the compiled model in one
safetensors file, plus a JSON map of which layers the library swapped in (``nn.QuantizedLinear`` for
int4/int8, ``nn.Linear`` for fp16). Loading builds the transformers model from its config without weights,
puts the library's layer classes back from those tensors, and never unpickles anything.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
from pathlib import Path

import torch

from phi3cli.backends.base import Backend, ConvertRecipe, LoadedModel, LoadRequest
from phi3cli.backends.npu_lib import MANIFEST
from phi3cli.backends.torch_backend.runtime import TorchModel
from phi3cli.errors import (
    ConversionError,
    DeviceUnavailableError,
    UnsupportedModelError,
)
from phi3cli.progress import Progress
from phi3cli.sources import check_architecture

SCHEMA = "phi3.npu-lib/1"
WEIGHTS = "npu_weights.safetensors"
DTYPE_NAMES = {"int4": "int4", "int8": "int8", "fp16": "float16"}  # phi3 format -> the library's dtype name
# Files of a Hugging Face folder that are not weights: config, generation config, tokenizer, chat template.
_NOT_WEIGHTS = ("*.json", "tokenizer.model", "*.jinja", "*.txt", "*.md")
_SKIP = {"model.safetensors.index.json", MANIFEST}
# Module classes the stored form can rebuild; anything else the library swaps in is refused, not pickled.
_LIBRARY_LAYERS = ("QuantizedLinear", "Linear")


def library_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("intel-npu-acceleration-library")
    except PackageNotFoundError:
        import intel_npu_acceleration_library as npu_lib

        return str(getattr(npu_lib, "__version__", "unknown"))


def _require_npu() -> None:
    """Stop unless the library sees an NPU: without one it silently falls back to another device."""
    from intel_npu_acceleration_library.backend import npu_available

    if not npu_available():
        raise DeviceUnavailableError(
            "The Intel NPU Acceleration Library reports no NPU (npu_available() is False); it would fall back "
            "to another device without saying so.",
            hint="Check the NPU driver, or run elsewhere with --backend openvino --device cpu (or gpu).",
        )


def _check_source(hf_dir: Path) -> None:
    """The library quantizes a Hugging Face Phi-3 folder with safetensors weights; refuse anything else early."""
    if (hf_dir / MANIFEST).is_file():
        raise UnsupportedModelError(
            f"{hf_dir} is already quantized by the NPU library.",
            hint="Give the original Hugging Face model (folder, id or `demo`) to quantize it again.",
        )
    if not (hf_dir / "config.json").is_file():
        raise UnsupportedModelError(
            f"{hf_dir} is not a Hugging Face model folder (no config.json); the NPU library quantizes those.",
            hint="Give a Hugging Face model folder, a hub id or `demo`.",
        )
    check_architecture(hf_dir / "config.json", str(hf_dir))
    if not any(hf_dir.glob("*.safetensors")):
        raise UnsupportedModelError(f"{hf_dir} has no .safetensors weights; phi3 does not load pickled checkpoints.")


def _flatten(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Every tensor of a compiled model by name, and the library layers among its modules."""
    from intel_npu_acceleration_library import nn as npu_nn

    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict] = {}
    seen: set[int] = set()

    def put(name: str, tensor: torch.Tensor | None) -> None:
        if tensor is None:
            return
        tensor = tensor.detach().contiguous()
        if tensor.data_ptr() in seen:  # tied weights: safetensors stores each buffer once
            tensor = tensor.clone()
        seen.add(tensor.data_ptr())
        tensors[name] = tensor

    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, npu_nn.QuantizedLinear):
            layers[name] = {"type": "QuantizedLinear", "in": int(module.inC), "out": int(module.outC)}
            put(prefix + "weight", module.weight)
            put(prefix + "scale", module.scale)  # as the layer holds it (already times sqrt(inC))
            put(prefix + "bias", module.bias)
            continue
        if isinstance(module, npu_nn.Linear):
            layers[name] = {"type": "Linear", "in": int(module.inC), "out": int(module.outC)}
            put(prefix + "weight", module.weight)
            put(prefix + "bias", module.bias)
            continue
        if any(name.startswith(f"{layer}.") for layer in layers):
            continue
        origin = type(module).__module__.split(".")[0]
        if origin not in ("torch", "transformers"):
            raise ConversionError(
                f"The NPU library put a {type(module).__qualname__} layer at {name or 'the top'}; phi3 stores only "
                f"its {' and '.join(_LIBRARY_LAYERS)} layers without pickling.",
                hint="Report this with the library version; OpenVINO runs the NPU with --backend openvino.",
            )
        for pname, param in module.named_parameters(recurse=False):
            put(prefix + pname, param)
        for bname, buffer in module.named_buffers(recurse=False):
            if bname not in module._non_persistent_buffers_set:
                put(prefix + bname, buffer)
    return tensors, layers


def quantize_with_library(hf_dir: Path, fmt: str, out: Path, progress: Progress) -> None:
    """Quantize and compile a Hugging Face Phi-3 folder with the library; store it safely in out."""
    from safetensors.torch import save_file

    if fmt not in DTYPE_NAMES:
        raise ConversionError(
            f"The NPU library produces {', '.join(DTYPE_NAMES)}, not {fmt}.", hint="Use --format int4, int8 or fp16."
        )
    _check_source(hf_dir)
    import intel_npu_acceleration_library as npu_lib
    from intel_npu_acceleration_library.compiler import CompilerConfig

    progress.phase(f"Quantizing and compiling {hf_dir.name} with the Intel NPU Acceleration Library ({fmt})")
    with contextlib.redirect_stdout(sys.stderr):  # the library prints its progress; stdout carries answers
        model = npu_lib.NPUModelForCausalLM.from_pretrained(
            str(hf_dir),
            use_cache=True,
            config=CompilerConfig(dtype=getattr(npu_lib, DTYPE_NAMES[fmt])),
            attn_implementation="sdpa",
            export=False,  # the library's cache pickles the whole model; phi3 stores safetensors instead
        ).eval()
    progress.phase("Writing the quantized model as safetensors")
    tensors, layers = _flatten(model)
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt", "schema": SCHEMA})
    for pattern in _NOT_WEIGHTS:
        for file in hf_dir.glob(pattern):
            if file.name not in _SKIP and file.is_file():
                shutil.copy2(file, out / file.name)
    manifest = {
        "schema": SCHEMA,
        "format": fmt,
        "library": library_version(),
        "compiler": {"dtype": DTYPE_NAMES[fmt], "use_cache": True, "attn_implementation": "sdpa"},
        "weights": WEIGHTS,
        "layers": layers,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise UnsupportedModelError(f"{path} has no readable {MANIFEST}: {exc}") from exc
    if manifest.get("schema") != SCHEMA:
        raise UnsupportedModelError(
            f"{path / MANIFEST} is not a phi3 NPU-library model (schema {manifest.get('schema')!r}).",
            hint="Quantize it again with `phi3 quantize MODEL --backend npu-lib`.",
        )
    return manifest


def load_quantized(path: Path, progress: Progress) -> torch.nn.Module:
    """Rebuild a model stored by quantize_with_library: no pickle, only safetensors and the library's classes."""
    from accelerate import init_empty_weights
    from intel_npu_acceleration_library import nn as npu_nn
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    manifest = read_manifest(path)
    if manifest.get("library") != library_version():
        progress.note(
            f"{path.name} was quantized with NPU library {manifest.get('library')}; this is {library_version()}."
        )
    tensors = load_file(str(path / manifest.get("weights", WEIGHTS)))
    config = AutoConfig.from_pretrained(path)
    with init_empty_weights():  # parameters on the meta device; buffers (rotary tables) computed for real
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    for name, layer in manifest["layers"].items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        weight, bias = tensors.pop(f"{name}.weight"), tensors.pop(f"{name}.bias", None)
        if layer["type"] == "QuantizedLinear":
            scale = tensors.pop(f"{name}.scale")
            new = npu_nn.QuantizedLinear(weight, scale, bias)
            new.scale = scale  # stored as the layer held it; the constructor would scale it again
        elif layer["type"] == "Linear":
            new = npu_nn.Linear(weight, bias)
        else:
            raise UnsupportedModelError(f"{path / MANIFEST} names a layer type phi3 cannot rebuild: {layer['type']}.")
        if (int(new.inC), int(new.outC)) != (layer["in"], layer["out"]):
            raise UnsupportedModelError(f"{path} is damaged: {name} has the wrong shape.")
        setattr(parent, attr, new)
    unexpected = model.load_state_dict(tensors, strict=False, assign=True).unexpected_keys
    empty = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.device.type == "meta"]
    if empty or unexpected:
        problem = f"lacks {empty[0]}" if empty else f"holds {unexpected[0]}, which config.json has no place for"
        raise UnsupportedModelError(
            f"{path / WEIGHTS} does not match {path / 'config.json'}: it {problem}.",
            hint="Quantize it again with `phi3 quantize MODEL --backend npu-lib --force`.",
        )
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model.eval()


class NpuLibModel(TorchModel):
    """A model the library compiled for the NPU: a transformers model, so torch's generate loop runs it."""

    backend = "npu-lib"

    def __init__(self, path: Path, model, tokenizer, fmt: str):
        super().__init__(path, model, tokenizer, fmt, device="npu")
        self.executed_device = "NPU"  # checked with npu_available() before loading; no silent fallback

    def close(self) -> None:
        from intel_npu_acceleration_library.backend import clear_cache

        super().close()
        clear_cache()  # the library keeps each layer's compiled NPU kernel in a process-wide cache


class NpuLibBackend(Backend):
    def check_device(self, device: str) -> None:
        _require_npu()

    def folder_format(self, folder: Path) -> str:
        return read_manifest(folder)["format"]

    def load(self, folder: Path, request: LoadRequest, progress: Progress) -> LoadedModel:
        from transformers import AutoTokenizer

        fmt = request.format or self.folder_format(folder)
        if request.threads:
            torch.set_num_threads(request.threads)
        progress.phase(f"Loading {request.source.spec} for the NPU ({fmt}, Intel NPU Acceleration Library)")
        model = load_quantized(folder, progress)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        return NpuLibModel(folder, model, tokenizer, fmt)

    def build(self, hf_dir: Path, recipe: ConvertRecipe, out: Path, progress: Progress, cache: Path) -> None:
        self.quantize(hf_dir, recipe, out, progress)

    def quantize(self, model_dir: Path, recipe: ConvertRecipe, out: Path, progress: Progress) -> None:
        unsupported = [
            flag
            for flag, value in (("--group-size", recipe.group_size), ("--ratio", recipe.ratio), ("--awq", recipe.awq))
            if value not in (None, False)
        ]
        if unsupported or recipe.sym is False:
            raise ConversionError(
                f"The NPU library quantizes every layer symmetrically per channel; "
                f"{', '.join(unsupported) or '--asym'} does not apply.",
                hint="Leave it out, or use --backend openvino for grouped or mixed int4/int8.",
            )
        quantize_with_library(Path(model_dir), recipe.format, out, progress)

    def runtime_versions(self) -> dict[str, str]:
        return {**super().runtime_versions(), "intel-npu-acceleration-library": library_version()}
