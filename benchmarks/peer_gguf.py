#!/usr/bin/env python
"""Write a Phi3ForCausalLM Hugging Face folder as a phi3-architecture f16 .gguf, and quantize it with llama.cpp.

For benchmarks against llama.cpp on the very same weights: not part of phi3 and not one of its dependencies.
Writing needs only the `gguf` package; quantizing needs llama-cpp-python, which compiles llama.cpp when installed
(``CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python``). The tokenizer must be a byte-level BPE
tokenizer.json (the demo model's, and the Phi-3-mini-shaped timing model's); it is written as llama.cpp's "gpt2"
model with the "smollm" pre-tokenizer. A tied lm_head is written out from the embedding, as llama.cpp's own
converter does.

    python benchmarks/peer_gguf.py HF_DIR OUT.gguf [--quantize Q4_K_M Q4_0 ...]

writes OUT.gguf (f16) and OUT-Q4_K_M.gguf etc. beside it. From Python: ``write_phi3_gguf(hf_dir, path)`` and
``quantize_gguf(src, dst, "Q4_K_M")``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
from pathlib import Path

import numpy as np

F32_TENSORS = ("norm",)  # 1-D norm weights stay float32, as llama.cpp's converter writes them


def _tokenizer(writer, hf_dir: Path, vocab_size: int) -> None:
    import gguf

    data = json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = data["model"]
    if model.get("type") != "BPE" or (data.get("pre_tokenizer") or {}).get("type") not in ("ByteLevel", "Sequence"):
        raise SystemExit(f"{hf_dir}: only byte-level BPE tokenizers are written (found {model.get('type')}).")
    vocab = {**model["vocab"], **{t["content"]: t["id"] for t in data.get("added_tokens", [])}}
    by_id = {i: tok for tok, i in vocab.items()}
    special = {t["id"] for t in data.get("added_tokens", []) if t.get("special")}
    tokens, types = [], []
    for i in range(vocab_size):  # rows of the embedding beyond the tokenizer's vocabulary get padding names
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        types.append(
            gguf.TokenType.CONTROL
            if i in special
            else gguf.TokenType.USER_DEFINED
            if i not in by_id
            else gguf.TokenType.NORMAL
        )
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    config = json.loads((hf_dir / "config.json").read_text())
    generation = hf_dir / "generation_config.json"
    gen = json.loads(generation.read_text()) if generation.is_file() else {}
    eos = gen.get("eos_token_id", config.get("eos_token_id"))
    eos = eos[0] if isinstance(eos, list) else eos
    if config.get("bos_token_id") is not None:
        writer.add_bos_token_id(int(config["bos_token_id"]))
    if eos is not None:
        writer.add_eos_token_id(int(eos))
    pad = gen.get("pad_token_id", config.get("pad_token_id"))
    if pad is not None:
        writer.add_pad_token_id(int(pad))
    writer.add_add_bos_token(False)
    template = hf_dir / "chat_template.jinja"
    if template.is_file():
        writer.add_chat_template(template.read_text(encoding="utf-8"))


def write_phi3_gguf(hf_dir: Path | str, path: Path | str) -> Path:
    """An f16 phi3-architecture .gguf of a Phi3ForCausalLM folder (safetensors), written atomically."""
    import gguf
    from safetensors import safe_open

    hf_dir, path = Path(hf_dir), Path(path)
    config = json.loads((hf_dir / "config.json").read_text())
    if config.get("model_type") != "phi3":
        raise SystemExit(f"{hf_dir} is a {config.get('model_type')} model; this writes Phi-3 (phi3) models only.")
    if config.get("rope_scaling"):
        raise SystemExit(f"{hf_dir}: rope_scaling (LongRoPE) is not written by this script.")
    layers = int(config["num_hidden_layers"])
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.PHI3, layers)

    tensors: dict[str, np.ndarray] = {}
    for shard in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(str(shard), framework="np") as fh:
            for key in fh.keys():  # noqa: SIM118 (safe_open is not a mapping)
                tensors[key] = fh.get_tensor(key)
    if "lm_head.weight" not in tensors:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]  # tied embeddings
    vocab_size = int(tensors["model.embed_tokens.weight"].shape[0])

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    writer = gguf.GGUFWriter(str(partial), "phi3")
    writer.add_name(hf_dir.name)
    writer.add_context_length(int(config.get("max_position_embeddings", 4096)))
    if config.get("original_max_position_embeddings"):
        writer.add_rope_scaling_orig_ctx_len(int(config["original_max_position_embeddings"]))
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_block_count(layers)
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or heads))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_rope_dimension_count(int(head_dim * float(config.get("partial_rotary_factor", 1.0))))
    writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    if config.get("sliding_window"):
        writer.add_sliding_window(int(config["sliding_window"]))
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    _tokenizer(writer, hf_dir, vocab_size)
    for key, value in tensors.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise SystemExit(f"{hf_dir}: no gguf name for tensor {key}.")
        keep_f32 = value.ndim == 1 or any(part in key for part in F32_TENSORS)
        writer.add_tensor(name, value.astype(np.float32 if keep_f32 else np.float16))
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def quantize_gguf(src: Path | str, dst: Path | str, ftype: str = "Q4_K_M", threads: int = 0) -> Path:
    """llama.cpp's own quantizer (llama_model_quantize) from an f16 .gguf to `ftype` (Q4_K_M, Q4_0, Q8_0...)."""
    import llama_cpp

    dst = Path(dst)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype.upper()}")
    params.nthread = threads
    partial = dst.with_name(dst.name + ".partial")
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(partial).encode(), ctypes.byref(params))
        if rc != 0:
            raise SystemExit(f"llama_model_quantize to {ftype} failed ({rc}).")
        os.replace(partial, dst)
    finally:
        partial.unlink(missing_ok=True)
    return dst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("hf_dir", type=Path)
    parser.add_argument("out", type=Path, help="the f16 .gguf to write")
    parser.add_argument("--quantize", nargs="*", default=[], metavar="FTYPE", help="also write OUT-FTYPE.gguf")
    args = parser.parse_args()
    write_phi3_gguf(args.hf_dir, args.out)
    print(f"{args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")
    for ftype in args.quantize:
        dst = quantize_gguf(args.out, args.out.with_name(f"{args.out.stem}-{ftype}.gguf"), ftype)
        print(f"{dst} ({dst.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    sys.exit(main())
