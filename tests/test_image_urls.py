"""`phi3 serve --allow-image-urls`: http(s) image URLs fetched from a real local HTTP server, with the size and
time limits for the whole fetch; each failure a 400 (an ApiError) naming the part, never a hang or a traceback.

resolve_images is called as the server calls it (off the event loop); the model is the FAKE scripted model that
says it reads images, since only the fetching is under test here. tests/test_vision_onnx.py sends an http URL
through a real server and model.
"""

from __future__ import annotations

import queue
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from phi3cli.serve.images import ImageOptions, resolve_images
from phi3cli.serve.protocol import ApiError
from tests.test_images import FakeVisionModel, png_bytes

PICTURE = png_bytes(3, size=(40, 60))
TRICKLE: queue.Queue[str] = queue.Queue()  # how the slow download ended, seen from the server


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        if self.path == "/missing.png":
            self.send_error(404)
            return
        body = {"/p.png": PICTURE, "/big.png": PICTURE + bytes(4096), "/slow.png": PICTURE}[self.path]
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.path != "/slow.png":
            self.wfile.write(body)
            return
        try:
            for k in range(0, len(body), 64):  # a trickle: every read gets data, the whole never comes in time
                self.wfile.write(body[k : k + 64])
                self.wfile.flush()
                time.sleep(0.1)
        except OSError:  # the client hung up
            TRICKLE.put("cut off")
        else:
            TRICKLE.put("sent whole")

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def site():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def messages(url: str) -> list[dict]:
    return [{"role": "user", "content": "What is this?", "image_urls": [url]}]


OPTIONS = ImageOptions(allow_urls=True, fetch_bytes=len(PICTURE) + 1024, fetch_seconds=1.0)


def test_an_image_url_is_fetched_and_decoded(site):
    given = messages(f"{site}/p.png")
    assert resolve_images(given, FakeVisionModel(), "tiny", OPTIONS) == 1
    (picture,) = given[0]["images"]
    assert (picture.width, picture.height, picture.media_type) == (60, 40, "image/png")


@pytest.mark.parametrize(
    "path, words",
    [
        ("/big.png", r"is over \d"),
        ("/slow.png", "took over 1 s to fetch"),
        ("/missing.png", "could not be fetched from"),
    ],
    ids=["over-size", "too-slow", "missing"],
)
def test_a_bad_image_url_is_a_400_naming_the_part(site, path, words):
    with pytest.raises(ApiError, match=words) as caught:
        resolve_images(messages(f"{site}{path}"), FakeVisionModel(), "tiny", OPTIONS)
    assert caught.value.status == 400 and caught.value.message.startswith("messages[0] image 1")
    if path == "/slow.png":  # the fetch gave up while the image was still coming, not once it had all come
        assert TRICKLE.get(timeout=60) == "cut off"


def test_without_the_flag_an_image_url_is_refused_unfetched(site):
    with pytest.raises(ApiError, match="--allow-image-urls"):
        resolve_images(messages(f"{site}/p.png"), FakeVisionModel(), "tiny", ImageOptions())
