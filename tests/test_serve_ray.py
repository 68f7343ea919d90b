"""`phi3 serve --ray`: a real two-node Ray cluster on 127.0.0.1 (Ray's own cluster utilities), two replicas of the
openvino demo, the official OpenAI client through Ray Serve's proxy, and a replica killed mid-run.

One cluster and one deployment for the module: Ray takes a while to start.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from tests.test_serve import KEY, QUESTIONS, Server, free_port, streamed_text

REPLICAS = 2
PER_REPLICA = 2  # --max-sequences: what each replica runs at once; Ray's router holds the rest


def test_ray_without_the_extra_names_it():
    code = (
        "import sys; sys.modules['ray'] = None; sys.argv = ['phi3', 'serve', '--ray']; "
        "from phi3cli.cli import main; main()"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "pip install 'phi3cli[ray]'" in done.stderr


def test_a_wrong_option_fails_before_anything_is_deployed():
    from tests.conftest import run_phi3

    done = run_phi3("serve", "--ray", "--backend", "openvino", "-o", "bogus=1", env={"COLUMNS": "250"})
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "The openvino backend has no option bogus" in done.stderr and "Deploying" not in done.stderr


@pytest.fixture(scope="module")
def cluster():
    pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    # Every node (and the phi3 driver, which inherits the variable) on the loopback address: Ray otherwise
    # resolves 127.0.0.1 to the machine's network address.
    saved = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1"})
    try:
        nodes.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        yield nodes
    finally:
        nodes.shutdown()
        if saved is None:
            os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
        else:
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = saved


@pytest.fixture(scope="module")
def server(cluster, demo_source, tmp_path_factory):
    srv = Server(free_port(), tmp_path_factory.mktemp("serve-ray") / "server.log")
    srv.start("--api-key", KEY, "--format", "int4", "--ray", "--ray-address", cluster.address,
              "--replicas", str(REPLICAS), "--max-sequences", str(PER_REPLICA), backend="openvino")  # fmt: skip
    srv.ready(lambda: srv.wait_for_log("Ray Serve replica(s)", timeout=300))
    yield srv
    srv.stop()
    assert srv.process.returncode == 0, srv.log()[-5000:]


def replica_processes() -> list:
    import psutil

    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if cmdline and cmdline[0].startswith("ray::ServeReplica"):
            found.append(process)
    return found


def answering_pids(server, expected: set[int], tries: int = 5) -> set[int]:
    """The replicas that answer /health while eight streams keep them busy (until all of expected answered).

    Ray's router prefers the replica beside its proxy while it has room, so it takes a busy moment (and, by
    chance, a few of them) to see every replica answer.
    """
    pids: set[int] = set()
    done = threading.Event()

    def poll():
        while not done.is_set() and not expected <= pids:
            status, body = server.raw("GET", "/health")
            if status == 200:
                pids.add(body["pid"])

    for _ in range(tries):
        done.clear()
        with ThreadPoolExecutor(12) as pool:
            pollers = [pool.submit(poll) for _ in range(4)]
            streams = [pool.submit(ask, server, QUESTIONS[i % 2], 48) for i in range(8)]
            for f in streams:
                f.result(timeout=300)
            done.set()
            for f in pollers:
                f.result(timeout=300)
        if expected <= pids:
            break
    return pids


def ask(server, question: str, max_tokens: int) -> str:
    stream = server.client(timeout=300).chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": question}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
    )
    return streamed_text(stream)[0]


@pytest.mark.slow
def test_two_replicas_serve_chat_completions(server):
    replicas = {p.pid for p in replica_processes()}
    assert len(replicas) == REPLICAS
    assert answering_pids(server, replicas) == replicas
    # Both replicas load the same model the same way: the same greedy answer wherever a request lands.
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: ask(server, QUESTIONS[i % 2], 24), range(8), timeout=300))
    assert len(set(answers[0::2])) == 1 and len(set(answers[1::2])) == 1 and answers[0] != answers[1]


@dataclass
class Outcome:
    started: bool = False  # the first chunk arrived
    completed: bool = False
    error: str = ""


@pytest.mark.slow
def test_killing_a_replica_loses_no_request_that_had_not_started(server):
    """Every replica slot streaming and the other requests waiting in Ray's router; then one replica dies.

    Only the victim's own streams may break off; what waited goes to the live replica (and to the new one).
    """
    slots = REPLICAS * PER_REPLICA
    started, lock, streaming = [0], threading.Lock(), threading.Event()

    def run(i: int) -> Outcome:
        outcome = Outcome()
        try:
            stream = server.client(timeout=300).chat.completions.create(
                model="demo",
                messages=[{"role": "user", "content": f"Tell me a story about the sea, number {i}."}],
                max_tokens=48,
                temperature=0,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            tokens = 0
            for chunk in stream:
                if not outcome.started:
                    outcome.started = True
                    with lock:
                        started[0] += 1
                        if started[0] >= slots:
                            streaming.set()
                if chunk.usage:
                    tokens = chunk.usage.completion_tokens
            outcome.completed = tokens == 48
        except Exception as exc:  # the stream of a killed replica breaks off
            outcome.error = f"{type(exc).__name__}: {exc}"
        return outcome

    before = replica_processes()
    assert len(before) == REPLICAS
    with ThreadPoolExecutor(8) as pool:  # 8 clients and 4 slots: 4 requests wait in Ray's router at any time
        futures = [pool.submit(run, i) for i in range(16)]
        assert streaming.wait(120)
        victim = before[0]
        victim.kill()
        outcomes = [f.result(timeout=600) for f in futures]
    lost = [o for o in outcomes if not o.completed and not o.started]
    assert not lost, lost
    assert all(o.completed or o.started for o in outcomes)
    assert sum(o.completed for o in outcomes) >= len(outcomes) - PER_REPLICA  # at most the victim's own streams
    # Ray replaces the replica by itself, and the new one answers.
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        alive = {p.pid for p in replica_processes()}
        if len(alive) == REPLICAS and victim.pid not in alive:
            break
        time.sleep(1)
    assert len(alive) == REPLICAS and victim.pid not in alive, alive
    assert answering_pids(server, alive, tries=20) == alive  # the new replica answers too (Ray routes to it)


@pytest.mark.slow
def test_a_vision_replica_takes_images_under_the_servers_image_options(tiny_multimodal_onnx, tmp_path):
    """A Ray replica serves images as the plain server does, with the server's --max-image-pixels (a local Ray
    instance that phi3 starts itself, one replica of the tiny Phi-4-multimodal ONNX folder)."""
    import openai

    from tests.conftest import png
    from tests.test_vision import ask as ask_with_image
    from tests.test_vision import data_url

    pytest.importorskip("ray")
    srv = Server(free_port(), tmp_path / "server.log")
    srv.start("--api-key", KEY, "--ray", "--max-image-pixels", "5000", backend="onnx", model=tiny_multimodal_onnx)
    srv.ready(lambda: srv.wait_for_log("Ray Serve replica(s)", timeout=300))
    try:
        client = srv.client()
        small = ask_with_image(client, data_url(png(1, size=(40, 60)))).choices[0].message.content
        assert small and small != ask_with_image(client, data_url(png(2, size=(40, 60)))).choices[0].message.content
        with pytest.raises(openai.BadRequestError, match="over the limit of 5,000 pixels"):
            ask_with_image(client, data_url(png(1)))  # 90x60: over the limit this server was given
    finally:
        srv.stop()
    assert srv.process.returncode == 0, srv.log()[-5000:]
