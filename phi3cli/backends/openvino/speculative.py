"""Speculative decoding in OpenVINO GenAI: a draft model (`draft_model`) or prompt lookup, on both pipelines.

LLMPipeline (chat, bench) and ContinuousBatchingPipeline (serve) take the same two properties: `draft_model`, a
draft compiled by `openvino_genai.draft_model(folder, device)`, or `prompt_lookup=True`; each request's
GenerationConfig then says how many tokens to propose (num_assistant_tokens) and, for lookup, the longest n-gram
(max_ngram_size). On the NPU OpenVINO GenAI documents the draft kind only (draft on the NPU or the CPU); phi3
compiles the draft for the target's device there, untried (no NPU here).

On the CPU, dynamic quantization of activations quantizes each group across the tokens read together, so a pass
that verifies K+1 tokens rounds differently from K+1 passes of one, and a greedy answer flips at a near-tie
(seen on the demo: the answer changed with both kinds at OpenVINO's default group of 32, with neither at 0). So
speculation turns it off (DYNAMIC_QUANTIZATION_GROUP_SIZE 0) unless the options set it: the contract is the same
greedy answer, and bench compares against the plain model loaded with the same setting.

A speculative pipeline of 2026.4 refuses a request that does not speculate (it checks is_assisting_generation, or
is_prompt_lookup), so a request that turns speculation down proposes one token a step, the least it takes.
"""

from __future__ import annotations

from typing import Any

import openvino_genai as ov_genai

from phi3cli.backends.base import GenerationSettings, LoadRequest
from phi3cli.speculation import SPECULATION, Speculation


def requested(request: LoadRequest) -> Speculation | None:
    return request.options.get(SPECULATION)


EXACT = {"DYNAMIC_QUANTIZATION_GROUP_SIZE": 0}  # see above: what keeps greedy answers equal on the CPU


def pipeline_properties(speculation: Speculation | None, device: str, properties: dict[str, Any]) -> dict:
    """The pipeline properties that turn speculation on (device: OpenVINO's name; the draft is compiled with the
    target's properties, on the same device)."""
    if speculation is None:
        return {}
    exact = {k: v for k, v in EXACT.items() if k not in properties} if device == "CPU" else {}
    if speculation.prompt_lookup:
        return {"prompt_lookup": True, **exact}
    assert speculation.draft_folder is not None, "loading.load prepares the draft's folder"
    # The plugin's compile properties only (ATTENTION_BACKEND and scheduler_config are GenAI's, for the target)
    draft_properties = {k: v for k, v in properties.items() if k.isupper() and k != "ATTENTION_BACKEND"}
    return {"draft_model": ov_genai.draft_model(str(speculation.draft_folder), device, **draft_properties), **exact}


def assist(config, speculation: Speculation | None, settings: GenerationSettings):
    """One request's proposals on its GenerationConfig (one a step when settings turn speculation down)."""
    if speculation is None:
        return config
    config.num_assistant_tokens = speculation.num_assistant_tokens if settings.speculate else 1
    if speculation.prompt_lookup:
        config.max_ngram_size = speculation.max_ngram_size
    return config
