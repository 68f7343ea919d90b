"""Turning a .gguf into a Hugging Face folder phi3's converters read (float16 safetensors, plain tokenizer).

transformers dequantizes the .gguf; a Phi-3 .gguf is written as it is, and a Llama one (the demo's SmolLM2) can be
repacked into Phi-3's fused projections, which is exact: the two architectures differ only in those.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from phi3cli.errors import Phi3Error, UnsupportedModelError
from phi3cli.progress import Progress, SilentProgress
from phi3cli.store import ModelStore
from phi3cli.util import atomic_output


def materialise_gguf(gguf: Path, final: Path, store: ModelStore, progress: Progress | None = None) -> Path:
    """A Hugging Face folder for a Phi-3 .gguf, dequantized once into the store."""
    progress = progress or SilentProgress()
    if (final / "config.json").is_file():
        return final
    with store.lock(f"source-{final.name}"):
        if not (final / "config.json").is_file():
            with atomic_output(final, force=True) as out:
                gguf_to_phi3(gguf, out, progress)
    return final


def _plain_bytelevel_tokenizer(tokenizer, chat_template: str | None, eos: str):
    """Rewrite a GGUF-built BPE tokenizer as plain byte-level BPE (what OpenVINO's converter accepts)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec["normalizer"] = None
    spec["decoder"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    spec["post_processor"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": True}
    spec["model"]["byte_fallback"] = False
    fast = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        eos_token=eos,
        pad_token=eos,
        unk_token=tokenizer.unk_token,
        bos_token=None,
        chat_template=chat_template,
        clean_up_tokenization_spaces=False,
    )
    return fast


def gguf_to_phi3(gguf: Path, out: Path, progress: Progress, *, repack_eos: str | None = None) -> None:
    """Write a Phi3ForCausalLM Hugging Face folder (float16 safetensors) from a .gguf file.

    repack_eos: the .gguf holds a Llama model, repacked into Phi-3's fused projections, with this end token.
    """
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        raise Phi3Error("Reading a .gguf model needs the torch extra.", hint="pip install 'phi3cli[torch]'") from exc

    with transformers_quiet():  # our phases say what happens; its bars and notices are not for our users
        _write_phi3(gguf, out, progress, repack_eos=repack_eos)


@contextlib.contextmanager
def transformers_quiet():
    """transformers' progress bars and notices off for the duration, then as they were.

    Its GGUF reader draws its bar with tqdm directly, past transformers' own switch: for the duration it draws
    with transformers' tqdm, which obeys the switch.
    """
    from transformers.utils import logging as hf_logging

    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_reader
    except ImportError:  # another transformers: its switch alone then
        gguf_reader = None
    bars, verbosity, reader_tqdm = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity(), None
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # e.g. its GGUF tokenizer notice ("legacy behaviour")
    if hasattr(gguf_reader, "tqdm"):
        reader_tqdm, gguf_reader.tqdm = gguf_reader.tqdm, hf_logging.tqdm
    try:
        yield
    finally:
        if reader_tqdm is not None:
            gguf_reader.tqdm = reader_tqdm
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _write_phi3(gguf: Path, out: Path, progress: Progress, *, repack_eos: str | None) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    progress.phase(f"Loading {gguf.name} (dequantizing)")
    folder, name = str(gguf.parent), gguf.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        source = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (ValueError, KeyError, AttributeError, RuntimeError) as exc:
        raise UnsupportedModelError(f"transformers could not load {gguf.name}: {exc}".splitlines()[0]) from exc

    if repack_eos:
        model = _repack_llama(source, gguf.name, progress)
        eos = repack_eos
        tokenizer = _plain_bytelevel_tokenizer(tokenizer, tokenizer.chat_template, eos)
    else:
        model = source
        eos = tokenizer.eos_token

    progress.phase("Writing float16 safetensors")
    model = model.to(torch.float16)
    model.config.dtype = "float16"
    model.generation_config = GenerationConfig(
        bos_token_id=model.config.bos_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids(eos),
        pad_token_id=tokenizer.convert_tokens_to_ids(eos),
    )
    model.config.eos_token_id = model.generation_config.eos_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _repack_llama(source, name: str, progress: Progress):
    """A Llama model's weights in Phi-3's fused projections: qkv_proj = cat(q, k, v), gate_up_proj = cat(gate, up)."""
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    progress.phase("Repacking Llama weights into Phi-3's fused projections")
    lc = source.config
    config = Phi3Config(
        vocab_size=lc.vocab_size,
        hidden_size=lc.hidden_size,
        intermediate_size=lc.intermediate_size,
        num_hidden_layers=lc.num_hidden_layers,
        num_attention_heads=lc.num_attention_heads,
        num_key_value_heads=lc.num_key_value_heads,
        hidden_act=lc.hidden_act,
        max_position_embeddings=lc.max_position_embeddings,
        original_max_position_embeddings=lc.max_position_embeddings,
        rms_norm_eps=lc.rms_norm_eps,
        rope_theta=lc.rope_theta,
        tie_word_embeddings=lc.tie_word_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        attention_bias=False,
    )
    model = Phi3ForCausalLM(config)
    src = source.state_dict()
    state = {}
    for key, value in src.items():
        if ".self_attn.k_proj." in key or ".self_attn.v_proj." in key or ".mlp.up_proj." in key:
            continue
        if ".self_attn.q_proj." in key:
            prefix = key.split(".self_attn.q_proj.")[0] + ".self_attn."
            state[prefix + "qkv_proj.weight"] = torch.cat(
                [src[prefix + "q_proj.weight"], src[prefix + "k_proj.weight"], src[prefix + "v_proj.weight"]]
            )
        elif ".mlp.gate_proj." in key:
            prefix = key.split(".mlp.gate_proj.")[0] + ".mlp."
            state[prefix + "gate_up_proj.weight"] = torch.cat(
                [src[prefix + "gate_proj.weight"], src[prefix + "up_proj.weight"]]
            )
        else:
            state[key] = value
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k != "lm_head.weight"]
    if missing or result.unexpected_keys:
        raise Phi3Error(f"Repacking {name} failed: missing {missing}, unexpected {result.unexpected_keys}")
    model.tie_weights()
    return model
