"""Penalties, min_p, logit_bias and log-probabilities on the server: checked, refused where the runtime cannot, answered."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from phi3cli.backends.base import LoadedModel
from phi3cli.backends.sampling import MAX_TOP_LOGPROBS, SamplingControls, refusal
from phi3cli.serve.protocol import ApiError, GenerationRequest

MAX_REPETITION_PENALTY = 10.0


def parse_sampling(body: dict, request: GenerationRequest) -> None:
    """The penalties, min_p, logit_bias and logprobs of a body, checked into the request (ranges only)."""
    controls = SamplingControls(
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.0, MAX_REPETITION_PENALTY, open_low=True),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        min_p=_number(body, "min_p", 0.0, 0.0, 1.0),
        logit_bias=_logit_bias(body.get("logit_bias")),
    )
    request.settings = replace(request.settings, sampling=controls)
    request.logprobs = _logprobs(body, request.kind)


def check_sampling(request: GenerationRequest, model: LoadedModel) -> None:
    """A 400 naming the field and the backend for what this model's runtime cannot do; token ids in its vocabulary."""
    if found := refusal(model, request.settings.sampling):
        name, why = found
        raise ApiError(f"This server cannot honour '{name}': {why}.", param=name, code="unsupported_value")
    if request.logprobs is not None and not scores_tokens(model):
        raise ApiError(
            f"This server cannot return 'logprobs': the {model.backend} backend cannot score tokens.",
            param="logprobs",
            code="unsupported_value",
        )
    vocab = model.vocab_size
    for token, _ in request.settings.sampling.logit_bias:
        if vocab is not None and token >= vocab:
            raise ApiError(
                f"logit_bias names token id {token}, outside this model's vocabulary (0 to {vocab - 1}).",
                param="logit_bias",
            )


def logprobs_body(kind: str, scored: list[dict] | None) -> dict | None:
    """choice.logprobs in OpenAI's form: chat's `content` list, or the completions API's parallel lists."""
    if scored is None:
        return None
    if kind == "chat":
        return {
            "content": [
                {
                    **_token(t["token"], t["logprob"]),
                    "top_logprobs": [_token(text, logprob) for _, text, logprob in t["top"]],
                }
                for t in scored
            ],
            "refusal": None,
        }
    offsets, at = [], 0
    for t in scored:
        offsets.append(at)
        at += len(t["token"])
    return {
        "tokens": [t["token"] for t in scored],
        "token_logprobs": [t["logprob"] for t in scored],
        "top_logprobs": [{text: logprob for _, text, logprob in t["top"]} for t in scored],
        "text_offset": offsets,
    }


def _token(text: str, logprob: float) -> dict:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def _number(body: dict, name: str, default: float, low: float, high: float, open_low: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    fits = isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high
    if not fits or (open_low and value == low):
        span = f"above {low:g} and at most {high:g}" if open_low else f"from {low:g} to {high:g}"
        raise ApiError(f"'{name}' must be a number {span}; got {value!r}.", param=name)
    return float(value)


def _logit_bias(value: Any) -> tuple[tuple[int, float], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise ApiError(
            "'logit_bias' must be an object mapping token ids to biases from -100 to 100.", param="logit_bias"
        )
    bias = []
    for key, amount in value.items():
        if not (isinstance(key, str) and key.isdigit()):
            raise ApiError(f"logit_bias key {key!r} is not a token id (a non-negative integer).", param="logit_bias")
        number = isinstance(amount, (int, float)) and not isinstance(amount, bool)
        if not number or not -100 <= amount <= 100:
            raise ApiError(
                f"logit_bias[{key!r}] must be a number from -100 to 100; got {amount!r}.", param="logit_bias"
            )
        bias.append((int(key), float(amount)))
    return tuple(sorted(bias))


def _logprobs(body: dict, kind: str) -> int | None:
    """How many alternatives to list per token, or None for no log-probabilities."""
    value, top = body.get("logprobs"), body.get("top_logprobs")
    if kind == "chat":
        if value is not None and not isinstance(value, bool):
            raise ApiError(f"'logprobs' must be true or false; got {value!r}.", param="logprobs")
        if top is not None:
            if not _count(top):
                raise ApiError(
                    f"'top_logprobs' must be an integer from 0 to {MAX_TOP_LOGPROBS}; got {top!r}.",
                    param="top_logprobs",
                )
            if not value:
                raise ApiError("'top_logprobs' needs 'logprobs': true.", param="top_logprobs")
        return (top or 0) if value else None
    if value is None:
        return None
    if not _count(value):
        raise ApiError(f"'logprobs' must be an integer from 0 to {MAX_TOP_LOGPROBS}; got {value!r}.", param="logprobs")
    return value


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_TOP_LOGPROBS


def scores_tokens(model: LoadedModel) -> bool:
    """Whether the model can give log-probabilities (its backend implements next_token_logprobs)."""
    return type(model).next_token_logprobs is not LoadedModel.next_token_logprobs


def reply_logprobs(model: LoadedModel, prompt_ids: list[int], reply_ids: list[int], top: int) -> list[dict]:
    """For each reply token: its id, text and log-probability, and the `top` likeliest alternatives (teacher-forced)."""
    import numpy as np

    if not reply_ids:
        return []
    ids = list(prompt_ids) + list(reply_ids)
    rows = model.next_token_logprobs(ids)[len(prompt_ids) - 1 :]
    out = []
    for row, token in zip(rows, reply_ids, strict=True):
        best = np.argsort(row)[::-1][:top] if top else []
        out.append(
            {
                "id": int(token),
                "token": model.decode([int(token)]),
                "logprob": float(row[token]),
                "top": [(int(i), model.decode([int(i)]), float(row[i])) for i in best],
            }
        )
    return out
