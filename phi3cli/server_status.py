"""What a running `phi3 serve` has loaded, asked over HTTP (for `phi3 ps`); the standard library only."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass

from phi3cli.errors import Phi3Error


class ServerUnreachableError(Phi3Error):
    """No phi3 server answered at the address, or it refused the request."""


@dataclass
class ServedModel:
    """One model a server offers, as its /v1/models says."""

    id: str
    loaded: bool
    backend: str = ""
    format: str = ""
    device: str = ""
    since: int | None = None
    memory_bytes: int | None = None
    keep_alive_s: float | None = None
    running: int = 0
    waiting: int = 0


def served_models(url: str, api_key: str | None = None, timeout: float = 10.0) -> list[ServedModel]:
    """GET URL/v1/models of a running `phi3 serve`."""
    request = urllib.request.Request(url.rstrip("/").removesuffix("/v1") + "/v1/models")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            cards = json.loads(answer.read())["data"]
    except urllib.error.HTTPError as exc:
        hint = "Pass --api-key (or set PHI3_API_KEY)." if exc.code == 401 else None
        raise ServerUnreachableError(f"The server at {url} answered {exc.code} {exc.reason}.", hint=hint) from None
    except (urllib.error.URLError, OSError, ValueError, KeyError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ServerUnreachableError(
            f"No phi3 server answers at {url}: {reason}.", hint="Start one with `phi3 serve`, or pass --url."
        ) from None
    models = []
    for card in cards:
        info = card.get("phi3") or {}
        models.append(
            ServedModel(
                id=card["id"],
                loaded=bool(card.get("loaded", True)),
                backend=info.get("backend", ""),
                format=info.get("format", ""),
                device=info.get("executed_device", ""),
                since=info.get("loaded_since"),
                memory_bytes=info.get("memory_bytes"),
                keep_alive_s=info.get("keep_alive_s"),
                running=info.get("running", 0),
                waiting=info.get("waiting", 0),
            )
        )
    return models
