"""Load test for `phi3 serve`: throughput, requests/s and latency at several numbers of concurrent clients.

Starts `phi3 serve` on a free loopback port (or uses --url), then for each concurrency level sends a
fixed number of streamed chat requests with the official OpenAI client. Every request asks a
different question (runtimes that reuse a cached prompt would otherwise flatter the figures) and
generates exactly --max-tokens tokens (ignore_eos), so the levels do the same work.

    python -m benchmarks.load_serve --model demo --backend openvino --format int4

With --ray it serves through Ray Serve instead: --replicas copies on a local cluster of --ray-nodes nodes
(Ray's own cluster utilities, on 127.0.0.1), or on an existing cluster with --ray-address. --kill-replica then
runs one more round in which a replica is killed while every slot is streaming, and reports which requests
were lost and how long Ray took to bring the replica back.

    python -m benchmarks.load_serve --backend openvino --format int4 --ray --replicas 2 --kill-replica
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
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
    ok: bool = True
    started: bool = True  # the first chunk arrived (a failed request may have started streaming)


@dataclass
class Level:
    clients: int
    requests: int
    failed: int
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
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)] if ordered else float("nan")


def ask(client: openai.OpenAI, model: str, index: int, max_tokens: int, on_start=None) -> Sample:
    question = f"Question {index}: write a short paragraph about {TOPICS[index % len(TOPICS)]}."
    start = time.perf_counter()
    first = None
    started = False
    usage = extra = None
    try:
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
            if not started:
                started = True
                if on_start:
                    on_start()
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - start
            if chunk.usage:
                usage, extra = chunk.usage, chunk.model_extra.get("phi3", {})
    except openai.OpenAIError:
        pass
    latency = time.perf_counter() - start
    if usage is None:  # failed, or the stream broke off
        return Sample(latency, first or latency, 0, 0.0, 0.0, ok=False, started=started)
    return Sample(latency, first or latency, usage.completion_tokens, extra["queue_ms"], extra["decode_tokens_per_s"])


def run_level(base: str, key: str, model: str, clients: int, requests: int, max_tokens: int, first: int):
    """Send requests from this many clients at once; the samples and the wall-clock time they took."""
    client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=600)
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        samples = list(pool.map(lambda i: ask(client, model, first + i, max_tokens), range(requests), timeout=3600))
    return samples, time.perf_counter() - start


def summarise(clients: int, samples: list[Sample], wall: float) -> Level:
    good = [s for s in samples if s.ok]
    latencies = [s.latency_s for s in good]
    ttfts = [s.ttft_s for s in good]
    return Level(
        clients=clients,
        requests=len(samples),
        failed=len(samples) - len(good),
        wall_s=wall,
        requests_per_s=len(good) / wall,
        latency_p50_s=percentile(latencies, 50),
        latency_p95_s=percentile(latencies, 95),
        ttft_p50_s=percentile(ttfts, 50),
        ttft_p95_s=percentile(ttfts, 95),
        queue_p50_ms=percentile([s.queue_ms for s in good], 50),
        output_tokens_per_s=sum(s.tokens for s in good) / wall,
        decode_tokens_per_s=statistics.median(s.decode_tps for s in good) if good else 0.0,
    )


def replica_pids() -> set[int]:
    """Ray Serve replica processes on this machine (their process title names them)."""
    import psutil

    pids = set()
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if cmdline and cmdline[0].startswith("ray::ServeReplica"):
            pids.add(process.pid)
    return pids


def fault_round(base: str, key: str, model: str, clients: int, requests: int, max_tokens: int, slots: int) -> dict:
    """Kill one replica once `slots` requests stream (the rest wait in Ray's router); see who is lost."""
    client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=600)
    before = replica_pids()
    streaming, lock, count = threading.Event(), threading.Lock(), [0]

    def started():
        with lock:
            count[0] += 1
            if count[0] >= slots:
                streaming.set()

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(ask, client, model, 50_000 + i, max_tokens, started) for i in range(requests)]
        streaming.wait(600)
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        killed_at = time.perf_counter()
        samples = [f.result() for f in futures]
    back = None
    while time.perf_counter() - killed_at < 300:
        now = replica_pids()
        if len(now) >= len(before) and victim not in now:
            back = time.perf_counter() - killed_at
            break
        time.sleep(0.5)
    return {
        "requests": requests,
        "answered": sum(s.ok for s in samples),
        "broke_mid_stream": sum(not s.ok and s.started for s in samples),
        "lost_before_streaming": sum(not s.ok and not s.started for s in samples),
        "killed_after_s": round(killed_at - start, 2),
        "replica_back_after_s": None if back is None else round(back, 1),
    }


def start_server(args, key: str, log, extra: list[str]) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "phi3cli", "serve", "--model", args.model, "--port", str(port), "--api-key", key]
    for flag in ("backend", "format", "device"):
        if getattr(args, flag):
            command += [f"--{flag}", getattr(args, flag)]
    command += extra + shlex.split(args.serve_args)
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


def local_cluster(nodes: int):
    """A Ray cluster of `nodes` nodes on 127.0.0.1, the machine's CPUs shared out between them."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # Ray otherwise turns 127.0.0.1 into the network address
    from ray.cluster_utils import Cluster

    cpus = max(1, (os.cpu_count() or 1) // nodes)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": cpus, "node_ip_address": "127.0.0.1"})
    for _ in range(nodes - 1):
        cluster.add_node(num_cpus=cpus, node_ip_address="127.0.0.1")
    return cluster


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--backend")
    parser.add_argument("--format")
    parser.add_argument("--device")
    parser.add_argument("--serve-args", default="", help="More `phi3 serve` options, e.g. '--threads 2'.")
    parser.add_argument("--max-sequences", type=int, default=8, help="phi3 serve --max-sequences.")
    parser.add_argument("--url", help="Use a server already running at this address (http://HOST:PORT).")
    parser.add_argument("--api-key", default=os.environ.get("PHI3_API_KEY", "load-test"))
    parser.add_argument("--concurrency", default="1,4,8", help="Comma-separated numbers of clients.")
    parser.add_argument("--requests", type=int, default=16, help="Requests per level (over all rounds).")
    parser.add_argument("--rounds", type=int, default=2, help="Run the levels in turn this many times.")
    parser.add_argument("--max-tokens", type=int, default=32, help="Tokens generated per request.")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--start-timeout", type=float, default=600)
    parser.add_argument("--ray", action="store_true", help="Serve through Ray Serve (phi3 serve --ray).")
    parser.add_argument("--replicas", type=int, default=2, help="With --ray: replicas.")
    parser.add_argument("--ray-nodes", type=int, default=2, help="With --ray: nodes of the local cluster.")
    parser.add_argument("--ray-address", help="With --ray: use this existing cluster instead of a local one.")
    parser.add_argument("--kill-replica", action="store_true", help="With --ray: a last round that kills a replica.")
    parser.add_argument("--json", help="Also write the figures to this file.")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    process = cluster = None
    fault = None
    log = tempfile.NamedTemporaryFile("w", prefix="phi3-serve-", suffix=".log", delete=False)  # noqa: SIM115
    try:
        extra = ["--max-sequences", str(args.max_sequences)]
        if args.ray:
            address = args.ray_address
            if address is None:
                cluster = local_cluster(args.ray_nodes)
                address = cluster.address
            extra += ["--ray", "--ray-address", address, "--replicas", str(args.replicas)]
        if args.url:
            base = args.url.rstrip("/").removesuffix("/v1")
        else:
            process, base = start_server(args, args.api_key, log, extra)
        client = openai.OpenAI(base_url=base + "/v1", api_key=args.api_key, max_retries=0, timeout=600)
        card = client.models.list().data[0]
        info = card.model_extra.get("phi3", {})
        with urllib.request.urlopen(
            urllib.request.Request(base + "/health", headers={"Authorization": f"Bearer {args.api_key}"})
        ) as answer:
            batching = json.load(answer).get("batching", {})
        mode = f"Ray Serve, {args.replicas} replicas" if args.ray else "one server"
        print(
            f"{card.id} · {info.get('backend')} {info.get('format')} on {info.get('executed_device')} · {mode} · "
            f"{batching.get('mode', '?')} (up to {batching.get('max_sequences', '?')} at once) · "
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
        if args.ray and args.kill_replica:
            slots = args.replicas * args.max_sequences  # all streaming, and more clients waiting in Ray's router
            fault = fault_round(
                base, args.api_key, card.id, slots + max(2, slots // 2), 3 * slots, args.max_tokens, slots
            )
    finally:
        if process:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
        if cluster:
            cluster.shutdown()
        log.close()
    os.unlink(log.name)  # kept (and named above) only when something failed
    report(results, fault)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": card.id, "server": info, "batching": batching, "levels": [asdict(r) for r in results],
                       "fault": fault}, f, indent=2)  # fmt: skip


def report(results: list, fault: dict | None) -> None:
    """The table per number of clients, the scaling against one client, and the fault round if any."""
    print("| clients | requests | failed | requests/s | latency p50 | latency p95 | TTFT p50 | TTFT p95 | "
          "queued p50 | output tok/s (all) | decode tok/s (each) |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(
            f"| {r.clients} | {r.requests} | {r.failed} | {r.requests_per_s:.2f} | {r.latency_p50_s:.2f} s | "
            f"{r.latency_p95_s:.2f} s | {r.ttft_p50_s * 1000:.0f} ms | {r.ttft_p95_s * 1000:.0f} ms | "
            f"{r.queue_p50_ms:.0f} ms | {r.output_tokens_per_s:.1f} | {r.decode_tokens_per_s:.1f} |"
        )
    one = next((r for r in results if r.clients == 1), None)
    if one and one.output_tokens_per_s:
        ratios = ", ".join(f"{r.clients} clients {r.output_tokens_per_s / one.output_tokens_per_s:.1f}x"
                           for r in results if r.clients != 1)  # fmt: skip
        print(f"\nOutput tokens/s against one client: {ratios}.")
    if fault:
        print(
            f"\nKilled a replica {fault['killed_after_s']} s into {fault['requests']} requests: "
            f"{fault['answered']} answered, {fault['broke_mid_stream']} broke off mid-stream, "
            f"{fault['lost_before_streaming']} lost before streaming; the replica was back after "
            f"{fault['replica_back_after_s']} s."
        )


if __name__ == "__main__":
    main()
