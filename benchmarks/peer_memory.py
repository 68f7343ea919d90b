"""What a decoded token reads (weights at their stored precision, the KV cache) and what memory gives (bandwidth):
the bytes-per-token and share-of-bandwidth columns of benchmarks/bench_peers.py.
"""

from __future__ import annotations

import multiprocessing as mp
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from benchmarks.peer_builds import Config


def _read_worker(gib: float, repeats: int, barrier, queue) -> None:
    import numpy as np

    a = np.ones(int(gib * (1 << 30)), dtype=np.uint8)
    a.max()  # touch every page first
    barrier.wait()
    start = time.perf_counter()
    for _ in range(repeats):
        a.max()
    queue.put((a.nbytes * repeats, time.perf_counter() - start))


def measure_bandwidth(processes: int, gib: float = 1.0, repeats: int = 8) -> float:
    """Bytes per second that `processes` numpy max reductions read together (each its own array, started together)."""
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(processes), ctx.Queue()
    workers = [ctx.Process(target=_read_worker, args=(gib, repeats, barrier, queue)) for _ in range(processes)]
    for w in workers:
        w.start()
    results = [queue.get() for _ in workers]
    for w in workers:
        w.join()
    return sum(b for b, _ in results) / max(t for _, t in results)


# ------------------------------------------------------------------------------------------ bytes per token


def ov_weight_bytes(folder: Path) -> tuple[int, int, dict[str, int]]:
    """(bytes of all constants, bytes of the embedding table not read per token, bytes per element type), from the XML."""
    root = ET.parse(folder / "openvino_model.xml").getroot()
    total = embed = 0
    tied = True
    per_type: dict[str, int] = {}
    for layer in root.iter("layer"):
        if layer.get("type") != "Const":
            continue
        data = layer.find("data")
        size = int(data.get("size", 0))
        total += size
        per_type[data.get("element_type")] = per_type.get(data.get("element_type"), 0) + size
        if "embed_tokens" in (layer.get("name") or ""):
            embed += size
        tied = tied and "lm_head" not in (layer.get("name") or "")
    # a tied lm_head multiplies by the embedding's own constant, which every decoded token then reads whole
    return total, 0 if tied else embed, per_type


def ort_weight_bytes(folder: Path) -> tuple[int, int, dict[str, int]]:
    import onnx

    proto = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    total = embed = 0
    per_type: dict[str, int] = {}
    for init in proto.graph.initializer:
        ext = {e.key: e.value for e in init.external_data}
        size = int(ext["length"]) if "length" in ext else len(init.raw_data)
        total += size
        kind = onnx.TensorProto.DataType.Name(init.data_type).lower()
        per_type[kind] = per_type.get(kind, 0) + size
        if "embed_tokens" in init.name:
            embed += size
    return total, embed, per_type


def gguf_weight_bytes(path: Path) -> tuple[int, int, dict[str, int]]:
    from gguf import GGUFReader

    total = embed = 0
    per_type: dict[str, int] = {}
    for t in GGUFReader(str(path)).tensors:
        size = int(t.n_bytes)
        total += size
        per_type[t.tensor_type.name] = per_type.get(t.tensor_type.name, 0) + size
        if t.name == "token_embd.weight":
            embed += size
    return total, embed, per_type


def disk_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and "tokenizer" not in p.name)


def kv_bytes_per_token(config: Config, hf_config: dict, context: float, path: Path, properties: dict) -> float:
    """Bytes of KV cache one decode step reads at the given context length, from the properties the run used."""
    layers = hf_config["num_hidden_layers"]
    kv_heads = hf_config.get("num_key_value_heads") or hf_config["num_attention_heads"]
    head_dim = hf_config.get("head_dim") or hf_config["hidden_size"] // hf_config["num_attention_heads"]
    bits = {"u8": 8, "i8": 8, "u4": 4, "f16": 16, "bf16": 16, "f32": 32}
    if config.backend == "ov":
        both = str(properties.get("KV_CACHE_PRECISION", "u8")).lower()  # u8 is OpenVINO's default on x86-64
        per_elem = 0.0
        for part in ("KEY", "VALUE"):
            b = bits.get(str(properties.get(f"{part}_CACHE_PRECISION", both)).lower(), 8)
            # u8/u4 keep an f32 scale and zero point per token, head and group (the group: a whole head here)
            per_elem += (b / 8 + (8 / head_dim if b < 16 else 0)) / 2
    elif config.backend == "ort":
        per_elem = 4 if _ort_io_float32(path) else 2
    else:
        per_elem = {"f16": 2, "q8_0": 34 / 32, "f32": 4}.get(config.knobs.get("kv", "f16"), 2)
    return 2 * layers * kv_heads * head_dim * context * per_elem


def _ort_io_float32(path: Path) -> bool:
    import onnx

    proto = onnx.load(str(path / "model.onnx"), load_external_data=False)
    for value in proto.graph.input:
        if value.name.startswith("past_key_values"):
            return value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    return True


def weight_bytes(config: Config, path: Path) -> tuple[int, int, dict[str, int]]:
    if config.backend == "llama":
        return gguf_weight_bytes(path)
    if config.backend == "ov":
        return ov_weight_bytes(path)
    return ort_weight_bytes(path)
