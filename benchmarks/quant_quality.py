#!/usr/bin/env python
"""Teacher-forced quality of quantized models against the fp32 reference: perplexity, KL divergence, same top token.

What llama.cpp's perplexity tool reports with --kl-divergence, computed the same way for every runtime on the
same token ids (the reference's Hugging Face tokenizer on phi3's shipped text, no special tokens added):

- perplexity: exp of the mean negative log-likelihood of ids[1:] given the tokens before;
- mean KL divergence KL(reference || candidate) of the next-token distribution, over the same positions,
  with its 99th percentile and maximum;
- top-1: the share of positions whose most likely next token is the reference's.

The reference is phi3's reference backend at full precision (transformers fp32), run once; its log-probabilities
are cached as .npy (keyed by the token ids and the reference's files) in the model store's cache, where `phi3 bench`
keeps its reference, or in --cache. A candidate is a path, optionally labelled LABEL=PATH:

- a folder phi3 runs (a Hugging Face folder, an OpenVINO IR, an ONNX Runtime GenAI folder): loaded by phi3 on the
  CPU (`phi3cli.loading.load`) and scored by its `next_token_logprobs`, the figures `phi3 bench` reports;
  `--option KEY=VALUE` passes a backend option (e.g. inference_precision=bf16) to the backends that take it;
- a .gguf file: llama.cpp through llama-cpp-python (Llama(logits_all=True).eval, then .scores), which is no phi3
  backend and no phi3 dependency.

    python -m benchmarks.quant_quality --reference HF_DIR [--json results.jsonl] [--option KEY=VALUE ...]
        [--threads 2] CANDIDATE [CANDIDATE ...]

prints one markdown row per candidate: label, PPL, change vs the reference's PPL, mean KLD, top-1 %, size MB.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from phi3cli.backends import get_spec, reference_spec, runtime_of_folder
from phi3cli.backends.options import options_for, parse_pairs
from phi3cli.bench.quality import (
    kl_per_position,
    load_reference,
    next_token_divergence,
    reference_path,
    save_reference,
)
from phi3cli.util import log_softmax

# --- what a candidate is -------------------------------------------------------------------------------


def runtime_of(path: Path) -> str:
    """llama.cpp for a .gguf, else the phi3 backend that runs the folder (its own format, or the reference's)."""
    if path.is_file() and path.suffix == ".gguf":
        return "llama.cpp"
    if runtime := runtime_of_folder(path):
        return runtime
    if (path / "config.json").is_file():
        return reference_spec().name
    raise SystemExit(f"{path}: not a .gguf, a folder in a phi3 backend's format or a Hugging Face model folder.")


def sizes_mb(path: Path, runtime: str) -> tuple[float, float]:
    """(the model's weight and graph files, the whole folder) in MB (10^6 bytes)."""
    if path.is_file():
        return path.stat().st_size / 1e6, path.stat().st_size / 1e6
    files = [f for f in path.rglob("*") if f.is_file()]
    weights = (".safetensors", ".bin", ".onnx", ".data", ".xml")
    model = [
        f for f in files if f.suffix in weights and not f.name.startswith(("openvino_tokenizer", "openvino_detok"))
    ]
    return sum(f.stat().st_size for f in model) / 1e6, sum(f.stat().st_size for f in files) / 1e6


# --- log-probabilities from each runtime -----------------------------------------------------------------


def phi3_logprobs(path: Path, ids: list[int], threads: int, options: dict, backend: str | None = None) -> np.ndarray:
    """What `phi3 bench` scores: the model loaded by phi3 on the CPU, teacher-forced on ids."""
    from phi3cli.loading import load

    name = backend or runtime_of_folder(path) or reference_spec().name
    model = load(str(path), backend=name, device="cpu", threads=threads, options=options_for(get_spec(name), options))
    try:
        return np.asarray(model.next_token_logprobs(ids), dtype=np.float32)
    finally:
        model.close()


def llama_logits(path: Path, ids: list[int], threads: int) -> np.ndarray:
    from llama_cpp import Llama

    batch = len(ids)
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


def candidate_logprobs(path: Path, runtime: str, ids: list[int], args: argparse.Namespace) -> np.ndarray:
    if runtime == "llama.cpp":
        return log_softmax(llama_logits(path, ids, args.threads)[:-1])
    return phi3_logprobs(path, ids, args.threads, args.options, backend=runtime)


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
        logprobs = phi3_logprobs(reference, ids, threads, {}, backend=reference_spec().name)
        save_reference(path, logprobs)
    return logprobs


def compare(ref_logp: np.ndarray, cand: np.ndarray, ids: list[int]) -> dict:
    """PPL of ids[1:], KL(ref || candidate) per position, same-top-token share; positions 0..n-2 predict 1..n-1.

    The divergence and top-1 figures are phi3cli.bench.quality's, the ones `phi3 bench` reports.
    """
    n = len(ids)
    if cand.shape[0] < n - 1 or cand.shape[1] < ref_logp.shape[1]:
        raise SystemExit(f"log-probabilities of shape {cand.shape} for {n} tokens, vocabulary {ref_logp.shape[1]}")
    if cand.shape[1] != ref_logp.shape[1]:  # a padded vocabulary: renormalized over the reference's
        cand = log_softmax(cand[:, : ref_logp.shape[1]])
    cand = cand[: n - 1]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("candidates", nargs="+", help="PATH or LABEL=PATH")
    parser.add_argument("--reference", type=Path, required=True, help="the fp32 Hugging Face folder")
    parser.add_argument("--text", type=Path, help="text to score (default: phi3's shipped perplexity text)")
    parser.add_argument("--cache", type=Path, help="where reference log-probabilities are cached")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--option", dest="options", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", type=Path, help="append one JSON line per candidate")
    args = parser.parse_args()
    args.options = parse_pairs(args.options)
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
        logprobs = candidate_logprobs(path, runtime, ids, args)
        model_mb, folder_mb = sizes_mb(path, runtime)
        row = {
            "label": label or path.name,
            "path": str(path),
            "runtime": runtime,
            **compare(ref, logprobs, ids),
            "model_mb": model_mb,
            "folder_mb": folder_mb,
            "scoring_s": time.perf_counter() - start,
            "options": args.options,
        }
        print(markdown_row(row), flush=True)
        if args.json:
            with args.json.open("a") as fh:
                fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
