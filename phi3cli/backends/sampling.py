"""Sampling controls beyond temperature/top-p/top-k, and which of them a loaded model's runtime acts on.

A LoadedModel lists the SamplingControls fields its generate() honours in `sampling_controls`; asking one it does
not is refused (`refusal`), never silently ignored. Log-probabilities are read by teacher forcing
(LoadedModel.next_token_logprobs over the prompt and the reply), so they exist wherever a backend scores tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Protocol

from phi3cli.errors import Phi3Error


class LoadedModel(Protocol):
    """What these checks read of a phi3cli.backends.base.LoadedModel (which imports this module)."""

    backend: str
    sampling_controls: frozenset[str]


MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingControls:
    """Penalties and biases on the next token's logits; the defaults change nothing."""

    repetition_penalty: float = 1.0  # > 1 divides the logit of every token already in prompt or reply (CTRL's)
    presence_penalty: float = 0.0  # subtracted once from each token already generated (OpenAI's, -2..2)
    frequency_penalty: float = 0.0  # subtracted per occurrence of each token already generated (OpenAI's, -2..2)
    min_p: float = 0.0  # drop tokens less likely than min_p times the likeliest one (when sampling)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit), OpenAI's -100..100

    def asked(self) -> list[str]:
        """The fields set to something other than their no-op default."""
        default = SamplingControls()
        return [f.name for f in fields(self) if getattr(self, f.name) != getattr(default, f.name)]


def refusal(model: LoadedModel, controls: SamplingControls) -> tuple[str, str] | None:
    """(field, why) for the first control this model's runtime cannot act on, or None."""
    for name in controls.asked():
        if name not in model.sampling_controls:
            able = ", ".join(sorted(model.sampling_controls)) or "none of them"
            return name, f"the {model.backend} backend cannot apply {name} (it applies: {able})"
    return None


class SamplingUnsupportedError(Phi3Error):
    """A sampling control the loaded model's runtime cannot act on."""


def require(model: LoadedModel, controls: SamplingControls, flags: dict[str, str]) -> None:
    """Raise SamplingUnsupportedError naming the option (flags: field -> how the user spelt it) and the backend."""
    if found := refusal(model, controls):
        name, why = found
        raise SamplingUnsupportedError(
            f"{flags.get(name, name)}: {why}.", hint="Leave it out, or choose a backend that applies it (--backend)."
        )
