"""The chat page at `/`, in a real headless Chromium driven by chromedriver through selenium.

It runs on the FAKE scripted model (the page's job is the protocol: list models, stream, keep the conversation,
send the API key), served with an API key. Skipped, saying why, where Chromium, its driver or selenium is missing
(.ci/run installs Debian's chromium and chromium-driver).
"""

from __future__ import annotations

import shutil
import urllib.request

import pytest

from tests.fakes.scripted_model import FakeScriptedModel
from tests.test_serve import KEY
from tests.test_serve_protocol import CONTEXT, InProcessServer

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
BROWSER = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (BROWSER and DRIVER),
    reason="no headless browser here: install Debian's chromium and chromium-driver (apt-get install -y chromium "
    "chromium-driver)",
)


@pytest.fixture(scope="module")
def fake():
    return FakeScriptedModel(context_length=CONTEXT)


@pytest.fixture(scope="module")
def server(fake, tmp_path_factory):
    srv = InProcessServer(fake, tmp_path_factory.mktemp("page") / "server.log", api_key=KEY)
    srv.start()
    srv.ready()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def test_the_page_is_served_without_the_key_and_ships_no_remote_code(server):
    with urllib.request.urlopen(server.base + "/", timeout=30) as answer:
        page = answer.read().decode()
    assert answer.headers["Content-Type"].startswith("text/html")
    assert (
        "<script" in page and "src=" not in page and "http" not in page.replace("http://", "").replace("https://", "")
    )


def test_a_question_typed_in_the_page_streams_its_answer_with_the_timing_line(server, fake, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 30)
    browser.get(server.base + "/")
    key = browser.find_element(By.ID, "key")
    key.clear()
    key.send_keys(KEY, Keys.TAB)  # the change event reloads the model list with the key
    wait.until(lambda d: "fake" in d.find_element(By.ID, "model").text)
    assert "demo (fake fake on CPU)" in browser.find_element(By.ID, "model").text

    fake.script("Paris is the capital.")
    browser.find_element(By.ID, "prompt").send_keys("What is the capital of France?", Keys.ENTER)
    stats = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".assistant .stats"))
    answer = browser.find_elements(By.CSS_SELECTOR, ".assistant")[-1].text
    assert answer.startswith("Paris is the capital.")
    line = stats[-1].text  # as `phi3 chat` prints it
    assert line.startswith("fake on CPU · TTFT") and " 4 tokens (" in line and line.endswith(" · stop")

    browser.find_element(By.ID, "prompt").send_keys("And of Spain?", Keys.ENTER)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".assistant .stats")) == 2)
    sent = fake.decode(fake.prompts[-1])  # the page kept the conversation and sent it whole
    assert "What is the capital of France?" in sent and "Paris is the capital." in sent and "And of Spain?" in sent
    assert browser.find_elements(By.CSS_SELECTOR, ".assistant")[-1].text.startswith("You said: And of Spain?")


def test_a_wrong_key_is_shown_in_the_page(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server.base + "/")
    key = browser.find_element(By.ID, "key")
    key.clear()
    key.send_keys("wrong", Keys.TAB)
    WebDriverWait(browser, 30).until(lambda d: "API key" in d.find_element(By.ID, "status").text)
