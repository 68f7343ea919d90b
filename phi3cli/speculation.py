"""Speculative decoding: a draft model or n-gram lookup proposes tokens, the model verifies several in one pass.

Greedy answers are the same token for token with and without it (the target model decides every token); what
changes is how many passes of the target a reply takes. `Speculation` is a load-time setting, carried in
LoadRequest.options[SPECULATION]; `GenerationSettings.speculate` turns it down for one request. loading.load
resolves the draft through the same path as any model and checks that both share one vocabulary.

Acceptance is counted from the stream, the same way for both kinds: the tokens a runtime hands over together
came from one pass of the target (RawTokens of one step share their time stamp). Of the K tokens that could be
proposed at each step is the share the target kept: (tokens - steps) / (steps * K). Prompt lookup
proposes nothing where the text has no matching n-gram, so for it this is a lower bound.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from phi3cli.errors import BackendUnavailableError, Phi3Error, UnsupportedModelError

SPECULATION = "speculation"  # the LoadRequest.options key that carries a Speculation
DRAFT, PROMPT_LOOKUP = "draft", "prompt-lookup"  # the kinds a BackendSpec lists in `speculates`
# The load option under which a plain model computes as a speculating one does: activations not quantized per
# group across the tokens read together (a backend that speculates sets it itself; bench loads its baseline so).
SAME_NUMERICS = {"dynamic_quantization_group_size": 0}


@dataclass(frozen=True)
class Speculation:
    """How a model is loaded to decode speculatively: with a draft model, or by prompt lookup."""

    draft: str | None = None  # the draft model as the user named it (anything phi3 can load)
    prompt_lookup: bool = False  # propose the tokens that followed the last n-gram where it appeared before
    num_assistant_tokens: int = 5  # tokens proposed per step of the target
    max_ngram_size: int = 3  # prompt lookup: the longest n-gram matched
    draft_folder: Path | None = None  # the draft's ready folder (set by loading.load)
    draft_format: str | None = None  # the draft's weight format (set by loading.load)

    def __post_init__(self) -> None:
        if self.draft and self.prompt_lookup:
            raise Phi3Error("--draft and --prompt-lookup are two kinds of speculation; choose one.")
        if self.num_assistant_tokens < 1:
            raise Phi3Error(f"--num-assistant-tokens must be at least 1, not {self.num_assistant_tokens}.")
        if self.max_ngram_size < 1:
            raise Phi3Error(f"--max-ngram-size must be at least 1, not {self.max_ngram_size}.")

    @property
    def kind(self) -> str:
        return DRAFT if self.draft else PROMPT_LOOKUP

    def describe(self) -> str:
        if self.draft:
            return f"draft {self.draft}, {self.num_assistant_tokens} tokens a step"
        return f"prompt lookup, {self.num_assistant_tokens} tokens a step, n-grams up to {self.max_ngram_size}"


def requested(
    draft: str | None, prompt_lookup: bool, num_assistant_tokens: int | None, max_ngram_size: int | None
) -> Speculation | None:
    """The Speculation the options ask for, or None (the numbers alone ask for nothing: they are refused)."""
    if not draft and not prompt_lookup:
        if num_assistant_tokens is not None or max_ngram_size is not None:
            raise Phi3Error("--num-assistant-tokens and --max-ngram-size apply with --draft or --prompt-lookup.")
        return None
    numbers = {"num_assistant_tokens": num_assistant_tokens, "max_ngram_size": max_ngram_size}
    return Speculation(draft=draft, prompt_lookup=prompt_lookup, **{k: v for k, v in numbers.items() if v is not None})


def check_backend(spec, speculation: Speculation, device: str) -> None:
    """Refuse, in one line, a backend or device whose runtime has not this kind of speculation (never ignore it)."""
    from phi3cli.backends import registry
    from phi3cli.util import package_versions

    if speculation.kind in spec.speculates and not (speculation.prompt_lookup and device == "npu"):
        return
    flag = "--draft" if speculation.draft else "--prompt-lookup"
    if speculation.kind in spec.speculates:  # prompt lookup on an NPU
        raise BackendUnavailableError(
            f"{flag}: prompt lookup is not documented for the {spec.name} runtime on the NPU (only a draft is).",
            hint="Use --draft MODEL, or --device cpu.",
        )
    runtime = ", ".join(f"{k} {v}" for k, v in package_versions(spec.libraries[:1]).items()) or spec.name
    able = [s.name for s in registry().values() if speculation.kind in s.speculates]
    raise BackendUnavailableError(
        f"{flag}: the {spec.name} backend's runtime ({runtime}) has no speculative decoding of this kind.",
        hint=f"Use --backend {' or '.join(able)}, or leave out {flag}." if able else f"Leave out {flag}.",
    )


def vocabulary(folder: Path) -> dict[str, int] | None:
    """The token → id table of a folder's tokenizer.json (its model's vocabulary and added tokens), or None."""
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    vocab = dict((data.get("model") or {}).get("vocab") or {})
    if isinstance(vocab, list):  # unigram tokenizers list [piece, score] pairs
        vocab = {piece: i for i, (piece, _) in enumerate(vocab)}
    vocab.update({t["content"]: t["id"] for t in data.get("added_tokens") or ()})
    return vocab


def check_vocabularies(target: Path, draft: Path, target_name: str, draft_name: str) -> None:
    """A draft must share the target's tokenizer: the same token for every id. One line naming both otherwise."""
    ours, theirs = vocabulary(target), vocabulary(draft)
    if ours is None or theirs is None:
        missing = target_name if ours is None else draft_name
        raise UnsupportedModelError(
            f"Cannot compare the tokenizers of {target_name} and the draft {draft_name}: {missing} has no "
            "tokenizer.json.",
            hint="Use a draft (and model) whose folder carries its tokenizer.json.",
        )
    if ours == theirs:
        return
    differ = sorted(set(ours.items()) ^ set(theirs.items()), key=lambda item: item[1])
    where = f"first difference at id {differ[0][1]}" if differ else "different tokens"
    raise UnsupportedModelError(
        f"The draft {draft_name} has a vocabulary of {len(theirs)} tokens and {target_name} one of {len(ours)} "
        f"({where}); a draft must share the model's tokenizer.",
        hint="Use a smaller model of the same family (same tokenizer) as the draft, or --prompt-lookup.",
    )


def steps_of(token_times: list[float]) -> int:
    """Passes of the target a reply took: the tokens a runtime hands over together share one time stamp."""
    return len(set(token_times))


def acceptance(generated: int, steps: int, proposed_per_step: int) -> float | None:
    """The share of proposable tokens the target kept: (tokens - steps) / ((steps - 1) * K), the first step being
    the prefill's; None with a single step."""
    if steps < 2 or proposed_per_step < 1:
        return None
    return max(0, generated - steps) / ((steps - 1) * proposed_per_step)
