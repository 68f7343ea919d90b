"""Several models on one `phi3 serve`: loaded on demand, least recently used unloaded first, idle ones unloaded.

The bookkeeping runs on FAKE scripted models (their loader is the test's); two real models (the demo at int4 and
at int8) run in a `phi3 serve` subprocess (slow), with `phi3 ps` asking it.
"""

from __future__ import annotations

import threading
import time

import openai
import psutil
import pytest

from phi3cli.serve.pool import ModelPool
from tests.conftest import run_phi3
from tests.fakes.scripted_model import FakeScriptedModel
from tests.test_serve import KEY, Server, free_port
from tests.test_serve_protocol import CONTEXT, InProcessServer


class Loader:
    """Makes a FAKE model per name; a name in `held` waits for its event before its load ends."""

    def __init__(self):
        self.made: dict[str, FakeScriptedModel] = {}
        self.held: dict[str, threading.Event] = {}

    def __call__(self, name: str) -> FakeScriptedModel:
        if name in self.held:
            assert self.held[name].wait(60)
        model = FakeScriptedModel(context_length=CONTEXT, default=lambda prompt, name=name: f"I am {name}.")
        self.made[name] = model
        return model


@pytest.fixture
def loader():
    return Loader()


def serve(tmp_path, loader, **pool_kwargs) -> InProcessServer:
    pool = ModelPool(["demo", "second", "third"], loader, **pool_kwargs)
    srv = InProcessServer(loader("demo"), tmp_path / "server.log", pool=pool)
    srv.start()
    srv.ready()
    return srv


def ask(server, model: str, **kwargs) -> str:
    answer = server.client().chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Who are you?"}], **kwargs
    )
    return answer.choices[0].message.content


def loaded(server) -> dict[str, bool]:
    return {m.id: m.model_extra["loaded"] for m in server.client().models.list().data}


def wait_until(check, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not reached in time"
        time.sleep(0.05)


def test_models_load_on_demand_and_the_least_recently_used_is_unloaded(tmp_path, loader):
    server = serve(tmp_path, loader, max_loaded=2)
    try:
        assert loaded(server) == {"demo": True, "second": False, "third": False}
        assert ask(server, "second") == "I am second."
        assert ask(server, "demo") == "I am demo."  # demo is now the most recently used
        assert ask(server, "third") == "I am third."
        assert loaded(server) == {"demo": True, "second": False, "third": True}
        wait_until(lambda: loader.made["second"].closed)
        assert not loader.made["demo"].closed
        card = next(m for m in server.client().models.list().data if m.id == "third").model_extra["phi3"]
        assert card["backend"] == "fake" and card["executed_device"] == "CPU" and card["loaded_since"] > 0
        assert card["memory_bytes"] is not None and card["load_seconds"] >= 0
        assert ask(server, "second") == "I am second."  # loaded again
        server.wait_for_log("unloading second to make room (--max-loaded)")
    finally:
        server.stop()


def test_an_unknown_model_is_a_404_naming_those_offered(tmp_path, loader):
    server = serve(tmp_path, loader)
    try:
        with pytest.raises(openai.NotFoundError) as caught:
            ask(server, "gpt-4o")
        assert "'demo', 'second', 'third'" in caught.value.body["message"]
        assert caught.value.body["param"] == "model"
    finally:
        server.stop()


def test_loading_does_not_block_requests_to_loaded_models(tmp_path, loader):
    loader.held["second"] = threading.Event()
    server = serve(tmp_path, loader)
    try:
        answers = {}
        waiting = threading.Thread(target=lambda: answers.setdefault("second", ask(server, "second")))
        waiting.start()
        server.wait_for_log("loading second")
        assert ask(server, "demo") == "I am demo."  # answered while second is still loading
        assert "second" not in answers
        loader.held["second"].set()
        waiting.join(60)
        assert answers["second"] == "I am second."
    finally:
        server.stop()


def test_keep_alive_unloads_an_idle_model(tmp_path, loader):
    server = serve(tmp_path, loader, keep_alive=3600)
    try:
        assert ask(server, "second", extra_body={"keep_alive": 0}) == "I am second."
        wait_until(lambda: not loaded(server)["second"])
        server.wait_for_log("unloading second after 0 s idle (keep_alive)")
        assert loaded(server)["demo"]  # the server's own keep-alive (an hour) keeps it
        with pytest.raises(openai.BadRequestError, match="keep_alive"):
            ask(server, "demo", extra_body={"keep_alive": "soon"})
    finally:
        server.stop()


class TightLoader(Loader):
    """As Loader, but memory holds `room` FAKE models at once: past that, the load is refused as phi3's memory check
    refuses it (NotEnoughMemoryError), before anything is made, its need unknown (0). `huge` never fits: it needs
    9 GB where 1 GB is available, more than the FAKE models loaded could free."""

    def __init__(self, room: int):
        super().__init__()
        self.room = room

    def __call__(self, name: str) -> FakeScriptedModel:
        from phi3cli.errors import NotEnoughMemoryError

        open_now = sum(not m.closed for m in self.made.values())
        if name == "huge":
            message = "Loading huge on cpu (fake, int4) needs about 9.0 GB of memory (its weights); 1.0 GB is available"
            raise NotEnoughMemoryError(message, needed=9_000_000_000, available=1_000_000_000)
        if open_now >= self.room:
            raise NotEnoughMemoryError(f"Loading {name} on cpu (fake, int4) needs more memory than is available")
        return super().__call__(name)


def test_a_model_that_does_not_fit_unloads_the_least_recently_used_first(tmp_path):
    """No --max-loaded: the memory check decides. As Ollama does, the least recently used model is unloaded to
    make room, and the load tried again; a model that would not fit even with every model unloaded is a 503 naming
    why, and unloads none."""
    loader = TightLoader(room=2)
    pool = ModelPool(["demo", "second", "third", "huge"], loader)
    server = InProcessServer(loader("demo"), tmp_path / "server.log", pool=pool)
    server.start()
    server.ready()
    try:
        assert ask(server, "second") == "I am second."  # two fit
        assert ask(server, "second") == "I am second."  # demo is now the least recently used
        assert ask(server, "third") == "I am third."
        server.wait_for_log("unloading demo to make room in memory for third")
        assert loader.made["demo"].closed and not loader.made["second"].closed
        assert loaded(server) == {"demo": False, "second": True, "third": True, "huge": False}
        with pytest.raises(openai.InternalServerError) as caught:
            ask(server, "huge")
        assert caught.value.status_code == 503
        assert "'huge' could not be loaded: Loading huge on cpu" in caught.value.body["message"]
        assert "needs about 9.0 GB of memory" in caught.value.body["message"]
        assert loaded(server) == {"demo": False, "second": True, "third": True, "huge": False}  # none unloaded
        assert ask(server, "demo") == "I am demo."  # and the server goes on, making room again
        server.wait_for_log("unloading second to make room in memory for demo")
    finally:
        server.stop()


def test_a_store_variant_named_by_its_id_loads_on_demand(tmp_path, loader):
    def find(name: str) -> str | None:  # what phi3cli.serve.pool.store_variant does with the model store
        return f"variants/{name}-folder" if name == "abcd1234" else None

    pool = ModelPool(["demo"], loader, find=find)
    server = InProcessServer(loader("demo"), tmp_path / "server.log", pool=pool)
    server.start()
    server.ready()
    try:
        assert ask(server, "abcd1234") == "I am variants/abcd1234-folder."
        assert loaded(server) == {"demo": True, "abcd1234": True}
        with pytest.raises(openai.NotFoundError, match="a variant of the model store by its id"):
            ask(server, "abcd9999")
    finally:
        server.stop()


@pytest.mark.slow
def test_two_real_models_with_an_lru_unload_and_phi3_ps(demo_source, tmp_path):
    from phi3cli.loading import prepare

    int8 = str(prepare("demo", backend="openvino", format="int8").folder)
    server = Server(free_port(), tmp_path / "server.log")
    server.start("--model", int8, "--max-loaded", "1", "--api-key", KEY, backend="openvino")
    server.ready()
    try:
        client = server.client()
        first = client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=8
        )
        assert first.model == "demo" and first.model_extra["phi3"]["format"] == "int4"
        cards = {m.id: m.model_extra for m in client.models.list().data}
        assert cards["demo"]["loaded"] and not cards[int8]["loaded"]
        resident = psutil.Process(server.process.pid).memory_info().rss
        second = client.chat.completions.create(
            model=int8, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=8
        )
        assert second.model_extra["phi3"]["format"] == "int8"
        cards = {m.id: m.model_extra for m in client.models.list().data}
        assert cards[int8]["loaded"] and not cards["demo"]["loaded"]  # --max-loaded 1: demo made room
        assert cards[int8]["phi3"]["memory_bytes"] > 0
        # and the memory it held went back: the process holds about the int8 model, not both (it kept the demo's
        # compiled model and KV-cache pool before: the batching engine outlived its close)
        swapped = psutil.Process(server.process.pid).memory_info().rss
        assert swapped < resident + cards[int8]["phi3"]["memory_bytes"] / 2, (resident, swapped, cards[int8])
        server.wait_for_log("unloading demo to make room (--max-loaded)")
        shown = run_phi3("ps", "--url", server.base, "--api-key", KEY)
        assert shown.returncode == 0, shown.stderr
        assert "openvino int8" in shown.stdout and "demo" in shown.stdout and "no" in shown.stdout
    finally:
        server.stop()
