"""The openvino backend: IR built by optimum-intel + NNCF weight compression, run by OpenVINO GenAI's LLMPipeline.

Building exports the Hugging Face model to an fp16 IR with optimum-intel, then compresses the weights with NNCF
(int4 or int8); the OpenVINO tokenizer and detokenizer are written beside the IR so the runtime needs no
transformers. Running feeds phi3's own prompt token ids (rendered by templates.py) to LLMPipeline.

This module holds only the registry entry and the device probe; the runtime lives in the modules beside it:
recipe (NNCF settings), export (building), ir (reading a folder), runtime (LLMPipeline), backend (the facade).
"""

from __future__ import annotations

from phi3cli.backends import BackendSpec


def probe() -> tuple[list[str], str]:
    """Devices OpenVINO lists (CPU, GPU, GPU.0, NPU...), mapped to phi3's cpu/gpu/npu."""
    import openvino as ov

    found = list(ov.Core().available_devices)
    mapped = [d for d in ("npu", "gpu", "cpu") if any(x.split(".")[0].lower() == d for x in found)]
    return mapped, "OpenVINO devices: " + (", ".join(found) or "none")


SPEC = BackendSpec(
    name="openvino",
    factory="phi3cli.backends.openvino.backend:OpenVINOBackend",
    extra="openvino",
    requires=("openvino", "openvino_genai", "openvino_tokenizers"),
    devices=("npu", "gpu", "cpu"),
    formats=("int4", "int8", "fp16"),
    description="OpenVINO GenAI LLMPipeline on IR built by optimum-intel + NNCF",
    preference=(("npu", 10), ("gpu", 20), ("cpu", 40)),
    marker="openvino_model.xml",
    probe=probe,
    probe_label="OpenVINO's device list",
    convert_targets=("cpu", "gpu", "npu"),
    quantizes="folder",
    quantize_input="an OpenVINO IR folder (fp16 or fp32)",
    quantize_make="phi3 convert {model} --to openvino --format fp16 -o DIR",
    libraries=(
        "openvino",
        "openvino-genai",
        "openvino-tokenizers",
        "optimum-intel",
        "optimum",
        "nncf",
        "transformers",
    ),
    constrains=True,  # XGrammar, through GenerationConfig.structured_output_config
)
