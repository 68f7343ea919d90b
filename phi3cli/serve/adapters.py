"""Run-time LoRA adapters in `phi3 serve`: a request picks one by its model name, MODEL:ADAPTER.

MODEL alone is the base model. A model loaded with adapters runs one request at a time (the runtime's continuous
batching does not take them), so each request's adapter is set on it in the worker, just before its generate.
"""

from __future__ import annotations

from typing import Any

from phi3cli.backends.adapters import model_adapters
from phi3cli.serve.protocol import ApiError


def pick_adapter(body: dict, loaded: list) -> tuple[dict, dict[str, float] | None]:
    """The body with MODEL:ADAPTER read back to MODEL, and the adapter it asks for (None: the base model).

    loaded: the models being served (each with .name and .model); only one loaded with adapters takes a suffix.
    """
    name = body.get("model")
    if not isinstance(name, str):
        return body, None
    for served in loaded:
        adapters = model_adapters(served.model)
        if adapters is None or not name.startswith(served.name + ":"):
            continue
        adapter = name[len(served.name) + 1 :]
        if adapter not in adapters.loaded:
            served_ids = ", ".join([served.name, *(f"{served.name}:{a}" for a in adapters.loaded)])
            raise ApiError(
                f"The model {name!r} does not exist; this server runs {served_ids} (see GET /health).",
                status=404,
                param="model",
                code="model_not_found",
            )
        return {**body, "model": served.name}, {adapter: adapters.loaded[adapter].alpha}
    return body, None


def use_adapter(model: Any, choice: dict[str, float] | None) -> None:
    """Apply a request's adapter on the model (None: the base), in the worker thread, right before its generate."""
    if (adapters := model_adapters(model)) is not None:
        adapters.use(choice or {})


def adapters_health(model: Any, served: str) -> dict:
    """What /health says about adapters: the model ids that pick each, and that requests run one at a time."""
    adapters = model_adapters(model)
    if adapters is None:
        return {}
    return {
        "adapters": {
            "models": {f"{served}:{name}": a.alpha for name, a in adapters.loaded.items()},
            "mixed_in_a_batch": adapters.per_request,
            "note": "one request at a time: each request's adapter is set on the model before it generates",
        }
    }
