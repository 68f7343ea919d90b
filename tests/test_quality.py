"""Teacher-forced quality on the real demo model: KL divergence and top-1 agreement against torch fp32."""

from __future__ import annotations

import numpy as np
import pytest

from phi3cli.backends import get_backend
from phi3cli.backends.base import ConvertRecipe
from phi3cli.bench.quality import (
    kl_per_position,
    load_reference,
    next_token_divergence,
    perplexity_text,
    reference_path,
    save_reference,
)
from phi3cli.convert import ensure_variant, quantize
from phi3cli.loading import load
from phi3cli.routing import given
from phi3cli.sources import resolve_source
from phi3cli.util import log_softmax

pytest.importorskip("openvino_genai")


@pytest.fixture(scope="module")
def text_ids(torch_model):
    return torch_model.encode(perplexity_text())


@pytest.fixture(scope="module")
def reference(torch_model, text_ids):
    return torch_model.next_token_logprobs(text_ids)


def _scores(folder, store, ids) -> np.ndarray:
    model = load(resolve_source(str(folder), store), route=given("openvino", "cpu"), store=store)
    try:
        return model.next_token_logprobs(ids)
    finally:
        model.close()


@pytest.mark.slow
def test_divergence_of_a_model_with_itself_is_zero(reference, text_ids):
    assert reference.shape[0] == len(text_ids) - 1
    assert np.allclose(np.exp(reference).sum(axis=-1), 1.0, atol=1e-4)
    assert next_token_divergence(reference, reference) == (0.0, 1.0)


def test_divergence_math_on_known_distributions():
    ref = log_softmax(np.log([[0.5, 0.5], [0.9, 0.1]]))
    cand = log_softmax(np.log([[0.5, 0.5], [0.1, 0.9]]))
    expected = 0.9 * np.log(9) + 0.1 * np.log(1 / 9)  # KL of the second row; the first is 0
    assert np.allclose(kl_per_position(ref, cand), [0.0, expected], atol=1e-6)
    kld, top1 = next_token_divergence(ref, cand)
    assert kld == pytest.approx(expected / 2, abs=1e-6) and top1 == 0.5  # row 1 ties: argmax is the first
    padded = log_softmax(np.concatenate([np.log([[0.5, 0.5], [0.1, 0.9]]), np.full((2, 3), -1e4)], axis=1))
    assert next_token_divergence(ref, padded) == pytest.approx((expected / 2, 0.5), abs=1e-6)  # padded rows cut
    with pytest.raises(ValueError, match="same positions"):
        next_token_divergence(ref, cand[:1])


@pytest.mark.slow
def test_int4_diverges_less_than_a_deliberately_worse_recipe(reference, text_ids, demo_source, store, tmp_path):
    backend = get_backend("openvino")
    default = ensure_variant(backend, demo_source, ConvertRecipe(format="int4"), store)
    fp16 = ensure_variant(backend, demo_source, ConvertRecipe(format="fp16"), store)
    worse = tmp_path / "channel-wise"  # one scale per output channel, every layer int4: a known-poor recipe
    quantize(fp16, "openvino", ConvertRecipe(format="int4", group_size=-1, ratio=1.0, sym=True), worse)
    kld_fp16, top1_fp16 = next_token_divergence(reference, _scores(fp16, store, text_ids))
    kld_int4, top1_int4 = next_token_divergence(reference, _scores(default, store, text_ids))
    kld_worse, _ = next_token_divergence(reference, _scores(worse, store, text_ids))
    assert 0.0 <= kld_fp16 < kld_int4 < kld_worse, (kld_fp16, kld_int4, kld_worse)
    assert top1_fp16 > 0.95 and top1_int4 > 0.6, (top1_fp16, top1_int4)


@pytest.mark.slow
def test_reference_cache_is_keyed_by_model_and_ids(reference, text_ids, demo_source, tmp_path):
    path = reference_path(tmp_path, demo_source.path, text_ids)
    assert load_reference(path) is None
    save_reference(path, reference)
    assert np.array_equal(load_reference(path), reference)
    assert reference_path(tmp_path, demo_source.path, text_ids[:-1]) != path
    assert not [p for p in tmp_path.iterdir() if p != path]  # nothing half-written left beside it
