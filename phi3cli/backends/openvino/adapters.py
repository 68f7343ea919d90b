"""LoRA adapters on an IR at run time: OpenVINO GenAI's Adapter / AdapterConfig, switched per generate.

GenAI matches an adapter's tensors to the IR's weights by name. phi3's normalised file keeps PEFT's names on Phi-3's
fused layers (base_model.model.model.layers.N.self_attn.qkv_proj.lora_A.weight), and optimum-intel's export names
each weight after its module (self.model.layers.N.self_attn.qkv_proj...), int4/int8-compressed or not, so they match
as they are; load checks every module an adapter changes is in the IR first, since GenAI skips a name it cannot
match without a word.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import openvino_genai as ov_genai

from phi3cli.backends.adapters import PREFIX, AdapterSet, RuntimeAdapter
from phi3cli.errors import Phi3Error

LAYER_NAME = re.compile(r"model\.layers\.\d+\.(?:self_attn|mlp)\.\w+")


def adapter_refusal(request: Any) -> str | None:
    """Why OpenVINO GenAI cannot apply adapters to this load (None: it can)."""
    from phi3cli.backends.base import BATCHING

    if request.device == "npu":
        return "phi3 has not tried OpenVINO GenAI's NPU pipeline (static shapes) with adapters; use --device cpu"
    if request.options.get(BATCHING) is not None:
        return "phi3 serve's continuous batching on OpenVINO does not take adapters yet"
    return None


def check_names(folder: Path, adapters: list[RuntimeAdapter]) -> None:
    """Refuse an adapter that changes a weight the IR does not name (another export, or a layer folded away)."""
    names = set(LAYER_NAME.findall((folder / "openvino_model.xml").read_text(errors="replace")))
    for adapter in adapters:
        if missing := [m for m in adapter.modules if m not in names]:
            raise Phi3Error(
                f"Adapter {adapter.name} changes {missing[0]}, which the IR in {folder} has no weight named for "
                f"({len(missing)} of its {len(adapter.modules)} layers).",
                hint="Convert the model with phi3 (optimum-intel's export), or merge: phi3 convert MODEL --adapter DIR.",
            )


class OpenVINOAdapters(AdapterSet):
    """The adapters an LLMPipeline was compiled with; the active set goes on each GenerationConfig."""

    def __init__(self, loaded: list[RuntimeAdapter]):
        super().__init__(loaded)
        self.handles = {a.name: ov_genai.Adapter(str(a.file)) for a in loaded}

    def runtime_config(self) -> Any:
        config = ov_genai.AdapterConfig()
        for name, alpha in self.active.items():
            config.add(self.handles[name], alpha)
        return config

    def pipeline_config(self) -> Any:
        """Every adapter, for LLMPipeline(adapters=...): the pipeline compiles a slot for each weight they change."""
        config = ov_genai.AdapterConfig()
        for name, handle in self.handles.items():
            config.add(handle, self.loaded[name].alpha)
        return config


def attach(folder: Path, adapters: tuple[RuntimeAdapter, ...], properties: dict[str, Any]) -> OpenVINOAdapters:
    """Check the adapters against the IR, read each once, and add them to the pipeline's properties."""
    check_names(folder, list(adapters))
    try:
        found = OpenVINOAdapters(list(adapters))
    except RuntimeError as exc:
        raise Phi3Error(f"OpenVINO GenAI could not read an adapter: {str(exc).splitlines()[0]}") from exc
    properties["adapters"] = found.pipeline_config()
    return found


def with_lora_branches(model: Any, adapters: OpenVINOAdapters) -> Any:
    """The IR with each active adapter as a branch beside the layers it changes: y = x·Wᵀ + alpha·(x·Aᵀ)·Bᵀ.

    For scoring (next_token_logprobs compiles the IR itself, outside GenAI): the same sum GenAI's run-time LoRA
    computes, on the same base weights.
    """
    import openvino.opset13 as ops
    from safetensors.numpy import load_file

    matmuls = {op.get_friendly_name(): op for op in model.get_ops() if op.get_type_name() == "MatMul"}
    for name, alpha in adapters.active.items():
        loaded = adapters.loaded[name]
        tensors = load_file(str(loaded.file))
        for module in loaded.modules:
            node = matmuls.get(f"__module.{module}/ov_ext::linear/MatMul")
            if node is None:
                raise Phi3Error(f"The IR has no MatMul for {module}; phi3 cannot score adapter {name} on it.")
            out = node.output(0)
            targets = list(out.get_target_inputs())
            a = ops.constant(tensors[f"{PREFIX}{module}.lora_A.weight"])
            b = ops.constant(tensors[f"{PREFIX}{module}.lora_B.weight"] * alpha)
            x = node.input_value(0)
            if x.get_element_type() != a.get_output_element_type(0):
                a, b = ops.convert(a, x.get_element_type()), ops.convert(b, x.get_element_type())
            lora = ops.matmul(ops.matmul(x, a, False, True), b, False, True)
            total = ops.add(out, lora)
            for target in targets:
                target.replace_source_output(total.output(0))
    model.validate_nodes_and_infer_types()
    return model
