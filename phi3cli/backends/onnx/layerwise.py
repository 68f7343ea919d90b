"""The model builder's int4, made layer by layer, so a 3.8B model converts within about its fp16 size of memory.

ONNX Runtime GenAI's builder (0.13) loads the checkpoint in float32, keeps every weight as a lazy float tensor
and quantizes the whole graph at the end, from a protobuf of the full float32 model, which at Phi-3-mini's size
does not fit in memory (docs/results/2026-12-05-real-size.md). Inside `layer_by_layer()` the builder loads the
checkpoint at its own dtype, each MatMul weight is block-quantized as the builder writes it (with ONNX Runtime's own quantizer, the one the final
pass would run, with the same block size, symmetry and accuracy level), and each layer's float weights are freed
once the layer is written. The lm_head too (int8 where the recipe says so), unless the embedding is tied to it:
then it is left to the builder's final pass, whose naming the tied embedding's GatherBlockQuantized refers to.
An untied embedding table, which the builder keeps in float32 (its size: docs/results/2026-12-05-real-size.md), is stored int8
in blocks along the hidden size and read with GatherBlockQuantized, as the builder does for a tied one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class _QuantizedLinear:
    """What the builder's make_matmul_int4 reads from a pre-quantized module (as from its QuantModel)."""

    def __init__(self, weight, bits: int, block_size: int, symmetric: bool):
        import torch
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            DefaultWeightOnlyQuantConfig,
            DefaultWeightOnlyQuantizer,
        )

        self.out_features, self.in_features = weight.shape
        self.bits, self.group_size = bits, block_size
        config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric, bits=bits)
        b = weight.detach().to(torch.float32).T.contiguous().numpy()  # MatMul's B: in x out
        packed, scales, zero_points = DefaultWeightOnlyQuantizer(config).qbits_block_quant(b)
        self.qweight = torch.from_numpy(packed)
        self.scales = torch.from_numpy(scales)
        self.qzeros = None if symmetric else torch.from_numpy(zero_points)


def _quantized(builder, weight, bits: int) -> _QuantizedLinear:
    attrs = builder.quant_attrs["int4"]  # the block size and symmetry the builder's final pass would use
    return _QuantizedLinear(weight, bits, int(attrs["qdq_block_size"]), bool(attrs["is_symmetric"]))


def _gather_int8(builder, table: _QuantizedLinear) -> None:
    """The embedding table as int8 blocks read by GatherBlockQuantized, in place of the builder's float Gather."""
    names = ["model.embed_tokens.qweight", builder.input_names["input_ids"], "model.embed_tokens.scales"]
    builder.make_initializer(table.qweight.reshape(table.out_features, table.in_features), names[0])
    builder.make_initializer(table.scales, names[2], to=builder.io_dtype)
    if table.qzeros is not None:
        names.append("model.embed_tokens.qzeros")
        builder.make_initializer(table.qzeros, names[3])
    name = "/model/embed_tokens/GatherBlockQuantized"
    output = f"{name}/output_0"
    builder.make_node(
        "GatherBlockQuantized",
        inputs=names,
        outputs=[output],
        name=name,
        domain="com.microsoft",
        bits=8,
        block_size=table.group_size,
        gather_axis=0,
        quantize_axis=1,
    )
    builder.make_value(output, builder.io_dtype, shape=["batch_size", "sequence_length", table.in_features])
    builder.layernorm_attrs["root_input"] = builder.layernorm_attrs["skip_input"] = output


@contextlib.contextmanager
def layer_by_layer() -> Iterator[None]:
    """Patch the builder (for the duration of the block) to quantize to int4 as it goes and free what it wrote."""
    import importlib

    import onnxruntime_genai.models.builder  # noqa: F401  (puts its folder on sys.path and imports `builders`)
    import torch

    base = importlib.import_module("builders.base")  # the module the builder runs, not a second copy of it

    auto_class = base.AutoModelForCausalLM
    model = base.Model
    original = {name: getattr(model, name) for name in ("make_matmul_int4", "make_layer", "to_int4", "make_embedding")}
    ir = base.ir

    class AtCheckpointDtype:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            kwargs.setdefault("dtype", "auto")  # fp16 stays fp16: half the memory of the builder's float32
            return auto_class.from_pretrained(*args, **kwargs)

    def quantize_now(self, matmul, basename, root_input, **kwargs):
        lm_head = bool(kwargs.get("logits"))
        excluded = basename in self.quant_attrs["int4"]["nodes_to_exclude"]
        keep_float = hasattr(matmul, "qweight") or excluded or (lm_head and self.shared_embeddings)
        if keep_float:  # float now, final pass later
            return original["make_matmul_int4"](self, matmul, basename, root_input, **kwargs)
        quantized_matmul = _quantized(self, matmul.weight, 8 if lm_head and self.int8_lm_head else 4)
        if lm_head:
            self.phi3_quantized_all = True  # nothing left for the final whole-graph pass
        return original["make_matmul_int4"](self, quantized_matmul, basename, root_input, **kwargs)

    def to_int4_unless_done(self):
        return self.model if getattr(self, "phi3_quantized_all", False) else original["to_int4"](self)

    def embedding_int8(self, embedding):
        if self.shared_embeddings or self.embed_attrs["scale"] != 1 or self.io_dtype != ir.DataType.FLOAT:
            return original["make_embedding"](self, embedding)  # the builder's own (a tied one: the lm_head's)
        _gather_int8(self, _quantized(self, embedding, 8))  # one row a token, blocks along the hidden size

    def make_layer_and_free(self, layer_id, layer):
        original["make_layer"](self, layer_id, layer)
        for param in layer.parameters():
            if param.dim() >= 2:  # the MatMul weights, now quantized; norms are read again when saving
                param.data = torch.empty(0, dtype=param.dtype)

    patched = {
        "make_matmul_int4": quantize_now,
        "make_layer": make_layer_and_free,
        "to_int4": to_int4_unless_done,
        "make_embedding": embedding_int8,
    }
    base.AutoModelForCausalLM = AtCheckpointDtype
    for name, method in patched.items():
        setattr(model, name, method)
    try:
        yield
    finally:
        base.AutoModelForCausalLM = auto_class
        for name, method in original.items():
            setattr(model, name, method)
