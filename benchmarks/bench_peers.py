#!/usr/bin/env python
"""phi3's int4 against llama.cpp on the same weights, side by side in one interleaved run.

Not part of phi3 and not one of its dependencies. llama.cpp runs through llama-cpp-python (imported only
in the workers), which compiles llama.cpp when installed (several minutes):

    CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python

On a CPU with AMX (Sapphire Rapids and later) that native build crashed here (SIGSEGV in the first decode, in a
virtual machine); building with the AVX-512 flags given one by one and AMX off ran:

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
      -DGGML_AVX_VNNI=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON \
      -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" pip install llama-cpp-python

For each model (a Hugging Face folder, or `demo`; several in one run) it builds every configuration asked
(see benchmarks/peer_builds.py): by default llama.cpp's Q4_K_M and Q4_0 quantized by llama.cpp from an f16 .gguf of
the same weights, and phi3's default int4 of every converting backend (`phi3:openvino`, `phi3:onnx`: built by
phi3's converter into its store and run through phi3's own load and timing path). Each configuration runs in its
own process (benchmarks/peer_workers.py, run by phi3cli.bench's run_isolated), in an order that rotates each
round (phi3cli.bench.stats.rotation): warm-up first, a different prompt per
repetition, greedy, end of text ignored, the given thread count. Memory bandwidth is measured before and after
(numpy max over a byte array in N processes at once: a reduction numpy runs at the rate a core can load; a
float32 sum is pairwise-summed and read about half as fast on a Xeon with AVX-512). Printed per model, as
markdown: prefill and decode tokens/s (medians over every run) and their ratios to llama.cpp Q4_K_M (the median
of the per-round ratios), size on disk, bytes read per decoded token (every weight but the embedding table, at
its stored precision, plus the KV cache at the mean context), the share of the measured bandwidth that decode
reaches, and, for models with real weights, quality under teacher forcing on phi3's shipped text against
phi3's reference backend (transformers fp32), scored as `phi3 bench` scores (phi3cli.bench.quality). Models marked
timing-only (scripts/make_shaped_model.py) get no quality. Every configuration also gets the wall time and peak
RSS of making its artifact, each built in a worker of its own (llama.cpp's quantize from the f16 .gguf, which is
written first and not timed; phi3's whole convert, export included: point PHI3_HOME at an empty store to time
it, else it is found and shown as cached), and its peak RSS while running.

    python -m benchmarks.bench_peers MODEL [MODEL ...] [--config SPEC ...] [--rounds 2] [--reps 3]
        [--prompt-tokens 512] [--gen-tokens 64] [--threads 2] [--work DIR] [--markdown FILE] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import peer_builds as pb
from benchmarks import peer_memory as pm
from phi3cli.bench.measure import reply_figures, synthetic_prompt
from phi3cli.bench.runner import run_isolated
from phi3cli.bench.stats import median_ratio, rotation
from phi3cli.generation import ReplyStats

BASELINE = "llama:Q4_K_M"
DEFAULT_CONFIGS = (BASELINE, "llama:Q4_0", "phi3:openvino", "phi3:onnx")
WORKER = "benchmarks.peer_workers"


# ------------------------------------------------------------------------------------------ prompts


def make_prompts(tokenizer_json: Path, count: int, length: int, seed: str) -> list[list[int]]:
    """phi3 bench's synthetic prompts (shuffled English, exactly `length` tokens), each starting with another token."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))

    def encode(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False).ids

    prompts: list[list[int]] = []
    for i in range(count):
        prompts.append(synthetic_prompt(encode, length, f"{seed}-{i}", {p[0] for p in prompts}))
    return prompts


# ------------------------------------------------------------------------------------------ running


def run_job(job: dict) -> dict:
    """One worker process (benchmarks/peer_workers.py) on one job: its result, or {"error": ...}; each reply's
    token times figured as phi3 bench figures them."""
    out = run_isolated(WORKER, job, timeout_s=1800)
    if not out.get("ok"):
        return {"error": out.get("error", "failed")}
    out["runs"] = [timed(run) for run in out.get("runs", [])]
    return out


def timed(run: dict) -> dict:
    """A worker's reply (prompt length, seconds per token since the request) with phi3 bench's figures."""
    figures = reply_figures(ReplyStats.from_times(run["prompt_tokens"], run["times"]))
    return {**{k: v for k, v in run.items() if k != "times"}, **figures}


def build_artifact(config: pb.Config, hf_dir: Path, work: Path, model: str) -> dict:
    """Build (or find) a configuration's artifact in a worker process of its own, so that its wall time and peak
    RSS are the build's alone: llama.cpp's quantize from the f16 .gguf, phi3's whole convert (export included)."""
    out = run_job({"mode": "build", "config": config.name, "hf_dir": str(hf_dir), "work": str(work), "model": model})
    if "error" in out:
        sys.exit(f"Building {config.name} failed: {out['error']}")
    out["cached"] = out["build_s"] < 1.0  # found, not built: no figure
    print(
        f"{hf_dir.name}: {config.name}: built in {out['build_s']:.0f} s, peak RSS {out['peak_rss_mb']:.0f} MiB",
        file=sys.stderr,
    )
    return out


def speed_job(config: pb.Config, path: Path, model: str, prompts: list[list[int]], work: Path, args) -> dict:
    return {
        "runtime": config.runtime,
        "phi3_backend": config.recipe if config.runtime == "phi3" else None,
        "model": model,
        "path": str(path),
        "knobs": config.knobs,
        "threads": args.threads,
        "prompts": prompts,
        "gen": args.gen_tokens,
        "work": str(work),
    }


def quality(configs, paths, hf_dir: Path, work: Path, args) -> dict[str, dict]:
    """Perplexity, KL divergence and top-1 of each configuration against phi3's reference, teacher-forced, each
    scored in a worker (phi3's `next_token_logprobs` for its own formats, llama.cpp's scores for a .gguf)."""
    import numpy as np
    from tokenizers import Tokenizer

    from phi3cli.bench.quality import kl_per_position, next_token_divergence, perplexity_text
    from phi3cli.util import log_softmax

    ids = Tokenizer.from_file(str(hf_dir / "tokenizer.json")).encode(perplexity_text(), add_special_tokens=False).ids
    targets = np.asarray(ids[1:])

    def logprobs(backend: str, path: Path, out: Path) -> np.ndarray | str:
        if not out.is_file():
            job = {"mode": "logits", "backend": backend, "path": str(path), "ids": ids, "threads": args.threads}
            done = run_job({**job, "out": str(out)})
            if "error" in done:
                return done["error"]
        return np.load(out)

    print(f"Quality: {len(ids)} tokens of phi3's perplexity text, against phi3's reference...", file=sys.stderr)
    ref = logprobs("reference", hf_dir, work / "reference-logprobs.npy")
    if isinstance(ref, str):
        sys.exit(f"The reference failed: {ref}")
    out: dict[str, dict] = {"reference": {"ppl": float(np.exp(-ref[np.arange(len(targets)), targets].mean()))}}
    scored: dict[str, np.ndarray | str] = {}  # by artifact: knobs do not change a teacher-forced score
    with tempfile.TemporaryDirectory() as tmp:
        for c in configs:
            if c.artifact not in scored:
                scored[c.artifact] = logprobs(c.backend, paths[c.artifact], Path(tmp) / f"{c.artifact}.npy")
            cand = scored[c.artifact]
            if isinstance(cand, str):
                out[c.name] = {"error": cand}
                print(f"  {c.name}: failed ({cand})", file=sys.stderr)
                continue
            width = min(ref.shape[1], cand.shape[1])
            cand = log_softmax(cand[:, :width]) if cand.shape[1] != width else cand
            kld, top1 = next_token_divergence(ref, cand)
            out[c.name] = {
                "ppl": float(np.exp(-cand[np.arange(len(targets)), targets].mean())),
                "kld": kld,
                "kld_p99": float(np.percentile(kl_per_position(ref, cand), 99)),
                "top1": top1,
            }
            print(f"  {c.name}: PPL {out[c.name]['ppl']:.2f}, KLD {kld:.4f}, top-1 {100 * top1:.1f} %", file=sys.stderr)
    return out


def mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def summarise(config, path, hf_config, args, rounds: list[dict], base_rounds: list[dict]) -> dict:
    runs = [r for rnd in rounds for r in rnd.get("runs", [])]
    row: dict = {"config": config.name, "errors": [rnd["error"] for rnd in rounds if "error" in rnd]}
    row["size_mb"] = pm.disk_bytes(path) / 1e6
    if not runs:
        return row
    properties = next((rnd.get("properties") for rnd in rounds if "properties" in rnd), {})
    total, embed, per_type = pm.weight_bytes(config, path)
    context = args.prompt_tokens + args.gen_tokens / 2
    kv = pm.kv_bytes_per_token(config, hf_config, context, path, properties)
    per_token = total - embed + kv
    # medians: on a shared machine one round can be slowed by someone else's job
    decode = statistics.median([r["decode_tps"] for r in runs])
    prefill = statistics.median([r["prefill_tps"] for r in runs])

    def per_round(rnds: list[dict], key: str) -> list[list[float]]:
        return [[r[key] for r in rnd.get("runs", [])] for rnd in rnds]

    ratios = {
        key: median_ratio(per_round(rounds, key), per_round(base_rounds, key)) for key in ("decode_tps", "prefill_tps")
    }
    row.update(
        prefill_tps=prefill,
        decode_tps=decode,
        decode_sd=statistics.pstdev([r["decode_tps"] for r in runs]),
        decode_ratio=ratios["decode_tps"] if ratios["decode_tps"] is not None else float("nan"),
        prefill_ratio=ratios["prefill_tps"] if ratios["prefill_tps"] is not None else float("nan"),
        weights_mb=(total - embed) / 1e6,
        kv_mb=kv / 1e6,
        bytes_per_token=per_token,
        gbps=per_token * decode / 1e9,
        load_s=mean([rnd["load_s"] for rnd in rounds if "load_s" in rnd]),
        run_rss_mb=max(rnd.get("peak_rss_mb", 0.0) for rnd in rounds),
        per_type_mb={k: round(v / 1e6, 1) for k, v in per_type.items()},
        properties=properties,
        path=str(path),
        runs=runs,
    )
    return row


def table(rows: list[dict], bandwidth: float, scores: dict | None) -> str:
    cols = ["configuration", "size MB"]
    if scores:
        cols += ["PPL", "vs fp32", "mean KLD", "top-1"]
    cols += ["prefill tok/s", "decode tok/s", "prefill ×", "decode ×", "MB read/token", "% of bandwidth"]
    cols += ["peak RSS running MiB", "make int4: s", "make int4: peak RSS MiB"]
    lines = ["| " + " | ".join(cols) + " |", "| --- |" + " --: |" * (len(cols) - 1)]
    ref_ppl = scores["reference"]["ppl"] if scores else None
    if scores:
        cells = ["transformers fp32 (reference)", "", f"{ref_ppl:.2f}", "—", "0", "100 %"] + [""] * 9
        lines.append("| " + " | ".join(cells) + " |")
    for r in rows:
        cells = [r["config"], f"{r['size_mb']:.0f}" if "size_mb" in r else ""]
        if scores:
            q = scores.get(r["config"], {})
            if "ppl" in q:
                cells += [f"{q['ppl']:.2f}", f"{100 * (q['ppl'] / ref_ppl - 1):+.1f} %", f"{q['kld']:.4f}"]
                cells += [f"{100 * q['top1']:.1f} %"]
            else:
                cells += [f"failed: {q.get('error', '?')[:60]}", "", "", ""]
        if "decode_tps" not in r:
            cells += [f"failed: {'; '.join(r['errors'])[:120]}"] + [""] * 8
        else:
            cells += [
                f"{r['prefill_tps']:.0f}",
                f"{r['decode_tps']:.1f}",
                f"{r['prefill_ratio']:.2f}",
                f"{r['decode_ratio']:.2f}",
                f"{r['bytes_per_token'] / 1e6:.0f}",
                f"{100 * r['gbps'] * 1e9 / bandwidth:.0f} %",
                f"{r['run_rss_mb']:.0f}",
            ]
        build = r.get("build") or {}
        cached = build.get("cached", True)
        if "decode_tps" in r:
            cells += ["cached", ""] if cached else [f"{build['build_s']:.0f}", f"{build['peak_rss_mb']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def resolve_model(spec: str) -> tuple[str, Path]:
    """(what phi3 is given, the Hugging Face folder) for demo or a folder."""
    if spec == "demo":
        from phi3cli.demo import ensure_demo
        from phi3cli.store import ModelStore

        return spec, ensure_demo(ModelStore())
    path = Path(spec).expanduser().absolute()
    if not (path / "config.json").is_file():
        sys.exit(f"{spec} is not a Hugging Face model folder (no config.json).")
    return str(path), path


def measure_model(spec: str, configs: list, args) -> dict:
    model, hf_dir = resolve_model(spec)
    hf_config = json.loads((hf_dir / "config.json").read_text())
    work = (args.work / hf_dir.name).absolute()
    work.mkdir(parents=True, exist_ok=True)
    paths, builds = {}, {}
    if any(c.runtime == "llama" for c in configs):
        pb.f16_gguf(hf_dir, work)  # llama.cpp quantizes from it: its writing is not part of the quantize time
    for c in configs:
        if c.artifact not in paths:
            builds[c.artifact] = build_artifact(c, hf_dir, work, model)
            paths[c.artifact] = Path(builds[c.artifact]["path"])
    timing_only = hf_config.get("phi3_timing_only")
    scores = None if timing_only or args.no_quality else quality(configs, paths, hf_dir, work, args)
    results: dict[str, list[dict]] = {c.name: [] for c in configs}
    for rnd in range(args.rounds):
        prompts = make_prompts(hf_dir / "tokenizer.json", args.reps + 1, args.prompt_tokens, f"round-{rnd}")
        order = rotation(configs, rnd)
        for c in order:
            start = time.perf_counter()
            out = run_job(speed_job(c, paths[c.artifact], model, prompts, work, args))
            results[c.name].append(out)
            if "error" in out:
                print(f"{hf_dir.name} round {rnd + 1}: {c.name}: {out['error']}", file=sys.stderr)
            else:
                d = mean([r["decode_tps"] for r in out["runs"]])
                p = mean([r["prefill_tps"] for r in out["runs"]])
                print(
                    f"{hf_dir.name} round {rnd + 1}: {c.name}: prefill {p:.0f} tok/s, decode {d:.1f} tok/s "
                    f"({time.perf_counter() - start:.0f} s)",
                    file=sys.stderr,
                )
    rows = [summarise(c, paths[c.artifact], hf_config, args, results[c.name], results[args.baseline]) for c in configs]
    for row, c in zip(rows, configs, strict=True):
        row["build"] = builds[c.artifact]
    return {"model": str(hf_dir), "hf_config": hf_config, "timing_only": timing_only, "rows": rows, "quality": scores}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="Hugging Face folders, or demo")
    parser.add_argument("--config", action="append", help=f"a configuration (repeatable); default {DEFAULT_CONFIGS}")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (each config once per round)")
    parser.add_argument("--reps", type=int, default=3, help="timed generates per config and round, after 1 warm-up")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--baseline", default=BASELINE, help="what the ratio columns divide by (default %(default)s)")
    parser.add_argument("--work", type=Path, default=Path(".bench-peers"), help="where built artifacts are cached")
    parser.add_argument("--no-quality", action="store_true", help="speed only")
    parser.add_argument("--markdown", type=Path, help="append the tables here")
    parser.add_argument("--json", type=Path, help="write every figure here")
    return parser.parse_args(argv)


def plan(args: argparse.Namespace) -> list[pb.Config]:
    """The configurations to measure, the baseline among them (first when it was not asked for)."""
    specs = list(args.config or DEFAULT_CONFIGS)
    if args.baseline not in specs:
        specs.insert(0, args.baseline)
    return [pb.parse_config(s) for s in specs]


def main() -> None:
    args = parse_args()

    try:
        configs = plan(args)
    except ValueError as exc:
        sys.exit(str(exc))
    try:
        import llama_cpp

        info = llama_cpp.llama_print_system_info().decode()
        simd = [f for f in ("AVX2", "AVX512", "AVX512_VNNI", "AVX512_BF16") if f"{f} = 1" in info]
        peer = f"llama-cpp-python {llama_cpp.__version__} ({', '.join(simd) or 'no AVX2'})"
    except ImportError:
        if any(c.runtime == "llama" for c in configs):
            sys.exit(
                'llama-cpp-python is not installed (it is no phi3 dependency): CMAKE_ARGS="-DGGML_NATIVE=ON" '
                "pip install llama-cpp-python"
            )
        peer = "no llama.cpp"
    load_before = os.getloadavg()[0]
    print(f"Measuring memory bandwidth (numpy max, 1 and {args.threads} processes)...", file=sys.stderr)
    bw_before = {1: pm.measure_bandwidth(1), args.threads: pm.measure_bandwidth(args.threads)}
    measured = [measure_model(spec, configs, args) for spec in args.models]
    bw_after = {1: pm.measure_bandwidth(1), args.threads: pm.measure_bandwidth(args.threads)}
    load_after = os.getloadavg()[0]
    bandwidth = max(bw_before[args.threads], bw_after[args.threads])

    texts = [
        f"pp{args.prompt_tokens} + tg{args.gen_tokens}, {args.threads} threads, {args.rounds} interleaved rounds × "
        f"(1 warm-up + {args.reps}); {peer}; ratios against {args.baseline}; bandwidth (numpy max) 1 thread "
        f"{bw_before[1] / 1e9:.1f}/{bw_after[1] / 1e9:.1f} GB/s, {args.threads} threads "
        f"{bw_before[args.threads] / 1e9:.1f}/{bw_after[args.threads] / 1e9:.1f} GB/s (before/after): shares are "
        f"of {bandwidth / 1e9:.1f} GB/s; load average {load_before:.1f} before, {load_after:.1f} after"
    ]
    for m in measured:
        c = m["hf_config"]
        what = f"timing only: {m['timing_only']}" if m["timing_only"] else "quality against transformers fp32"
        what = what if m["timing_only"] or m["quality"] else "quality not measured"
        texts.append(
            f"**{Path(m['model']).name}** ({c['num_hidden_layers']} layers, hidden {c['hidden_size']}, "
            f"intermediate {c['intermediate_size']}, vocab {c['vocab_size']}; {what})\n\n"
            + table(m["rows"], bandwidth, m["quality"])
        )
    text = "\n\n".join(texts) + "\n"
    print(text)
    if args.markdown:
        with args.markdown.open("a") as f:
            f.write(f"\n{text}\n`python -m benchmarks.bench_peers {' '.join(sys.argv[1:])}`\n")
    if args.json:
        bw = {"before": bw_before, "after": bw_after}
        args.json.write_text(json.dumps({"bandwidth": bw, "models": measured}, indent=1, default=str))


if __name__ == "__main__":
    main()
