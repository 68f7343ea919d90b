"""Load test for `phi3 serve`: requests/s and latency at several numbers of concurrent clients.

Starts `phi3 serve` on a free loopback port (or uses --url), then for each concurrency level sends a
fixed number of streamed chat requests with the official OpenAI client. Every request asks a
different question (runtimes that reuse a cached prompt would otherwise flatter the figures) and
generates exactly --max-tokens tokens (ignore_eos), so the levels do the same work.

    .venv/bin/python scripts/load_serve.py --model demo --backend openvino --format int4
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import openai

TOPICS = ["the sea", "mountains", "bees", "the moon", "rivers", "forests", "trains", "winter", "bread", "music"]


@dataclass
class Sample:
    latency_s: float  # request sent to the last chunk
    ttft_s: float  # request sent to the first text
    tokens: int  # completion tokens (the server's usage figure)
    queue_ms: float  # the server's wait before generating
    decode_tps: float  # the server's decode rate for this request


@dataclass
class Level:
    clients: int
    requests: int
    wall_s: float
    requests_per_s: float
    latency_p50_s: float
    latency_p95_s: float
    ttft_p50_s: float
    ttft_p95_s: float
    queue_p50_ms: float
    output_tokens_per_s: float  # all clients together
    decode_tokens_per_s: float  # the runtime's rate per request (median)


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def ask(client: openai.OpenAI, model: str, index: int, max_tokens: int) -> Sample:
    question = f"Question {index}: write a short paragraph about {TOPICS[index % len(TOPICS)]}."
    start = time.perf_counter()
    first = None
    usage = extra = None
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - start
        if chunk.usage:
            usage, extra = chunk.usage, chunk.model_extra.get("phi3", {})
    latency = time.perf_counter() - start
    if usage is None:
        raise RuntimeError("the stream ended without a usage chunk")
    return Sample(latency, first or latency, usage.completion_tokens, extra["queue_ms"], extra["decode_tokens_per_s"])


def run_level(base: str, key: str, model: str, clients: int, requests: int, max_tokens: int, first: int):
    """Send requests from this many clients at once; the samples and the wall-clock time they took."""
    client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=600)
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        samples = list(pool.map(lambda i: ask(client, model, first + i, max_tokens), range(requests), timeout=3600))
    return samples, time.perf_counter() - start


def summarise(clients: int, samples: list[Sample], wall: float) -> Level:
    requests = len(samples)
    latencies = [s.latency_s for s in samples]
    ttfts = [s.ttft_s for s in samples]
    return Level(
        clients=clients,
        requests=requests,
        wall_s=wall,
        requests_per_s=requests / wall,
        latency_p50_s=percentile(latencies, 50),
        latency_p95_s=percentile(latencies, 95),
        ttft_p50_s=percentile(ttfts, 50),
        ttft_p95_s=percentile(ttfts, 95),
        queue_p50_ms=percentile([s.queue_ms for s in samples], 50),
        output_tokens_per_s=sum(s.tokens for s in samples) / wall,
        decode_tokens_per_s=statistics.median(s.decode_tps for s in samples),
    )


def start_server(args, key: str, log) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "phi3cli", "serve", "--model", args.model, "--port", str(port), "--api-key", key]
    for flag in ("backend", "format", "device"):
        if getattr(args, flag):
            command += [f"--{flag}", getattr(args, flag)]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.start_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"phi3 serve exited with {process.returncode}; its log is {log.name}")
        try:
            request = urllib.request.Request(base + "/health", headers={"Authorization": f"Bearer {key}"})
            with urllib.request.urlopen(request, timeout=5) as answer:
                if answer.status == 200:
                    return process, base
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise SystemExit(f"phi3 serve did not answer within {args.start_timeout} s; its log is {log.name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--backend")
    parser.add_argument("--format")
    parser.add_argument("--device")
    parser.add_argument("--url", help="Use a server already running at this address (http://HOST:PORT).")
    parser.add_argument("--api-key", default=os.environ.get("PHI3_API_KEY", "load-test"))
    parser.add_argument("--concurrency", default="1,4,8", help="Comma-separated numbers of clients.")
    parser.add_argument("--requests", type=int, default=16, help="Requests per level (over all rounds).")
    parser.add_argument("--rounds", type=int, default=2, help="Run the levels in turn this many times.")
    parser.add_argument("--max-tokens", type=int, default=32, help="Tokens generated per request.")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--start-timeout", type=float, default=600)
    parser.add_argument("--json", help="Also write the figures to this file.")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    process = None
    log = tempfile.NamedTemporaryFile("w", prefix="phi3-serve-", suffix=".log", delete=False)  # noqa: SIM115
    try:
        if args.url:
            base = args.url.rstrip("/").removesuffix("/v1")
        else:
            process, base = start_server(args, args.api_key, log)
        client = openai.OpenAI(base_url=base + "/v1", api_key=args.api_key, max_retries=0, timeout=600)
        card = client.models.list().data[0]
        info = card.model_extra.get("phi3", {})
        print(
            f"{card.id} · {info.get('backend')} {info.get('format')} on {info.get('executed_device')} · "
            f"{args.requests} requests per level · {args.max_tokens} tokens each",
            file=sys.stderr,
        )
        for i in range(args.warmup):
            ask(client, card.id, 10_000 + i, args.max_tokens)
        # Levels take turns, round after round, so a machine whose speed drifts affects them alike.
        runs: dict[int, tuple[list[Sample], float]] = {c: ([], 0.0) for c in levels}
        per_round = math.ceil(args.requests / args.rounds)
        for r in range(args.rounds):
            for n, clients in enumerate(levels):
                first = (r * len(levels) + n) * 1000
                samples, wall = run_level(base, args.api_key, card.id, clients, per_round, args.max_tokens, first)
                runs[clients] = (runs[clients][0] + samples, runs[clients][1] + wall)
                print(f"  round {r + 1}: {clients} clients, {per_round} requests in {wall:.1f} s", file=sys.stderr)
        results = [summarise(c, *runs[c]) for c in levels]
    finally:
        if process:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        log.close()
    os.unlink(log.name)  # kept (and named above) only when something failed

    print("| clients | requests | requests/s | latency p50 | latency p95 | TTFT p50 | TTFT p95 | queued p50 | "
          "output tok/s (all) | decode tok/s (each) |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(
            f"| {r.clients} | {r.requests} | {r.requests_per_s:.2f} | {r.latency_p50_s:.2f} s | "
            f"{r.latency_p95_s:.2f} s | {r.ttft_p50_s * 1000:.0f} ms | {r.ttft_p95_s * 1000:.0f} ms | "
            f"{r.queue_p50_ms:.0f} ms | {r.output_tokens_per_s:.1f} | {r.decode_tokens_per_s:.1f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": card.id, "server": info, "levels": [asdict(r) for r in results]}, f, indent=2)


if __name__ == "__main__":
    main()
