"""`phi3 serve`'s core: a loaded model behind an OpenAI-compatible HTTP API (Starlette on uvicorn).

Imported only by the serve command, so the rest of phi3 never needs the `serve` extra.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import sys

from phi3cli.backends.base import GenerationSettings, LoadedModel
from phi3cli.errors import Phi3Error
from phi3cli.generation import generate_text

try:
    import starlette  # noqa: F401
    import uvicorn
except ImportError as exc:  # pragma: no cover - depends on the install
    raise Phi3Error(
        f"phi3 serve needs the serve extra ({exc.name} is not installed).",
        hint="pip install 'phi3cli[serve]'",
    ) from None

from phi3cli.serve.app import create_app  # noqa: E402
from phi3cli.serve.pool import ModelPool  # noqa: E402

__all__ = ["ModelPool", "bind", "create_app", "describe", "is_loopback", "run", "warm_up"]


class ServeError(Phi3Error):
    """The server cannot start: the address is taken or cannot be bound."""


def warm_up(model: LoadedModel) -> None:
    """One short generation, so the first client does not pay for the runtime's first-call compilation."""
    ids = model.encode(model.chat_template.render([{"role": "user", "content": "Hello"}]))
    generate_text(model, ids, GenerationSettings(max_new_tokens=2))


def describe(model: LoadedModel) -> str:
    """How the server runs requests on this model, in one line for the start-up message."""
    engine = model.batch_engine()
    if engine is None:
        return model.serial_reason
    info = engine.describe()
    parts = [f"continuous batching of up to {info['max_sequences']} requests"]
    if "kv_cache_tokens" in info:
        parts.append(f"KV cache {info['kv_cache_tokens']:,} tokens ({info['kv_cache_bytes'] / 2**30:.2f} GiB)")
    if "prefix_caching" in info:
        parts.append(f"prefix caching {'on' if info['prefix_caching'] else 'off'}")
    if "threads" in info:
        threads = info["threads"]
        same = (
            "greedy answers do not change with load"
            if info.get("greedy_invariant")
            else ("greedy answers may change with load (one thread keeps them the same)")
        )
        parts.append(f"{threads} CPU thread{'s' if threads > 1 else ''}: {same}")
    return " · ".join(parts)


def is_loopback(host: str) -> bool:
    """Whether host is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0 picks a free one), or a ServeError saying why not."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise ServeError(f"Cannot resolve the host {host!r}: {exc.strerror}.", hint="Check --host.") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ServeError(f"Port {port} on {host} is already in use.", hint="Choose another with --port.") from None
        raise ServeError(f"Cannot listen on {host}:{port}: {exc.strerror}.", hint="Check --host and --port.") from None
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


class _Server(uvicorn.Server):
    """uvicorn's server, which on Ctrl-C or SIGTERM first stops the generations so open streams end at once."""

    def __init__(self, config: uvicorn.Config, on_exit):
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig, frame) -> None:
        self._on_exit()
        super().handle_exit(sig, frame)


def run(app, sock: socket.socket) -> None:
    """Serve app on the bound socket until Ctrl-C or SIGTERM; requests are logged to stderr, one line each."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log = logging.getLogger("phi3.serve")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    try:
        _Server(config, on_exit=app.state.jobs.cancel_all).run(sockets=[sock])
    finally:
        log.removeHandler(handler)
        sock.close()
