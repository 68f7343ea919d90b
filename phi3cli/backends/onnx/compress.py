"""NNCF weight compression of an fp32 ONNX Runtime GenAI graph: the CPU int4 default.

The model builder quantizes every MatMul with round-to-nearest; NNCF instead keeps the most sensitive share of
the weights in int8 (`ratio`) and fits each int4 group's scale on activations of a calibration text (scale
estimation), as the OpenVINO default does. NNCF writes DequantizeLinear + MatMul pairs; ONNX Runtime would run
the int8 ones as a dequantization of the whole matrix on every step, so each pair becomes one MatMulNBits
(4 or 8 bits) here, and the embedding table a GatherBlockQuantized (sharing lm_head's int8 weights where the
model ties them, as the builder does).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from phi3cli.backends.nncf_weights import CALIBRATION_TEXT, calibration_samples, nncf_progress
from phi3cli.errors import ConversionError
from phi3cli.progress import Progress
from phi3cli.util import first_line

# Tokens of each calibration paragraph fed to the graph (enough for the activation statistics NNCF needs).
CALIBRATION_TOKENS = 256
# int8 accuracy level: MatMulNBits quantizes activations to int8 on the CPU, as the builder's CPU models do.
ACCURACY_LEVEL = 4
EMBEDDING_BLOCK = 32  # an untied embedding table is stored int8 in blocks of this many columns


def compress_model(src: Path, filename: str, settings: dict[str, Any], out: Path, progress: Progress) -> None:
    """Compress src/filename (an fp32 builder graph) with NNCF into out/filename (+ .data)."""
    import onnx

    progress.phase(f"Reading {filename} (fp32)")
    # weights stay in their file while NNCF runs (a proto over 2 GB cannot be serialized for its sessions)
    model = onnx.load(str(src / filename), load_external_data=False)
    gather, tied = _embedding(model)
    try:
        with nncf_progress(progress):
            model = _nncf_compress(model, src, settings, gather)
    except ConversionError:
        raise
    except Exception as exc:
        raise ConversionError(
            f"NNCF could not compress {src / filename}: {first_line(exc, typed=True)}",
            hint="Run again with --debug for the traceback, or use --recipe rtn (the builder's own int4).",
        ) from exc
    progress.phase("Packing the weights into MatMulNBits")
    if tied is not None:  # NNCF fed the Transpose from lm_head's DequantizeLinear too; it goes with the Gather
        table = next(n.input[0] for n in model.graph.node if n.name == gather)
        next(n for n in model.graph.node if table in n.output).input[0] = tied
    packed = to_matmulnbits(model)
    if tied is not None and tied not in packed:
        raise ConversionError(f"NNCF left the tied lm_head weight {tied} uncompressed; the embedding cannot share it.")
    _quantize_embedding(model, gather, packed.get(tied))
    progress.phase(f"Writing the int4 {filename}")
    onnx.save_model(
        model,
        str(out / filename),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=f"{filename}.data",
        size_threshold=1024,  # small tensors (the Reshape target) stay inline: shape inference reads them
    )


def _embedding(model) -> tuple[str, str | None]:
    """The token-embedding Gather's name, and the lm_head weight it reads where the model ties them (else None).

    The builder feeds a tied embedding as Transpose(lm_head weight). NNCF is told to leave the Gather alone (a
    dequantized table would be rebuilt on every step); _quantize_embedding replaces it afterwards.
    """
    inits = {i.name for i in model.graph.initializer}
    gather = next((n for n in model.graph.node if n.op_type == "Gather" and "input_ids" in n.input[1:]), None)
    if gather is None:
        raise ConversionError("The ONNX graph has no token-embedding Gather on input_ids; it cannot be compressed.")
    source = gather.input[0]
    if source in inits:
        return gather.name, None
    producer = next((n for n in model.graph.node if source in n.output), None)
    if producer is None or producer.op_type != "Transpose" or producer.input[0] not in inits:
        raise ConversionError(f"The embedding table {source} is neither a weight nor a transposed one.")
    return gather.name, producer.input[0]


def _calibration_feeds(model, src: Path, text: Path) -> list[dict[str, np.ndarray]]:
    """One feed per calibration paragraph: its tokens, a full mask, and empty KV-cache inputs."""
    from onnx import TensorProto
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(src / "tokenizer.json"))
    names = {i.name: i for i in model.graph.input}
    feeds = []
    for paragraph in calibration_samples(text):
        ids = np.array([tokenizer.encode(paragraph).ids[:CALIBRATION_TOKENS]], dtype=np.int64)
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        if "position_ids" in names:
            feed["position_ids"] = np.arange(ids.shape[1], dtype=np.int64)[None]
        for name, graph_input in names.items():
            if name.startswith("past_key_values"):
                dims = [d.dim_value for d in graph_input.type.tensor_type.shape.dim]
                dtype = np.float16 if graph_input.type.tensor_type.elem_type == TensorProto.FLOAT16 else np.float32
                feed[name] = np.zeros((1, dims[1], 0, dims[3]), dtype=dtype)
        feeds.append(feed)
    return feeds


def _nncf_compress(model, src: Path, settings: dict[str, Any], gather: str):
    import nncf
    from nncf.onnx.quantization.backend_parameters import BackendParameters
    from nncf.quantization.advanced_parameters import AdvancedCompressionParameters

    mode = nncf.CompressWeightsMode.INT4_SYM if settings.get("sym") else nncf.CompressWeightsMode.INT4_ASYM
    options: dict[str, Any] = {
        "mode": mode,
        "group_size": settings["group_size"],
        "ratio": settings.get("ratio", 1.0),
        "ignored_scope": nncf.IgnoredScope(names=[gather]),
        "advanced_parameters": AdvancedCompressionParameters(
            backend_params={BackendParameters.EXTERNAL_DATA_DIR: str(src.resolve())}
        ),
    }
    if options["ratio"] < 1 or settings.get("scale_estimation") or settings.get("awq"):
        feeds = _calibration_feeds(model, src, settings.get("dataset") or CALIBRATION_TEXT)
        options.update(dataset=nncf.Dataset(feeds), subset_size=len(feeds))
        options["scale_estimation"] = bool(settings.get("scale_estimation"))
        options["awq"] = bool(settings.get("awq"))
    return nncf.compress_weights(model, **options)


def _block_size(k: int) -> int:
    """The largest MatMulNBits block (a power of two from 16 to 256) that divides k."""
    for block in (256, 128, 64, 32, 16):
        if k % block == 0:
            return block
    raise ConversionError(f"A weight with {k} input channels cannot be split into MatMulNBits blocks.")


def _pack_nibbles(values: np.ndarray) -> np.ndarray:
    """uint8 values < 16 along the last axis, two to a byte (the first in the low nibble), padded to even."""
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros((*values.shape[:-1], 1), np.uint8)], axis=-1)
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


def to_matmulnbits(model) -> dict[str, dict[str, Any]]:
    """Replace every DequantizeLinear(weight) + MatMul with one MatMulNBits; returns the packed weights by name.

    Per-channel int8 (NNCF's backup precision) becomes 8-bit blocks that repeat the channel's scale.
    """
    from onnx import TensorProto, helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    packed: dict[str, dict[str, Any]] = {}
    drop_nodes, drop_inits, new_inits = [], set(), []
    for dq in [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]:
        users = consumers.get(dq.output[0], [])
        if len(users) != 1 or users[0].op_type != "MatMul" or users[0].input[1] != dq.output[0]:
            continue
        matmul = users[0]
        attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
        weight_type = inits[dq.input[0]].data_type
        bits = 4 if weight_type in (TensorProto.UINT4, TensorProto.INT4) else 8
        q = numpy_helper.to_array(inits[dq.input[0]]).astype(np.int16)  # [K, N]
        scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float32)
        zero = numpy_helper.to_array(inits[dq.input[2]]).astype(np.int16) if len(dq.input) > 2 else None
        if weight_type in (TensorProto.INT4, TensorProto.INT8):  # signed: shift onto the unsigned grid
            offset = 1 << (bits - 1)
            q = q + offset
            zero = (zero + offset) if zero is not None else None
        k, n = q.shape
        if "block_size" in attrs and attrs["block_size"]:
            block = int(attrs["block_size"])
            scales = scale.T  # [N, K/block]
            zeros = zero.T if zero is not None else None
        else:  # per output channel (axis 1): one scale per column, repeated over the blocks
            if scale.size != n:
                continue  # per input channel: no MatMulNBits layout; left as it is
            block = _block_size(k)
            scales = np.repeat(scale.reshape(n, 1), k // block, axis=1)
            zeros = np.repeat(zero.reshape(n, 1), k // block, axis=1) if zero is not None else None
        blocks = -(-k // block)
        columns = q.T.astype(np.uint8)  # [N, K]
        if blocks * block != k:
            columns = np.pad(columns, ((0, 0), (0, blocks * block - k)), constant_values=1 << (bits - 1))
        data = columns.reshape(n, blocks, block)
        if bits == 4:
            data = _pack_nibbles(data)
        base = matmul.input[1].removesuffix("_dequantized")
        names = [f"{base}_Q{bits}G{block}", f"{base}_scale", f"{base}_zp"]
        new_inits.append(numpy_helper.from_array(np.ascontiguousarray(data), names[0]))
        new_inits.append(numpy_helper.from_array(np.ascontiguousarray(scales), names[1]))
        inputs = [matmul.input[0], names[0], names[1]]
        if zeros is not None:
            zp = zeros.astype(np.uint8)
            zp = _pack_nibbles(zp) if bits == 4 else zp
            new_inits.append(numpy_helper.from_array(np.ascontiguousarray(zp), names[2]))
            inputs.append(names[2])
        node = helper.make_node(
            "MatMulNBits",
            inputs,
            list(matmul.output),
            name=f"{matmul.name}_Q{bits}",
            domain="com.microsoft",
            K=k,
            N=n,
            bits=bits,
            block_size=block,
            accuracy_level=ACCURACY_LEVEL,
        )
        model.graph.node.insert(list(model.graph.node).index(matmul), node)
        drop_nodes += [dq, matmul]
        drop_inits.update(dq.input)
        packed[base] = {"names": names, "bits": bits, "block": block, "k": k, "n": n, "zero": zeros is not None}
    for node in drop_nodes:
        model.graph.node.remove(node)
    kept = [i for i in model.graph.initializer if i.name not in drop_inits]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept + new_inits)
    if not packed:
        raise ConversionError("NNCF left no weight to pack; the graph was not compressed.")
    return packed


def _quantize_embedding(model, gather_name: str, shared: dict[str, Any] | None) -> None:
    """The embedding Gather becomes a GatherBlockQuantized: on lm_head's packed weights when tied (its Transpose
    goes), else on an int8 copy of its own table."""
    from onnx import helper, numpy_helper

    gather = next(n for n in model.graph.node if n.name == gather_name)
    embedding = gather.input[0]
    inits = {i.name: i for i in model.graph.initializer}
    if shared is not None:
        data, scales, zeros = shared["names"]
        bits, block, rows, width = shared["bits"], shared["block"], shared["n"], shared["k"]
        has_zero = shared["zero"]
    else:  # its own int8 copy: asymmetric blocks, round to nearest
        table = numpy_helper.to_array(inits[embedding]).astype(np.float32)
        rows, width = table.shape
        bits, block = 8, EMBEDDING_BLOCK if width % EMBEDDING_BLOCK == 0 else _block_size(width)
        groups = table.reshape(rows, width // block, block)
        low, high = np.minimum(groups.min(-1), 0), np.maximum(groups.max(-1), 0)
        step = np.where(high > low, (high - low) / 255, 1).astype(np.float32)
        zero = np.clip(np.round(-low / step), 0, 255).astype(np.uint8)
        q = np.clip(np.round(groups / step[..., None]) + zero[..., None], 0, 255).astype(np.uint8)
        data, scales, zeros = f"{embedding}_Q8G{block}", f"{embedding}_scale", f"{embedding}_zp"
        for name, array in ((data, q.reshape(rows, width)), (scales, step), (zeros, zero)):
            model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        has_zero = True
    reshape_out = data
    if shared is not None:  # MatMulNBits keeps [N, blocks, bytes]; the Gather wants [rows, bytes per row]
        transpose = next(n for n in model.graph.node if embedding in n.output)
        model.graph.node.remove(transpose)
        embedding = "model.embed_tokens.weight"
        shape = f"{embedding}_shape"
        model.graph.initializer.append(
            numpy_helper.from_array(np.array([rows, -(-width // block) * block * bits // 8], np.int64), shape)
        )
        reshape_out = f"{embedding}_rows"
        model.graph.node.insert(
            list(model.graph.node).index(gather),
            helper.make_node("Reshape", [data, shape], [reshape_out], name=f"{gather.name}_Reshape"),
        )
    inputs = [reshape_out, gather.input[1], scales] + ([zeros] if has_zero else [])
    node = helper.make_node(
        "GatherBlockQuantized",
        inputs,
        list(gather.output),
        name=f"{gather.name}BlockQuantized",
        domain="com.microsoft",
        bits=bits,
        block_size=block,
        gather_axis=0,
        quantize_axis=1,
    )
    model.graph.node.insert(list(model.graph.node).index(gather), node)
    model.graph.node.remove(gather)
    kept = [i for i in model.graph.initializer if i.name != embedding]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
