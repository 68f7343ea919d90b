"""The sampling controls `phi3 chat` takes beyond temperature and top-p (the server's names, as flags)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from phi3cli.backends.base import GenerationSettings, LoadedModel

PANEL = "Sampling"
FLAGS = {
    "repetition_penalty": "--repeat-penalty",
    "presence_penalty": "--presence-penalty",
    "frequency_penalty": "--frequency-penalty",
    "min_p": "--min-p",
}

RepeatPenaltyOpt = Annotated[
    float,
    typer.Option(
        "--repeat-penalty",
        min=0.01,
        max=10.0,
        help="Above 1 makes tokens already in the conversation less likely (greedy answers too).",
        rich_help_panel=PANEL,
    ),
]
FrequencyPenaltyOpt = Annotated[
    float,
    typer.Option(
        "--frequency-penalty",
        min=-2.0,
        max=2.0,
        help="Subtracted from a token's logit per time the reply already has it (OpenAI's).",
        rich_help_panel=PANEL,
    ),
]
PresencePenaltyOpt = Annotated[
    float,
    typer.Option(
        "--presence-penalty",
        min=-2.0,
        max=2.0,
        help="Subtracted once from the logit of every token the reply already has (OpenAI's).",
        rich_help_panel=PANEL,
    ),
]
MinPOpt = Annotated[
    float,
    typer.Option(
        "--min-p",
        min=0.0,
        max=1.0,
        help="When sampling, drop tokens less likely than MIN_P times the likeliest.",
        rich_help_panel=PANEL,
    ),
]


def apply_sampling(
    settings: GenerationSettings, loaded: LoadedModel, repeat: float, presence: float, frequency: float, min_p: float
) -> None:
    """Put the controls asked into settings (else keep a resumed session's); refuse what the backend cannot apply."""
    from phi3cli.backends.sampling import SamplingControls, require

    sampling = SamplingControls(repeat, presence, frequency, min_p)
    if sampling.asked():
        settings.sampling = sampling
    require(loaded, settings.sampling, FLAGS)
