"""The Phi-3 family through both converters: tiny random-weight models with each member's real attention layout.

Each member is its hub config.json (head size, KV heads per query head, partial rotary, LongRoPE factors sized
to the rotary half, context window, sliding window, tied embeddings) cut to 2 layers and a few heads, with the
demo model's tokenizer. Random weights check plumbing, not answers: each converts with `phi3 convert`, generates,
and says its real context window (and, for a long one, the KV cache it needs); the interactive chat's /model and
phi3 bench show it too. Phi-3-medium-128k is Phi-3-medium-4k's layout with the LongRoPE that three other members
convert, so only its window is checked, not a conversion.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from phi3cli.backends.base import GenerationSettings
from phi3cli.context import attention_shape, describe_context
from phi3cli.errors import UnsupportedModelError
from phi3cli.generation import generate_text
from phi3cli.loading import load
from phi3cli.routing import given
from phi3cli.sources import OTHER_PHI_MODELS, resolve_source
from tests.conftest import run_phi3
from tests.test_sessions import Terminal

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
TINY_LAYERS = 2
# What each backend is converted to here: OpenVINO's export (NNCF is tested on the demo), ONNX's CPU int4 build.
FORMATS = {"openvino": "fp16", "onnx": "int4"}


@dataclass(frozen=True)
class Member:
    """A family member's real config.json, as far as the converters and the KV cache care, and its tiny heads."""

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    context: int
    sliding_window: int
    tiny_heads: int  # query heads of the tiny model
    partial_rotary: float = 1.0
    tied: bool = False
    vocab: int = 32064
    full_kv: str = ""  # the fp16 KV cache of the real model's whole window, as phi3 says it

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def config(self, *, tiny: bool) -> dict:
        heads = self.tiny_heads if tiny else self.heads
        kv_heads = heads * self.kv_heads // self.heads
        hidden = heads * self.head_dim
        config = {
            "architectures": ["Phi3ForCausalLM"],
            "model_type": "phi3",
            "hidden_size": hidden,
            "intermediate_size": self.intermediate * hidden // self.hidden // 64 * 64,
            "num_hidden_layers": TINY_LAYERS if tiny else self.layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "max_position_embeddings": self.context,
            "original_max_position_embeddings": 4096,
            "partial_rotary_factor": self.partial_rotary,
            "rope_theta": 10000.0,
            "rope_scaling": None,
            "sliding_window": self.sliding_window,
            "tie_word_embeddings": self.tied,
            "vocab_size": self.vocab,
        }
        if self.context > 4096:
            # One factor per rotary frequency, in the real lists' range (short near 1, long up to about 64).
            half = int(self.head_dim * self.partial_rotary) // 2
            config["rope_scaling"] = {
                "type": "longrope",
                "short_factor": [round(1.0 + 0.05 * i / half, 4) for i in range(half)],
                "long_factor": [round(64.0 ** (i / (half - 1)), 4) for i in range(half)],
            }
        return config


# Layouts from the hub config.json files; tiny_heads keeps each one's head size and query/KV ratio.
MINI = {"layers": 32, "hidden": 3072, "heads": 32, "kv_heads": 32, "intermediate": 8192, "tiny_heads": 2}
MEDIUM = {"layers": 40, "hidden": 5120, "heads": 40, "kv_heads": 10, "intermediate": 17920, "tiny_heads": 4}
PHI4_MINI = {"layers": 32, "hidden": 3072, "heads": 24, "kv_heads": 8, "intermediate": 8192, "tiny_heads": 3}
PHI4_MINI |= {"partial_rotary": 0.75, "tied": True, "vocab": 200064}
SHORT = {"context": 4096, "sliding_window": 2047}
FAMILY = {
    m.name: m
    for m in (
        Member("Phi-3-mini-4k-instruct", **MINI, **SHORT),
        Member("Phi-3-mini-128k-instruct", **MINI, context=131072, sliding_window=262144, full_kv="51.5 GB"),
        Member("Phi-3-medium-4k-instruct", **MEDIUM, **SHORT),
        Member("Phi-3-medium-128k-instruct", **MEDIUM, context=131072, sliding_window=131072, full_kv="26.8 GB"),
        Member("Phi-3.5-mini-instruct", **MINI, context=131072, sliding_window=262144, full_kv="51.5 GB"),
        Member("Phi-4-mini-instruct", **PHI4_MINI, context=131072, sliding_window=262144, full_kv="17.2 GB"),
    )
}
CONVERTED = [name for name in FAMILY if name != "Phi-3-medium-128k-instruct"]
RUNTIMES = {"openvino": "openvino_genai", "onnx": "onnxruntime_genai"}


class Family:
    """Tiny checkpoints and their conversions, each made once per test run."""

    def __init__(self, root: Path, tokenizer_dir: Path):
        self.root, self.tokenizer_dir = root, tokenizer_dir
        self.made: dict[tuple[str, str], Path] = {}

    def checkpoint(self, name: str) -> Path:
        if (name, "hf") not in self.made:
            import torch
            from transformers import Phi3Config, Phi3ForCausalLM

            folder = self.root / name
            demo = json.loads((self.tokenizer_dir / "config.json").read_text())
            ids = {k: demo[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
            config = {**FAMILY[name].config(tiny=True), "vocab_size": demo["vocab_size"], **ids}
            torch.manual_seed(0)
            Phi3ForCausalLM(Phi3Config(**config)).to(torch.float16).save_pretrained(folder)
            for file in (*TOKENIZER_FILES, "generation_config.json"):
                shutil.copy2(self.tokenizer_dir / file, folder / file)
            self.made[name, "hf"] = folder
        return self.made[name, "hf"]

    def converted(self, name: str, backend: str) -> Path:
        if (name, backend) not in self.made:
            from typer.testing import CliRunner

            from phi3cli.cli import app

            out = self.root / f"{name}-{backend}"
            args = ["convert", str(self.checkpoint(name)), "--to", backend, "-f", FORMATS[backend], "-o", str(out)]
            result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
            assert result.exit_code == 0, result.output
            self.made[name, backend] = out
        return self.made[name, backend]


@pytest.fixture(scope="session")
def family(demo_source, tmp_path_factory):
    return Family(tmp_path_factory.mktemp("family"), demo_source.path)


def tiny_kv_bytes(member: Member) -> int:
    config = member.config(tiny=True)
    return TINY_LAYERS * config["num_key_value_heads"] * member.head_dim * 2 * 2 * member.context


def spaced(text: str) -> str:
    """A pattern for text that the terminal may wrap at any space."""
    return r"\s+".join(re.escape(word) for word in text.split())


# ----------------------------------------------------------------------------------------- the KV cache


@pytest.mark.parametrize("name", FAMILY)
def test_the_real_configs_say_their_window_and_its_kv_cache(name, tmp_path):
    member = FAMILY[name]
    (tmp_path / "config.json").write_text(json.dumps(member.config(tiny=False)))
    line = describe_context(member.context, tmp_path)
    if member.full_kv:
        assert line == f"context {member.context} tokens (KV cache at full context: {member.full_kv} at fp16)"
    else:
        assert line == "context 4096 tokens"  # a short window: no warning about memory


def test_the_kv_cache_shape_is_read_from_an_onnx_folder_too(tmp_path):
    decoder = {"num_hidden_layers": 32, "num_key_value_heads": 8, "head_size": 128}
    (tmp_path / "genai_config.json").write_text(json.dumps({"model": {"context_length": 131072, "decoder": decoder}}))
    shape = attention_shape(tmp_path)
    assert (shape.layers, shape.kv_heads, shape.head_dim) == (32, 8, 128)
    assert describe_context(131072, tmp_path).endswith("(KV cache at full context: 17.2 GB at fp16)")


# ------------------------------------------------------------------------------ converted and chatted


def tiny_window(member: Member) -> str:
    """What phi3 says of the tiny model's window: the real one, and for a long one the tiny model's KV cache."""
    window = f"context {member.context} tokens"
    if member.context > 4096:
        window += f" (KV cache at full context: {tiny_kv_bytes(member) / 1e6:.0f} MB at fp16)"
    return window


@pytest.mark.slow
@pytest.mark.parametrize("backend", FORMATS)
@pytest.mark.parametrize("name", CONVERTED)
def test_each_member_converts_runs_and_says_its_window(name, backend, family, store):
    pytest.importorskip(RUNTIMES[backend])
    member = FAMILY[name]
    source = resolve_source(str(family.converted(name, backend)))
    assert source.kind == backend
    model = load(source, route=given(backend, "cpu"), store=store)
    try:
        stats = generate_text(model, "Hi", GenerationSettings(max_new_tokens=4, ignore_eos=True))
        assert (stats.executed_device, stats.generated_tokens) == ("CPU", 4)
        assert model.context_length == member.context
        assert describe_context(model.context_length, model.path) == tiny_window(member)
    finally:
        model.close()


@pytest.mark.slow
@pytest.mark.parametrize("backend", FORMATS)
def test_chat_model_command_shows_the_window(backend, family, tmp_path):
    pytest.importorskip(RUNTIMES[backend])
    member = FAMILY["Phi-3-mini-128k-instruct"]
    folder = family.converted(member.name, backend)
    chat = Terminal("chat", "-m", str(folder), "-b", backend, "-d", "cpu", "-n", "4", cwd=tmp_path)
    chat.expect(r">>> ")
    chat.type("Hi")
    chat.expect(rf"{backend} on CPU · .* tokens \(\d+ prompt\)")
    chat.type("/model")
    chat.expect(spaced(f"{tiny_window(member)}, prompt up to {member.context - 1}"))
    chat.type("/exit")
    assert chat.close() == 0


@pytest.mark.slow
def test_bench_reports_the_window_and_its_kv_cache(family, tmp_path):
    """One backend: bench takes the window from the loaded model and the KV cache from its folder, as /model does."""
    backend = "openvino"
    pytest.importorskip(RUNTIMES[backend])
    member = FAMILY["Phi-4-mini-instruct"]
    folder = family.converted(member.name, backend)
    args = ["bench", "-m", str(folder), "-b", backend, "-d", "cpu", "-f", FORMATS[backend]]
    args += ["-p", "16", "-n", "4", "--warmup", "0"]
    args += ["-r", "1", "--no-quality", "--no-chart", "--json", str(tmp_path / "run.json")]
    done = run_phi3(*args, "--markdown", str(tmp_path / "run.md"), env={"COLUMNS": "220"})
    assert done.returncode == 0, done.stdout + done.stderr
    (row,) = json.loads((tmp_path / "run.json").read_text())["results"]
    assert row["status"] == "ok", row["reason"]
    assert (row["context_length"], row["kv_cache_bytes"]) == (131072, tiny_kv_bytes(member))
    kv = f"{tiny_kv_bytes(member) / 1e6:.0f} MB"
    assert "131072" in done.stdout and f"(KV {kv})" in done.stdout
    assert f"| 131072 (KV {kv}) |" in (tmp_path / "run.md").read_text()


# --------------------------------------------------------------------------- LongRoPE in the OpenVINO IR


@pytest.mark.slow
@pytest.mark.parametrize("name", ["Phi-3-mini-128k-instruct", "Phi-4-mini-instruct"])
def test_openvino_ir_switches_to_the_long_factors_past_the_original_window(name, family):
    """transformers uses the long factors once a position passes 4096; the IR must too, or a 128k model is a 4k one."""
    import numpy as np
    import openvino as ov
    import torch
    from transformers import AutoModelForCausalLM

    folder = family.converted(name, "openvino")
    reference = AutoModelForCausalLM.from_pretrained(family.checkpoint(name), dtype=torch.float32).eval()
    core = ov.Core()
    compiled = core.compile_model(
        core.read_model(str(folder / "openvino_model.xml")), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
    )
    ids = np.arange(1000, 1008)[None]
    for start in (0, 5000, 100_000):  # short factors, then long ones
        positions = np.arange(start, start + ids.shape[1])[None]
        with torch.no_grad():
            want = reference(torch.tensor(ids), position_ids=torch.tensor(positions)).logits[0].numpy()
        request = compiled.create_infer_request()
        request.reset_state()
        inputs = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": positions}
        got = request.infer({**inputs, "beam_idx": np.zeros(1, dtype=np.int32)})["logits"][0]
        assert np.abs(got - want).max() < 1e-3, f"positions from {start}"


# ------------------------------------------------------------------------------ relatives phi3 refuses


def relative_folder(model_type: str, folder: Path) -> Path:
    """A folder with the config.json a relative publishes (its architecture and the remote code it names)."""
    architecture = {"phi3small": "Phi3SmallForCausalLM", "phi3_v": "Phi3VForCausalLM", "phi4mm": "Phi4MMForCausalLM"}
    config = {"model_type": model_type, "architectures": [architecture.get(model_type, "PhiMoEForCausalLM")]}
    config["auto_map"] = {"AutoModelForCausalLM": f"modeling_{model_type}.{config['architectures'][0]}"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("model_type", OTHER_PHI_MODELS)
def test_phi_relatives_that_are_not_phi3_are_refused_by_name(model_type, tmp_path):
    name, why = OTHER_PHI_MODELS[model_type]
    with pytest.raises(UnsupportedModelError, match=re.escape(f"is {name}: {why}.")):
        resolve_source(str(relative_folder(model_type, tmp_path)))


def test_convert_refuses_a_relative_in_one_line(tmp_path):
    done = run_phi3("convert", str(relative_folder("phi3small", tmp_path)), "--to", "onnx", "-o", str(tmp_path / "out"))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines[0].startswith("Error:") and "Phi-3-small" in lines[0] and "Phi3ForCausalLM" in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_onnx_int4_made_layer_by_layer_equals_the_builders_own(family, tmp_path):
    """The layer-by-layer int4 (what a 3.8B model converts with) writes the very weights of the builder's own final
    pass, which needs the whole float32 graph in memory; checked on an untied member, whose lm_head goes too."""
    import numpy as np
    import onnx
    from onnx import numpy_helper
    from onnxruntime_genai.models.builder import create_model

    from phi3cli.backends.onnx.layerwise import layer_by_layer

    hf = family.checkpoint("Phi-3-mini-4k-instruct")
    assert not json.loads((hf / "config.json").read_text())["tie_word_embeddings"]
    options = {"hf_token": "false", "hf_remote": False, "int4_algo_config": "rtn_last", "int4_is_symmetric": False}
    create_model(None, str(hf), str(tmp_path / "whole"), "int4", "cpu", str(tmp_path / "cache1"), **options)
    with layer_by_layer():
        create_model(None, str(hf), str(tmp_path / "layered"), "int4", "cpu", str(tmp_path / "cache2"), **options)

    def matmuls(folder: Path) -> list[tuple[dict, list]]:
        graph = onnx.load(str(folder / "model.onnx")).graph
        weights = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        nodes = [n for n in graph.node if n.op_type in ("MatMul", "MatMulNBits")]
        return [
            ({a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}, [weights[i] for i in n.input[1:]])
            for n in nodes
        ]

    whole, layered = matmuls(tmp_path / "whole"), matmuls(tmp_path / "layered")
    assert len(whole) == len(layered) == TINY_LAYERS * 5 + 1  # qkv, o, gate, up, down per layer, and the lm_head

    def codes(packed, bits):  # 4-bit codes two to a byte
        return np.stack([packed & 15, packed >> 4], -1).astype(int) if bits == 4 else packed.astype(int)

    for (attrs_w, arrays_w), (attrs_l, arrays_l) in zip(whole, layered, strict=True):
        assert attrs_w == attrs_l
        (q_w, scale_w, *zp_w), (q_l, scale_l, *zp_l) = arrays_w, arrays_l
        np.testing.assert_array_equal(scale_w, scale_l)  # the same grid for every block
        # The final pass's RTN (Python) and ONNX Runtime's C++ block quantizer break rounding ties differently:
        # a few codes, and the zero points rounded from them, sit one step apart.
        for a, b in [(q_w, q_l), *zip(zp_w, zp_l, strict=True)]:
            diff = np.abs(codes(a, attrs_w["bits"]) - codes(b, attrs_w["bits"]))
            assert diff.max() <= (1 if attrs_w["bits"] == 4 else 2) and (diff > 0).mean() < 0.01, (
                diff.max(),
                (diff > 0).mean(),
            )
    assert layered[-1][0]["bits"] == 8  # rtn_last: the lm_head in int8

    # The untied embedding table is int8 (the builder keeps it float32), and both folders run to the same logits
    # within what that and the tie-breaking cost.
    embedding = [n for n in onnx.load(str(tmp_path / "layered" / "model.onnx")).graph.node if "embed_tokens" in n.name]
    assert [n.op_type for n in embedding] == ["GatherBlockQuantized"], embedding

    def logits(folder: Path):
        import onnxruntime_genai as og

        model = og.Model(str(folder))
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=32, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(list(range(5, 21)))
        return np.asarray(generator.get_output("logits"), dtype=np.float32).reshape(16, -1)

    expected, got = logits(tmp_path / "whole"), logits(tmp_path / "layered")
    diff, spread = got - expected, expected.std()
    assert np.sqrt((diff**2).mean()) < 0.05 * spread and np.abs(diff).max() < 0.2 * spread, (diff, spread)
