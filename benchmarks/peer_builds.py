"""Builds the artifacts benchmarks/bench_peers.py times, from one Hugging Face folder, and what each reads per token.

A configuration is named `runtime:recipe[@knob=value,...]`:

- `llama:Q4_K_M`, `llama:Q4_0`, ... : llama.cpp's own quantization of an f16 .gguf of the same weights.
- `phi3:openvino`, `phi3:onnx` : phi3's own default int4 of that backend, built by phi3's converter into its model
  store (as `phi3 convert MODEL --to BACKEND --format int4` does) and run through phi3's own load and timing path
  (`loading.load` + `stream_reply`), with the runtime settings phi3 compiles it with.
- `ov:phi3`, `ort:phi3` : the same folders, run by the bare runtime loops with the knobs given (to try settings).
- `ov:sym-g128-r0.6` : an OpenVINO IR exported by optimum-intel (fp16), weights compressed by NNCF.
  Tokens: `sym`/`asym`, `g<N>` (group size, `g-1` channel-wise), `r<ratio>` (the rest in the backup precision),
  `lm4` (all layers int4: embedding and lm_head too; NNCF's default keeps both int8), `b8s` (backup int8
  symmetric instead of asymmetric).
- `ort:b32-sym-acc4` : ONNX Runtime GenAI's model builder (int4 MatMulNBits, round to nearest).
  Tokens: `b<N>` (block size), `sym`/`asym`, `acc<N>` (MatMulNBits accuracy_level: 4 = int8 activations,
  0 = fp32), `emb4` (the embedding Gather int4 too), `lm8` (lm_head int8: the builder's rtn_last).
  With `nncf`: the builder writes fp32 and phi3's NNCF compression (phi3cli.backends.onnx.compress) makes the
  int4/int8 mix, as the CPU default does: `r<ratio>`, `se` (scale estimation on phi3's text), and `i8acc<N>`
  (the accuracy level of the int8 MatMulNBits only), e.g. `ort:nncf-b64-asym-r0.6-se-acc4`.

Knobs (after @) are runtime settings, read by the worker; they do not change the artifact.
Everything is cached under a work folder, keyed by the recipe, written beside and renamed when complete.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from phi3cli.util import atomic_output

LLAMA_TYPES = ("Q4_K_M", "Q4_K_S", "Q4_0", "Q4_1", "Q5_K_M", "Q6_K", "Q8_0", "IQ4_NL", "IQ4_XS")


@dataclass
class Config:
    name: str  # as given
    runtime: str  # llama | ov | ort
    recipe: str
    knobs: dict[str, str] = field(default_factory=dict)

    @property
    def artifact(self) -> str:
        if self.recipe == "phi3" or self.runtime == "phi3":
            return f"phi3-{self.backend}"
        return f"{self.runtime}-{self.recipe}"

    @property
    def backend(self) -> str:
        """The runtime family the artifact belongs to: llama, ov or ort."""
        if self.runtime == "phi3":
            return PHI3_BACKENDS[self.recipe]
        return self.runtime


PHI3_BACKENDS = {"openvino": "ov", "onnx": "ort"}  # phi3's backend name -> the bare runtime loop that runs it


def parse_config(spec: str) -> Config:
    head, _, tail = spec.partition("@")
    runtime, _, recipe = head.partition(":")
    if runtime not in ("llama", "ov", "ort", "phi3") or not recipe:
        raise ValueError(f"{spec!r}: expected llama:TYPE, phi3:BACKEND, ov:RECIPE or ort:RECIPE")
    knobs = dict(kv.split("=", 1) for kv in tail.split(",") if kv) if tail else {}
    if runtime == "llama" and recipe not in LLAMA_TYPES:
        raise ValueError(f"{spec!r}: llama.cpp types here are {', '.join(LLAMA_TYPES)}")
    if runtime == "phi3" and recipe not in PHI3_BACKENDS:
        raise ValueError(f"{spec!r}: phi3's converting backends here are {', '.join(PHI3_BACKENDS)}")
    if runtime == "phi3" and set(knobs) - {"threads"}:
        raise ValueError(f"{spec!r}: phi3 configurations take threads=N only (they run with phi3's own settings)")
    if runtime == "ov" and recipe != "phi3":
        ov_settings(recipe)
    if runtime == "ort" and recipe != "phi3":
        ort_settings(recipe)
    return Config(spec, runtime, recipe, knobs)


def ov_settings(recipe: str) -> dict:
    out = {"sym": True, "group_size": 128, "ratio": 1.0, "all_layers": False, "backup": "int8_asym"}
    for token in recipe.split("-") if "g-1" not in recipe else recipe.replace("g-1", "gcw").split("-"):
        if token in ("sym", "asym"):
            out["sym"] = token == "sym"
        elif token == "gcw":
            out["group_size"] = -1
        elif m := re.fullmatch(r"g(\d+)", token):
            out["group_size"] = int(m[1])
        elif m := re.fullmatch(r"r([\d.]+)", token):
            out["ratio"] = float(m[1])
        elif token == "lm4":
            out["all_layers"] = True
        elif token == "b8s":
            out["backup"] = "int8_sym"
        else:
            raise ValueError(f"ov recipe {recipe!r}: unknown token {token!r}")
    return out


def ort_settings(recipe: str) -> dict:
    out = {"block": 32, "sym": True, "acc": 4, "emb4": False, "lm8": False, "nncf": False, "ratio": 1.0, "se": False}
    for token in recipe.split("-"):
        if token in ("nncf", "se"):
            out[token] = True
        elif m := re.fullmatch(r"r([\d.]+)", token):
            out["ratio"] = float(m[1])
        elif m := re.fullmatch(r"i8acc(\d)", token):
            out["i8acc"] = int(m[1])
        elif token in ("sym", "asym"):
            out["sym"] = token == "sym"
        elif m := re.fullmatch(r"b(\d+)", token):
            out["block"] = int(m[1])
        elif m := re.fullmatch(r"acc(\d)", token):
            out["acc"] = int(m[1])
        elif token in ("emb4", "lm8"):
            out[token] = True
        else:
            raise ValueError(f"ort recipe {recipe!r}: unknown token {token!r}")
    return out


def say(text: str) -> None:
    print(f"  build: {text}", flush=True)


# ------------------------------------------------------------------------------------------ llama.cpp


def f16_gguf(hf_dir: Path, work: Path) -> Path:
    """An f16 phi3-architecture .gguf of the folder (written by benchmarks/peer_gguf.py)."""
    final = work / "gguf" / "f16.gguf"
    if final.is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    from benchmarks.peer_gguf import write_phi3_gguf

    say(f"f16 .gguf of {hf_dir.name}")
    return write_phi3_gguf(hf_dir, final)


def llama_gguf(hf_dir: Path, work: Path, ftype: str) -> Path:
    final = work / "gguf" / f"{ftype}.gguf"
    if final.is_file():
        return final
    from benchmarks.peer_gguf import quantize_gguf

    source = f16_gguf(hf_dir, work)
    say(f"llama.cpp quantizes to {ftype}")
    return quantize_gguf(source, final, ftype, threads=2)


# ------------------------------------------------------------------------------------------ OpenVINO


def ov_fp16(hf_dir: Path, work: Path) -> Path:
    """The fp16 IR the ov: recipes compress, exported by phi3's own OpenVINO export."""
    final = work / "ov" / "fp16"
    if (final / "openvino_model.xml").is_file():
        return final
    from phi3cli.backends.openvino.export import export_ir
    from phi3cli.progress import SilentProgress

    class Say(SilentProgress):
        def phase(self, description: str, total=None) -> None:
            say(description)

    final.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(final, force=True) as out:
        export_ir(hf_dir, out, Say())
    return final


def ov_ir(hf_dir: Path, work: Path, recipe: str) -> Path:
    final = work / "ov" / recipe
    if (final / "openvino_model.xml").is_file():
        return final
    import nncf
    import openvino as ov

    src = ov_fp16(hf_dir, work)
    s = ov_settings(recipe)
    say(f"NNCF compresses the IR ({recipe}: {s})")
    model = ov.Core().read_model(str(src / "openvino_model.xml"))
    mode = nncf.CompressWeightsMode.INT4_SYM if s["sym"] else nncf.CompressWeightsMode.INT4_ASYM
    backup = nncf.BackupMode.INT8_SYM if s["backup"] == "int8_sym" else nncf.BackupMode.INT8_ASYM
    model = nncf.compress_weights(
        model,
        mode=mode,
        group_size=s["group_size"],
        ratio=s["ratio"],
        all_layers=s["all_layers"],
        backup_mode=backup,
    )
    with atomic_output(final, force=True) as out:
        ov.save_model(model, str(out / "openvino_model.xml"), compress_to_fp16=False)
        for item in src.iterdir():
            if not item.name.startswith("openvino_model."):
                shutil.copy2(item, out / item.name)
    return final


# ------------------------------------------------------------------------------------------ ONNX Runtime


def ort_model(hf_dir: Path, work: Path, recipe: str) -> Path:
    """The builder's model for the recipe; accuracy levels share one build (only a node attribute differs)."""
    s = ort_settings(recipe)
    final = work / "ort" / recipe
    if (final / "genai_config.json").is_file():
        return final
    base_recipe = "-".join(
        [f"b{s['block']}", "sym" if s["sym"] else "asym", "acc4"] + [t for t in ("emb4", "lm8") if s[t]]
    )
    if s["nncf"]:
        base_recipe = "-".join(
            ["nncf", f"b{s['block']}", "sym" if s["sym"] else "asym", f"r{s['ratio']}"]
            + (["se"] if s["se"] else [])
            + ["acc4"]
        )
    base = work / "ort" / base_recipe
    if s["nncf"] and not (base / "genai_config.json").is_file():
        ort_nncf(hf_dir, work, base, s)
    if not (base / "genai_config.json").is_file():
        from onnxruntime_genai.models.builder import create_model

        say(f"ONNX Runtime GenAI's builder ({base_recipe})")
        options = {
            "hf_token": "false",
            "hf_remote": False,
            "int4_block_size": s["block"],
            "int4_is_symmetric": s["sym"],
            "int4_accuracy_level": 4,
        }
        if s["emb4"]:
            options["int4_op_types_to_quantize"] = ("MatMul", "Gather")
        if s["lm8"]:
            options["int4_algo_config"] = "rtn_last"
        base.parent.mkdir(parents=True, exist_ok=True)
        cache = work / "ort" / ".builder-cache"
        with atomic_output(base, force=True) as out:
            create_model(None, str(hf_dir), str(out), "int4", "cpu", str(cache), **options)
        shutil.rmtree(cache, ignore_errors=True)
    if s["acc"] == 4 and "i8acc" not in s:
        return base
    import onnx

    say(f"accuracy_level {s['acc']} (int8: {s.get('i8acc', s['acc'])}) on the MatMulNBits of {base_recipe}")
    with atomic_output(final, force=True) as out:
        for item in base.iterdir():
            if item.name != "model.onnx":
                os.link(item, out / item.name)  # the weights file is shared, not copied
        proto = onnx.load(str(base / "model.onnx"), load_external_data=False)
        for node in proto.graph.node:
            if node.op_type == "MatMulNBits":
                bits = next(a.i for a in node.attribute if a.name == "bits")
                for attr in node.attribute:
                    if attr.name == "accuracy_level":
                        attr.i = s.get("i8acc", s["acc"]) if bits == 8 else s["acc"]
        onnx.save(proto, str(out / "model.onnx"))
    return final


def ort_nncf(hf_dir: Path, work: Path, base: Path, s: dict) -> None:
    """The builder's fp32 graph compressed by phi3's NNCF path (the CPU int4 default's code, other settings)."""
    from onnxruntime_genai.models.builder import create_model

    from phi3cli.backends.onnx.compress import compress_model
    from phi3cli.progress import SilentProgress

    fp32 = work / "ort" / "fp32"
    if not (fp32 / "genai_config.json").is_file():
        say("ONNX Runtime GenAI's builder (fp32)")
        cache = work / "ort" / ".builder-cache"
        with atomic_output(fp32, force=True) as out:
            create_model(None, str(hf_dir), str(out), "fp32", "cpu", str(cache), hf_token="false", hf_remote=False)
        shutil.rmtree(cache, ignore_errors=True)
    say(f"NNCF compresses the fp32 graph ({base.name})")
    settings = {"group_size": s["block"], "ratio": s["ratio"], "sym": s["sym"], "scale_estimation": s["se"]}
    with atomic_output(base, force=True) as out:
        compress_model(fp32, "model.onnx", settings, out, SilentProgress())
        for item in fp32.iterdir():
            if not item.name.startswith("model.onnx"):
                shutil.copy2(item, out / item.name)


# ------------------------------------------------------------------------------------------ all


def phi3_variant(model: str, backend: str) -> Path:
    """phi3's default int4 variant of the model for the CPU, from its store (built there on first use)."""
    from phi3cli.loading import prepare
    from phi3cli.progress import SilentProgress
    from phi3cli.routing import given

    class Say(SilentProgress):
        def phase(self, description: str, total=None) -> None:
            say(description)

    return prepare(model, route=given(backend, "cpu"), format="int4", progress=Say()).folder


def ensure(config: Config, hf_dir: Path, work: Path, model: str) -> Path:
    if config.runtime == "phi3" or config.recipe == "phi3":
        name = config.recipe if config.runtime == "phi3" else {v: k for k, v in PHI3_BACKENDS.items()}[config.runtime]
        return phi3_variant(model, name)
    if config.runtime == "llama":
        return llama_gguf(hf_dir, work, config.recipe)
    if config.runtime == "ov":
        return ov_ir(hf_dir, work, config.recipe)
    return ort_model(hf_dir, work, config.recipe)
