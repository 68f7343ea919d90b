"""Images in, text out on the onnx backend: the tiny Phi-4-multimodal as an ONNX Runtime GenAI folder laid out as
Microsoft's Phi-4-multimodal-instruct-onnx ("phi4mm": decoder, vision, embedding and speech models), run by
og.MultiModalProcessor.

The folder is built once per test store by scripts/make_tiny_multimodal.py's build_onnx (the builder users run)
from the tiny model the openvino tests use (tests/conftest.py). As there, random weights answer deterministic nonsense: two different
images give different greedy answers and the same image the same one, through `phi3 chat --image` (by folder and by
hub id) and through `phi3 serve` driven by the official openai client.
"""

from __future__ import annotations

import json
import re
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import openai
import pytest

from tests.conftest import png, run_phi3
from tests.test_serve import KEY, Server, free_port
from tests.test_vision import QUESTION, ask, chat_with_image, data_url

pytestmark = pytest.mark.slow


def test_the_folder_is_laid_out_as_microsofts(tiny_multimodal_onnx):
    model = json.loads((Path(tiny_multimodal_onnx) / "genai_config.json").read_text())["model"]
    assert model["type"] == "phi4mm" and set(model) >= {"decoder", "vision", "speech", "embedding"}
    assert model["decoder"]["inputs"]["inputs_embeds"] == "inputs_embeds" and "input_ids" not in model["decoder"]
    assert model["vision"]["inputs"] == {
        "pixel_values": "pixel_values",
        "attention_mask": "image_attention_mask",
        "image_sizes": "image_sizes",
    }


def test_chat_image_reaches_the_model_on_onnx(tiny_multimodal_onnx, pictures):
    first = chat_with_image(tiny_multimodal_onnx, pictures / "p1.png", backend="onnx")
    other = chat_with_image(tiny_multimodal_onnx, pictures / "p2.png", backend="onnx")
    again = chat_with_image(tiny_multimodal_onnx, pictures / "p1.png", backend="onnx")
    assert first.stdout.strip() and first.stdout == again.stdout  # stdout is the answer alone
    assert first.stdout != other.stdout
    assert "onnx on CPU" in first.stderr and "(1 image, encoded in " in first.stderr
    text = run_phi3("chat", QUESTION, "--model", tiny_multimodal_onnx, "--backend", "onnx", "-n", "8")
    assert text.returncode == 0 and text.stdout != first.stdout and "image" not in text.stderr.splitlines()[-1]
    both = chat_with_image(
        tiny_multimodal_onnx, pictures / "p1.png", "--image", str(pictures / "p2.png"), backend="onnx"
    )
    assert "(2 images, encoded in " in both.stderr and both.stdout != first.stdout  # the second image counts


def test_image_count_and_context_limits_on_onnx(tiny_multimodal_onnx, pictures):
    many = [arg for _ in range(9) for arg in ("--image", str(pictures / "p1.png"))]
    result = run_phi3("chat", QUESTION, "--model", tiny_multimodal_onnx, "--backend", "onnx", *many)
    assert result.returncode == 1 and "9 images in one request" in result.stderr
    assert "Traceback" not in result.stderr
    # Eight images take most of the tiny model's 4096-token context: the answer is clipped to what is left.
    eight = many[:16]
    result = run_phi3("chat", QUESTION, "--model", tiny_multimodal_onnx, "--backend", "onnx", "-n", "4000", *eight)
    assert result.returncode == 0, result.stderr
    assert "(8 images, encoded in " in result.stderr
    assert 0 < int(re.search(r"(\d+)\s+tokens \(", result.stderr)[1]) < 4000


def test_a_ready_made_onnx_vision_repo_runs_by_its_id(tiny_multimodal_onnx, pictures, tmp_path):
    """A repo with the folder in a subfolder, as Microsoft publishes its -onnx repos, offline."""
    from tests.hub_repos import publish

    publish(tmp_path / "hub", "acme/tiny-vision-onnx", {"cpu-int4": Path(tiny_multimodal_onnx)})
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "PHI3_HOME": str(tmp_path / "home")}
    mine = chat_with_image(tiny_multimodal_onnx, pictures / "p1.png", backend="onnx")
    hub = run_phi3(
        "chat", QUESTION, "-m", "acme/tiny-vision-onnx", "-n", "8", "--image", str(pictures / "p1.png"), env=env
    )
    assert hub.returncode == 0, hub.stderr
    assert hub.stdout == mine.stdout and "onnx on CPU" in hub.stderr


def test_serve_image_url_parts_reach_the_model_on_onnx(tiny_multimodal_onnx, tmp_path):
    srv = Server(free_port(), tmp_path / "server.log")
    srv.start("--api-key", KEY, "--allow-image-urls", backend="onnx", model=tiny_multimodal_onnx)
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "p1.png").write_bytes(png(1))
    site = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=tmp_path / "site"))
    threading.Thread(target=site.serve_forever, daemon=True).start()
    srv.ready()
    try:
        client = srv.client()
        first = ask(client, data_url(png(1))).choices[0].message.content
        other = ask(client, data_url(png(2))).choices[0].message.content
        assert first and first == ask(client, data_url(png(1))).choices[0].message.content
        # the same picture fetched from a (local, real) web server, as --allow-image-urls allows
        fetched = ask(client, f"http://127.0.0.1:{site.server_address[1]}/p1.png").choices[0].message.content
        assert fetched == first
        assert first != other
        stream = ask(client, data_url(png(2)), stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == other
        text_only = ask(client, None)
        assert text_only.choices[0].message.content != first
        # usage counts what the runtime read: the image's tokens too (256 per crop and more), not only the text's
        assert ask(client, data_url(png(1))).usage.prompt_tokens > text_only.usage.prompt_tokens + 256
        # Eight images leave the answer less room than max_tokens asks: where the runtime stops there, the reason
        # is "length", and a reply that ends before it is "stop".
        content = [{"type": "image_url", "image_url": {"url": data_url(png(k % 2))}} for k in range(8)]
        messages = [{"role": "user", "content": [*content, {"type": "text", "text": QUESTION}]}]
        model = client.models.list().data[0].id
        full = client.chat.completions.create(model=model, messages=messages, max_tokens=4000, temperature=0)
        used = full.usage.prompt_tokens + full.usage.completion_tokens
        assert full.usage.completion_tokens < 4000 and used <= 4096
        assert full.choices[0].finish_reason == ("length" if used == 4096 else "stop"), full.usage
        # With a long text too, the images overflow the context: a 400 before any token, streamed or not (a stream
        # starts at its first token, so no 200 carrying the error).
        long = [{"role": "user", "content": [*content, {"type": "text", "text": QUESTION + " lorem" * 500}]}]
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError, match="images"):
                client.chat.completions.create(model=model, messages=long, max_tokens=8, stream=stream)
    finally:
        srv.stop()
        site.shutdown()
    assert "Traceback" not in srv.log(), srv.log()


def test_bench_measures_the_image_on_onnx(tiny_multimodal_onnx, pictures, tmp_path):
    report_path = tmp_path / "report.json"
    args = [
        "--model",
        tiny_multimodal_onnx,
        "-b",
        "onnx",
        "-p",
        "16",
        "-n",
        "4",
        "-r",
        "2",
        "--no-quality",
        "--no-chart",
    ]
    done = run_phi3("bench", *args, "--image", str(pictures / "p1.png"), "--json", str(report_path),
                    env={"COLUMNS": "200"})  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    (row,) = [r for r in json.loads(report_path.read_text())["results"] if r["status"] == "ok"]
    test = row["image"]
    assert test["image"] == "p1.png (90x60)" and test["tokens_counted"] == [4, 4]
    for key in ("image_ms", "ttft_ms", "decode_tps"):
        assert test[key]["n"] == 2 and test[key]["min"] > 0, (key, test[key])
    # The processor's time is part of the time to first token, in every run.
    assert all(e < t for e, t in zip(test["image_ms"]["values"], test["ttft_ms"]["values"], strict=True))
