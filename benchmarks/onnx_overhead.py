"""How much phi3's onnx backend costs over calling onnxruntime_genai directly, per weight format.

For each format the demo model is built (once, into the store) and loaded by phi3's onnx backend. Each
request then runs two ways on that one og.Model: through phi3 (phi3cli.generation.stream_reply, the path
`phi3 chat` and `phi3 bench` use) and through the bare loop of ONNX Runtime GenAI's own examples
(GeneratorParams, Generator, append_tokens, generate_next_token, a TokenizerStream). Both get the same
prompt ids and the same settings (greedy, eos ignored, N new tokens). Runs are interleaved, alternating which goes first, with a
different prompt each repetition. Speeds are medians; an overhead is the median, over repetitions, of the
ratio between the two runs of that repetition (positive: phi3 is slower). The CPU-time overhead compares
the calling thread's CPU time per request; with --threads 1 that is all the work, so it is the figure to
trust on a busy machine, where wall-clock speeds swing by tens of percent.

    python -m benchmarks.onnx_overhead --reps 11 --new-tokens 64             # wall clock, default threads
    python -m benchmarks.onnx_overhead --reps 11 --new-tokens 64 --threads 1 # CPU time: the overhead
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from functools import partial
from pathlib import Path

from phi3cli.bench.quality import agreement_prompts
from phi3cli.generation import ReplyStats

# The fixed prompts the bench compares answers on: varied lengths and topics.
QUESTIONS = agreement_prompts()


def run_direct(og, model, tokenizer, ids: list[int], new_tokens: int) -> dict:
    """The loop from ONNX Runtime GenAI's own examples, timed like stream_reply times ours."""
    cpu = time.thread_time()
    start = time.perf_counter()
    params = og.GeneratorParams(model)
    length = len(ids) + new_tokens
    params.set_search_options(max_length=length, min_length=length, do_sample=False, batch_size=1)
    generator = og.Generator(model, params)
    stream = tokenizer.create_stream()
    generator.append_tokens(ids)
    times = []
    while not generator.is_done():
        generator.generate_next_token()
        stream.decode(generator.get_next_tokens()[0])
        times.append(time.perf_counter() - start)
    del generator
    return figures(times, time.thread_time() - cpu)


def run_ours(model, ids: list[int], new_tokens: int) -> dict:
    from phi3cli.backends.base import GenerationSettings
    from phi3cli.generation import generate_text

    cpu = time.thread_time()
    stats = generate_text(model, ids, GenerationSettings(max_new_tokens=new_tokens, ignore_eos=True))
    return figures(stats.token_times, time.thread_time() - cpu)


def figures(times: list[float], cpu_s: float) -> dict:
    stats = ReplyStats.from_times(0, times)  # figured as phi3 bench figures a reply
    return {
        "tokens": stats.generated_tokens,
        "ttft_s": stats.ttft_s,
        "decode_tps": stats.decode_tps,
        "cpu_s": cpu_s,  # CPU time of the calling thread: all the work when ONNX Runtime runs on it (--threads 1)
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--formats", nargs="+", default=["int4", "fp16", "fp32"])
    parser.add_argument("--reps", type=int, default=7, help="measured repetitions per format and path")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument(
        "--threads",
        type=int,
        help="ONNX Runtime intra-op threads for both paths; with 1 it computes on the calling thread, so that "
        "thread's CPU time measures all the work and stays steady on a busy machine",
    )
    parser.add_argument("--json", type=Path, help="write every measurement here")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    import onnxruntime_genai as og

    from phi3cli.loading import load
    from phi3cli.routing import given
    from phi3cli.sources import resolve_source
    from phi3cli.store import ModelStore

    store = ModelStore()
    demo = resolve_source("demo", store)
    setups = {}
    for fmt in args.formats:
        ours = load(demo, route=given("onnx", "cpu"), format=fmt, threads=args.threads, store=store)
        # The bare loop runs on the og.Model phi3 loaded: a second og.Model of the same folder differs from the
        # first by up to 10% in CPU time here, whichever of the two is loaded first, which would swamp the
        # difference measured. The session options are the same either way (providers cleared, threads).
        setups[fmt] = (ours, ours.model, og.Tokenizer(ours.model))
    first = next(iter(setups.values()))[0]  # the formats share the tokenizer and the template
    prompts = [first.encode(first.chat_template.render([{"role": "user", "content": q}])) for q in QUESTIONS]

    for ours, direct, tokenizer in setups.values():  # warm-up: first runs allocate and tune
        run_ours(ours, prompts[-1], args.new_tokens)
        run_direct(og, direct, tokenizer, prompts[-1], args.new_tokens)

    results: dict[str, dict[str, list[dict]]] = {fmt: {"phi3": [], "direct": []} for fmt in setups}
    for rep in range(args.reps):
        ids = prompts[rep % len(prompts)]
        for fmt, (ours, direct, tokenizer) in setups.items():
            runs = [
                ("phi3", partial(run_ours, ours, ids, args.new_tokens)),
                ("direct", partial(run_direct, og, direct, tokenizer, ids, args.new_tokens)),
            ]
            for name, run in runs if rep % 2 == 0 else reversed(runs):
                results[fmt][name].append({**run(), "prompt_tokens": len(ids)})

    summary = report(og, args, prompts, results, setups)
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "runs": results}, indent=2) + "\n")
    for ours, _, _ in setups.values():
        ours.close()


def report(og, args: argparse.Namespace, prompts: list, results: dict, setups: dict) -> dict:
    """Print the table of medians and paired overheads; return the summary."""
    from phi3cli.util import dir_size

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"onnxruntime-genai {og.__version__} · {platform.machine()} {os.cpu_count()} cores · "
        f"{args.reps} interleaved reps · {args.new_tokens} new tokens (eos ignored), greedy · "
        f"prompts {min(map(len, prompts))}-{max(map(len, prompts))} tokens · load average {load:.1f}\n"
    )
    print(f"intra-op threads: {args.threads or 'ONNX Runtime default'}\n")
    print(
        "| format | size | decode tok/s phi3 | decode tok/s direct | decode overhead | TTFT phi3 | TTFT direct "
        "| TTFT overhead | CPU time overhead |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    summary = {}
    for fmt, runs in results.items():
        med = {
            name: {key: statistics.median(r[key] for r in rows) for key in ("decode_tps", "ttft_s")}
            for name, rows in runs.items()
        }
        # Overheads from the runs paired within each repetition (adjacent in time), so drift cancels out.
        pairs = list(zip(runs["phi3"], runs["direct"], strict=True))
        decode_overhead = statistics.median(d["decode_tps"] / p["decode_tps"] for p, d in pairs) - 1
        ttft_overhead = statistics.median(p["ttft_s"] / d["ttft_s"] for p, d in pairs) - 1
        cpu_overhead = statistics.median(p["cpu_s"] / d["cpu_s"] for p, d in pairs) - 1
        summary[fmt] = {
            **med,
            "decode_overhead": decode_overhead,
            "ttft_overhead": ttft_overhead,
            "cpu_overhead": cpu_overhead,
        }
        size = dir_size(setups[fmt][0].path) / 1e6
        print(
            f"| {fmt} | {size:.0f} MB | {med['phi3']['decode_tps']:.1f} | {med['direct']['decode_tps']:.1f} | "
            f"{decode_overhead:+.1%} | {med['phi3']['ttft_s'] * 1000:.0f} ms | {med['direct']['ttft_s'] * 1000:.0f} ms | "
            f"{ttft_overhead:+.1%} | {cpu_overhead:+.1%} |"
        )
    return summary


if __name__ == "__main__":
    main()
