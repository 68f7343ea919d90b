"""Images in, text out: a tiny random Phi-4-multimodal, converted by phi3 and run by OpenVINO GenAI's VLMPipeline.

The model is built offline by scripts/make_tiny_multimodal.py (the same builder users run) into the test store and
converted once by `phi3 chat` itself (cached in the store like the demo's variants). Random weights answer
nonsense, but deterministic nonsense: two different images give different greedy answers and the same image gives
the same one, which is what shows the image reaches the model, through `phi3 chat --image` and through
`phi3 serve` driven by the official openai client. Text-only models refuse images with one line (a 400 in serve).
"""

from __future__ import annotations

import base64
import csv
import io
import json
import re

import openai
import pytest

from tests.conftest import ROOT, png, run_phi3
from tests.test_serve import KEY, Server, free_port

pytestmark = pytest.mark.slow
QUESTION = "What is in this picture?"


def chat_with_image(model: str, image, *extra: str, backend: str = "openvino"):
    result = run_phi3(
        "chat", QUESTION, "--model", model, "--backend", backend, "-n", "8", "--image", str(image), *extra
    )
    assert result.returncode == 0, result.stderr
    return result


def test_chat_image_reaches_the_model(tiny_multimodal, pictures):
    first = chat_with_image(tiny_multimodal, pictures / "p1.png")
    other = chat_with_image(tiny_multimodal, pictures / "p2.png")
    again = chat_with_image(tiny_multimodal, pictures / "p1.png")
    assert first.stdout.strip() and first.stdout == again.stdout  # stdout is the answer alone
    assert first.stdout != other.stdout
    assert "openvino on CPU" in first.stderr and "(1 image, encoded in " in first.stderr
    text = run_phi3("chat", QUESTION, "--model", tiny_multimodal, "--backend", "openvino", "-n", "8")
    assert text.returncode == 0 and text.stdout != first.stdout and "image" not in text.stderr.splitlines()[-1]
    # The prompt size is the runtime's count, the image's tokens included (at least one 256-token crop).
    with_image = int(re.search(r"\((\d+) prompt with images\)", first.stderr).group(1))
    assert with_image > int(re.search(r"\((\d+) prompt\)", text.stderr).group(1)) + 256


def test_image_command_in_a_session_goes_with_the_next_message(tiny_multimodal, pictures, tmp_path):
    from tests.test_sessions import Terminal

    term = Terminal(
        "chat", "-m", tiny_multimodal, "-b", "openvino", "-n", "8", cwd=tmp_path, env={"PYTHONPATH": str(ROOT)}
    )
    term.expect(r">>> ")
    term.type(f"/image {pictures / 'p2.png'}")
    term.expect(r"p2.png \(90x60\) goes with your next message")
    term.type(QUESTION)
    term.expect(r"\(1 image, encoded in \d+ ms\)")
    term.type("/image absent.png")
    term.expect(r"No image at absent.png")  # an error does not end the chat
    term.type("/save s.json")
    term.expect(r"Saved 2 messages")
    term.type("/exit")
    assert term.close() == 0
    assert json.loads((tmp_path / "s.json").read_text())["messages"][0]["images"] == ["p2.png"]


def test_bad_images_are_one_line_before_loading(tiny_multimodal, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(png(3)[:150])
    result = run_phi3("chat", QUESTION, "--model", tiny_multimodal, "--image", str(broken))
    assert result.returncode == 1 and "damaged or truncated" in result.stderr and "Traceback" not in result.stderr
    big = tmp_path / "big.png"
    big.write_bytes(png(4, size=(100, 100)))
    result = run_phi3("chat", QUESTION, "--model", tiny_multimodal, "--image", str(big), "--max-image-pixels", "9999")
    assert result.returncode == 1 and "over the limit of 9,999 pixels" in result.stderr


def test_a_text_only_model_given_an_image_says_so(demo_source, pictures):
    result = run_phi3("chat", QUESTION, "--model", "demo", "--backend", "openvino", "--image", str(pictures / "p1.png"))
    assert result.returncode == 1
    assert "Error: demo reads no images: it is a text-only model." in result.stderr
    assert "Traceback" not in result.stderr


def test_a_ready_made_vision_ir_repo_runs_by_its_id(tiny_multimodal, store, pictures, tmp_path):
    """An IR repo laid out as OpenVINO's organisation publishes vision models (the IRs at its root), offline."""
    from phi3cli.backends import get_backend
    from phi3cli.backends.base import ConvertRecipe
    from phi3cli.convert import ensure_variant
    from phi3cli.sources import resolve_source
    from tests.hub_repos import publish

    built = ensure_variant(
        get_backend("openvino"), resolve_source(tiny_multimodal, store), ConvertRecipe("int4"), store
    )
    publish(tmp_path / "hub", "acme/tiny-vision-int4-ov", {"": built})
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "PHI3_HOME": str(tmp_path / "home")}
    mine = chat_with_image(tiny_multimodal, pictures / "p1.png")
    hub = run_phi3(
        "chat", QUESTION, "-m", "acme/tiny-vision-int4-ov", "-n", "8", "--image", str(pictures / "p1.png"), env=env
    )
    assert hub.returncode == 0, hub.stderr
    assert hub.stdout == mine.stdout and "Converting" not in hub.stderr


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64," + base64.b64encode(data).decode()


def ask(client, image_url: str | None, **kwargs):
    content = [{"type": "text", "text": QUESTION}]
    if image_url:
        content.insert(0, {"type": "image_url", "image_url": {"url": image_url}})
    return client.chat.completions.create(
        model=client.models.list().data[0].id,
        messages=[{"role": "user", "content": content}],
        max_tokens=8,
        temperature=0,
        **kwargs,
    )


@pytest.fixture(scope="module")
def vision_server(tiny_multimodal, tmp_path_factory):
    srv = Server(free_port(), tmp_path_factory.mktemp("vision-serve") / "server.log")
    srv.start("--api-key", KEY, backend="openvino", model=tiny_multimodal)
    srv.ready()
    yield srv
    srv.stop()
    assert "Traceback" not in srv.log(), srv.log()


def test_serve_image_url_parts_reach_the_model_streamed_and_not(vision_server):
    client = vision_server.client()
    first = ask(client, data_url(png(1))).choices[0].message.content
    other = ask(client, data_url(png(2))).choices[0].message.content
    assert first and first == ask(client, data_url(png(1))).choices[0].message.content
    assert first != other
    stream = ask(client, data_url(png(2)), stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == other
    assert ask(client, None).choices[0].message.content != first


def test_serve_responses_api_takes_input_image_parts(vision_server):
    client = vision_server.client()
    name = client.models.list().data[0].id

    def answer(png_bytes):
        content = [{"type": "input_image", "image_url": data_url(png_bytes)}, {"type": "input_text", "text": QUESTION}]
        reply = client.responses.create(
            model=name, input=[{"role": "user", "content": content}], max_output_tokens=8, temperature=0
        )
        return reply.output_text

    assert answer(png(1)) == ask(client, data_url(png(1))).choices[0].message.content
    assert answer(png(1)) != answer(png(2))


@pytest.mark.parametrize(
    "url, words",
    [
        ("https://example.com/cat.png", "--allow-image-urls"),
        (data_url(b"plain text", "text/plain"), "media type 'text/plain'"),
        (data_url(png(5)[:100]), "damaged or truncated"),
    ],
    ids=["remote-url", "wrong-media-type", "truncated"],
)
def test_serve_refuses_bad_images_with_a_400(vision_server, url, words):
    with pytest.raises(openai.BadRequestError, match=words) as caught:
        ask(vision_server.client(), url)
    assert caught.value.status_code == 400
    assert ask(vision_server.client(), None).choices[0].message.content  # the server still answers


def test_serve_text_only_model_given_an_image_is_a_400_naming_it(demo_source, tmp_path):
    srv = Server(free_port(), tmp_path / "server.log")
    srv.start("--api-key", KEY, "--max-sequences", "1", backend="openvino", model="demo")
    srv.ready()
    try:
        with pytest.raises(openai.BadRequestError, match="demo reads no images: it is a text-only model") as caught:
            ask(srv.client(), data_url(png(1)))
        assert caught.value.status_code == 400
    finally:
        srv.stop()


def test_bench_measures_the_image_beside_the_text(tiny_multimodal, pictures, tmp_path):
    """On a vision model bench adds the image test: encoding time, TTFT with the image, decode speed."""
    report_path = tmp_path / "report.json"
    args = ["--model", tiny_multimodal, "-b", "openvino", "-f", "int4", "-p", "16", "-n", "4", "-r", "2"]
    done = run_phi3("bench", *args, "--no-quality", "--no-chart", "--image", str(pictures / "p1.png"),
                    "--json", str(report_path), "--markdown", str(tmp_path / "report.md"),
                    "--csv", str(tmp_path / "report.csv"), env={"COLUMNS": "200"})  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "One image (p1.png (90x60))" in done.stdout and "image ms" in done.stdout, done.stdout
    assert "pp16+tg4" in done.stdout and "1 image+tg4" in done.stdout
    report = json.loads(report_path.read_text())
    assert report["settings"]["image"] == str(pictures / "p1.png")
    (row,) = [r for r in report["results"] if r["status"] == "ok"]
    test = row["image"]
    assert test["image"] == "p1.png (90x60)" and test["tokens_counted"] == [4, 4]
    for key in ("image_ms", "ttft_ms", "decode_tps"):
        assert test[key]["n"] == 2 and test[key]["min"] > 0, (key, test[key])
    # The runtime's encoding is part of the time to first token, in every run.
    assert all(e < t for e, t in zip(test["image_ms"]["values"], test["ttft_ms"]["values"], strict=True))
    markdown = (tmp_path / "report.md").read_text()
    assert "| image encoding ms | TTFT ms | decode tok/s |" in markdown and "| 1 image+tg4 |" in markdown
    (line,) = [r for r in csv.DictReader(io.StringIO((tmp_path / "report.csv").read_text())) if r["image"]]
    assert line["test"] == "1 image+tg4" and line["image"] == "p1.png (90x60)" and line["tokens_counted"] == "4 4"
    for key in ("image_ms", "ttft_ms", "decode_tps"):
        assert float(line[f"{key}_mean"]) == pytest.approx(test[key]["mean"]), key


def test_bench_compare_reads_the_image_test(tiny_multimodal, pictures, tmp_path):
    """--compare finds a slower image encoding, time to first token with the image, or decode after it."""
    report_path = tmp_path / "report.json"
    args = ["--model", tiny_multimodal, "-b", "openvino", "-f", "int4", "-p", "8", "-n", "4", "-r", "1"]
    done = run_phi3("bench", *args, "--no-quality", "--no-chart", "--json", str(report_path))
    assert done.returncode == 0, done.stdout + done.stderr
    same = run_phi3("bench", "--load", str(report_path), "--compare", str(report_path), "--no-chart",
                    env={"COLUMNS": "200"})  # fmt: skip
    assert same.returncode == 0 and "1 image+tg4" in same.stdout and "image_ms" in same.stdout, same.stdout
    for figure, factor in (("image_ms", 0.5), ("ttft_ms", 0.5), ("decode_tps", 2.0)):
        better = json.loads(report_path.read_text())
        for row in better["results"]:
            if row.get("image"):
                row["image"][figure]["mean"] *= factor  # the baseline claims a faster image test
        (tmp_path / "better.json").write_text(json.dumps(better))
        done = run_phi3("bench", "--load", str(report_path), "--compare", str(tmp_path / "better.json"),
                        "--no-chart", env={"COLUMNS": "200"})  # fmt: skip
        assert done.returncode == 3, (figure, done.stdout + done.stderr)
        regressed = [ln for ln in done.stdout.splitlines() if "1 image+tg4" in ln and figure in ln]
        assert regressed, (figure, done.stdout)


def test_bench_progress_counts_the_image_runs(tiny_multimodal, store):
    """The progress bar's total: step_count for what the job asks, plus what the image test announces once the
    model is loaded; every step reported, none past the total."""
    from phi3cli.bench.measure import MeasureJob, measure_configuration, step_count
    from phi3cli.progress import more_steps

    job = MeasureJob(tiny_multimodal, "openvino", "cpu", "int4", [8], 2, warmup=1, repetitions=2, quality=False)
    reports: list[str] = []
    result = measure_configuration(job, store, reports.append)
    assert result["image"] and len(result["image"]["reps"]) == 2
    added = [n for n in map(more_steps, reports) if n is not None]
    assert added == [job.warmup + job.repetitions]
    assert len(reports) - len(added) == step_count(job) + sum(added)
