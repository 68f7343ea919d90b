"""LoRA adapters applied at run time: what a LoadRequest asks for, and what a loaded model offers to switch them.

The core reads and checks each adapter against the base (phi3cli.adapters) and hands the backend RuntimeAdapters
under LoadRequest.options[ADAPTERS]. A backend that applies adapters at run time has a method
``adapter_refusal(request) -> str | None`` (None: it can, on that device and format) and gives the model it loads an
``adapters`` attribute, an AdapterSet; a backend without the method refuses them, and the user merges instead
(`phi3 convert --adapter`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phi3cli.errors import Phi3Error

ADAPTERS = "adapters"  # the LoadRequest.options key: a tuple of RuntimeAdapter, read at load
PREFIX = "base_model.model."  # PEFT's key prefix, kept in the normalised file (OpenVINO GenAI matches on it)
ALPHA_RANGE = (0.0, 4.0)  # the multiplier on the adapter's own scale; beyond 4 a LoRA trained at 1 gives noise
MERGE_HINT = "Merge it into a converted copy instead: phi3 convert MODEL --adapter DIR (then run that copy)."


class AdapterError(Phi3Error):
    """An adapter folder that is missing, malformed, or does not fit the base model, or an alpha out of range."""


def check_alpha(alpha: float, what: str) -> float:
    """Refuse an alpha outside ALPHA_RANGE (or not a number) in one line."""
    low, high = ALPHA_RANGE
    if not (isinstance(alpha, int | float) and math.isfinite(alpha) and low <= alpha <= high):
        raise AdapterError(f"{what}: alpha must be from {low:g} to {high:g}, not {alpha}.")
    return float(alpha)


@dataclass(frozen=True)
class RuntimeAdapter:
    """One adapter for a runtime: its name, the normalised file (fused Phi-3 LoRAs, scale in B) and its alpha."""

    name: str
    file: Path
    alpha: float
    modules: tuple[str, ...]  # the weights it changes: model.layers.N.self_attn.qkv_proj, ...


def adapter_refusal(backend: Any, request: Any) -> str | None:
    """Why backend cannot apply adapters at run time for request (None: it can)."""
    ask = getattr(backend, "adapter_refusal", None)
    if ask is None:
        return f"the {backend.name} backend applies no adapters at run time"
    return ask(request)


class AdapterSet:
    """The adapters a model loaded (each once), and which of them the next generate applies, at what alpha.

    A backend subclasses it to turn the active set into its runtime's form (runtime_config).
    """

    def __init__(self, loaded: list[RuntimeAdapter]):
        self.loaded = {a.name: a for a in loaded}
        self.active: dict[str, float] = {a.name: a.alpha for a in loaded}
        self.mixes = True  # several adapters apply at once (summed)
        self.per_request = False  # a batch may run different adapters per sequence

    def use(self, choice: Mapping[str, float]) -> None:
        """Apply exactly these adapters (name -> alpha) from the next generate on; {} is the base model."""
        for name, alpha in choice.items():
            if name not in self.loaded:
                raise Phi3Error(
                    f"No adapter named {name!r} is loaded (loaded: {', '.join(self.loaded) or 'none'}).",
                    hint="Adapters are loaded with the model: --adapter DIR[:ALPHA].",
                )
            check_alpha(alpha, f"adapter {name}")
        if len(choice) > 1 and not self.mixes:
            raise Phi3Error("This runtime applies one adapter at a time.")
        self.active = dict(choice)

    def command(self, arg: str) -> str:
        """/adapter in a chat: '' lists; 'none' is the base; 'NAME[:ALPHA] ...' applies exactly those. Says what is on."""
        words = arg.split()
        if not words:
            listed = ", ".join(f"{n}{' (on)' if n in self.active else ''}" for n in self.loaded)
            return f"Loaded adapters: {listed}. Active: {self.describe()}. /adapter NAME[:ALPHA] ... or /adapter none."
        choice: dict[str, float] = {}
        for word in [] if words == ["none"] else words:
            name, _, alpha = word.partition(":")
            known = self.loaded.get(name)
            try:
                choice[name] = float(alpha) if alpha else self.active.get(name, known.alpha if known else 1.0)
            except ValueError:
                raise Phi3Error(f"/adapter {word}: {alpha!r} is not an alpha (a number).") from None
        self.use(choice)
        return f"Adapters: {self.describe()}."

    def describe(self) -> str:
        """The active adapters, as the /model line and /health show them."""
        if not self.active:
            return "none"
        return ", ".join(f"{n}" + (f" (alpha {a:g})" if a != 1 else "") for n, a in self.active.items())

    def runtime_config(self) -> Any:
        """The active set in the runtime's form."""
        raise NotImplementedError


def model_adapters(model: Any) -> AdapterSet | None:
    """The adapters a loaded model can switch, or None (loaded without, or a runtime that has none)."""
    return getattr(model, "adapters", None)


def adapters_note(model: Any) -> str:
    """What the /model line adds: ' · adapters: ...' for a model loaded with adapters, else nothing."""
    adapters = model_adapters(model)
    return f" · adapters: {adapters.describe()}" if adapters else ""


def adapter_command(model: Any, arg: str) -> str:
    """The reply to /adapter ARG in a chat (AdapterSet.command), or why there is nothing to switch."""
    adapters = model_adapters(model)
    if adapters is None:
        return "No adapters loaded: start the chat with --adapter DIR (OpenVINO) to switch them here."
    return adapters.command(arg)
