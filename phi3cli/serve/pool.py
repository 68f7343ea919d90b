"""The models a server offers: loaded on demand, at most max_loaded at once (least recently used unloaded first),
unloaded after keep_alive seconds idle.

Loading runs on a thread, so requests to the models already loaded go on meanwhile; each loaded model has its own
queue (and batch engine). A model leaves the pool at once when unloaded, and is closed once its requests are done.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from starlette.requests import Request

from phi3cli.backends.base import LoadedModel
from phi3cli.errors import NotEnoughMemoryError
from phi3cli.serve.protocol import ApiError
from phi3cli.serve.served import Served

log = logging.getLogger("phi3.serve")
FOREVER = -1.0
REAP_EVERY_S = 1.0


def parse_keep_alive(value) -> float | None:
    """Ollama's keep_alive: seconds (a number) or a duration ("30s", "5m", "1h"); negative keeps the model loaded."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and value.strip():
        text = value.strip()
        unit = {"s": 1, "m": 60, "h": 3600}.get(text[-1].lower())
        try:
            return float(text[:-1]) * unit if unit else float(text)
        except ValueError:
            pass
    raise ApiError(
        f"'keep_alive' must be seconds or a duration such as '30s', '5m', '1h'; got {value!r}.", param="keep_alive"
    )


def store_variant(name: str) -> str | None:
    """The folder of the one ready variant of the model store whose id starts with name (`phi3 models list`), or None.

    Only ids: a client never makes the server open a path it names.
    """
    from phi3cli.errors import Phi3Error
    from phi3cli.inventory import StoreInventory
    from phi3cli.store import ModelStore

    if not (len(name) >= 4 and name.isalnum()):
        return None
    try:
        found = StoreInventory(ModelStore()).find_entries(name)
    except Phi3Error:
        return None
    ready = [e for e in found if e.kind == "variant" and e.status == "ok"]
    return str(ready[0].path) if len(ready) == 1 == len(found) else None


class ModelPool:
    """The models on offer (ids in order: the first is the default), and the loaded ones in least-recent order."""

    def __init__(
        self,
        names: list[str],
        loader: Callable[[str], LoadedModel] | None = None,
        max_loaded: int | None = None,
        keep_alive: float = FOREVER,
        find: Callable[[str], str | None] | None = None,
    ):
        self.names = list(dict.fromkeys(names))
        self.loader, self.max_loaded, self.keep_alive = loader, max_loaded, keep_alive
        self.find = find  # what a name not offered loads from (a store variant's folder), or None
        self.specs: dict[str, str] = {}  # names found so, and what the loader is given for them
        self.loaded: OrderedDict[str, Served] = OrderedDict()
        self.on_load: Callable[[Served], None] | None = None  # metrics hook
        self._loading: dict[str, asyncio.Lock] = {}
        self._reaper: asyncio.Task | None = None
        self.stopping = False

    def add(self, name: str, model: LoadedModel, load_seconds: float = 0.0, memory_bytes: int | None = None) -> Served:
        """Put a model loaded elsewhere in the pool (the one `phi3 serve` loads at start)."""
        ctx = Served.of(model, name)
        ctx.loaded_at, ctx.load_seconds, ctx.memory_bytes = time.time(), load_seconds, memory_bytes
        ctx.keep_alive = self.keep_alive
        if name not in self.names:
            self.names.append(name)
        self.loaded[name] = ctx
        if self.on_load:
            self.on_load(ctx)
        return ctx

    @property
    def default(self) -> str:
        return self.names[0]

    async def get(self, name: str | None, keep_alive: float | None = None) -> Served:
        """The loaded model named (the default when None), loading it first if it is not; 404 if not on offer."""
        name = self.default if name is None else name
        if isinstance(name, str) and name not in self.names and self.find and self.loader:
            if spec := await asyncio.to_thread(self.find, name):
                self.specs[name] = spec
                self.names.append(name)
        if not isinstance(name, str) or name not in self.names:
            also = " or a variant of the model store by its id (phi3 models list)" if self.find else ""
            raise ApiError(
                f"The model {name!r} does not exist; this server offers {', '.join(map(repr, self.names))}{also} "
                "(see GET /v1/models).",
                status=404,
                param="model",
                code="model_not_found",
            )
        if name not in self.loaded:
            async with self._loading.setdefault(name, asyncio.Lock()):
                if name not in self.loaded:
                    await self._load(name)
        ctx = self.loaded[name]
        self.loaded.move_to_end(name)
        ctx.last_used = time.monotonic()
        if keep_alive is not None:
            ctx.keep_alive = keep_alive
        return ctx

    async def _load(self, name: str) -> None:
        if self.loader is None or self.stopping:
            raise ApiError(f"The model {name!r} is not loaded.", status=503, code=None, type="server_error")
        for closing in self._make_room():  # before loading, so memory holds at most max_loaded models
            await asyncio.to_thread(closing.join)
        log.info(f"loading {name} (asked for by a request)")
        try:
            model, seconds, grown = await self._load_making_room(name)
        except Exception as exc:
            message = getattr(exc, "message", None) or f"{exc.__class__.__name__}: {exc}"
            short = isinstance(exc, NotEnoughMemoryError)  # unloading the other models would not make room
            raise ApiError(f"The model {name!r} could not be loaded: {message}", status=503 if short else 500,
                           code=None, type="server_error") from None  # fmt: skip
        ctx = self.add(name, model, seconds, grown)
        ctx.jobs.start()
        log.info(f"loaded {name} in {seconds:.1f} s · {model.backend} {model.format} on {model.executed_device}")

    async def _load_making_room(self, name: str) -> tuple[LoadedModel, float, int]:
        """Load name (the model, the load's seconds and the resident memory it added); while the load's memory check
        refuses it, unload the least recently used model (once its requests are done, so new ones wait) and try
        again, as Ollama makes room. Where even unloading every model (by the memory each took to load) would not
        make room, it fails at once, unloading none."""
        import psutil

        process = psutil.Process()
        while True:
            before, start = process.memory_info().rss, time.perf_counter()
            try:
                model = await asyncio.to_thread(self.loader, self.specs.get(name, name))
                return model, time.perf_counter() - start, max(0, process.memory_info().rss - before)
            except NotEnoughMemoryError as exc:
                held = [ctx.memory_bytes for ctx in self.loaded.values()]
                if not held or (None not in held and exc.needed > exc.available + sum(held)):
                    raise
                closing = self.unload(next(iter(self.loaded)), f"to make room in memory for {name}")
                if closing is not None:
                    await asyncio.to_thread(closing.join)

    def _make_room(self) -> list[threading.Thread]:
        closing = []
        while self.max_loaded is not None and len(self.loaded) >= self.max_loaded:
            name = next(iter(self.loaded))  # the least recently used
            closing.append(self.unload(name, "to make room (--max-loaded)"))
        return closing

    def unload(self, name: str, why: str) -> threading.Thread | None:
        """Take a model out of the pool now; close it on a thread (returned) once its requests are done."""
        ctx = self.loaded.pop(name, None)
        if ctx is None:
            return None
        log.info(f"unloading {name} {why}")

        def close() -> None:
            while ctx.jobs.running or ctx.jobs.waiting:
                time.sleep(0.05)
            ctx.jobs.close()
            ctx.model.close()

        thread = threading.Thread(target=close, name=f"phi3-unload-{name}", daemon=True)
        thread.start()
        return thread

    def reap(self) -> None:
        """Unload the models idle for longer than their keep_alive."""
        now = time.monotonic()
        for name, ctx in list(self.loaded.items()):
            idle = not (ctx.jobs.running or ctx.jobs.waiting)
            if ctx.keep_alive >= 0 and idle and now - ctx.last_used >= ctx.keep_alive:
                self.unload(name, f"after {ctx.keep_alive:g} s idle (keep_alive)")

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(REAP_EVERY_S)
            self.reap()

    def start(self) -> None:
        for ctx in self.loaded.values():
            ctx.jobs.start()
        self._reaper = asyncio.get_running_loop().create_task(self._reap_forever())

    def close(self) -> None:
        self.stopping = True
        if self._reaper:
            self._reaper.cancel()
        for ctx in self.loaded.values():
            ctx.jobs.close()

    def close_models(self) -> None:
        """Close every loaded model (the server has stopped)."""
        for ctx in self.loaded.values():
            ctx.model.close()

    def cancel_all(self) -> None:
        """Cancel what every model is running and has waiting (the server is stopping); does not block."""
        self.stopping = True
        for ctx in list(self.loaded.values()):
            ctx.jobs.cancel_all()

    def healthy(self) -> bool:
        return all(ctx.jobs.healthy() for ctx in list(self.loaded.values()))

    def cards(self) -> list[dict]:
        """/v1/models: every model on offer, with what is loaded, where, since when and the memory it took."""
        cards = []
        for name in self.names:
            ctx = self.loaded.get(name)
            if ctx is None:
                cards.append({"id": name, "object": "model", "created": 0, "owned_by": "phi3", "loaded": False})
            else:
                cards.append(ctx.card())
        return cards


async def served(request: Request, body: dict | None = None) -> Served:
    """The loaded model a request names (body's model, else the server's first), loaded first if need be."""
    body = body or {}
    return await request.app.state.pool.get(body.get("model"), parse_keep_alive(body.get("keep_alive")))
