#!/usr/bin/env python
"""Teacher-forced quality of quantized models against the fp32 reference: perplexity, KL divergence, same top token.

What llama.cpp's perplexity tool reports with --kl-divergence, computed the same way for every runtime on the
same token ids (the reference's Hugging Face tokenizer on phi3's shipped text, no special tokens added):

- perplexity: exp of the mean negative log-likelihood of ids[1:] given the tokens before;
- mean KL divergence KL(reference || candidate) of the next-token distribution, over the same positions,
  with its 99th percentile and maximum;
- top-1: the share of positions whose most likely next token is the reference's.

The fp32 reference runs in transformers once; its log-probabilities are cached as .npy (keyed by the token ids
and the reference's files) in the model store's cache, where `phi3 bench` keeps its reference, or in --cache. A candidate is a path, optionally
labelled LABEL=PATH:

- a Hugging Face folder (config.json + safetensors): transformers, fp32;
- an OpenVINO folder (openvino_model.xml): the compiled IR on the CPU, INFERENCE_PRECISION_HINT f32 unless
  --ov-prop sets otherwise, all logits of one forward pass with a fresh state;
- an ONNX Runtime GenAI folder (genai_config.json): og.Generator.append_tokens, then the "logits" output;
- a .gguf file: llama.cpp through llama-cpp-python (Llama(logits_all=True).eval, then .scores).

--chunk N feeds the ids N at a time through the runtime's KV cache (OpenVINO's stateful model, ONNX Runtime
GenAI's generator, llama.cpp's batches) instead of in one pass: what it takes to see the KV-cache precision.

    python scripts/quant_quality.py --reference HF_DIR [--json results.jsonl] [--ov-prop KEY=VALUE ...]
        [--chunk N] [--threads 2] CANDIDATE [CANDIDATE ...]

prints one markdown row per candidate: label, PPL, change vs the reference's PPL, mean KLD, top-1 %, size MB.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from phi3cli.bench.quality import (  # noqa: E402
    kl_per_position,
    load_reference,
    next_token_divergence,
    reference_path,
    save_reference,
)
from phi3cli.util import log_softmax  # noqa: E402

# --- what a candidate is -------------------------------------------------------------------------------


def runtime_of(path: Path) -> str:
    if path.is_file() and path.suffix == ".gguf":
        return "llama.cpp"
    if (path / "openvino_model.xml").is_file():
        return "openvino"
    if (path / "genai_config.json").is_file():
        return "onnx"
    if (path / "config.json").is_file():
        return "transformers"
    raise SystemExit(f"{path}: not a .gguf, OpenVINO, ONNX Runtime GenAI or Hugging Face model folder.")


def sizes_mb(path: Path, runtime: str) -> tuple[float, float]:
    """(the model's weight and graph files, the whole folder) in MB (10^6 bytes)."""
    if path.is_file():
        return path.stat().st_size / 1e6, path.stat().st_size / 1e6
    files = [f for f in path.rglob("*") if f.is_file()]
    if runtime == "openvino":
        model = [f for f in files if f.name in ("openvino_model.xml", "openvino_model.bin")]
    elif runtime == "onnx":
        genai = json.loads((path / "genai_config.json").read_text())
        name = genai["model"]["decoder"]["filename"]
        model = [f for f in files if f.name in (name, f"{name}.data")]
    else:
        model = [f for f in files if f.suffix == ".safetensors"]
    return sum(f.stat().st_size for f in model) / 1e6, sum(f.stat().st_size for f in files) / 1e6


# --- logits from each runtime --------------------------------------------------------------------------


def transformers_logits(path: Path, ids: list[int], threads: int) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, local_files_only=True)
    model.eval()
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def openvino_logits(path: Path, ids: list[int], props: dict, chunk: int | None) -> np.ndarray:
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(path / "openvino_model.xml")), "CPU", props)
    names = {p.get_any_name() for p in compiled.inputs}
    request = compiled.create_infer_request()
    request.reset_state()
    out, step = [], chunk or len(ids)
    for start in range(0, len(ids), step):
        part = ids[start : start + step]
        end = start + len(part)
        inputs = {
            "input_ids": np.array([part], dtype=np.int64),
            "attention_mask": np.ones((1, end), dtype=np.int64),
            "position_ids": np.arange(start, end, dtype=np.int64)[None, :],
            "beam_idx": np.zeros(1, dtype=np.int32),
        }
        result = request.infer({k: v for k, v in inputs.items() if k in names})
        out.append(np.array(result["logits"][0], dtype=np.float32))
    return np.concatenate(out)


def onnx_logits(path: Path, ids: list[int], chunk: int | None) -> np.ndarray:
    import onnxruntime_genai as og

    model = og.Model(str(path))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 1, do_sample=False, batch_size=1)
    generator = og.Generator(model, params)
    out, step = [], chunk or len(ids)
    for start in range(0, len(ids), step):
        part = ids[start : start + step]
        generator.append_tokens(part)
        logits = np.asarray(generator.get_output("logits"), dtype=np.float32)
        logits = logits.reshape(-1, logits.shape[-1])
        if logits.shape[0] != len(part):
            raise SystemExit(f"{path}: the model returned {logits.shape[0]} rows of logits for {len(part)} tokens.")
        out.append(logits)
    del generator
    return np.concatenate(out)


def llama_logits(path: Path, ids: list[int], threads: int, chunk: int | None) -> np.ndarray:
    from llama_cpp import Llama

    batch = chunk or len(ids)
    llm = Llama(
        model_path=str(path),
        n_ctx=len(ids) + 16,
        n_batch=batch,
        n_ubatch=batch,
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=True,
        verbose=False,
    )
    llm.eval(ids)
    scores = np.array(llm.scores[: len(ids)], dtype=np.float32)
    llm.close()
    return scores


def candidate_logits(path: Path, runtime: str, ids: list[int], args: argparse.Namespace) -> np.ndarray:
    if runtime == "transformers":
        return transformers_logits(path, ids, args.threads)
    if runtime == "openvino":
        props = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": args.threads, **args.ov_props}
        return openvino_logits(path, ids, props, args.chunk)
    if runtime == "onnx":
        return onnx_logits(path, ids, args.chunk)
    return llama_logits(path, ids, args.threads, args.chunk)


# --- reference and metrics -----------------------------------------------------------------------------


def token_ids(reference: Path, text_path: Path | None) -> list[int]:
    from transformers import AutoTokenizer

    from phi3cli.bench.quality import perplexity_text

    text = text_path.read_text(encoding="utf-8") if text_path else perplexity_text()
    tokenizer = AutoTokenizer.from_pretrained(str(reference), local_files_only=True)
    return tokenizer.encode(text, add_special_tokens=False)


def reference_logprobs(reference: Path, ids: list[int], cache: Path, threads: int) -> np.ndarray:
    """The fp32 reference's log-probabilities at every position, cached as `phi3 bench` caches its reference."""
    path = reference_path(cache, reference, ids)
    logprobs = load_reference(path)
    if logprobs is None or logprobs.shape[0] != len(ids) - 1:
        logprobs = log_softmax(transformers_logits(reference, ids, threads)[:-1])
        save_reference(path, logprobs)
    return logprobs


def compare(ref_logp: np.ndarray, logits: np.ndarray, ids: list[int]) -> dict:
    """PPL of ids[1:], KL(ref || candidate) per position, same-top-token share; positions 0..n-2 predict 1..n-1.

    The divergence and top-1 figures are phi3cli.bench.quality's, the ones `phi3 bench` reports.
    """
    n = len(ids)
    if logits.shape[0] < n or logits.shape[1] < ref_logp.shape[1]:
        raise SystemExit(f"logits of shape {logits.shape} for {n} tokens and a vocabulary of {ref_logp.shape[1]}")
    cand = log_softmax(logits[: n - 1, : ref_logp.shape[1]])
    ref = ref_logp[: n - 1]
    rows, target = np.arange(n - 1), np.asarray(ids[1:])
    kld = kl_per_position(ref, cand)
    kld_mean, top1 = next_token_divergence(ref, cand)
    return {
        "ppl": float(np.exp(-cand[rows, target].astype(np.float64).mean())),
        "ppl_ref": float(np.exp(-ref[rows, target].astype(np.float64).mean())),
        "kld_mean": kld_mean,
        "kld_p99": float(np.percentile(kld, 99)),
        "kld_max": float(kld.max()),
        "top1": top1,
        "positions": int(n - 1),
    }


def markdown_row(r: dict) -> str:
    delta = 100 * (r["ppl"] / r["ppl_ref"] - 1)
    return (
        f"| {r['label']} | {r['runtime']} | {r['ppl']:.3f} | {delta:+.2f} % | {r['kld_mean']:.5f} | "
        f"{r['kld_p99']:.4f} | {100 * r['top1']:.2f} % | {r['model_mb']:.1f} | {r['folder_mb']:.1f} |"
    )


HEADER = (
    "| model | runtime | PPL | vs fp32 | mean KLD | KLD p99 | top-1 | model MB | folder MB |\n"
    "| --- | --- | --: | --: | --: | --: | --: | --: | --: |"
)


def parse_props(items: list[str]) -> dict:
    props = {}
    for item in items:
        key, _, value = item.partition("=")
        props[key] = int(value) if value.lstrip("-").isdigit() else value
    return props


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("candidates", nargs="+", help="PATH or LABEL=PATH")
    parser.add_argument("--reference", type=Path, required=True, help="the fp32 Hugging Face folder")
    parser.add_argument("--text", type=Path, help="text to score (default: phi3's shipped perplexity text)")
    parser.add_argument("--cache", type=Path, help="where reference log-probabilities are cached")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--chunk", type=int, help="feed N tokens at a time through the KV cache")
    parser.add_argument("--ov-prop", dest="ov_props", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", type=Path, help="append one JSON line per candidate")
    args = parser.parse_args()
    args.ov_props = parse_props(args.ov_props)
    if args.cache is None:
        from phi3cli.store import ModelStore

        args.cache = ModelStore().cache_dir("reference")

    ids = token_ids(args.reference, args.text)
    ref = reference_logprobs(args.reference, ids, args.cache, args.threads)
    print(HEADER, flush=True)
    for spec in args.candidates:
        label, _, given = spec.rpartition("=") if "=" in spec else ("", "", spec)
        path = Path(given)
        runtime = runtime_of(path)
        start = time.perf_counter()
        logits = candidate_logits(path, runtime, ids, args)
        model_mb, folder_mb = sizes_mb(path, runtime)
        row = {
            "label": label or path.name,
            "path": str(path),
            "runtime": runtime,
            **compare(ref, logits, ids),
            "model_mb": model_mb,
            "folder_mb": folder_mb,
            "scoring_s": time.perf_counter() - start,
            "chunk": args.chunk,
            "ov_props": args.ov_props if runtime == "openvino" else None,
        }
        print(markdown_row(row), flush=True)
        if args.json:
            with args.json.open("a") as fh:
                fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
