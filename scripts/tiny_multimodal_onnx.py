"""The tiny Phi-4-multimodal (scripts/make_tiny_multimodal.py) as an ONNX Runtime GenAI folder, laid out as
Microsoft's Phi-4-multimodal-instruct-onnx folders are: genai_config.json of type "phi4mm" with four models.

- decoder `phi-4-mm-text.onnx`: ONNX Runtime GenAI's own model builder, on the language model's weights (as a
  Phi3ForCausalLM: the same layers), taking `inputs_embeds` (exclude_embeds), int4 as Microsoft's CPU folder.
- vision `phi-4-mm-vision.onnx`: the model's SigLIP tower, 2x2 compression, separators and projection (torch.onnx
  export), inputs `pixel_values` [images, crops, 3, 448, 448], `image_attention_mask` [images, crops, 32, 32],
  `image_sizes` [images, 2], output `image_features` [image tokens, hidden], tokens in the order transformers'
  Phi4MultimodalImageEmbedding writes them (useful rows of the crop with a separator each, the global separator,
  the global image's rows with a separator each).
- embedding `phi-4-mm-embedding.onnx`: `input_ids` [batch, tokens], `image_features`, `audio_features` ->
  `inputs_embeds`: the token embeddings, with the image (audio) features written over the positions of token
  200010 (200011), the ids ONNX Runtime GenAI's Phi-4 processor gives `<|image_N|>` (`<|audio_N|>`).
- speech `phi-4-mm-speech.onnx`: ONNX Runtime GenAI loads a phi4mm folder only with one; this one has the inputs
  the runtime names and returns zeros (audio is out of scope; it runs only when audio is given).

Two simplifications, both for the tiny model only: `vision_processor.json` sets `dynamic_hd` 1 (every image is
one 448-pixel crop plus the global view; Microsoft's folders say 36), so the exported vision graph handles one crop;
and the vision tower attends to every patch (transformers masks a crop's padding patches inside the tower; here
the padding is dropped from the output only, as the token count requires).

The tiny model's vocabulary has 1,024 words, so its tokenizer.json gives `<|endoftext10|>` and `<|endoftext11|>`
the ids 200010 and 200011 the runtime's processor looks for (the embedding maps both to row 0 before overwriting).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

IMAGE_ID, AUDIO_ID = 200010, 200011
TEXT, VISION, EMBEDDING, SPEECH = (f"phi-4-mm-{k}.onnx" for k in ("text", "vision", "embedding", "speech"))
OPSET = 17


def vision_processor() -> dict:
    """Microsoft's vision_processor.json for Phi-4-multimodal, with dynamic_hd 1 (see the module's docstring)."""

    def op(name, kind, **extra):
        return {"operation": {"name": name, "type": kind, **extra}}

    return {
        "processor": {
            "name": "phi_4_vision_processor",
            "transforms": [
                op("decode_image", "DecodeImage", attrs={"color_space": "RGB"}),
                op(
                    "phi4_vision_dynamic_preprocess",
                    "Phi4VisionDynamicPreprocess",
                    attrs={"dynamic_hd": 1, "dyhd_base_resolution": 448},
                ),
                op("rescale", "Rescale", inputs=[":0"]),
                op("normalize", "Normalize", attrs={"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}),
                op(
                    "phi4_vision_processor",
                    "Phi4VisionProcessor",
                    inputs=[":0", "phi4_vision_dynamic_preprocess:1"],
                    attrs={"dyhd_base_resolution": 448, "interpolation": "CUBIC"},
                ),
            ],
            "output_aligner": "phi4-vision-aligner",
        }
    }


def speech_processor() -> dict:
    """Microsoft's speech_processor.json for Phi-4-multimodal (the runtime reads it when it loads the folder)."""
    attrs = {"audio_compression_rate": 8}
    for prefix, (n_fft, frame, hop) in (("", (512, 400, 160)), ("_8k", (256, 200, 80))):
        attrs |= {
            f"stft_normal{prefix}/n_fft": n_fft,
            f"stft_normal{prefix}/frame_length": frame,
            f"stft_normal{prefix}/hop_length": hop,
            f"stft_normal{prefix}/win_fn": "hamming",
            f"logmel{prefix}/chunk_size": 30,
            f"logmel{prefix}/hop_length": hop,
            f"logmel{prefix}/n_fft": 512,
            f"logmel{prefix}/n_mel": 80,
            f"logmel{prefix}/feature_first": 0,
            f"logmel{prefix}/no_padding": 1,
        }
    decoder = {"name": "audio_decoder", "type": "AudioDecoderEx", "attrs": {"target_sample_rates": [8000, 16000]}}
    embed = {"name": "phi_4_audio_embed", "type": "Phi4AudioEmbed", "attrs": attrs}
    return {
        "feature_extraction": {
            "sequence": [{"operation": decoder}, {"operation": embed}],
            "output_aligner": "phi4-audio-aligner",
        }
    }


def _vision_module(model):
    import torch

    class Vision(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = model.model.embed_tokens_extend.image_embed

        def forward(self, pixel_values, image_attention_mask, image_sizes):
            embed = self.embed
            tower = embed.img_processor
            images, crops = pixel_values.shape[0], pixel_values.shape[1]
            x = tower.embeddings.patch_embedding(pixel_values.flatten(0, 1)).flatten(2).transpose(1, 2)
            hidden = x + tower.embeddings.position_embedding.weight[None]  # every patch kept: ids 0..1023
            states = [hidden]
            for layer in tower.encoder.layers:
                out = layer(hidden, None)
                hidden = out[0] if isinstance(out, tuple) else out
                states.append(hidden)
            feature = states[embed.layer_idx]  # [images*crops, 1024, width]
            side = 32
            grid = feature.reshape(-1, side, side, feature.shape[-1]).permute(0, 3, 1, 2)
            grid = embed.image_token_compression(grid).permute(0, 2, 3, 1)  # [images*crops, 16, 16, width]
            grid = grid.reshape(images, crops, 16, 16, grid.shape[-1])
            newline = embed.sub_img_feature_extensor.reshape(1, 1, 1, -1).expand(images, 16, 1, -1)
            glob = torch.cat([grid[:, 0], newline], dim=2).reshape(images, 16 * 17, -1)
            sub = torch.cat([grid[:, 1], newline], dim=2).reshape(images, 16 * 17, -1)
            mask = image_attention_mask[:, 1, 0::2, 0::2] > 0  # [images, 16, 16]: the crop's useful tokens
            keep_sub = mask[:, :, :1] & torch.cat([mask[:, :1, :], torch.ones_like(mask[:, :1, :1])], dim=2)
            separator = embed.global_img_feature_extensor.reshape(1, 1, -1).expand(images, 1, -1)
            tokens = torch.cat([sub, separator, glob], dim=1)  # [images, 545, width]
            keep = torch.cat(
                [keep_sub.reshape(images, -1), torch.ones_like(tokens[:, 272:, 0], dtype=torch.bool)], dim=1
            )
            chosen = tokens.reshape(-1, tokens.shape[-1])[keep.reshape(-1)]
            up = torch.nn.functional.gelu(embed.img_projection_up(chosen))
            return embed.img_projection_down(up) + 0 * image_sizes.sum()

    return Vision().eval()


def _embedding_module(model):
    import torch

    class Embedding(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.table = model.model.embed_tokens

        def forward(self, input_ids, image_features, audio_features):
            ids = input_ids.long()
            image, audio = ids == IMAGE_ID, ids == AUDIO_ID
            embeds = self.table(torch.where(image | audio, torch.zeros_like(ids), ids))
            flat = embeds.reshape(-1, embeds.shape[-1])
            flat = flat.index_put((torch.nonzero(image.reshape(-1))[:, 0],), image_features)
            flat = flat.index_put((torch.nonzero(audio.reshape(-1))[:, 0],), audio_features)
            return flat.reshape(embeds.shape)

    return Embedding().eval()


def _export(module, args, path: Path, inputs: list[str], output: str, axes: dict) -> None:
    import torch

    with torch.no_grad():
        torch.onnx.export(
            module, args, str(path), input_names=inputs, output_names=[output], dynamic_axes=axes,
            opset_version=OPSET, dynamo=False,
        )  # fmt: skip


def _speech_graph(path: Path, hidden: int) -> None:
    import onnx
    from onnx import TensorProto, helper

    inputs = [
        helper.make_tensor_value_info("audio_embeds", TensorProto.FLOAT, ["batch", "frames", 80]),
        helper.make_tensor_value_info("audio_attention_mask", TensorProto.BOOL, ["batch", "frames"]),
        helper.make_tensor_value_info("audio_sizes", TensorProto.INT64, ["batch"]),
        helper.make_tensor_value_info("audio_projection_mode", TensorProto.INT64, [1]),
    ]
    output = helper.make_tensor_value_info("audio_features", TensorProto.FLOAT, ["audio_tokens", hidden])
    width = helper.make_tensor("width", TensorProto.INT64, [1], [hidden])
    nodes = [
        helper.make_node("ReduceSum", ["audio_sizes"], ["count"], keepdims=1),
        helper.make_node("Concat", ["count", "width"], ["shape"], axis=0),
        helper.make_node("ConstantOfShape", ["shape"], ["audio_features"]),
    ]
    graph = helper.make_graph(nodes, "speech_zeros", inputs, [output], initializer=[width])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), str(path))


def _text_decoder(model, hf_dir: Path, out: Path, scratch: Path) -> None:
    """The language model as a Phi3ForCausalLM folder, built by ONNX Runtime GenAI's builder (inputs_embeds)."""
    from onnxruntime_genai.models.builder import create_model
    from transformers import Phi3Config, Phi3ForCausalLM

    text = model.config
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "original_max_position_embeddings", "rope_theta",
            "rms_norm_eps", "bos_token_id", "eos_token_id", "pad_token_id", "partial_rotary_factor")  # fmt: skip
    config = Phi3Config(**{k: getattr(text, k) for k in keys if hasattr(text, k)}, tie_word_embeddings=False)
    phi3 = Phi3ForCausalLM(config)
    missing, _ = phi3.load_state_dict(model.state_dict(), strict=False)
    if missing:
        raise RuntimeError(f"language model weights missing: {missing[:3]}")
    source = scratch / "language-model"
    phi3.save_pretrained(source)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        shutil.copy(hf_dir / name, source / name)
    create_model(None, str(source), str(out), "int4", "cpu", str(scratch / "cache"), exclude_embeds=True,
                 filename=TEXT)  # fmt: skip


def _genai_config(out: Path, hidden: int) -> None:
    path = out / "genai_config.json"
    config = json.loads(path.read_text())
    model = config["model"]
    model["type"] = "phi4mm"
    model["vision"] = {
        "filename": VISION,
        "config_filename": "vision_processor.json",
        "inputs": {
            "pixel_values": "pixel_values",
            "attention_mask": "image_attention_mask",
            "image_sizes": "image_sizes",
        },
        "outputs": {"image_features": "image_features"},
    }
    model["speech"] = {
        "filename": SPEECH,
        "config_filename": "speech_processor.json",
        "inputs": {
            "audio_embeds": "audio_embeds",
            "attention_mask": "audio_attention_mask",
            "audio_sizes": "audio_sizes",
            "audio_projection_mode": "audio_projection_mode",
        },
        "outputs": {"audio_features": "audio_features"},
    }
    model["embedding"] = {
        "filename": EMBEDDING,
        "inputs": {"input_ids": "input_ids", "image_features": "image_features", "audio_features": "audio_features"},
        "outputs": {"inputs_embeds": "inputs_embeds"},
    }
    model["image_token_id"], model["decoder"]["hidden_size"] = IMAGE_ID, hidden
    path.write_text(json.dumps(config, indent=4))
    (out / "vision_processor.json").write_text(json.dumps(vision_processor(), indent=2))
    (out / "speech_processor.json").write_text(json.dumps(speech_processor(), indent=2))


def _tokenizer(hf_dir: Path, out: Path) -> None:
    """The tiny tokenizer with <|endoftext10|>/<|endoftext11|> at the ids the runtime's processor looks for."""
    data = json.loads((hf_dir / "tokenizer.json").read_text())
    remap = {"<|endoftext10|>": IMAGE_ID, "<|endoftext11|>": AUDIO_ID}
    for token in data["added_tokens"]:
        token["id"] = remap.get(token["content"], token["id"])
    (out / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
    for name in ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "generation_config.json"):
        shutil.copy(hf_dir / name, out / name)


def build_onnx(hf_dir: Path, out: Path) -> Path:
    """Write the ONNX Runtime GenAI folder of the tiny Phi-4-multimodal in hf_dir into out (created)."""
    import torch
    from transformers import Phi4MultimodalForCausalLM

    hf_dir, out = Path(hf_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = Phi4MultimodalForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    hidden = model.config.hidden_size
    with tempfile.TemporaryDirectory() as scratch:
        _text_decoder(model, hf_dir, out, Path(scratch))
    pixels = torch.randn(2, 2, 3, 448, 448)
    mask = torch.ones(2, 2, 32, 32)
    mask[1, 1, 20:] = 0  # a padded crop, so the traced graph keeps the data-dependent selection
    sizes = torch.tensor([[448, 448], [448, 448]])
    _export(_vision_module(model), (pixels, mask, sizes), out / VISION,
            ["pixel_values", "image_attention_mask", "image_sizes"], "image_features",
            {"pixel_values": {0: "images", 1: "crops"}, "image_attention_mask": {0: "images", 1: "crops"},
             "image_sizes": {0: "images"}, "image_features": {0: "image_tokens"}})  # fmt: skip
    ids = torch.tensor([[1, IMAGE_ID, IMAGE_ID, 2]])
    _export(_embedding_module(model), (ids, torch.randn(2, hidden), torch.zeros(0, hidden)), out / EMBEDDING,
            ["input_ids", "image_features", "audio_features"], "inputs_embeds",
            {"input_ids": {0: "batch", 1: "tokens"}, "image_features": {0: "image_tokens"},
             "audio_features": {0: "audio_tokens"}, "inputs_embeds": {0: "batch", 1: "tokens"}})  # fmt: skip
    _speech_graph(out / SPEECH, hidden)
    _genai_config(out, hidden)
    for name in ("added_tokens.json", "merges.txt", "vocab.json"):  # the builder's copy of the tokenizer's files
        (out / name).unlink(missing_ok=True)
    _tokenizer(hf_dir, out)
    return out
