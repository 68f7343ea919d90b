"""Bare runtime loops for benchmarks/bench_peers.py: one process per configuration and round (run by
phi3cli.bench.runner.run_isolated: `python -m benchmarks.peer_workers JOB.json RESULT.json`).

Each worker loads its artifact, runs one warm-up generate on its own prompt, then one generate per given prompt
(every prompt different, so OpenVINO cannot reuse a KV cache and llama-cpp-python cannot reuse a prefix), greedy,
end of text ignored, and reports when each token came; bench_peers figures them as phi3 bench does
(ReplyStats.from_times): prefill tokens/s = prompt tokens / time to the first token, decode tokens/s = (tokens - 1)
/ (time of the last token - time of the first).

A phi3 configuration runs through phi3's own path instead: `loading.load` (the settings phi3 compiles
the model with) and `stream_reply` (the timing every phi3 command reports).

A logits job (quality) writes the next-token log-probabilities of one token sequence to a .npy file: phi3's own
scoring (`next_token_logprobs` of the model phi3 loads: the reference backend for the reference, the folder's backend
for an IR or ONNX folder, as `phi3 bench` scores them), or llama.cpp's scores.

Knobs (the part of a configuration after @):
- ov (defaults: the settings phi3 compiled with before KV_CACHE_PRECISION f16 was adopted, which phi3:openvino
  now adds): kv=u8|f16|bf16|u4|k8v4 (KV_CACHE_PRECISION; u4 sets KEY/VALUE_CACHE_PRECISION), dq=N
  (DYNAMIC_QUANTIZATION_GROUP_SIZE), prec=f32|bf16|auto (INFERENCE_PRECISION_HINT, default f32 as phi3 sets),
  attn=sdpa|pa|auto (ATTENTION_BACKEND, default pa as phi3 sets), threads=N (INFERENCE_NUM_THREADS, default
  --threads, 0 = unset), hint=latency|throughput (PERFORMANCE_HINT), pin=0|1 (ENABLE_CPU_PINNING),
  stream=ids|text|none (a token-id StreamerBase, a text callback, or no streamer: figures from PerfMetrics),
  raw=1 (no properties at all: OpenVINO's own defaults), kvgs=N (KEY/VALUE_CACHE_GROUP_SIZE),
  tbb=static|auto (TBB_PARTITIONER), denorm=0|1 (CPU_DENORMALS_OPTIMIZATION), core=any|pcore|ecore
  (SCHEDULING_CORE_TYPE: matters only on hybrid CPUs).
- ort: threads=N (intra_op_num_threads, default --threads), spin=0|1 (session.intra_op.allow_spinning),
  inter=N (inter_op_num_threads).
- llama: flash=0|1 (flash attention; llama-cpp-python turns it off unless asked, llama.cpp's own tools
  default to auto), kv=f16|q8_0 (K and V cache type), batch=N (n_batch), threads=N, repack=0 (no weight
  repacking).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def _figures(prompt_len: int, start: float, stamps: list[float], extra: dict | None = None) -> dict:
    """A reply's timing (seconds since the request, per token), which bench_peers figures as phi3 bench does."""
    return {"prompt_tokens": prompt_len, "times": [t - start for t in stamps], **(extra or {})}


# ------------------------------------------------------------------------------------------ OpenVINO


def ov_properties(knobs: dict, threads: int) -> dict:
    if knobs.get("raw") == "1":
        return {}
    props: dict = {}
    n = int(knobs.get("threads", threads))
    if n:
        props["INFERENCE_NUM_THREADS"] = n
    prec = knobs.get("prec", "f32")
    if prec != "auto":
        props["INFERENCE_PRECISION_HINT"] = prec
    attn = knobs.get("attn", "pa")
    if attn != "auto":
        props["ATTENTION_BACKEND"] = attn.upper()
    kv = knobs.get("kv")
    if kv == "u4":
        props["KEY_CACHE_PRECISION"] = "u4"
        props["VALUE_CACHE_PRECISION"] = "u4"
    elif kv == "k8v4":
        props["KEY_CACHE_PRECISION"] = "u8"
        props["VALUE_CACHE_PRECISION"] = "u4"
    elif kv:
        props["KV_CACHE_PRECISION"] = kv
    if "kvgs" in knobs:
        props["KEY_CACHE_GROUP_SIZE"] = int(knobs["kvgs"])
        props["VALUE_CACHE_GROUP_SIZE"] = int(knobs["kvgs"])
    if "dq" in knobs:
        props["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = int(knobs["dq"])
    if "hint" in knobs:
        props["PERFORMANCE_HINT"] = knobs["hint"].upper()
    if "pin" in knobs:
        props["ENABLE_CPU_PINNING"] = knobs["pin"] == "1"
    if "tbb" in knobs:
        props["TBB_PARTITIONER"] = knobs["tbb"].upper()
    if "core" in knobs:
        props["SCHEDULING_CORE_TYPE"] = {"any": "ANY_CORE", "pcore": "PCORE_ONLY", "ecore": "ECORE_ONLY"}[knobs["core"]]
    if "denorm" in knobs:
        props["CPU_DENORMALS_OPTIMIZATION"] = knobs["denorm"] == "1"
    return props


def run_ov(path: Path, knobs: dict, threads: int, prompts: list[list[int]], gen: int, work: Path) -> dict:
    import numpy as np
    import openvino as ov
    import openvino_genai as ov_genai

    props = ov_properties(knobs, threads)
    props["CACHE_DIR"] = str(work / "ov-cache")  # its own: never the store's, which phi3 runs share
    start = time.perf_counter()
    pipe = ov_genai.LLMPipeline(str(path), "CPU", **props)
    load_s = time.perf_counter() - start
    config = pipe.get_generation_config()
    config.max_new_tokens = gen
    config.min_new_tokens = gen
    config.ignore_eos = True
    config.do_sample = False
    config.apply_chat_template = False
    mode = knobs.get("stream", "ids")
    tokenizer = pipe.get_tokenizer()

    class Stamps(ov_genai.StreamerBase):
        def __init__(self):
            super().__init__()
            self.times: list[float] = []

        def write(self, token):
            now = time.perf_counter()
            self.times.extend([now] * (1 if isinstance(token, int) else len(token)))
            return ov_genai.StreamingStatus.RUNNING

        def end(self):
            pass

    runs = []
    for i, ids in enumerate(prompts):
        inputs = ov.Tensor(np.array([ids], dtype=np.int64))
        stamps: list[float] = []
        t0 = time.perf_counter()
        if mode == "ids":
            streamer = Stamps()
            result = pipe.generate(inputs, config, streamer)
            stamps = streamer.times
        elif mode == "text":

            def on_text(text: str, stamps: list[float] = stamps) -> ov_genai.StreamingStatus:
                stamps.append(time.perf_counter())
                return ov_genai.StreamingStatus.RUNNING

            result = pipe.generate(inputs, config, on_text)
        else:
            result = pipe.generate(inputs, config)
        total = time.perf_counter() - t0
        pm = result.perf_metrics
        perf = {
            "pm_ttft_s": pm.get_ttft().mean / 1000,
            "pm_tpot_ms": pm.get_tpot().mean,
            "pm_tokens": int(pm.get_num_generated_tokens()),
            "wall_s": total,
        }
        if mode == "none" or len(stamps) < 2:  # PerfMetrics' first token, the rest spread evenly to the end
            n, ttft = perf["pm_tokens"], perf["pm_ttft_s"]
            times = [ttft + (total - ttft) * k / max(n - 1, 1) for k in range(n)]
            fig = _figures(len(ids), 0.0, times, perf)
        else:
            fig = _figures(len(ids), t0, stamps, perf)
        if i:  # the first prompt is the warm-up
            runs.append(fig)
    del tokenizer
    return {"load_s": load_s, "runs": runs, "properties": {k: str(v) for k, v in props.items() if k != "CACHE_DIR"}}


# ------------------------------------------------------------------------------------------ ONNX Runtime


def run_ort(path: Path, knobs: dict, threads: int, prompts: list[list[int]], gen: int, work: Path) -> dict:
    import onnxruntime_genai as og

    session: dict = {"intra_op_num_threads": int(knobs.get("threads", threads))}
    if "inter" in knobs:
        session["inter_op_num_threads"] = int(knobs["inter"])
    if "spin" in knobs:
        session["config_entries"] = {"session.intra_op.allow_spinning": knobs["spin"]}
    start = time.perf_counter()
    config = og.Config(str(path))
    config.clear_providers()
    config.overlay(json.dumps({"model": {"decoder": {"session_options": session}}}))
    model = og.Model(config)
    load_s = time.perf_counter() - start
    runs = []
    for i, ids in enumerate(prompts):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + gen, min_length=len(ids) + gen, do_sample=False, batch_size=1)
        generator = og.Generator(model, params)
        stamps = []
        t0 = time.perf_counter()
        generator.append_tokens(ids)
        while not generator.is_done():
            generator.generate_next_token()
            generator.get_next_tokens()
            stamps.append(time.perf_counter())
        del generator
        if i:
            runs.append(_figures(len(ids), t0, stamps))
    return {"load_s": load_s, "runs": runs, "properties": session}


# ------------------------------------------------------------------------------------------ llama.cpp


def run_llama(path: Path, knobs: dict, threads: int, prompts: list[list[int]], gen: int, work: Path) -> dict:
    import llama_cpp

    n_ctx = max(len(p) for p in prompts) + gen + 8
    kwargs: dict = {}
    if "flash" in knobs:
        kwargs["flash_attn"] = knobs["flash"] == "1"
    if "kv" in knobs:
        kind = getattr(llama_cpp, f"GGML_TYPE_{knobs['kv'].upper()}")
        kwargs.update(type_k=kind, type_v=kind)
    if knobs.get("repack") == "0":  # no weight repacking (use_extra_bufts), which Llama() does not expose
        import llama_cpp.llama_cpp as low  # the module Llama() calls

        default_params = low.llama_model_default_params

        def model_params():
            params = default_params()
            params.use_extra_bufts = False
            return params

        low.llama_model_default_params = model_params
    threads = int(knobs.get("threads", threads))
    start = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        n_batch=int(knobs.get("batch", 512)),
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
        **kwargs,
    )
    load_s = time.perf_counter() - start
    runs = []
    for i, ids in enumerate(prompts):
        stamps = []
        t0 = time.perf_counter()
        # generate() evaluates the prompt, then yields one greedy token per step; it never stops by itself
        for n, _token in enumerate(llm.generate(ids, top_k=1, temp=0.0, reset=True), 1):
            stamps.append(time.perf_counter())
            if n >= gen:
                break
        if i:
            runs.append(_figures(len(ids), t0, stamps))
    return {
        "load_s": load_s,
        "runs": runs,
        "properties": {"n_threads": threads, **{k: str(v) for k, v in kwargs.items()}},
    }


# ------------------------------------------------------------------------------------------ phi3


def run_phi3(job: dict) -> dict:
    """phi3's default int4 through phi3's own load and timing path, as `phi3 chat`/`phi3 bench` run it."""
    from phi3cli.backends.base import GenerationSettings
    from phi3cli.generation import generate_text
    from phi3cli.loading import load

    threads = int(job["knobs"].get("threads", job["threads"]))
    start = time.perf_counter()
    model = load(job["model"], backend=job["phi3_backend"], device="cpu", format="int4", threads=threads)
    load_s = time.perf_counter() - start
    if str(model.path) != job["path"]:
        raise SystemExit(f"phi3 loaded {model.path}, not the variant measured for size ({job['path']})")
    settings = GenerationSettings(max_new_tokens=job["gen"], ignore_eos=True)
    replies = [generate_text(model, ids, settings) for ids in job["prompts"]][1:]  # [0]: the warm-up
    runs = [_figures(r.prompt_tokens, 0.0, r.token_times) for r in replies]
    # What the runtime compiled the model with (the KV cache's precision: what bytes per token needs), where it says.
    properties = getattr(model, "compiled_properties", None) or {"intra_op_num_threads": threads}
    model.close()
    return {"load_s": load_s, "runs": runs, "properties": properties}


# ------------------------------------------------------------------------------------------ logits


def run_logits(job: dict) -> dict:
    import numpy as np

    from benchmarks.quant_quality import llama_logits, phi3_logprobs
    from phi3cli.backends import reference_spec
    from phi3cli.util import log_softmax

    path, ids, threads = Path(job["path"]), job["ids"], job["threads"]
    if job["backend"] == "llama":
        logprobs = log_softmax(llama_logits(path, ids, threads)[:-1])
    else:
        backend = reference_spec().name if job["backend"] == "reference" else None
        logprobs = phi3_logprobs(path, ids, threads, {}, backend=backend)
    np.save(job["out"], logprobs)
    return {"shape": list(logprobs.shape)}


RUNNERS = {"ov": run_ov, "ort": run_ort, "llama": run_llama}


def run_build(job: dict) -> dict:
    """Build one configuration's artifact (benchmarks/peer_builds.py), timed on its own: wall seconds, peak RSS."""
    from benchmarks import peer_builds as pb

    start = time.perf_counter()
    path = pb.ensure(pb.parse_config(job["config"]), Path(job["hf_dir"]), Path(job["work"]), job["model"])
    return {"path": str(path), "build_s": time.perf_counter() - start}


def main(job_file: str, result_file: str) -> None:
    job = json.loads(Path(job_file).read_text())
    if job.get("mode") == "build":
        result = run_build(job)
    elif job.get("mode") == "logits":
        result = run_logits(job)
    elif job["runtime"] == "phi3":
        result = run_phi3(job)
    else:
        run = RUNNERS[job["runtime"]]
        result = run(Path(job["path"]), job["knobs"], job["threads"], job["prompts"], job["gen"], Path(job["work"]))
    from phi3cli.bench.measure import peak_rss_bytes  # after the run: its import is not in the peak

    result["peak_rss_mb"] = peak_rss_bytes() / 2**20
    Path(result_file).write_text(json.dumps({"ok": True, **result}))


if __name__ == "__main__":
    main(*sys.argv[1:3])
