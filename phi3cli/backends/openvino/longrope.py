"""LongRoPE traced into the OpenVINO IR: short factors up to the original window, long factors beyond it.

transformers picks Phi-3's LongRoPE factors in Python (`if seq_len > original_max_position_embeddings`), so a
traced export keeps only the branch its dummy inputs took: the short factors. optimum-intel 1.27 accepts that
and the IR of a 128k model goes wrong past 4096 tokens. While exporting, this puts the choice into the graph
(torch.where on the largest position), as transformers makes it, so the IR is right over the whole window.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

LONGROPE_TYPES = ("longrope", "su")  # "su" is the name Phi-3's first 128k checkpoints used


def uses_longrope(config: dict) -> bool:
    """Whether a config.json asks for LongRoPE (Phi-3-mini-128k, Phi-3-medium-128k, Phi-3.5-mini, Phi-4-mini)."""
    scaling = config.get("rope_scaling") or {}
    return isinstance(scaling, dict) and scaling.get("type", scaling.get("rope_type")) in LONGROPE_TYPES


def _with_long_inv_freq(init):
    """Phi3RotaryEmbedding.__init__ that also computes the long factors' frequencies (a constant when traced)."""

    def __init__(self, config, device=None):
        init(self, config, device)
        self.long_inv_freq = None
        if self.rope_type in LONGROPE_TYPES:
            original = int(config.original_max_position_embeddings)
            self.long_inv_freq, _ = self.rope_init_fn(config, device, seq_len=original + 1)

    return __init__


def _longrope_forward(self, x, position_ids):
    """Phi3RotaryEmbedding.forward with the short/long choice as a graph operation."""
    import torch

    original = int(self.config.original_max_position_embeddings)
    with torch.no_grad():
        seq_len = torch.max(position_ids) + 1
        inv_freq = torch.where(
            seq_len > original, self.long_inv_freq.to(x.device), self.original_inv_freq.to(x.device)
        ).float()
        inv_freq_expanded = inv_freq[None, :, None].expand(position_ids.shape[0], -1, 1)
        freqs = (inv_freq_expanded @ position_ids[:, None, :].float()).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


@contextlib.contextmanager
def longrope_in_graph(config: dict) -> Iterator[None]:
    """While exporting a LongRoPE Phi-3, trace both factor sets and the choice between them."""
    if not uses_longrope(config):
        yield
        return
    from transformers.models.phi3 import modeling_phi3

    rotary = modeling_phi3.Phi3RotaryEmbedding
    original_init, original_forward = rotary.__init__, rotary.forward
    rotary.__init__, rotary.forward = _with_long_inv_freq(original_init), _longrope_forward
    try:
        yield
    finally:
        rotary.__init__, rotary.forward = original_init, original_forward
