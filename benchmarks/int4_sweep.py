#!/usr/bin/env python
"""Build the int4 variants of the recipe study: OpenVINO (optimum-intel + NNCF) and ONNX Runtime GenAI's builder.

Each build writes its folder atomically with a recipe.json beside the model (the exact settings, the library
versions and how long the conversion took); benchmarks/quant_quality.py then measures it. Subcommands
(`python -m benchmarks.int4_sweep ...` from the repository root):

    int4_sweep.py ov-export HF_DIR OUT              # fp16 IR + OpenVINO tokenizers, as phi3 exports
    int4_sweep.py ov FP16_IR OUT [--sym] [--group-size 64] [--ratio 1.0] [--backup int8_asym] [--all-layers]
                  [--awq] [--scale-estimation] [--gptq] [--lora-correction] [--dataset calibration|auto]
                  [--sensitivity hessian_input_activation] [--dtype int4|nf4] [--ignore NODE ...]
                  [--ignore-pattern REGEX ...] [--fallback adjust]
    int4_sweep.py onnx HF_DIR OUT [--block 32] [--asym] [--accuracy-level 4] [--algo default|rtn|k_quant...]
                  [--gather] [--exclude /lm_head/MatMul] [--shared-embeddings true|false]
    int4_sweep.py noisy HF_DIR OUT [--sigma 0.4]    # the same model, weights moved off any 4-bit grid
    int4_sweep.py offgrid HF_DIR OUT [--spread 0.3] # the same function, weights off any grid (channel scales)
    int4_sweep.py report RESULTS.jsonl [--replace OLD NEW]   # the markdown table of the measurements

--dataset calibration is phi3cli/backends/openvino/data/calibration.txt (phi3's default int4 uses it), plain English written for phi3 (one sample a paragraph),
not the text the quality is measured on.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

from phi3cli.backends.nncf_weights import CALIBRATION_TEXT as CALIBRATION
from phi3cli.backends.nncf_weights import calibration_samples
from phi3cli.util import atomic_output

SUPPORT = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


def write_recipe(out: Path, recipe: dict, seconds: float, packages: tuple[str, ...]) -> None:
    recipe = {
        **recipe,
        "convert_s": round(seconds, 1),
        "command": " ".join(["python -m benchmarks.int4_sweep", *sys.argv[1:]]),
        "versions": {p: version(p) for p in packages},
    }
    (out / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
    print(json.dumps(recipe))


def ov_export(args: argparse.Namespace) -> None:
    """phi3's own fp16 export (LongRoPE kept in the graph, the OpenVINO tokenizers beside it), not a copy of it."""
    from phi3cli.backends.openvino.export import export_ir
    from phi3cli.progress import SilentProgress

    start = time.perf_counter()
    with atomic_output(args.out, force=True) as tmp:
        export_ir(args.hf_dir, tmp, SilentProgress())
        write_recipe(tmp, {"backend": "openvino", "format": "fp16"}, time.perf_counter() - start, ("optimum-intel",))


def ov_settings(args: argparse.Namespace) -> dict:
    settings: dict = {"bits": 4, "sym": args.sym, "group_size": args.group_size, "ratio": args.ratio}
    if args.dtype != "int4":
        settings["dtype"] = args.dtype
    if args.backup:
        settings["backup_precision"] = args.backup
    if args.all_layers:
        settings["all_layers"] = True
    if args.awq:
        settings["quant_method"] = "awq"
    for flag in ("scale_estimation", "gptq", "lora_correction"):
        if getattr(args, flag):
            settings[flag] = True
    if args.sensitivity:
        settings["sensitivity_metric"] = args.sensitivity
    if args.dataset:
        settings["dataset"] = "auto" if args.dataset == "auto" else calibration_samples(Path(args.dataset))
        if args.num_samples:
            settings["num_samples"] = args.num_samples
    if args.ignore or args.ignore_pattern:
        settings["ignored_scope"] = {"names": args.ignore or [], "patterns": args.ignore_pattern or []}
    if args.fallback:
        settings["group_size_fallback"] = args.fallback
    return settings


def ov_compress(args: argparse.Namespace) -> None:
    from optimum.intel import OVConfig, OVModelForCausalLM, OVQuantizer, OVWeightQuantizationConfig

    settings = ov_settings(args)
    shown = {k: v for k, v in settings.items() if k != "dataset"}
    if "dataset" in settings:
        shown["dataset"] = args.dataset if args.dataset == "auto" else f"{Path(args.dataset).name} (paragraphs)"
    start = time.perf_counter()
    with atomic_output(args.out, force=True) as tmp:
        model = OVModelForCausalLM.from_pretrained(args.src, compile=False, local_files_only=True)
        config = OVWeightQuantizationConfig(tokenizer=str(args.src), **settings)
        OVQuantizer(model).quantize(ov_config=OVConfig(quantization_config=config), save_directory=tmp)
        for name in (
            "openvino_tokenizer.xml",
            "openvino_tokenizer.bin",
            "openvino_detokenizer.xml",
            "openvino_detokenizer.bin",
            *SUPPORT,
        ):
            if (args.src / name).is_file() and not (tmp / name).exists():
                shutil.copy2(args.src / name, tmp / name)
        write_recipe(
            tmp,
            {"backend": "openvino", "settings": shown, "precisions": ov_precisions(tmp / "openvino_model.xml")},
            time.perf_counter() - start,
            ("optimum-intel", "nncf", "openvino"),
        )


def ov_precisions(xml: Path) -> dict:
    """Weight elements per storage type in an IR, and which types the embedding/lm_head constants have."""
    import openvino as ov

    model = ov.Core().read_model(str(xml))
    counts: dict[str, int] = {}
    for op in model.get_ops():
        if op.get_type_name() != "Constant":
            continue
        shape = list(op.get_output_shape(0))
        size = 1
        for d in shape:
            size *= d
        if size < 4096:
            continue
        kind = op.get_output_element_type(0).get_type_name()
        counts[kind] = counts.get(kind, 0) + size
    total = sum(counts.values())
    return {k: round(v / total, 4) for k, v in sorted(counts.items())}


def onnx_build(args: argparse.Namespace) -> None:
    from onnxruntime_genai.models.builder import create_model

    options: dict = {"hf_token": "false", "hf_remote": False, "int4_block_size": args.block}
    options["int4_is_symmetric"] = not args.asym
    if args.accuracy_level is not None:
        options["int4_accuracy_level"] = args.accuracy_level
    if args.algo != "default":
        options["int4_algo_config"] = args.algo
    if args.gather:
        options["int4_op_types_to_quantize"] = ("MatMul", "Gather")
    if args.exclude:
        options["int4_nodes_to_exclude"] = args.exclude
    if args.shared_embeddings is not None:
        options["shared_embeddings"] = args.shared_embeddings == "true"
    start = time.perf_counter()
    with atomic_output(args.out, force=True) as tmp, tempfile.TemporaryDirectory(prefix="ort-cache-") as cache:
        create_model(None, str(args.hf_dir), str(tmp), "int4", "cpu", cache, **options)
        for name in SUPPORT:
            if (args.hf_dir / name).is_file() and not (tmp / name).exists():
                shutil.copy2(args.hf_dir / name, tmp / name)
        shown = {k: list(v) if isinstance(v, tuple) else v for k, v in options.items() if not k.startswith("hf_")}
        write_recipe(
            tmp,
            {"backend": "onnx", "settings": shown, "precisions": onnx_precisions(tmp)},
            time.perf_counter() - start,
            ("onnxruntime-genai", "onnxruntime"),
        )


def onnx_precisions(folder: Path) -> dict:
    """Bytes of initializers per kind (MatMulNBits int4/int8 blobs, float tensors), and the ops that hold them."""
    import onnx

    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    sizes: dict[str, int] = {}
    for init in model.graph.initializer:
        length = next((int(e.value) for e in init.external_data if e.key == "length"), len(init.raw_data))
        kind = onnx.TensorProto.DataType.Name(init.data_type)
        sizes[kind] = sizes.get(kind, 0) + length
    ops: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in ("MatMulNBits", "GatherBlockQuantized", "Gather", "MatMul"):
            bits = next((a.i for a in node.attribute if a.name == "bits"), None)
            key = f"{node.op_type}{'/' + str(bits) if bits else ''}"
            ops[key] = ops.get(key, 0) + 1
    return {"bytes_mb": {k: round(v / 1e6, 1) for k, v in sizes.items()}, "ops": ops}


def noisy(args: argparse.Namespace) -> None:
    """Add Gaussian noise to every 2-D weight, sigma = args.sigma x its own 4-bit (or 8-bit) step per 32 inputs.

    The demo's linear weights lie on a Q4_1 grid (asymmetric, 32 per group) and its embedding on a Q8_0 grid;
    noise of 0.4 grid steps smears the lattice (its Fourier component falls to exp(-2 pi^2 0.16) = 4 %), so no
    quantizer can recover the grid, while the model still answers.
    """
    import numpy as np
    from safetensors.numpy import load_file, save_file

    rng = np.random.default_rng(args.seed)
    with atomic_output(args.out, force=True) as tmp:
        for item in args.hf_dir.iterdir():
            if item.is_file() and item.suffix != ".safetensors":
                shutil.copy2(item, tmp / item.name)
        for shard in sorted(args.hf_dir.glob("*.safetensors")):
            tensors = load_file(str(shard))
            for name, w in tensors.items():
                if w.ndim != 2 or w.shape[1] % 32:
                    continue
                groups = w.astype(np.float32).reshape(w.shape[0], -1, 32)
                if "embed_tokens" in name:  # Q8_0: symmetric, 8 bits
                    step = np.abs(groups).max(axis=-1, keepdims=True) / 127
                else:  # Q4_1: asymmetric, 4 bits
                    step = (groups.max(axis=-1, keepdims=True) - groups.min(axis=-1, keepdims=True)) / 15
                groups = groups + rng.standard_normal(groups.shape, dtype=np.float32) * (args.sigma * step)
                tensors[name] = groups.reshape(w.shape).astype(w.dtype)
            save_file(tensors, str(tmp / shard.name), metadata={"format": "pt"})
        readme = tmp / "README.md"
        note = (
            f"\n\nPerturbed copy: Gaussian noise of {args.sigma} grid steps on every 2-D weight (seed {args.seed}).\n"
        )
        readme.write_text((readme.read_text() if readme.is_file() else "") + note)


def offgrid(args: argparse.Namespace) -> None:
    """The same function with weights off every 4-bit grid: random per-channel scales folded into the weights.

    Each linear layer's input columns are multiplied by scales s (log-normal, sigma args.spread) and the tensor
    that feeds them is divided by s: the RMSNorm weight before qkv_proj and gate_up_proj, the v rows of qkv_proj
    before o_proj (per KV head, repeated for the query heads that share it), the up rows of gate_up_proj before
    down_proj. The fp32 model computes the same logits (up to fp16 rounding of the stored weights), but a group of
    32 inputs no longer shares one grid. The tied embedding / lm_head is left as it is.
    """
    import numpy as np
    from safetensors.numpy import load_file, save_file

    config = json.loads((args.hf_dir / "config.json").read_text())
    heads, kv_heads = int(config["num_attention_heads"]), int(config["num_key_value_heads"])
    hidden, inter = int(config["hidden_size"]), int(config["intermediate_size"])
    head_dim = hidden // heads
    rng = np.random.default_rng(args.seed)

    def scales(n: int) -> np.ndarray:
        return np.clip(np.exp(rng.standard_normal(n) * args.spread), 0.25, 4.0).astype(np.float32)

    with atomic_output(args.out, force=True) as tmp:
        for item in args.hf_dir.iterdir():
            if item.is_file() and item.suffix != ".safetensors":
                shutil.copy2(item, tmp / item.name)
        (shard,) = sorted(args.hf_dir.glob("*.safetensors"))
        t = {k: v.astype(np.float32) for k, v in load_file(str(shard)).items()}
        dtype = load_file(str(shard))["model.norm.weight"].dtype
        for i in range(int(config["num_hidden_layers"])):
            p = f"model.layers.{i}."
            s = scales(hidden)
            t[p + "input_layernorm.weight"] /= s
            t[p + "self_attn.qkv_proj.weight"] *= s[None, :]
            s = scales(hidden)
            t[p + "post_attention_layernorm.weight"] /= s
            t[p + "mlp.gate_up_proj.weight"] *= s[None, :]
            s = scales(kv_heads * head_dim)
            v0 = hidden + kv_heads * head_dim  # qkv rows: q (heads), k (kv heads), v (kv heads)
            t[p + "self_attn.qkv_proj.weight"][v0:] /= s[:, None]
            per_query_head = np.concatenate(
                [s[(h // (heads // kv_heads)) * head_dim :][:head_dim] for h in range(heads)]
            )
            t[p + "self_attn.o_proj.weight"] *= per_query_head[None, :]
            s = scales(inter)
            t[p + "mlp.gate_up_proj.weight"][inter:] /= s[:, None]
            t[p + "mlp.down_proj.weight"] *= s[None, :]
        save_file({k: v.astype(dtype) for k, v in t.items()}, str(tmp / shard.name), metadata={"format": "pt"})
        readme = tmp / "README.md"
        note = f"\n\nOff-grid copy: per-channel scales (log-normal sigma {args.spread}, seed {args.seed}) folded in.\n"
        readme.write_text((readme.read_text() if readme.is_file() else "") + note)


def report(args: argparse.Namespace) -> None:
    """A markdown table of quant_quality.py's JSON lines, with each build's recipe and conversion time."""
    rows = [json.loads(line) for line in args.results.read_text().splitlines() if line.strip()]
    latest = {r["label"]: r for r in rows}  # a label measured again: the last measurement counts
    order = {"transformers": 0, "llama.cpp": 1, "openvino": 2, "onnx": 3}
    ranked = sorted(latest.values(), key=lambda r: (r["label"].split(":")[0], order.get(r["runtime"], 9)))
    lines = [
        "| model | backend | recipe | PPL | vs fp32 | mean KLD | KLD p99 | top-1 | model MB | folder MB | convert s |",
        "| --- | --- | --- | --: | --: | --: | --: | --: | --: | --: | --: |",
    ]
    commands = []
    for r in ranked:
        path = Path(r["path"])
        sidecar = path / "recipe.json" if path.is_dir() else path.with_name(path.name + ".json")
        recipe = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
        model, _, name = r["label"].partition(":")
        extra = []
        if r.get("chunk"):
            extra.append(f"chunk {r['chunk']}")
        if r.get("ov_props"):
            extra += [f"{k}={v}" for k, v in r["ov_props"].items() if k not in ("INFERENCE_PRECISION_HINT",)]
            if r["ov_props"].get("INFERENCE_PRECISION_HINT", "f32") != "f32":
                extra.append(f"precision {r['ov_props']['INFERENCE_PRECISION_HINT']}")
        extra = [e for e in extra if not e.startswith("INFERENCE_NUM_THREADS")]
        recipe_text = name.partition(":")[2] or name
        if extra:
            recipe_text += f" ({', '.join(extra)})"
        delta = 100 * (r["ppl"] / r["ppl_ref"] - 1)
        convert = recipe.get("convert_s")
        lines.append(
            f"| {model} | {r['runtime']} | {recipe_text} | {r['ppl']:.3f} | {delta:+.2f} % | {r['kld_mean']:.4f} | "
            f"{r['kld_p99']:.3f} | {100 * r['top1']:.1f} % | {r['model_mb']:.1f} | {r['folder_mb']:.1f} | "
            f"{convert if convert is not None else ''} |"
        )
        if recipe.get("command"):
            commands.append(f"- `{r['label']}`: `{recipe['command']}`")
    text = "\n".join(lines) + "\n\nBuilt by:\n\n" + "\n".join(commands) + "\n"
    for old, new in args.replace:
        text = text.replace(old, new)
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("ov-export")
    p.add_argument("hf_dir", type=Path)
    p.add_argument("out", type=Path)
    p.set_defaults(run=ov_export)

    p = sub.add_parser("ov")
    p.add_argument("src", type=Path, help="an fp16 IR folder from ov-export")
    p.add_argument("out", type=Path)
    p.add_argument("--sym", action="store_true")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--ratio", type=float, default=1.0)
    p.add_argument("--backup", choices=("int8_asym", "int8_sym", "none"))
    p.add_argument("--all-layers", action="store_true")
    p.add_argument("--awq", action="store_true")
    p.add_argument("--scale-estimation", action="store_true")
    p.add_argument("--gptq", action="store_true")
    p.add_argument("--lora-correction", action="store_true")
    p.add_argument(
        "--dataset", help=f"'auto' or a text file (default file: phi3's calibration text, {CALIBRATION.name})"
    )
    p.add_argument("--num-samples", type=int)
    p.add_argument("--sensitivity")
    p.add_argument("--dtype", default="int4")
    p.add_argument("--ignore", nargs="*", help="node names NNCF leaves uncompressed")
    p.add_argument("--ignore-pattern", nargs="*", help="regular expressions of node names NNCF leaves uncompressed")
    p.add_argument("--fallback", choices=("error", "ignore", "adjust"), help="when the group size does not divide")
    p.set_defaults(run=ov_compress)

    p = sub.add_parser("onnx")
    p.add_argument("hf_dir", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--block", type=int, default=32)
    p.add_argument("--asym", action="store_true")
    p.add_argument("--accuracy-level", type=int)
    p.add_argument("--algo", default="default")
    p.add_argument("--gather", action="store_true", help="quantize the embedding Gather too")
    p.add_argument("--exclude", nargs="*")
    p.add_argument("--shared-embeddings", choices=("true", "false"))
    p.set_defaults(run=onnx_build)

    p = sub.add_parser("noisy")
    p.add_argument("hf_dir", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--sigma", type=float, default=0.4)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=noisy)

    p = sub.add_parser("offgrid")
    p.add_argument("hf_dir", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--spread", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=offgrid)

    p = sub.add_parser("report")
    p.add_argument("results", type=Path, help="quant_quality.py --json output")
    p.add_argument("--replace", nargs=2, action="append", default=[], metavar=("OLD", "NEW"), help="shorten paths")
    p.set_defaults(run=report)

    args = parser.parse_args()
    if getattr(args, "dataset", None) == "calibration":
        args.dataset = str(CALIBRATION)
    args.run(args)


if __name__ == "__main__":
    sys.exit(main())
