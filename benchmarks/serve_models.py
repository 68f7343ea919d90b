"""The memory of one and of two models loaded in one `phi3 serve`, and the time to load the second on demand.

Usage: python -m benchmarks.serve_models MODEL_A MODEL_B [serve options...]
Starts `phi3 serve --model MODEL_A --model MODEL_B`, reads the server's resident memory once MODEL_A is loaded,
asks MODEL_B one question (the client's wall time includes loading it), then reads the memory again.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request

import openai
import psutil


def main() -> None:
    if len(sys.argv) < 3 or sys.argv[1] in ("-h", "--help"):
        raise SystemExit(__doc__)
    first, second, *options = sys.argv[1:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "phi3cli", "serve", "--model", first, "--model", second, "--port", str(port)]
    server = subprocess.Popen([*command, *options], stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                urllib.request.urlopen(base + "/health", timeout=5)
                break
            except OSError:
                assert server.poll() is None, "the server exited"
                time.sleep(0.5)
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=600)
        question = [{"role": "user", "content": "What is the capital of France?"}]
        client.chat.completions.create(model=first, messages=question, max_tokens=8)
        one = psutil.Process(server.pid).memory_info().rss
        start = time.perf_counter()
        client.chat.completions.create(model=second, messages=question, max_tokens=8)
        on_demand = time.perf_counter() - start
        two = psutil.Process(server.pid).memory_info().rss
        cards = {m.id: m.model_extra["phi3"] for m in client.models.list().data}
        print(f"one model loaded: {one / 2**20:,.0f} MiB resident")
        print(f"two models loaded: {two / 2**20:,.0f} MiB resident (+{(two - one) / 2**20:,.0f} MiB)")
        print(f"first request to {second}: {on_demand:.2f} s (load, warm-up and 8 tokens)")
        for name, card in cards.items():
            print(
                f"  {name}: {card['backend']} {card['format']}, load {card['load_seconds']} s, "
                f"memory_bytes {card['memory_bytes'] / 2**20:,.0f} MiB"
            )
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
