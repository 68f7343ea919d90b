"""How much phi3's openvino backend costs over calling openvino_genai directly, per weight format; and load times.

For each format the demo model is built (once, into the store) and loaded through phi3. Each repetition then
generates twice on the same openvino_genai.LLMPipeline object: through phi3 (phi3cli.generation.stream_reply over
the openvino backend, the path `phi3 chat` and `phi3 bench` use) and by calling LLMPipeline.generate directly
with the leanest streamer there is, a StreamerBase that only stamps the time of each token. One pipeline for
both, because a second LLMPipeline in the same process runs measurably slower than the first (their CPU threads
compete), which would bias any comparison by construction order. Both get prompt ids of the same kind and the
same settings (greedy, eos ignored, N new tokens); each run gets a prompt the pipeline has not seen (it reuses
the KV cache of a repeated prompt), the two paths swap prompt sets and order every repetition. The figures are
medians, and the ratios are taken within one run. OpenVINO's own PerfMetrics of our runs are shown beside ours.

Load times are measured in fresh processes: cold (an empty compiled-model cache) and warm (the same cache again).

    python -m benchmarks.openvino_overhead --reps 8 --new-tokens 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from phi3cli.bench.quality import agreement_prompts
from phi3cli.generation import ReplyStats

# The fixed prompts the bench compares answers on: varied lengths and topics.
QUESTIONS = agreement_prompts()


def direct_config(pipe, new_tokens: int):
    config = pipe.get_generation_config()
    config.max_new_tokens, config.ignore_eos = new_tokens, True
    config.do_sample, config.apply_chat_template = False, False
    return config


def run_direct_ids(ov, ov_genai, pipe, ids: list[int], new_tokens: int) -> dict:
    """LLMPipeline.generate on token ids with a streamer that only stamps each token (no text)."""

    class Stamps(ov_genai.StreamerBase):
        def __init__(self):
            super().__init__()
            self.times: list[float] = []

        def write(self, token):
            now = time.perf_counter() - start
            self.times.extend([now] * (1 if isinstance(token, int) else len(token)))
            return ov_genai.StreamingStatus.RUNNING

        def end(self):
            pass

    start = time.perf_counter()
    streamer = Stamps()
    pipe.generate(ov.Tensor(np.array([ids], dtype=np.int64)), direct_config(pipe, new_tokens), streamer)
    return figures(streamer.times)


def run_direct_text(ov, ov_genai, pipe, ids: list[int], new_tokens: int) -> dict:
    """LLMPipeline.generate on token ids streaming text through OpenVINO GenAI's own TextStreamer (C++ decoding).

    TextStreamer calls back once per piece of text, not per token: time to first token is the first piece, and
    the decode rate is the generated tokens after the first over the time from the first piece to the last.
    """
    times: list[float] = []

    def on_text(text: str):
        times.append(time.perf_counter() - start)
        return ov_genai.StreamingStatus.RUNNING

    start = time.perf_counter()
    streamer = ov_genai.TextStreamer(pipe.get_tokenizer(), on_text)
    result = pipe.generate(ov.Tensor(np.array([ids], dtype=np.int64)), direct_config(pipe, new_tokens), streamer)
    tokens = result.perf_metrics.get_num_generated_tokens()
    decode = times[-1] - times[0]
    return {"tokens": tokens, "ttft_s": times[0], "decode_tps": (tokens - 1) / decode if decode else 0.0}


def run_ours(model, ids: list[int], new_tokens: int) -> dict:
    from phi3cli.backends.base import GenerationSettings
    from phi3cli.generation import generate_text

    stats = generate_text(model, ids, GenerationSettings(max_new_tokens=new_tokens, ignore_eos=True))
    perf = model.last_perf
    return {
        **figures(stats.token_times),
        "ov_ttft_s": perf.get_ttft().mean / 1000,
        "ov_decode_tps": 1000 / perf.get_tpot().mean if perf.get_tpot().mean else 0.0,
        "token_ids": stats.token_ids,
    }


def own_work_per_token(model, prompt_ids: list[int], token_ids: list[int], reps: int = 5) -> float:
    """Seconds phi3 spends per token without the runtime: the generated ids replayed through the same streamer
    (TokenStreamer.write), incremental decoder, worker-thread hand-off (pull_from_push) and stream_reply."""
    from phi3cli.backends.base import GenerationSettings, LoadedModel
    from phi3cli.backends.openvino.runtime import TokenStreamer
    from phi3cli.backends.streaming import IncrementalDecoder, pull_from_push
    from phi3cli.generation import generate_text

    class Replay(LoadedModel):
        backend, device, executed_device, format = "openvino", "cpu", "CPU", model.format
        path, context_length, chat_template = model.path, model.context_length, model.chat_template

        def encode(self, text):
            return model.encode(text)

        def generate(self, ids, settings):
            def produce(emit):
                streamer = TokenStreamer(IncrementalDecoder(model.decode, model.decode_pair), emit)
                for token_id in token_ids:
                    streamer.write(token_id)

            return pull_from_push(produce)

    settings = GenerationSettings(max_new_tokens=len(token_ids), ignore_eos=True)
    return statistics.median(
        generate_text(Replay(), prompt_ids, settings).total_s / len(token_ids) for _ in range(reps)
    )


def figures(times: list[float]) -> dict:
    stats = ReplyStats.from_times(0, times)  # figured as phi3 bench figures a reply
    return {"tokens": stats.generated_tokens, "ttft_s": stats.ttft_s, "decode_tps": stats.decode_tps}


LOAD_CHILD = """
import json, sys, time
from pathlib import Path
from phi3cli.loading import load
from phi3cli.routing import given
from phi3cli.sources import resolve_source
from phi3cli.store import ModelStore
store = ModelStore(Path({store!r}))
model = load(resolve_source("demo", store), route=given("openvino", "cpu"), format={fmt!r}, store=store)
print(json.dumps({{"load_s": model.load_seconds}}))
"""


def load_time(store_root: Path, fmt: str) -> float:
    code = LOAD_CHILD.format(store=str(store_root), fmt=fmt)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["load_s"]


def cold_warm(real_root: Path, fmt: str, pairs: int) -> tuple[list[float], list[float]]:
    """Load in fresh processes from a store whose variants are the real ones but whose cache starts empty."""
    cold, warm = [], []
    for _ in range(pairs):
        with tempfile.TemporaryDirectory(prefix="phi3-bench-") as tmp:
            root = Path(tmp)
            for name in ("sources", "variants"):
                (root / name).symlink_to(real_root / name)
            cold.append(load_time(root, fmt))
            warm.append(load_time(root, fmt))
    return cold, warm


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--formats", nargs="+", default=["int4", "int8", "fp16"])
    parser.add_argument("--reps", type=int, default=8, help="measured repetitions per format and path")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--load-pairs", type=int, default=3, help="cold/warm load pairs per format (0 skips)")
    parser.add_argument("--json", type=Path, help="write every measurement here")
    return parser.parse_args()


def main() -> None:
    import openvino_genai as ov_genai

    from phi3cli.backends.openvino.runtime import attention_properties, precision_properties
    from phi3cli.loading import load
    from phi3cli.routing import given
    from phi3cli.sources import resolve_source
    from phi3cli.store import ModelStore

    args = parse_args()
    store = ModelStore()
    demo = resolve_source("demo", store)
    properties = {
        "CACHE_DIR": str(store.cache_dir("openvino")),
        **precision_properties("cpu", {}),
        **attention_properties("cpu", {}),
    }
    models = {fmt: load(demo, route=given("openvino", "cpu"), format=fmt, store=store) for fmt in args.formats}
    prompts, results = measure(models, args)
    load_avg = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"openvino-genai {ov_genai.__version__} · {platform.machine()} {os.cpu_count()} cores · "
        f"{args.reps} interleaved reps · {args.new_tokens} new tokens (eos ignored), greedy · "
        f"prompts {min(map(len, prompts))}-{max(map(len, prompts))} tokens · {properties} · "
        f"load average {load_avg:.1f}\n"
    )
    summary = report(models, prompts, results)
    for model in models.values():
        model.close()
    if args.load_pairs:
        report_loads(store, args, summary)
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "runs": results}, indent=2) + "\n")


def measure(models: dict, args: argparse.Namespace) -> tuple[list, dict]:
    """Interleaved repetitions of phi3's path and the two bare OpenVINO GenAI loops on each format."""
    import openvino as ov
    import openvino_genai as ov_genai

    first = next(iter(models.values()))  # the formats share the tokenizer and the template
    paths_run = {
        "phi3": lambda model, ids: run_ours(model, ids, args.new_tokens),
        "direct, TextStreamer": lambda model, ids: run_direct_text(ov, ov_genai, model.pipe, ids, args.new_tokens),
        "direct, ids only": lambda model, ids: run_direct_ids(ov, ov_genai, model.pipe, ids, args.new_tokens),
    }
    names = list(paths_run)
    questions = [f"{QUESTIONS[i % len(QUESTIONS)]} (Question {i + 1}.)" for i in range(len(names) * args.reps)]
    prompts = [first.encode(first.chat_template.render([{"role": "user", "content": q}])) for q in questions]

    for model in models.values():  # the first generate after loading compiles and allocates
        for i, run in enumerate(paths_run.values()):
            run(model, first.encode(first.chat_template.render([{"role": "user", "content": f"Warm up {i}."}])))

    results: dict[str, dict[str, list[dict]]] = {fmt: {name: [] for name in names} for fmt in models}
    for rep in range(args.reps):
        # Rotate which path goes first and which prompt each path gets, so neither order nor prompt favours one.
        batch = prompts[len(names) * rep : len(names) * (rep + 1)]
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for fmt, model in models.items():
            for name, ids in zip(order, batch, strict=True):
                results[fmt][name].append({**paths_run[name](model, ids), "prompt_tokens": len(ids)})
    return prompts, results


def report(models: dict, prompts: list, results: dict) -> dict:
    """Print the medians, phi3's overhead against each bare loop, and phi3's own work per token."""
    from phi3cli.util import dir_size

    print(
        "| format | size | path | decode tok/s | TTFT | phi3's decode overhead | phi3's TTFT overhead |\n"
        "| --- | --- | --- | --- | --- | --- | --- |"
    )
    summary = {}
    own_lines: list[str] = []
    for fmt, runs in results.items():
        med = {
            name: {key: statistics.median(r[key] for r in rows) for key in ("decode_tps", "ttft_s")}
            for name, rows in runs.items()
        }
        med["PerfMetrics of phi3's runs"] = {
            "decode_tps": statistics.median(r["ov_decode_tps"] for r in runs["phi3"]),
            "ttft_s": statistics.median(r["ov_ttft_s"] for r in runs["phi3"]),
        }
        own = own_work_per_token(models[fmt], prompts[0], runs["phi3"][0]["token_ids"])
        summary[fmt] = {"median": med, "own_work_per_token_s": own}
        own_lines.append(
            f"| {fmt} | {own * 1e6:.0f} µs | {1000 / med['phi3']['decode_tps']:.1f} ms | "
            f"{own * med['phi3']['decode_tps']:.1%} |"
        )
        cells = [fmt, f"{dir_size(models[fmt].path) / 1e6:.0f} MB"]
        for name, m in med.items():
            overheads = " | "
            if name.startswith("direct"):  # >0: phi3 is slower than calling OpenVINO GenAI this way
                decode = m["decode_tps"] / med["phi3"]["decode_tps"] - 1
                ttft = med["phi3"]["ttft_s"] / m["ttft_s"] - 1
                summary[fmt][f"overhead vs {name}"] = {"decode": decode, "ttft": ttft}
                overheads = f"{decode:+.1%} | {ttft:+.1%}"
            print(
                f"| {' | '.join(cells)} | {name} | {m['decode_tps']:.1f} | {m['ttft_s'] * 1000:.0f} ms | {overheads} |"
            )
            cells = ["", ""]
    print(
        "\nphi3's own work per token, without the runtime (generated ids replayed through the same streamer, "
        "decoder, thread hand-off and stream_reply):\n\n| format | per token | phi3's TPOT | share |\n| --- | --- | --- | --- |"
    )
    print("\n".join(own_lines))
    return summary


def report_loads(store, args: argparse.Namespace, summary: dict) -> None:
    """Cold and warm load times in fresh processes, per format."""
    loads = {fmt: cold_warm(store.root, fmt, args.load_pairs) for fmt in args.formats}
    print(f"\nLoad time in a fresh process (phi3cli.loading.load, median of {args.load_pairs}):\n")
    print("| format | cold (empty compiled-model cache) | warm (cache filled) | warm / cold |")
    print("| --- | --- | --- | --- |")
    for fmt, (cold, warm) in loads.items():
        c, w = statistics.median(cold), statistics.median(warm)
        summary[fmt]["load"] = {"cold_s": cold, "warm_s": warm}
        print(f"| {fmt} | {c:.2f} s | {w:.2f} s | {w / c:.2f} |")


if __name__ == "__main__":
    main()
