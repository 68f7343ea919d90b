"""LoRA adapters: PEFT folders read and checked against the base, run on OpenVINO at run time, merged on convert.

The fast tests write PEFT's file layout with numpy (bad inputs, the fused/unfused mapping); the slow ones build a
random LoRA for the demo with peft itself and compare the run-time adapter with the merged model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks.lora_figures import make as make_random_lora
from phi3cli.adapters import AdapterChoice, AdapterError, module_shapes, read_adapter
from tests.conftest import PROMPTS, TEST_HOME, run_phi3

BASE = {  # the demo model's shape
    "model_type": "phi3",
    "architectures": ["Phi3ForCausalLM"],
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "num_hidden_layers": 30,
}
PREFIX = "base_model.model.model.layers"
INT4_KLD_BOUND = 0.25  # measured 0.117 nats (top-1 0.75) against the merged fp16 model; the base model is at 1.48


def write_lora(folder: Path, tensors: dict, **config) -> Path:
    """A folder as PEFT's save_pretrained writes it, with these tensors."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    settings = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "bias": "none", **config}
    (folder / "adapter_config.json").write_text(json.dumps(settings))
    save_file({k: v.astype(np.float32) for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"))
    return folder


def pair(module: str, rank: int = 4, layer: int = 0, base: dict = BASE, seed: int = 0) -> dict:
    """Random lora_A / lora_B tensors for one module of one layer, shaped for base."""
    out_dim, in_dim = module_shapes(base)[module]
    rng = np.random.default_rng(seed)
    return {
        f"{PREFIX}.{layer}.{module}.lora_A.weight": rng.normal(size=(rank, in_dim)),
        f"{PREFIX}.{layer}.{module}.lora_B.weight": rng.normal(size=(out_dim, rank)),
    }


def test_fused_targets_read_with_scale_folded_in(tmp_path):
    tensors = pair("self_attn.qkv_proj") | pair("mlp.down_proj", layer=3)
    adapter = read_adapter(write_lora(tmp_path / "a", tensors), BASE)
    assert adapter.modules == ("mlp.down_proj", "self_attn.qkv_proj") and adapter.rank == 4
    a = tensors[f"{PREFIX}.0.self_attn.qkv_proj.lora_A.weight"]
    b = tensors[f"{PREFIX}.0.self_attn.qkv_proj.lora_B.weight"]
    np.testing.assert_allclose(adapter.delta("model.layers.0.self_attn.qkv_proj"), 2.0 * b @ a, rtol=1e-4, atol=1e-4)


def test_the_store_key_follows_the_weights_not_the_config_text(tmp_path):
    tensors = pair("self_attn.qkv_proj") | pair("mlp.down_proj")
    first = read_adapter(write_lora(tmp_path / "a", tensors, target_modules=["qkv_proj", "down_proj"]), BASE)
    again = read_adapter(write_lora(tmp_path / "b", tensors, target_modules=["down_proj", "qkv_proj"]), BASE)
    stronger = read_adapter(write_lora(tmp_path / "c", tensors, lora_alpha=16), BASE)
    assert first.digest == again.digest != stronger.digest


def test_unfused_q_k_v_and_gate_up_map_exactly_onto_the_fused_layers(tmp_path):
    # A Llama-style fine-tune: separate q/k/v and gate/up projections, of different ranks, some missing (no v).
    parts = {"self_attn.q_proj": 4, "self_attn.k_proj": 2, "mlp.gate_proj": 4, "mlp.up_proj": 3}
    tensors = {}
    for i, (module, rank) in enumerate(parts.items()):
        tensors |= pair(module, rank=rank, seed=i)
    config = {"rank_pattern": {"k_proj": 2, "up_proj": 3}}
    adapter = read_adapter(write_lora(tmp_path / "a", tensors, **config), BASE)
    assert adapter.modules == ("mlp.gate_up_proj", "self_attn.qkv_proj")
    assert set(adapter.source_modules) == set(parts)
    shapes = module_shapes(BASE)

    def part(module: str) -> np.ndarray:
        if module not in parts:
            return np.zeros(shapes[module], dtype=np.float32)
        a, b = (tensors[f"{PREFIX}.0.{module}.lora_{x}.weight"] for x in "AB")
        return 8 / parts[module] * b @ a  # PEFT's scale: lora_alpha / r of that module

    qkv = np.concatenate([part(f"self_attn.{m}_proj") for m in "qkv"])
    gate_up = np.concatenate([part("mlp.gate_proj"), part("mlp.up_proj")])
    np.testing.assert_allclose(adapter.delta("model.layers.0.self_attn.qkv_proj"), qkv, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(adapter.delta("model.layers.0.mlp.gate_up_proj"), gate_up, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: d.mkdir(), "has no adapter_config.json"),
        (lambda d: write_lora(d, pair("self_attn.o_proj"), peft_type="IA3"), "IA3 adapter; phi3 applies LoRA"),
        (lambda d: write_lora(d, pair("self_attn.o_proj"), use_dora=True), "uses DoRA"),
        (
            lambda d: write_lora(d, pair("self_attn.o_proj"), auto_mapping={"base_model_class": "LlamaForCausalLM"}),
            "trained on a LlamaForCausalLM",
        ),
        (
            lambda d: write_lora(
                d, pair("self_attn.o_proj") | {"base_model.model.lm_head.lora_A.weight": np.ones((4, 576))}
            ),
            "cannot map onto Phi-3's layers: lm_head (modules found: lm_head, o_proj)",
        ),
        (
            lambda d: write_lora(
                d,
                pair(
                    "self_attn.qkv_proj",
                    base={
                        **BASE,
                        "hidden_size": 3072,
                        "intermediate_size": 8192,
                        "num_attention_heads": 32,
                        "num_key_value_heads": 32,
                    },
                ),
            ),
            f"tensor {PREFIX}.0.self_attn.qkv_proj.lora_A.weight is (4, 3072), the base model needs (4, 576)",
        ),
        (lambda d: write_lora(d, pair("mlp.down_proj", layer=30)), "is for layer 30; the base model has 30 layers"),
        (
            lambda d: write_lora(d, {k: v for k, v in pair("mlp.down_proj").items() if "lora_A" in k}),
            "has no lora_B partner",
        ),
    ],
    ids=["no-config", "not-lora", "dora", "other-architecture", "unmappable", "shape", "layer", "half-pair"],
)
def test_bad_adapters_are_refused_in_one_line(tmp_path, setup, message):
    folder = tmp_path / "adapter"
    setup(folder)
    with pytest.raises(AdapterError) as caught:
        read_adapter(folder, BASE)
    assert message in caught.value.message
    assert "\n" not in caught.value.message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("some/dir", ("dir", "some/dir", 1.0)),
        ("some/dir:0.5", ("dir", "some/dir", 0.5)),
        ("sea=some/dir:2", ("sea", "some/dir", 2.0)),
    ],
)
def test_adapter_option_parses_name_folder_and_alpha(text, expected):
    choice = AdapterChoice.parse(text)
    assert (choice.name, str(choice.path), choice.alpha) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [("d:5", "alpha must be from 0 to 4, not 5.0"), ("d:-1", "not -1.0"), ("d:x", "'x' after ':' is not an alpha")],
)
def test_alpha_out_of_range_is_refused(text, message):
    with pytest.raises(AdapterError, match=message):
        AdapterChoice.parse(text)


def assert_one_line_error(done, *needles):
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    for needle in needles:
        assert needle in done.stderr, done.stderr


def test_convert_refuses_a_bad_adapter_and_writes_nothing(config_only_model, tmp_path):
    before = sorted((TEST_HOME / "sources").glob("*lora*")) if (TEST_HOME / "sources").is_dir() else []
    done = run_phi3("convert", str(config_only_model), "--adapter", str(tmp_path), "-o", str(tmp_path / "out"))
    assert_one_line_error(done, "has no adapter_config.json")
    done = run_phi3("convert", str(config_only_model), "--adapter", f"{tmp_path}:9", "-o", str(tmp_path / "out"))
    assert_one_line_error(done, "alpha must be from 0 to 4")
    assert not (tmp_path / "out").exists()
    assert sorted((TEST_HOME / "sources").glob("*lora*")) == before


def test_onnx_refuses_run_time_adapters_before_building(config_only_model, tmp_path):
    folder = write_lora(tmp_path / "a", pair("self_attn.o_proj"))
    done = run_phi3("chat", "-m", str(config_only_model), "-b", "onnx", "--adapter", str(folder), "hi")
    assert_one_line_error(
        done, "ONNX Runtime GenAI 0.13.2's model builder bakes an adapter", "phi3 convert MODEL --adapter"
    )


def test_bench_adapter_refuses_what_does_not_apply_in_one_line(config_only_model, tmp_path):
    folder = write_lora(tmp_path / "a", pair("self_attn.o_proj"))
    model = str(config_only_model)
    done = run_phi3("bench", "-m", model, "--adapter", str(folder), "--all")
    assert_one_line_error(done, "--all, --compare", "do not apply with --adapter")
    done = run_phi3("bench", "-m", model, "--adapter", str(folder), "--prompt-lookup")
    assert_one_line_error(done, "do not apply with --adapter")
    done = run_phi3("bench", "-m", model, "-b", "onnx", "--adapter", str(folder))
    assert_one_line_error(done, "ONNX Runtime GenAI 0.13.2's model builder bakes an adapter")
    done = run_phi3("bench", "-m", model, "-b", "torch", "--adapter", str(folder))
    assert_one_line_error(done, "the torch backend applies none", "phi3 convert MODEL --adapter")
    done = run_phi3("bench", "-m", model, "--adapter", f"{folder}:9")
    assert_one_line_error(done, "alpha must be from 0 to 4")


def peft_lora(base: Path, out: Path, seed: int, std: float = 0.07) -> Path:
    return make_random_lora(out, seed=seed, std=std, base=base)


@pytest.fixture(scope="module")
def loras(demo_source, tmp_path_factory):
    """Two random LoRAs for the demo (different seeds), as PEFT folders."""
    root = tmp_path_factory.mktemp("loras")
    return {name: peft_lora(demo_source.path, root / name, seed) for name, seed in (("sea", 2), ("sky", 3))}


def ask(model, question: str = PROMPTS[0], n: int = 24) -> str:
    from phi3cli.backends.base import GenerationSettings

    ids = model.encode(model.chat_template.render([{"role": "user", "content": question}]))
    return "".join(t.text for t in model.generate(ids, GenerationSettings(max_new_tokens=n)))


def load_demo(source, store, fmt: str, adapters=()):
    from phi3cli.backends.adapters import ADAPTERS
    from phi3cli.loading import load
    from phi3cli.routing import given

    options = {ADAPTERS: tuple(AdapterChoice.parse(a) for a in adapters)} if adapters else {}
    return load(source, route=given("openvino", "cpu"), format=fmt, options=options, store=store)


@pytest.mark.slow
def test_openvino_run_time_adapter_answers_as_the_merged_model_fp16(demo_source, store, loras):
    from phi3cli.adapter_store import merged_source

    model = load_demo(demo_source, store, "fp16", [f"{n}={p}" for n, p in loras.items()])
    try:
        answers = {}
        for name, choice in (("base", {}), ("sea", {"sea": 1.0}), ("sky", {"sky": 1.0}), ("sea0", {"sea": 0.0})):
            model.adapters.use(choice)  # switched between generates, on one loaded model
            answers[name] = ask(model)
    finally:
        model.close()
    assert answers["sea"] != answers["base"] and answers["sky"] != answers["sea"], answers  # the LoRAs change it
    assert answers["sea0"] == answers["base"]  # alpha 0 is the base model
    plain = load_demo(demo_source, store, "fp16")
    try:
        assert ask(plain) == answers["base"]
    finally:
        plain.close()
    merged = merged_source(demo_source, [AdapterChoice.parse(str(loras["sea"]))], store)
    assert merged.slug != demo_source.slug
    reference = load_demo(merged, store, "fp16")
    try:
        assert ask(reference) == answers["sea"]
        assert reference.path != plain.path  # the merged variant is stored apart from the base's
    finally:
        reference.close()


@pytest.mark.slow
def test_openvino_int4_base_with_run_time_adapter_stays_close_to_the_merged_model(demo_source, store, loras):
    from phi3cli.adapter_store import merged_source
    from phi3cli.bench.quality import next_token_divergence, perplexity_text

    reference = load_demo(merged_source(demo_source, [AdapterChoice.parse(str(loras["sea"]))], store), store, "fp16")
    model = load_demo(demo_source, store, "int4", [str(loras["sea"])])
    try:
        ids = reference.encode(perplexity_text())[:512]
        ref = reference.next_token_logprobs(ids)
        prompt = model.encode(model.chat_template.render([{"role": "user", "content": PROMPTS[0]}]))
        from phi3cli.backends.base import GenerationSettings

        answer = [t.token_id for t in model.generate(prompt, GenerationSettings(max_new_tokens=16))]
        scored = model.next_token_logprobs(prompt + answer)[len(prompt) - 1 :].argmax(axis=-1)
        assert scored[: len(answer)].tolist() == answer  # scoring sees the adapter as generate does
        with_adapter, _ = next_token_divergence(ref, model.next_token_logprobs(ids))
        model.adapters.use({})
        without, _ = next_token_divergence(ref, model.next_token_logprobs(ids))
    finally:
        model.close()
        reference.close()
    assert with_adapter < INT4_KLD_BOUND < without, (with_adapter, without)


@pytest.mark.slow
def test_chat_switches_adapters_in_one_session(demo_source, loras, tmp_path):
    from tests.test_sessions import Terminal

    sea = loras["sea"]
    term = Terminal(
        "chat", "-m", "demo", "-b", "openvino", "-f", "fp16", "-n", "24", "--adapter", f"sea={sea}", cwd=tmp_path
    )
    term.expect(r">>> ")
    term.type("/model")
    term.expect(r"adapters: sea")
    term.type(PROMPTS[0])
    with_sea = term.expect(r"(?s).*?tok/s")
    term.type("/adapter sea:0")
    term.expect(r"Adapters: sea \(alpha 0\)")
    term.type(PROMPTS[0])
    at_zero = term.expect(r"(?s).*?tok/s")
    term.type("/adapter none")
    term.expect(r"Adapters: none")
    term.type("/adapter nope")
    term.expect(r"No adapter named 'nope' is loaded \(loaded: sea\)")
    term.type("/adapter sea:7")
    term.expect(r"alpha must be from 0 to 4")
    term.type("/exit")
    assert term.close() == 0
    # Switching changed the answer (the last line is the reply's figures, which differ anyway).
    assert with_sea.rsplit("\n", 1)[0] != at_zero.rsplit("\n", 1)[0], (with_sea, at_zero)


@pytest.mark.slow
def test_one_shot_chat_with_adapter_answers_as_convert_adapter(demo_source, loras, tmp_path):
    sea = str(loras["sea"])
    with_adapter = run_phi3(
        "chat", "-m", "demo", "-b", "openvino", "-f", "fp16", "-n", "24", "--adapter", sea, PROMPTS[0]
    )
    assert with_adapter.returncode == 0, with_adapter.stderr
    out = tmp_path / "merged"
    done = run_phi3("convert", "demo", "--to", "openvino", "-f", "fp16", "--adapter", sea, "-o", str(out))
    assert done.returncode == 0, done.stderr
    merged = run_phi3("chat", "-m", str(out), "-n", "24", PROMPTS[0])
    assert merged.returncode == 0, merged.stderr
    assert merged.stdout == with_adapter.stdout


@pytest.mark.slow
def test_serve_picks_the_adapter_by_model_name(demo_source, store, loras, tmp_path):
    from tests.test_serve import Server, free_port

    model = load_demo(demo_source, store, "fp16", [f"sea={loras['sea']}"])
    try:
        expected = {"demo:sea": ask(model, n=16)}
        model.adapters.use({})
        expected["demo"] = ask(model, n=16)
    finally:
        model.close()
    srv = Server(free_port(), tmp_path / "server.log")
    srv.start("--format", "fp16", "--adapter", f"sea={loras['sea']}", backend="openvino")
    try:
        srv.ready()
        client = srv.client(key="none")
        answers = {}
        for name in ("demo:sea", "demo", "demo:sea"):  # switched back and forth on one server
            reply = client.chat.completions.create(
                model=name, messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=16, temperature=0
            )
            assert answers.setdefault(name, reply.choices[0].message.content) == reply.choices[0].message.content
        assert answers == expected
        health = srv.raw("GET", "/health")[1]
        assert (
            health["adapters"]["models"] == {"demo:sea": 1.0} and "one request at a time" in health["adapters"]["note"]
        )
        with pytest.raises(Exception, match="demo:nope"):
            client.chat.completions.create(model="demo:nope", messages=[{"role": "user", "content": "hi"}])
    finally:
        srv.stop()


@pytest.mark.slow
def test_the_torch_reference_runs_an_adapter_merged(demo_source, store, loras):
    from phi3cli.backends.adapters import ADAPTERS, model_adapters
    from phi3cli.loading import load
    from phi3cli.routing import given

    runtime = load_demo(demo_source, store, "fp16", [str(loras["sea"])])
    try:
        expected = ask(runtime)
    finally:
        runtime.close()
    choice = (AdapterChoice.parse(str(loras["sea"])),)
    reference = load(demo_source, route=given("torch", "cpu"), format="fp32", options={ADAPTERS: choice}, store=store)
    try:
        assert model_adapters(reference) is None and reference.path != demo_source.path  # a merged copy, not the base
        assert ask(reference) == expected
    finally:
        reference.close()


@pytest.mark.slow
def test_bench_measures_without_and_with_the_adapter_and_its_quality_against_merged(demo_source, loras, tmp_path):
    report = tmp_path / "adapter.json"
    done = run_phi3(
        "bench", "-m", "demo", "-b", "openvino", "-d", "cpu", "-f", "fp16", "--threads", "2",
        "-p", "32", "-n", "8", "-r", "1", "--adapter", str(loras["sea"]), "--json", str(report),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    header = next(line for line in done.stdout.splitlines() if "decode tok/s" in line)
    for column in ("TTFT ms", "speed", "KLD vs merged", "top-1 vs merged"):
        assert column in header, done.stdout
    rows = [line for line in done.stdout.splitlines() if line.strip("│ ").startswith(("without ", "with "))]
    assert len(rows) == 2 and "1.00×" in rows[0] and "×" in rows[1], done.stdout
    figures = json.loads(report.read_text())
    without, with_ = figures["rows"]
    assert figures["ratio"] == pytest.approx(with_["decode_tps"]["mean"] / without["decode_tps"]["mean"])
    # The run-time adapter is the merged model (fp16); the base is not, which is what the adapter changes.
    assert with_["kl_divergence"] < 1e-3 < without["kl_divergence"], figures["rows"]
    assert with_["top1"] > without["top1"]
