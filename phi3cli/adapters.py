"""LoRA adapters as PEFT writes them (adapter_config.json + adapter_model.safetensors), read for a Phi-3 base.

read_adapter() checks a folder against the base model's config.json (architecture, the modules it targets, every
tensor's shape) and turns it into phi3's one form: per layer, a LoRA on Phi-3's own Linear layers (qkv_proj, o_proj,
gate_up_proj, down_proj) with PEFT's scale (lora_alpha / r) folded into B. Adapters trained on unfused q/k/v or
gate/up projections (a Llama-style fine-tune) become one LoRA on the fused layer: A stacked, B block-diagonal, which
is the same update exactly. Anything else is refused in one line naming what was found. Reading needs numpy and
safetensors only; runtimes load the normalised file (adapter_store), convert merges it (adapter_store.merge).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from phi3cli.backends.adapters import AdapterError, check_alpha

if TYPE_CHECKING:
    import numpy as np

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# Phi-3's Linear layers per decoder layer, and the unfused names other trainers write: (fused layer, part index).
FUSED_MODULES = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
UNFUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}
KEY = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(?P<layer>\d+)\.(?P<module>(?:self_attn|mlp)\.\w+)"
    r"\.lora_(?P<which>[AB])(?:\.[\w-]+)?\.weight$"
)


@dataclass(frozen=True)
class AdapterChoice:
    """An adapter the user named: --adapter DIR[:ALPHA] (chat, bench, convert) or NAME=DIR (serve)."""

    name: str
    path: Path
    alpha: float = 1.0

    @classmethod
    def parse(cls, text: str) -> AdapterChoice:
        """DIR, DIR:ALPHA, NAME=DIR or NAME=DIR:ALPHA; the name defaults to the folder's name."""
        name, _, rest = text.partition("=") if "=" in text and not Path(text).exists() else ("", "", text)
        alpha = 1.0
        head, sep, tail = rest.rpartition(":")
        if sep and head and not Path(rest).exists():
            try:
                alpha = float(tail)
            except ValueError:
                raise AdapterError(f"--adapter {text}: {tail!r} after ':' is not an alpha (a number).") from None
            rest = head
        path = Path(rest).expanduser()
        check_alpha(alpha, f"--adapter {text}")
        return cls(name or path.name, path, alpha)


@dataclass
class LoraAdapter:
    """An adapter read and checked against a base: one (A, B·scale) pair per Phi-3 Linear layer it changes."""

    name: str
    path: Path
    rank: int  # the largest rank of any layer after fusing
    source_modules: tuple[str, ...]  # the module names the file targets, as written (q_proj, qkv_proj, ...)
    pairs: dict[str, tuple[np.ndarray, np.ndarray]] = field(repr=False, default_factory=dict)  # module -> (A, B)
    digest: str = ""  # identifies the weights it applies (scale included), for store keys

    @property
    def modules(self) -> tuple[str, ...]:
        """The Phi-3 modules it changes, without the layer (self_attn.qkv_proj, ...)."""
        return tuple(sorted({m.split(".", 3)[-1] for m in self.pairs}))

    def delta(self, module: str) -> np.ndarray:
        """The update B·A (scale folded in) for model.layers.N.<module>, float32, shaped like the weight."""
        a, b = self.pairs[module]
        return b @ a


def module_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """(out, in) of every Linear an adapter may target in one Phi-3 decoder layer, fused and unfused names."""
    try:
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        inter = int(config["intermediate_size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise AdapterError(f"The base model's config.json lacks {exc} to check an adapter's shapes against.") from exc
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    q, kv = heads * head_dim, kv_heads * head_dim
    return {
        "self_attn.qkv_proj": (q + 2 * kv, hidden),
        "self_attn.o_proj": (hidden, q),
        "mlp.gate_up_proj": (2 * inter, hidden),
        "mlp.down_proj": (hidden, inter),
        "self_attn.q_proj": (q, hidden),
        "self_attn.k_proj": (kv, hidden),
        "self_attn.v_proj": (kv, hidden),
        "mlp.gate_proj": (inter, hidden),
        "mlp.up_proj": (inter, hidden),
    }


def read_config(folder: Path) -> dict:
    """adapter_config.json of a PEFT LoRA folder, refusing what phi3 cannot apply (DoRA, biases, other methods)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterError(f"Adapter {folder} is not a folder.", hint="Give the folder PEFT saved the adapter in.")
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise AdapterError(
            f"{folder} has no {CONFIG_FILE}: not a PEFT adapter folder.",
            hint="Give the folder that save_pretrained() wrote (adapter_config.json + adapter_model.safetensors).",
        )
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise AdapterError(f"{path} cannot be read as JSON: {exc}") from exc
    kind = str(config.get("peft_type", "")).upper()
    if kind != "LORA":
        raise AdapterError(f"{folder} is a {kind or 'untyped'} adapter; phi3 applies LoRA adapters only.")
    for key, why in (("use_dora", "DoRA"), ("fan_in_fan_out", "fan_in_fan_out (Conv1D) weights")):
        if config.get(key):
            raise AdapterError(f"{folder} uses {why}; phi3 applies plain LoRA only.")
    if config.get("bias", "none") != "none" or config.get("modules_to_save"):
        raise AdapterError(f"{folder} also trains biases or whole modules (modules_to_save); phi3 applies LoRA only.")
    base_class = (config.get("auto_mapping") or {}).get("base_model_class")
    if base_class and base_class != "Phi3ForCausalLM":
        raise AdapterError(f"{folder} was trained on a {base_class}, not a Phi-3 model (Phi3ForCausalLM).")
    if not (folder / WEIGHTS_FILE).is_file():
        raise AdapterError(f"{folder} has no {WEIGHTS_FILE} (phi3 reads adapters saved as safetensors).")
    return config


def _pattern_value(patterns: dict, key: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern lookup: the first pattern that ends the module's key."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return float(value)
    return default


def _scale(config: dict, key: str, rank: int) -> float:
    alpha = _pattern_value(config.get("alpha_pattern"), key, float(config.get("lora_alpha", rank)))
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _read_pairs(folder: Path, config: dict, base: dict) -> dict[tuple[int, str], tuple]:
    """(layer, module) -> (A, B·scale) as the file has them, each shape checked against the base."""
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(folder / WEIGHTS_FILE))
    except Exception as exc:  # a truncated file, or a dtype numpy cannot hold (bf16)
        raise AdapterError(f"{folder / WEIGHTS_FILE} cannot be read: {exc}") from exc
    shapes, layers = module_shapes(base), int(base.get("num_hidden_layers") or 1 << 30)
    found: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    foreign = sorted({k.rsplit(".lora_", 1)[0].split(".")[-1] for k in tensors if not KEY.match(k)})
    names = sorted({m.group("module").split(".")[-1] for k in tensors if (m := KEY.match(k))})
    unknown = [n for n in names if f"self_attn.{n}" not in shapes and f"mlp.{n}" not in shapes]
    if foreign or unknown or not names:
        raise AdapterError(
            f"{folder} targets modules phi3 cannot map onto Phi-3's layers: {', '.join(foreign + unknown) or 'none'} "
            f"(modules found: {', '.join(sorted(set(foreign + names))) or 'none'}).",
            hint="phi3 applies LoRA on qkv_proj, o_proj, gate_up_proj, down_proj (or q/k/v_proj, gate/up_proj).",
        )
    for key, tensor in tensors.items():
        m = KEY.match(key)
        layer, module = int(m.group("layer")), m.group("module")
        if module not in shapes:
            raise AdapterError(f"{folder}: tensor {key} targets {module}, which Phi-3 does not have there.")
        if layer >= layers:
            raise AdapterError(f"{folder}: tensor {key} is for layer {layer}; the base model has {layers} layers.")
        found.setdefault((layer, module), {})[m.group("which")] = (key, tensor.astype("float32"))
    pairs = {}
    for (layer, module), ab in sorted(found.items()):
        if len(ab) != 2:
            key = next(iter(ab.values()))[0]
            raise AdapterError(f"{folder}: tensor {key} has no lora_{'B' if 'A' in ab else 'A'} partner.")
        (key_a, a), (key_b, b) = ab["A"], ab["B"]
        out_dim, in_dim = shapes[module]
        rank = a.shape[0]
        for key, tensor, want in ((key_a, a, (rank, in_dim)), (key_b, b, (out_dim, rank))):
            if tuple(tensor.shape) != want:
                raise AdapterError(
                    f"{folder}: tensor {key} is {tuple(tensor.shape)}, the base model needs {want}.",
                    hint="The adapter was trained on another model (or another size of Phi-3).",
                )
        pairs[(layer, module)] = (a, b * _scale(config, f"model.layers.{layer}.{module}", rank))
    return pairs


def _fuse(pairs: dict[tuple[int, str], tuple], base: dict) -> dict[str, tuple]:
    """Unfused q/k/v and gate/up LoRAs as one LoRA on the fused layer: A stacked, B block-diagonal (exact)."""
    import numpy as np

    shapes = module_shapes(base)
    out: dict[str, tuple] = {}
    grouped: dict[tuple[int, str], list] = {}
    for (layer, module), (a, b) in pairs.items():
        if module in UNFUSED:
            fused, part = UNFUSED[module]
            grouped.setdefault((layer, fused), []).append((part, a, b))
        else:
            out[f"model.layers.{layer}.{module}"] = (a, b)
    for (layer, fused), parts in grouped.items():
        key = f"model.layers.{layer}.{fused}"
        if key in out:
            raise AdapterError(f"The adapter targets both {fused} and its parts in layer {layer}.")
        names = [n for n, (f, _) in UNFUSED.items() if f == fused]
        offsets, row = [], 0
        for n in names:
            offsets.append(row)
            row += shapes[n][0]
        a = np.concatenate([p[1] for p in sorted(parts, key=lambda p: p[0])])
        b = np.zeros((shapes[fused][0], a.shape[0]), dtype=np.float32)
        col = 0
        for part, _, pb in sorted(parts, key=lambda p: p[0]):
            b[offsets[part] : offsets[part] + pb.shape[0], col : col + pb.shape[1]] = pb
            col += pb.shape[1]
        out[key] = (a, b)
    return out


def read_adapter(folder: Path, base: dict, name: str | None = None) -> LoraAdapter:
    """Read a PEFT LoRA folder for the base model whose config.json is base; one-line AdapterError otherwise."""
    import hashlib

    from phi3cli.sources import SUPPORTED_MODEL_TYPES

    folder = Path(folder)
    config = read_config(folder)
    if base.get("model_type") not in SUPPORTED_MODEL_TYPES:
        raise AdapterError(f"The base model is a '{base.get('model_type')}' model; phi3 applies adapters to Phi-3.")
    pairs = _read_pairs(folder, config, base)
    fused = _fuse(pairs, base)
    digest = hashlib.sha256()  # of what is applied (PEFT writes target_modules in no fixed order)
    for module, (a, b) in sorted(fused.items()):
        digest.update(module.encode() + a.tobytes() + b.tobytes())
    return LoraAdapter(
        name=name or folder.name,
        path=folder,
        rank=max(a.shape[0] for a, _ in fused.values()),
        source_modules=tuple(sorted({m for _, m in pairs})),
        pairs=fused,
        digest=digest.hexdigest()[:16],
    )
