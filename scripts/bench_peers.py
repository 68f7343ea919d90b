#!/usr/bin/env python
"""phi3 against llama.cpp on the same weights: the demo model's .gguf and our best CPU configuration.

Not part of phi3 and not one of its dependencies. llama.cpp runs through llama-cpp-python, which
compiles llama.cpp when installed (several minutes):

    CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python

Both sides run in fresh subprocesses, one after the other, with the same prompt length, output length,
thread count, warm-up and repetitions; prompts are shuffled English text that differs every run, and
generation ignores the end of text, as in `phi3 bench`. Our side measures the int4 CPU configurations
of every installed converting backend with `phi3 bench`'s own runner and takes the fastest. It prints
both and the ratio ours / llama.cpp for decode tokens/s (above 1: we are faster) and time to first token.

    python scripts/bench_peers.py [--prompt-tokens 512] [--gen-tokens 128] [--threads N] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def llama_worker(args: argparse.Namespace) -> None:
    """Runs in its own process: llama.cpp on the .gguf, printing one JSON line of per-run figures."""
    from llama_cpp import Llama

    from phi3cli.bench.quality import perplexity_text

    n_ctx = args.prompt_tokens + args.gen_tokens + 8
    start = time.perf_counter()
    llm = Llama(
        model_path=args.gguf,
        n_ctx=n_ctx,
        n_batch=min(512, n_ctx),
        n_threads=args.threads,
        n_threads_batch=args.threads,
        verbose=False,
    )
    load_s = time.perf_counter() - start
    words = perplexity_text().split()
    seen_first: set[int] = set()
    runs = []
    for i in range(args.warmup + args.repetitions):
        for attempt in range(50):  # a different prompt every run, starting with a different token
            rng = random.Random(f"llama-{args.prompt_tokens}-{i}-{attempt}")
            ids: list[int] = []
            while len(ids) < args.prompt_tokens:
                rng.shuffle(words)
                ids += llm.tokenize((" ".join(words) + "\n").encode(), add_bos=False, special=False)
            if ids[0] not in seen_first:
                break
        seen_first.add(ids[0])
        prompt = ids[: args.prompt_tokens]
        times = []
        start = time.perf_counter()
        # generate() samples after evaluating the prompt and never stops at end of text by itself.
        for n, _token in enumerate(llm.generate(prompt, top_k=1, temp=0.0, reset=True), 1):
            times.append(time.perf_counter() - start)
            if n >= args.gen_tokens:
                break
        total = time.perf_counter() - start
        if i >= args.warmup:
            decode_s = times[-1] - times[0]
            runs.append(
                {
                    "ttft_ms": times[0] * 1000,
                    "decode_tps": (len(times) - 1) / decode_s if decode_s > 0 else 0.0,
                    "e2e_tps": len(times) / total,
                    "tokens": len(times),
                }
            )
    import llama_cpp

    print(json.dumps({"load_s": load_s, "runs": runs, "version": llama_cpp.__version__}))


def run_llama(args: argparse.Namespace, gguf: Path) -> dict:
    cmd = [sys.executable, __file__, "--llama-worker", "--gguf", str(gguf)]
    for flag in ("prompt_tokens", "gen_tokens", "threads", "warmup", "repetitions"):
        cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"llama.cpp run failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def demo_gguf() -> Path:
    """The very .gguf the demo model is built from, kept in the model store's cache after the first fetch."""
    from phi3cli.demo import DEMO_GGUF, fetch_demo_gguf
    from phi3cli.progress import SilentProgress
    from phi3cli.store import ModelStore

    cached = ModelStore().cache_dir("bench-peers") / DEMO_GGUF
    if cached.is_file() and not os.environ.get("PHI3_DEMO_GGUF"):
        os.environ["PHI3_DEMO_GGUF"] = str(cached)
        return fetch_demo_gguf(cached.parent, SilentProgress())  # checks the sha256
    with tempfile.TemporaryDirectory() as tmp:
        path = fetch_demo_gguf(Path(tmp), SilentProgress())
        if path != cached:
            tmp_copy = cached.with_suffix(".partial")
            tmp_copy.write_bytes(path.read_bytes())
            tmp_copy.replace(cached)
    return cached


def run_ours(args: argparse.Namespace) -> dict:
    """Every installed converting backend's int4 on the CPU, measured by phi3 bench's runner; the report."""
    from phi3cli.bench import BenchSettings, plan_configurations, run_bench
    from phi3cli.devices import probe
    from phi3cli.progress import SilentProgress

    class Say(SilentProgress):
        def phase(self, description: str, total=None) -> None:
            print(f"  {description}", file=sys.stderr, flush=True)

    backends = [b for b in ("openvino", "onnx") if b in probe().present]
    planned = plan_configurations(probe(), backends=backends, devices=["cpu"], formats=["int4"])
    settings = BenchSettings(
        prompt_tokens=[args.prompt_tokens],
        gen_tokens=args.gen_tokens,
        warmup=args.warmup,
        repetitions=args.repetitions,
        threads=args.threads,
        quality=False,
    )
    return run_bench("demo", planned, settings, progress=Say())


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--gen-tokens", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="default: the physical cores")
    parser.add_argument("--json", type=Path, help="write both sides' figures here")
    parser.add_argument("--llama-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--gguf", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads is None:
        import psutil

        args.threads = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    if args.llama_worker:
        llama_worker(args)
        return
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        sys.exit('llama-cpp-python is not installed: CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python')

    gguf = demo_gguf()
    print(
        f"pp{args.prompt_tokens}+tg{args.gen_tokens}, {args.threads} threads, "
        f"{args.warmup} warm-up + {args.repetitions} runs, greedy, end of text ignored",
        file=sys.stderr,
    )
    print("phi3 (int4 CPU configurations):", file=sys.stderr)
    report = run_ours(args)
    ok = [(r, r["runs"][0]) for r in report["results"] if r["status"] == "ok" and r["runs"]]
    for r in report["results"]:
        if r["status"] != "ok":
            print(f"  {r['backend']}/{r['device']}/{r['format']}: {r['status']}: {r['reason']}", file=sys.stderr)
    if not ok:
        sys.exit("No phi3 CPU configuration ran.")
    best_row, best = max(ok, key=lambda pair: pair[1]["decode_tps"]["mean"])
    print(f"llama.cpp on {gguf.name}:", file=sys.stderr)
    peer = run_llama(args, gguf)
    peer_decode = mean([r["decode_tps"] for r in peer["runs"]])
    peer_ttft = mean([r["ttft_ms"] for r in peer["runs"]])
    assert all(r["tokens"] == args.gen_tokens for r in peer["runs"])

    width = max(len(f"phi3 {r['backend']} {r['format']} cpu") for r, _ in ok)
    print(f"{'':{width}}  decode tok/s   TTFT ms")
    for r, run in sorted(ok, key=lambda pair: -pair[1]["decode_tps"]["mean"]):
        name = f"phi3 {r['backend']} {r['format']} cpu"
        print(f"{name:{width}}  {run['decode_tps']['mean']:12.1f}  {run['ttft_ms']['mean']:8.1f}")
    print(f"{'llama.cpp ' + peer['version'] + ' Q4_1':{width}}  {peer_decode:12.1f}  {peer_ttft:8.1f}")
    ratio = best["decode_tps"]["mean"] / peer_decode
    print(
        f"ratio ours/llama.cpp ({best_row['backend']} {best_row['format']}): decode {ratio:.2f}x, "
        f"time to first token {best['ttft_ms']['mean'] / peer_ttft:.2f}x (below 1 is faster)"
    )
    if args.json:
        args.json.write_text(json.dumps({"ours": report, "llama_cpp": peer, "decode_ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()
