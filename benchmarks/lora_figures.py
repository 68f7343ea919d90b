"""A LoRA on the demo: base + run-time adapter against a merged copy, on OpenVINO (load time, memory, speed, KLD).

`make DIR` writes a random LoRA for the demo with peft (r 8, alpha 16, std 0.07 on qkv_proj, o_proj, gate_up_proj,
down_proj: the tests' "sea" adapter). `run` measures one configuration in this process (so its peak RSS is its
own) and prints one JSON line: base (the base alone), adapter (base + adapter, active), adapter-off (loaded, none
active), merged (the adapter merged, then converted). `quality` prints the KL divergence and top-1 agreement, on
bench's perplexity text, of the base + run-time adapter against the merged model at fp16 (the reference), for each
format given. Decode speed: 128 new tokens with end of text ignored, median of 3 after one warm-up reply; beside it the process's
CPU time per generated token (prefill included), which other work on a busy machine disturbs less.
`phi3 bench --adapter DIR` measures the decode speed and TTFT side by side and the quality of the run-time adapter
against the merged model at the measured format; this script adds memory, load time, CPU time and the int4 IR against
a merged fp16 reference.

    python -m benchmarks.lora_figures make SEA_DIR
    for f in fp16 int4; do for c in base adapter adapter-off merged; do
        flock LOCK python -m benchmarks.lora_figures run $c $f SEA_DIR; done; done
    python -m benchmarks.lora_figures quality SEA_DIR fp16 int4
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from phi3cli.adapter_store import merged_source
from phi3cli.adapters import AdapterChoice
from phi3cli.backends.adapters import ADAPTERS
from phi3cli.backends.base import GenerationSettings
from phi3cli.bench.measure import peak_rss_bytes
from phi3cli.bench.quality import next_token_divergence, perplexity_text
from phi3cli.generation import ReplyStats, stream_reply
from phi3cli.loading import load, prepare
from phi3cli.routing import given
from phi3cli.sources import resolve_source
from phi3cli.store import ModelStore
from phi3cli.util import dir_size


def make(out: Path, seed: int = 2, std: float = 0.07, base: Path | None = None) -> Path:
    """A random LoRA made by peft itself: r 8, alpha 16, on Phi-3's four Linear layers of base (default: the demo)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base or resolve_source("demo").path, dtype=torch.float32)
    targets = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False))
    with torch.no_grad():
        for name, tensor in peft_model.named_parameters():
            if "lora_" in name:
                tensor.normal_(0, std)
    peft_model.save_pretrained(out)
    return out


def how(what: str, fmt: str, adapter: Path, store: ModelStore) -> tuple:
    """The source and load keywords of a configuration (the merged source is built here, once)."""
    source = resolve_source("demo", store)
    options = {}
    if what == "merged":
        source = merged_source(source, [AdapterChoice.parse(str(adapter))], store)
    elif what.startswith("adapter"):
        options = {ADAPTERS: (AdapterChoice.parse(str(adapter)),)}
    return source, dict(route=given("openvino", "cpu"), format=fmt, options=options, store=store, threads=2)


def load_config(what: str, fmt: str, adapter: Path, store: ModelStore):
    source, keywords = how(what, fmt, adapter, store)
    return load(source, **keywords)


def run(what: str, fmt: str, adapter: Path) -> dict:
    store = ModelStore()
    source, keywords = how(what, fmt, adapter, store)
    prepare(source, **keywords)  # converts the variant if it is not in the store yet, before anything is timed
    start = time.perf_counter()
    model = load(source, **keywords)
    load_s = time.perf_counter() - start
    if what == "adapter-off":
        model.adapters.use({})
    ids = model.encode(model.chat_template.render([{"role": "user", "content": "Write a story about the sea."}]))
    rates, cpu = [], []
    for _ in range(4):
        start = time.process_time()
        for event in stream_reply(model, ids, GenerationSettings(max_new_tokens=128, ignore_eos=True)):
            if isinstance(event, ReplyStats):
                rates.append(event.decode_tps)
                cpu.append((time.process_time() - start) / event.generated_tokens)
    return {
        "config": what,
        "format": fmt,
        "load_s": round(load_s, 2),
        "peak_rss_mib": round(peak_rss_bytes() / 2**20),
        "decode_tok_s": round(statistics.median(rates[1:]), 1),
        "cpu_ms_per_token": round(1000 * statistics.median(cpu[1:]), 1),  # all threads: steadier on a busy machine
        "folder_mib": round(dir_size(model.path) / 2**20),
    }


def quality(adapter: Path, formats: list[str]) -> list[dict]:
    store = ModelStore()
    reference = load_config("merged", "fp16", adapter, store)
    ids = reference.encode(perplexity_text())[:512]
    ref = reference.next_token_logprobs(ids)
    rows = []
    for fmt in formats:
        for what in ("adapter", "merged", "base"):
            model = load_config("adapter" if what == "base" else what, fmt, adapter, store)
            if what == "base":
                model.adapters.use({})
            kld, top1 = next_token_divergence(ref, model.next_token_logprobs(ids))
            rows.append({"format": fmt, "config": what, "kld": round(kld, 6), "top1": round(top1, 4)})
            model.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("make").add_argument("out", type=Path)
    one = sub.add_parser("run")
    one.add_argument("config", choices=["base", "adapter", "adapter-off", "merged"])
    one.add_argument("format")
    one.add_argument("adapter", type=Path)
    q = sub.add_parser("quality")
    q.add_argument("adapter", type=Path)
    q.add_argument("formats", nargs="+")
    args = parser.parse_args()
    if args.command == "make":
        make(args.out)
    elif args.command == "run":
        print(json.dumps(run(args.config, args.format, args.adapter)))
    else:
        for row in quality(args.adapter, args.formats):
            print(json.dumps(row))


if __name__ == "__main__":
    main()
