"""GET /metrics (phi3 serve --metrics): Prometheus's text format, counters that move, and no prompt in it.

On the FAKE scripted model: what is counted is the server's bookkeeping, the same for every runtime.
"""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes.scripted_model import FakeScriptedModel
from tests.test_serve import KEY
from tests.test_serve_protocol import CONTEXT, InProcessServer

SECRET = "my-secret-prompt-words"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = InProcessServer(
        FakeScriptedModel(context_length=CONTEXT), tmp_path_factory.mktemp("metrics") / "log", metrics=True
    )
    srv.start()
    srv.ready()
    yield srv
    srv.stop()


def scrape(server) -> tuple[str, dict]:
    request = urllib.request.Request(server.base + "/metrics", headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        assert answer.headers["Content-Type"].startswith("text/plain")
        text = answer.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return text, samples


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_counters_move_with_requests_and_prompts_never_show(server):
    _, before = scrape(server)
    client = server.client()
    answer = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": SECRET}])
    client.completions.create(model="demo", prompt=SECRET, max_tokens=2)
    with pytest.raises(Exception):  # noqa: B017 - any client error: a 400 to count
        client.chat.completions.create(model="demo", messages=[], max_tokens=4)
    text, after = scrape(server)
    assert SECRET not in text and "You said" not in text
    route = "/v1/chat/completions"
    assert (
        value(after, "phi3_requests_total", route=route, status="200")
        == value(before, "phi3_requests_total", route=route, status="200") + 1
    )
    assert (
        value(after, "phi3_requests_total", route=route, status="400")
        == value(before, "phi3_requests_total", route=route, status="400") + 1
    )
    assert value(after, "phi3_requests_total", route="/v1/completions", status="200") >= 1
    generated = value(after, "phi3_generated_tokens_total", model="demo") - value(
        before, "phi3_generated_tokens_total", model="demo"
    )
    assert generated == answer.usage.completion_tokens + 2  # the completion was cut at max_tokens=2
    assert value(after, "phi3_prompt_tokens_total", model="demo") - value(
        before, "phi3_prompt_tokens_total", model="demo"
    ) == answer.usage.prompt_tokens + len(SECRET)  # the fake reads one token per character
    assert (
        value(after, "phi3_time_to_first_token_seconds_count", model="demo")
        == value(before, "phi3_time_to_first_token_seconds_count", model="demo") + 2
    )
    assert value(after, "phi3_time_per_output_token_seconds_count", model="demo") >= 1
    assert value(after, "phi3_model_loaded", model="demo", backend="fake", format="fake", device="CPU") == 1
    assert ("phi3_queue_depth", (("model", "demo"),)) in after
    assert ("phi3_running_sequences", (("model", "demo"),)) in after


def test_metrics_need_the_api_key_and_are_off_by_default(server, tmp_path):
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(server.base + "/metrics", timeout=30)
    assert caught.value.code == 401
    plain = InProcessServer(FakeScriptedModel(context_length=CONTEXT), tmp_path / "log")
    plain.start()
    plain.ready()
    try:
        assert plain.raw("GET", "/metrics")[0] == 404
    finally:
        plain.stop()
