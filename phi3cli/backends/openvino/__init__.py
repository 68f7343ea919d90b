"""The openvino backend: IR built by optimum-intel + NNCF weight compression, run by OpenVINO GenAI's LLMPipeline.

Building exports the Hugging Face model to an fp16 IR with optimum-intel, then compresses the weights with NNCF
(int4 or int8); the OpenVINO tokenizer and detokenizer are written beside the IR so the runtime needs no
transformers. Running feeds phi3's own prompt token ids (rendered by templates.py) to LLMPipeline.

This module holds only the registry entry and the device probe; the runtime lives in the modules beside it:
recipe (NNCF settings), export (building), ir (reading a folder), runtime (LLMPipeline), backend (the facade).
"""

from __future__ import annotations

from phi3cli.backends import BackendSpec
from phi3cli.backends.options import BackendOption

# What `--option KEY=VALUE` sets on this backend; each is the OpenVINO property of the same name in capitals (runtime.py
# and kvcache.py turn them into compile properties). Checked by the core before anything loads.
OPTIONS = (
    BackendOption(
        "inference_precision",
        "Precision of the computation (INFERENCE_PRECISION_HINT). Default f32 on the CPU, so answers match the "
        "reference; bf16 is faster on CPUs that have it; auto leaves OpenVINO's choice (the default elsewhere).",
        choices=("auto", "f32", "bf16", "f16"),
    ),
    BackendOption(
        "kv_cache_precision",
        "Precision of the KV cache (KV_CACHE_PRECISION). Default f16 for one conversation on the CPU (faster decoding "
        "than OpenVINO's u8), u8 when `phi3 serve` batches.",
        choices=("u8", "u4", "f16", "bf16", "f32"),
    ),
    BackendOption(
        "dynamic_quantization_group_size",
        "Group size of the CPU's dynamic quantization of activations (DYNAMIC_QUANTIZATION_GROUP_SIZE); 0 turns it "
        "off (prefill slower, a kept KV cache then equals a full prefill's). Default: OpenVINO's (32).",
        type=int,
        minimum=0,
    ),
    BackendOption(
        "attention_backend",
        "ATTENTION_BACKEND: pa (PagedAttention, the default on the CPU: keeps the KV cache between turns), sdpa (the "
        "stateful pipeline, every prompt read whole) or auto (OpenVINO's choice, the default elsewhere).",
        choices=("auto", "sdpa", "pa"),
    ),
    BackendOption(
        "performance_hint",
        "PERFORMANCE_HINT: latency (OpenVINO's default for one stream) or throughput.",
        choices=("latency", "throughput"),
    ),
    BackendOption(
        "max_prompt_len",
        "The longest prompt, chat history included, the static-shape NPU model is compiled for (MAX_PROMPT_LEN).",
        type=int,
        minimum=1,
        default=1024,
        devices=("npu",),
    ),
    BackendOption(
        "min_response_len",
        "Room kept for the reply beyond the prompt on the NPU (MIN_RESPONSE_LEN).",
        type=int,
        minimum=1,
        default=128,
        devices=("npu",),
    ),
    BackendOption(
        "generate_hint",
        "NPU compilation (GENERATE_HINT): fast_compile starts sooner; best_perf compiles longer for faster tokens.",
        choices=("fast_compile", "best_perf"),
        default="fast_compile",
        devices=("npu",),
    ),
    BackendOption(
        "prefill_hint",
        "NPU prefill model (PREFILL_HINT): dynamic or static shapes. Default: the NPU plugin's (dynamic).",
        choices=("dynamic", "static"),
        devices=("npu",),
    ),
)


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
    other_markers=("openvino_language_model.xml",),  # Phi-4-multimodal's IRs, run by VLMPipeline
    vision_types=("phi4_multimodal", "phi3_v"),
    remote_code_types=("phi3_v",),  # Phi-3.5-vision: optimum-intel's export loads the model with its own code
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
    options=OPTIONS,
    speculates=("draft", "prompt-lookup"),  # draft_model / prompt_lookup on LLMPipeline and continuous batching
)
