#!/usr/bin/env python
"""A Phi-3-mini-shaped model with random weights, for timing only (it never answers).

Builds, offline, a `Phi3ForCausalLM` with Phi-3-mini-4k's widths (hidden 3072, intermediate 8192, 32 heads,
32 KV heads, head_dim 96, rope theta 10000, context 4096, sliding window 2047, separate lm_head) but N layers
(default 4) and seeded random fp16 weights (normal, std 0.02 as in transformers' init; norms at 1, so the
activations stay finite), with the demo model's tokenizer (vocabulary 49152, ChatML). Saved as a Hugging
Face folder that every phi3 converter and llama.cpp's .gguf writer accept. Decode time grows linearly with
the layers, so per-layer figures measured on it give an estimate for the full 32 layers.

    python scripts/make_shaped_model.py OUT [--layers 4] [--seed 0] [--tokenizer-from DEMO_FOLDER]

Built in fp16 from the start: 32 layers (7.4 GB of safetensors) peak at about the size of the weights.
About 1.5 GB for 4 layers (the 49152-word vocabulary makes embedding and lm_head 151M parameters each;
Phi-3-mini's own 32064 words would make them 98M).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

# Phi-3-mini-4k-instruct's config.json, less the vocabulary and the special-token ids (the demo tokenizer's).
PHI3_MINI = {
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 4096,
    "original_max_position_embeddings": 4096,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "sliding_window": 2047,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "attention_bias": False,
    "initializer_range": 0.02,
}
TIMING_ONLY_KEY = "phi3_timing_only"  # the marker phi3 bench reads (phi3cli.bench.report.timing_only)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "added_tokens.json",
)
NOTE = """# Phi-3-mini-shaped model: random weights, for timing only, never answers

A `Phi3ForCausalLM` with Phi-3-mini-4k's widths (hidden 3072, intermediate 8192, 32 heads, 32 KV heads,
head_dim 96, rope theta 10000, context 4096) but {layers} layers and random float16 weights (seed {seed},
normal with std 0.02), built offline by phi3's `scripts/make_shaped_model.py`. Tokenizer: the demo model's
(vocabulary 49152). Use it to time runtimes on the real layer shapes; its output is noise.
"""


def demo_folder() -> Path:
    from phi3cli.demo import ensure_demo
    from phi3cli.store import ModelStore

    return ensure_demo(ModelStore())


def build(out: Path, layers: int, seed: int, tokenizer_dir: Path) -> None:
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    tok_config = json.loads((tokenizer_dir / "config.json").read_text())
    config = Phi3Config(
        **PHI3_MINI,
        num_hidden_layers=layers,
        vocab_size=tok_config["vocab_size"],
        bos_token_id=tok_config.get("bos_token_id"),
        eos_token_id=tok_config.get("eos_token_id"),
        pad_token_id=tok_config.get("pad_token_id"),
    )
    torch.manual_seed(seed)
    # Built in fp16 from the start (on the meta device, then filled in place): in fp32 first, 32 layers would
    # need about 15 GB before the cast.
    torch.set_default_dtype(torch.float16)
    try:
        with torch.device("meta"):
            model = Phi3ForCausalLM(config)
    finally:
        torch.set_default_dtype(torch.float32)
    model = model.to_empty(device="cpu").eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, config.initializer_range)
        rotary = type(model.model.rotary_emb)(config=config)  # meta init left inv_freq empty
        model.model.rotary_emb = rotary.to(torch.float32)
        ids = torch.arange(16)[None]
        logits = model(ids).logits.float()
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters; logits std {logits.std():.2f}")
    config.architectures = ["Phi3ForCausalLM"]
    partial = out.parent / f".{out.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        model.save_pretrained(partial, safe_serialization=True, max_shard_size="2GB")
        for name in [*TOKENIZER_FILES, "generation_config.json"]:
            if (tokenizer_dir / name).is_file():
                shutil.copy2(tokenizer_dir / name, partial / name)
        data = json.loads((partial / "config.json").read_text())
        data["_comment"] = "random weights, for timing only, never answers"
        data[TIMING_ONLY_KEY] = "random weights"  # phi3 bench reads it and labels its results "timing only"
        (partial / "config.json").write_text(json.dumps(data, indent=2) + "\n")
        (partial / "README.md").write_text(NOTE.format(layers=layers, seed=seed))
        if out.exists():
            shutil.rmtree(out)
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write (replaced if it exists)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer-from", type=Path, help="a Hugging Face folder (default: the demo model)")
    args = parser.parse_args()
    if args.layers < 1:
        sys.exit("--layers must be at least 1.")
    tokenizer_dir = args.tokenizer_from or demo_folder()
    build(args.out.absolute(), args.layers, args.seed, tokenizer_dir)
    print(f"Wrote {args.out} (random weights, for timing only).")


if __name__ == "__main__":
    main()
