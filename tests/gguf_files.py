"""Write real .gguf files for tests: the demo model's weights under the phi3 architecture, or a bare header."""

from __future__ import annotations

import json
from pathlib import Path


def write_phi3_gguf(hf_dir: Path, out: Path) -> Path:
    """The demo model as a phi3-architecture .gguf (float16), as llama.cpp's converter lays Phi-3 out."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    layers = cfg["num_hidden_layers"]
    writer = gguf.GGUFWriter(str(out), "phi3")
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(layers)
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_rope_freq_base(cfg["rope_theta"])
    writer.add_rope_dimension_count(cfg["hidden_size"] // cfg["num_attention_heads"])
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    writer.add_tokenizer_model("llama")
    writer.add_token_list([t for t, _ in vocab])
    writer.add_token_scores([0.0] * len(vocab))
    writer.add_token_types([1] * len(vocab))
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_unk_token_id(0)
    # The demo's ChatML template, whose markers are in this vocabulary (Phi-3's <|user|> markers are not).
    writer.add_chat_template((hf_dir / "chat_template.jinja").read_text())
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.PHI3, layers)
    for key, value in load_file(str(hf_dir / "model.safetensors")).items():
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        writer.add_tensor(name, value.astype(np.float16) if value.ndim > 1 else value.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def write_header_only_gguf(out: Path, arch: str) -> Path:
    """A .gguf with an architecture and no tensors: enough to be identified and refused."""
    import gguf

    writer = gguf.GGUFWriter(str(out), arch)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
