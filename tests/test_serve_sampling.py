"""Sampling controls on `phi3 serve`: penalties, min_p, logit_bias and log-probabilities, acted on or refused.

The bad-input and refusal tests run on the FAKE scripted model (it declares no sampling controls and scores no
tokens); what the runtimes do with the controls runs on the real demo model (slow), loaded in this process.
"""

from __future__ import annotations

import math

import openai
import pytest

from tests.fakes.scripted_model import FakeScriptedModel
from tests.test_serve import KEY, MAX_TOKENS
from tests.test_serve_protocol import CONTEXT, InProcessServer

COUNT = [{"role": "user", "content": "List the numbers from one to ten, one per line."}]


@pytest.fixture(scope="module")
def fake_server(tmp_path_factory):
    srv = InProcessServer(FakeScriptedModel(context_length=CONTEXT), tmp_path_factory.mktemp("sampling") / "log")
    srv.start()
    srv.ready()
    yield srv
    srv.stop()


def ask(server, **kwargs):
    kwargs = {"model": "demo", "messages": COUNT, "max_tokens": MAX_TOKENS, "temperature": 0, **kwargs}
    return server.client().chat.completions.create(**kwargs)


BAD = {
    "presence_penalty": {"presence_penalty": 2.5},
    "frequency_penalty": {"frequency_penalty": -3},
    "repetition_penalty": {"extra_body": {"repetition_penalty": 0}},
    "min_p": {"extra_body": {"min_p": 1.5}},
    "top_logprobs": {"logprobs": True, "top_logprobs": 21},
    "logit_bias": {"logit_bias": {"x": 1}},
}


@pytest.mark.parametrize("field", BAD)
def test_values_out_of_range_are_400s_naming_the_field(fake_server, field):
    with pytest.raises(openai.BadRequestError) as caught:
        ask(fake_server, **BAD[field])
    error = caught.value.body
    assert error["param"] == field and field in error["message"]
    assert "\n" not in error["message"]
    assert ask(fake_server).choices[0].message.content  # the server keeps answering


@pytest.mark.parametrize(
    "asked", [{"frequency_penalty": 0.5}, {"extra_body": {"repetition_penalty": 1.3}}, {"logprobs": True}]
)
def test_a_control_the_backend_cannot_apply_is_a_400_naming_field_and_backend(fake_server, asked):
    field = next(iter(asked.get("extra_body", asked)))
    with pytest.raises(openai.BadRequestError) as caught:
        ask(fake_server, **asked)
    assert caught.value.body["param"] == field
    assert field in caught.value.body["message"] and "fake backend" in caught.value.body["message"]


def test_controls_at_their_defaults_are_accepted_and_not_ignored(fake_server):
    answer = ask(fake_server, frequency_penalty=0, presence_penalty=0, logprobs=False)
    assert answer.model_extra["phi3"]["ignored_fields"] == []


@pytest.fixture(scope="module")
def real_servers(demo_source, tmp_path_factory):
    """The demo model on openvino and on torch, each behind the app in this process."""
    from phi3cli.loading import load

    servers = {}
    for backend in ("openvino", "torch"):
        srv = InProcessServer(load("demo", backend=backend), tmp_path_factory.mktemp(backend) / "log", KEY)
        srv.start()
        srv.ready()
        servers[backend] = srv
    yield servers
    for srv in servers.values():
        srv.stop()
        srv.model.close()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["openvino", "torch"])
def test_a_penalty_changes_the_greedy_answer(real_servers, backend):
    server = real_servers[backend]
    plain = ask(server, max_tokens=32).choices[0].message.content
    penalised = ask(server, max_tokens=32, frequency_penalty=1.5)
    assert penalised.choices[0].message.content != plain
    assert penalised.model_extra["phi3"]["ignored_fields"] == []
    again = ask(server, max_tokens=32, extra_body={"repetition_penalty": 1.5}).choices[0].message.content
    assert again != plain


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["openvino", "torch"])
def test_logprobs_are_the_produced_tokens_and_sum_sensibly(real_servers, backend):
    answer = ask(real_servers[backend], logprobs=True, top_logprobs=5)
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens
    assert "".join(t.token for t in content) == answer.choices[0].message.content
    for token in content:
        assert len(token.top_logprobs) == 5
        assert token.top_logprobs[0].token == token.token  # greedy: the likeliest token is the one produced
        assert token.logprob == pytest.approx(token.top_logprobs[0].logprob)
        assert token.logprob <= 0
        assert sum(math.exp(t.logprob) for t in token.top_logprobs) <= 1 + 1e-4
        assert [t.logprob for t in token.top_logprobs] == sorted((t.logprob for t in token.top_logprobs), reverse=True)


@pytest.mark.slow
def test_streamed_and_completion_logprobs(real_servers):
    server = real_servers["openvino"]
    whole = ask(server, logprobs=True, top_logprobs=2).choices[0].logprobs.content
    stream = server.client().chat.completions.create(
        model="demo", messages=COUNT, max_tokens=MAX_TOKENS, temperature=0, logprobs=True, top_logprobs=2, stream=True
    )
    streamed = [
        t for chunk in stream if chunk.choices and chunk.choices[0].logprobs for t in chunk.choices[0].logprobs.content
    ]
    assert [(t.token, round(t.logprob, 4)) for t in streamed] == [(t.token, round(t.logprob, 4)) for t in whole]
    completion = server.client().completions.create(
        model="demo", prompt="One, two, three,", max_tokens=8, temperature=0, logprobs=3
    )
    logprobs = completion.choices[0].logprobs
    assert "".join(logprobs.tokens) == completion.choices[0].text
    assert all(
        max(top, key=top.get) == token for token, top in zip(logprobs.tokens, logprobs.top_logprobs, strict=True)
    )


@pytest.mark.slow
def test_logit_bias_steers_torch_and_openvino_refuses_it(real_servers):
    torch_server = real_servers["torch"]
    first = ask(torch_server, logprobs=True).choices[0].logprobs.content[0]
    first_id = torch_server.model.encode(first.token)[0]
    steered = ask(torch_server, logit_bias={str(first_id): -100}, logprobs=True).choices[0].logprobs.content[0]
    assert steered.token != first.token
    with pytest.raises(openai.BadRequestError, match="outside this model's vocabulary"):
        ask(torch_server, logit_bias={str(torch_server.model.vocab_size): 5})
    with pytest.raises(openai.BadRequestError, match=r"'logit_bias'.*openvino backend") as caught:
        ask(real_servers["openvino"], logit_bias={"1": 5})
    assert caught.value.body["param"] == "logit_bias"


@pytest.mark.slow
def test_onnx_applies_repetition_penalty_and_refuses_the_others(demo_source, tmp_path):
    from phi3cli.loading import load

    server = InProcessServer(load("demo", backend="onnx"), tmp_path / "log", KEY)
    server.start()
    server.ready()
    try:
        plain = ask(server, max_tokens=32).choices[0].message.content
        assert ask(server, max_tokens=32, extra_body={"repetition_penalty": 1.5}).choices[0].message.content != plain
        with pytest.raises(openai.BadRequestError, match=r"'presence_penalty'.*onnx backend"):
            ask(server, presence_penalty=1.0)
        top = ask(server, logprobs=True, top_logprobs=3).choices[0].logprobs.content
        assert all(t.top_logprobs[0].token == t.token for t in top)
    finally:
        server.stop()
        server.model.close()


@pytest.mark.slow
def test_phi3_chat_applies_a_repeat_penalty_and_refuses_what_the_backend_cannot(demo_source):
    from tests.conftest import run_phi3

    question = COUNT[0]["content"]
    plain = run_phi3("chat", "-m", "demo", "-b", "torch", "-n", "32", question)
    penalised = run_phi3("chat", "-m", "demo", "-b", "torch", "-n", "32", "--repeat-penalty", "1.5", question)
    assert plain.returncode == penalised.returncode == 0, plain.stderr + penalised.stderr
    assert penalised.stdout != plain.stdout
    refused = run_phi3("chat", "-m", "demo", "-b", "onnx", "-f", "fp32", "--presence-penalty", "1", question)
    assert refused.returncode == 1
    assert "Error: --presence-penalty: the onnx backend cannot apply presence_penalty" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_a_saved_chat_keeps_its_sampling_controls(tmp_path):
    from phi3cli.backends.base import GenerationSettings
    from phi3cli.backends.sampling import SamplingControls
    from phi3cli.sessions import SavedSession, load_session, save_session

    controls = SamplingControls(repetition_penalty=1.3, frequency_penalty=0.5, logit_bias=((7, -5.0),))
    saved = SavedSession(
        model="demo", backend="torch", device="cpu", executed_device="CPU", format="fp32",
        messages=[{"role": "user", "content": "Hi"}], settings=GenerationSettings(sampling=controls),
    )  # fmt: skip
    assert load_session(save_session(tmp_path / "chat.json", saved)).settings.sampling == controls
