"""Speculative decoding: a draft model or prompt lookup gives the same greedy answers, on the real demo model.

The fast tests check the options, the refusal of a runtime without speculation and the vocabulary check on real
tokenizers built here; the slow ones load the demo on openvino (chat's pipeline, serve's continuous batching, bench).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from phi3cli.errors import BackendUnavailableError, Phi3Error, UnsupportedModelError
from phi3cli.speculation import Speculation, acceptance, check_backend, check_vocabularies, requested
from tests.conftest import run_phi3


def write_tokenizer(folder, words: list[str]):
    """A real word-level tokenizer.json (the tokenizers library's own) over these words."""
    from tokenizers import Tokenizer, models

    folder.mkdir(parents=True, exist_ok=True)
    Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0])).save(
        str(folder / "tokenizer.json")
    )
    return folder


def test_options_ask_for_one_kind_with_sane_numbers():
    assert requested(None, False, None, None) is None
    assert requested(None, True, 4, None) == Speculation(prompt_lookup=True, num_assistant_tokens=4)
    with pytest.raises(Phi3Error, match="choose one"):
        requested("demo", True, None, None)
    with pytest.raises(Phi3Error, match="apply with --draft or --prompt-lookup"):
        requested(None, False, 3, None)


def test_acceptance_is_counted_from_the_passes():
    assert acceptance(64, 13, 5) == pytest.approx(51 / 60)  # 12 passes after the prefill's proposed 5 each
    assert acceptance(10, 10, 5) == 0.0  # one token a pass: nothing accepted
    assert acceptance(1, 1, 5) is None


def test_a_backend_without_speculation_refuses_in_one_line():
    from phi3cli.backends import registry

    spec = next(s for s in registry().values() if not s.speculates)
    with pytest.raises(BackendUnavailableError, match="has no speculative decoding") as caught:
        check_backend(spec, Speculation(prompt_lookup=True), "cpu")
    assert "\n" not in caught.value.message and "--prompt-lookup" in caught.value.message


def test_a_draft_with_another_vocabulary_is_refused(tmp_path):
    target = write_tokenizer(tmp_path / "target", ["<unk>", "a", "b", "c"])
    same = write_tokenizer(tmp_path / "same", ["<unk>", "a", "b", "c"])
    other = write_tokenizer(tmp_path / "other", ["<unk>", "a", "c", "b", "d"])
    check_vocabularies(target, same, "target", "same")
    with pytest.raises(UnsupportedModelError, match="vocabulary of 5 tokens and target one of 4") as caught:
        check_vocabularies(target, other, "target", "other")
    assert "The draft other" in caught.value.message and "first difference at id 2" in caught.value.message


def test_the_commands_refuse_what_does_not_apply_in_one_line():
    numbers = run_phi3("chat", "--model", "demo", "--num-assistant-tokens", "3", "Hi")
    assert numbers.returncode == 1 and "apply with --draft or --prompt-lookup" in numbers.stderr, numbers.stderr
    bench = run_phi3("bench", "--model", "demo", "--prompt-lookup", "--all")
    assert bench.returncode == 1 and "--all, --compare" in bench.stderr, bench.stderr
    assert "Traceback" not in numbers.stderr + bench.stderr


# --- the real demo model on openvino ---


def greedy_ids(model, ids, n=48):
    from phi3cli.backends.base import GenerationSettings
    from phi3cli.generation import generate_text

    return generate_text(model, ids, GenerationSettings(max_new_tokens=n))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["prompt-lookup", "draft"])
def test_greedy_answer_is_the_same_with_speculation(demo_source, store, kind):
    pytest.importorskip("openvino_genai")
    from phi3cli.bench.speculative import grounded_prompt
    from phi3cli.loading import load
    from phi3cli.speculation import SAME_NUMERICS

    # The draft kind: the fp16 demo checked by the int4 demo (same tokenizer); lookup on the int4 demo.
    speculation = Speculation(draft="demo") if kind == "draft" else Speculation(prompt_lookup=True)
    how = dict(backend="openvino", device="cpu", format="fp16" if kind == "draft" else "int4", threads=2, store=store)
    plain = load("demo", options=dict(SAME_NUMERICS), **how)
    ids = grounded_prompt(plain)
    expected = greedy_ids(plain, ids)
    plain.close()
    fast = load("demo", speculation=speculation, **how)
    try:
        got = greedy_ids(fast, ids)
    finally:
        fast.close()
    assert got.token_ids == expected.token_ids and got.text == expected.text
    assert got.speculation == fast.speculation and got.acceptance is not None
    assert got.steps < got.generated_tokens  # several tokens were accepted in some pass


@pytest.fixture(scope="module")
def other_vocabulary(demo_source):
    """The tiny random Phi-4-mini: the demo's vocabulary plus Phi-4-mini's special tokens."""
    from tests.test_structured import tiny_phi4_mini

    return tiny_phi4_mini(demo_source.path)


@pytest.mark.slow
def test_chat_refuses_a_draft_with_another_tokenizer(other_vocabulary):
    done = run_phi3("chat", "--model", "demo", "--backend", "openvino", "--draft", str(other_vocabulary), "Hi")
    assert done.returncode == 1, done.stderr
    error = [line for line in done.stderr.splitlines() if line.startswith("Error")]
    assert len(error) == 1 and "a draft must share the model's tokenizer" in error[0], done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_chat_prints_the_acceptance_and_onnx_refuses(demo_source):
    done = run_phi3("chat", "--model", "demo", "--backend", "openvino", "--prompt-lookup", "-n", "24", "Hi")
    assert done.returncode == 0, done.stderr
    assert "accepted (" in done.stderr and "tokens a pass" in done.stderr, done.stderr
    refused = run_phi3("chat", "--model", "demo", "--backend", "onnx", "--prompt-lookup", "Hi")
    assert refused.returncode == 1 and "has no speculative decoding" in refused.stderr, refused.stderr


@pytest.mark.slow
def test_bench_shows_both_side_by_side_with_the_acceptance(demo_source, tmp_path):
    out = tmp_path / "report.json"
    done = run_phi3("bench", "--model", "demo", "--backend", "openvino", "--format", "int4", "--prompt-lookup",
                    "-p", "64", "-n", "24", "-r", "1", "--warmup", "0", "--json", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "accepted" in done.stdout and "speed-up" in done.stdout and "copy a given text" in done.stdout
    report = json.loads(out.read_text())
    assert [t["task"] for t in report["tasks"]] == ["synthetic", "copy a given text"]
    assert all(t["same_answer"] and t["acceptance"] is not None for t in report["tasks"])


@pytest.fixture(scope="module")
def speculative_server(demo_source, tmp_path_factory):
    pytest.importorskip("openvino_genai")
    from tests.test_serve import KEY, Server, free_port

    srv = Server(free_port(), tmp_path_factory.mktemp("serve-speculative") / "server.log")
    srv.start("--api-key", KEY, "--format", "int4", "--kv-cache-gb", "0.05", "--prompt-lookup", backend="openvino")
    srv.ready()
    yield srv
    srv.stop()
    assert "Traceback" not in srv.log(), srv.log()


@pytest.mark.slow
def test_serve_with_speculation_answers_eight_concurrent_clients(speculative_server):
    from tests.test_serve import QUESTIONS

    client = speculative_server.client()

    def ask(question: str, **extra) -> str:
        reply = client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": question}], max_tokens=24, temperature=0, **extra
        )
        return reply.choices[0].message.content

    alone = {q: ask(q) for q in QUESTIONS}
    assert len(set(alone.values())) == len(QUESTIONS)
    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        together = list(pool.map(ask, QUESTIONS, timeout=300))
    assert dict(zip(QUESTIONS, together, strict=True)) == alone
    assert ask(QUESTIONS[0], extra_body={"speculative": False}) == alone[QUESTIONS[0]]
    assert "speculative: prompt lookup" in speculative_server.log()
