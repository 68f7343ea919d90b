#!/usr/bin/env python
"""A tiny random-weight Phi-4-multimodal, built offline, for tests (it never answers anything sensible).

Builds a `Phi4MultimodalForCausalLM` from transformers' own config classes: Phi-4-multimodal's layout (the
language model, the SigLIP vision tower with its 2x2 token compression, the image projection, a small audio
encoder) at width 128 with 2 layers, a small vision tower (64 wide, 2 layers) that keeps the real crop size
(448) and patch size (14), so every runtime's image preprocessing runs as it does on the real model. The real
tokenizer and image processor are not available offline, so both are made: a byte-level BPE trained on a few
sentences (about 450 words, with the model's special tokens `<|system|>`, `<|user|>`, `<|assistant|>`, `<|end|>`,
`<|endoftext|>`, `<|endoftext10|>` (image) and `<|endoftext11|>` (audio)), Phi-4-multimodal's chat template,
and the image processor's config.

    python scripts/make_tiny_multimodal.py OUT [--seed 0] [--onnx ONNX_OUT]

About 2 MB of safetensors; a few seconds. With --onnx it also writes the model as an ONNX Runtime GenAI folder laid
out as Microsoft's Phi-4-multimodal-instruct-onnx folders (scripts/tiny_multimodal_onnx.py; about 7 s more).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SPECIAL = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext10|>", "<|endoftext11|>"]
# Phi-4-multimodal-instruct's chat template (its tokenizer_config.json): images and audio are placeholders such as
# <|image_1|> written in a user message's text.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and message['tools'] is "
    "not none %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + message['tools'] + '<|/tool|>' + "
    "'<|end|>' }}{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is in this image? Describe the picture in one sentence.",
    "A red square, a blue circle and a green triangle on a white background.",
    "Hello! How are you today? I am fine, thank you.",
    "Paris is the capital of France. The sea is blue and the sky is grey.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9, symbols: ()[]{}<>+-*/=_.,;:!?'\"",
]


def build_tokenizer(out: Path) -> tuple[dict[str, int], int]:
    """A byte-level BPE with the model's special tokens, saved as tokenizer.json and its config: their ids, and
    the vocabulary's size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=1024 - len(SPECIAL),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    tok.add_special_tokens(SPECIAL)
    tok.save(str(out / "tokenizer.json"))
    ids = {name: tok.token_to_id(name) for name in SPECIAL}
    config = {
        "tokenizer_class": "GPT2TokenizerFast",
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "model_max_length": 131072,
        "clean_up_tokenization_spaces": False,
        "add_prefix_space": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special = {k: "<|endoftext|>" for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return ids, tok.get_vocab_size()


def model_config(ids: dict[str, int], vocab: int):
    from transformers import Phi4MultimodalAudioConfig, Phi4MultimodalConfig, Phi4MultimodalVisionConfig

    vision = Phi4MultimodalVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=448,
        patch_size=14,
        crop_size=448,
        image_token_id=ids["<|endoftext10|>"],
    )
    audio = Phi4MultimodalAudioConfig(
        hidden_size=64,
        intermediate_size=128,
        num_blocks=2,
        num_attention_heads=4,
        ext_pw_out_channel=64,
        depthwise_separable_out_channel=64,
        nemo_conv_channels=64,
        audio_token_id=ids["<|endoftext11|>"],
    )
    return Phi4MultimodalConfig(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        original_max_position_embeddings=4096,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|endoftext|>"], ids["<|end|>"]],
        pad_token_id=ids["<|endoftext|>"],
        vision_config=vision,
        audio_config=audio,
        tie_word_embeddings=False,
    )


def processor_config() -> dict:
    """transformers' Phi4MultimodalImageProcessorFast settings, as Phi-4-multimodal-instruct's files give them."""
    return {
        "image_processor_type": "Phi4MultimodalImageProcessorFast",
        "processor_class": "Phi4MultimodalProcessor",
        "dynamic_hd": 36,
        "patch_size": 14,
        "size": {"height": 448, "width": 448},
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "do_normalize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_convert_rgb": True,
    }


def build(out: Path, seed: int = 0) -> Path:
    """Write the tiny model, its tokenizer and processor config into `out` (created); returns `out`."""
    import torch
    from transformers import Phi4MultimodalForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    ids, vocab = build_tokenizer(out)
    torch.manual_seed(seed)
    config = model_config(ids, vocab)
    model = Phi4MultimodalForCausalLM(config).eval()
    with torch.no_grad():  # the separators are zeros at init: make them count, as trained ones do
        embed = model.model.embed_tokens_extend.image_embed
        embed.global_img_feature_extensor.normal_(0, 0.02)
        embed.sub_img_feature_extensor.normal_(0, 0.02)
        # Special tokens never win: a special token's output row is the mean of the others, so its logit is their
        # mean, never above their max. A greedy answer is then text (max_new_tokens long) that tests can compare.
        special = sorted(ids.values())
        ordinary = [i for i in range(vocab) if i not in ids.values()]
        model.lm_head.weight[special] = model.lm_head.weight[ordinary].mean(dim=0)
    model.save_pretrained(out)
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (out / "preprocessor_config.json").write_text(json.dumps(processor_config(), indent=2))
    generation = {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": [ids["<|endoftext|>"], ids["<|end|>"]]}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return out


def build_onnx(hf_dir: Path, out: Path) -> Path:
    """The tiny model in hf_dir as an ONNX Runtime GenAI folder in out (scripts/tiny_multimodal_onnx.py)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "tiny_multimodal_onnx", Path(__file__).with_name("tiny_multimodal_onnx.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_onnx(hf_dir, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--onnx", type=Path, metavar="ONNX_OUT", help="also write an ONNX Runtime GenAI folder here")
    args = parser.parse_args(argv)
    build(args.out, seed=args.seed)
    print(args.out)
    if args.onnx:
        print(build_onnx(args.out, args.onnx))
    return 0


if __name__ == "__main__":
    sys.exit(main())
