"""`nmt serve` on 127.0.0.1: the LibreTranslate client, error codes, batching, the page, SIGTERM.

One server for the module, started with a small queue and a long batch window so that a burst of
requests is batched (and overflows) for sure; the SIGTERM test runs last and stops it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from nmt.checkpoint import load_for_inference
from tests.integration.conftest import ROOT

pytestmark = pytest.mark.slow  # every test here trains a model or uses one trained for it

httpx = pytest.importorskip("httpx", reason="the serving tests need httpx (nmt[dev])")
pytest.importorskip("fastapi", reason="nmt serve needs fastapi and uvicorn (nmt[serve])")
pytest.importorskip("uvicorn", reason="nmt serve needs fastapi and uvicorn (nmt[serve])")

WINDOW_MS, MAX_BATCH, QUEUE = 300, 4, 4
MAX_TEXTS, MAX_CHARS, MAX_BODY = 100, 1000, 32_768  # the limits given on the command line
SENTENCE = "A man walks in the park."  # of the test corpus's grammar (tests/synthetic_corpus.py)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(trained_run):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "NMT_DEBUG"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "nmt.cli", "serve", "-m", str(trained_run / "checkpoints" / "last.pt"),
         "--port", str(port), "--batch-window-ms", str(WINDOW_MS), "--max-batch", str(MAX_BATCH),
         "--queue-size", str(QUEUE), "--threads", "1", "--max-texts", str(MAX_TEXTS),
         "--max-chars", str(MAX_CHARS), "--max-body-bytes", str(MAX_BODY)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail(f"server did not start: {proc.communicate()[0]}")
    yield SimpleServer(url, proc, trained_run / "checkpoints" / "last.pt")
    if proc.poll() is None:
        proc.kill()
        proc.wait()


class SimpleServer:
    def __init__(self, url: str, proc: subprocess.Popen, checkpoint: Path) -> None:
        self.url, self.proc, self.checkpoint = url, proc, checkpoint

    def post(self, path: str, **kwargs):
        return httpx.post(f"{self.url}{path}", timeout=60, **kwargs)


def test_libretranslate_client_gets_our_translation(server):
    from libretranslatepy import LibreTranslateAPI

    from nmt.checkpoint import load_for_inference
    from nmt.translate import translate_lines

    model, tokenizer, cfg = load_for_inference(server.checkpoint)
    expected = list(translate_lines(model, tokenizer, [SENTENCE], cfg.decode, search="beam"))[0]
    client = LibreTranslateAPI(server.url)
    assert client.translate(SENTENCE, "en", "de") == expected
    assert client.languages() == [{"code": "en", "name": "English", "targets": ["de"]},
                                  {"code": "de", "name": "German", "targets": []}]
    listed = server.post("/translate", json={"q": [SENTENCE, "", "Two dogs."], "source": "en",
                                             "target": "de"})
    assert listed.status_code == 200
    assert listed.json()["translatedText"][:2] == [expected, ""]


@pytest.mark.parametrize("kwargs, status, message", [
    ({"content": b"{\"q\": ", "headers": {"Content-Type": "application/json"}}, 400, "invalid JSON"),
    ({"content": b""}, 400, "empty request body"),
    ({"json": {"q": "x", "source": "en", "target": "fr"}}, 400, "unsupported language pair"),
    ({"json": {"source": "en", "target": "de"}}, 400, "missing parameter q"),
    ({"json": {"q": [1, 2], "source": "en", "target": "de"}}, 400, "list of strings"),
    ({"json": {"q": "x", "source": "en", "target": "de", "format": "html"}}, 400, "format"),
    ({"json": {"q": ["x"] * (MAX_TEXTS + 1), "source": "en", "target": "de"}}, 413, f"at most {MAX_TEXTS}"),
    ({"json": {"q": "x" * (MAX_CHARS + 1), "source": "en", "target": "de"}}, 413, f"{MAX_CHARS} characters"),
    ({"content": b"q=" + b"x" * MAX_BODY}, 413, f"{MAX_BODY} bytes"),
    ({"content": b"[" * 20_000, "headers": {"Content-Type": "application/json"}}, 400, "nested too deeply"),
])
def test_bad_requests_get_their_status_and_the_server_keeps_serving(server, kwargs, status, message):
    response = server.post("/translate", **kwargs)
    assert response.status_code == status
    assert message in response.json()["error"]
    ok = server.post("/translate", json={"q": SENTENCE, "source": "en", "target": "de"})
    assert ok.status_code == 200


def test_unknown_path_is_a_json_404(server):
    response = httpx.get(f"{server.url}/nope", timeout=10)
    assert response.status_code == 404 and response.json() == {"error": "Not Found"}


def test_burst_is_batched_and_overflow_gets_503(server):
    before = httpx.get(f"{server.url}/health", timeout=10).json()
    codes: list[int] = []
    barrier = threading.Barrier(16)

    def one() -> None:
        barrier.wait()
        codes.append(server.post("/translate", json={"q": SENTENCE, "source": "en",
                                                     "target": "de"}).status_code)

    threads = [threading.Thread(target=one) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = httpx.get(f"{server.url}/health", timeout=10).json()
    served = codes.count(200)
    assert set(codes) <= {200, 503} and 503 in codes  # queue of 4 + a batch of 4 < 16
    assert served >= MAX_BATCH
    # every served request was decoded, in fewer batches than requests
    assert after["sentences"] - before["sentences"] == served
    assert after["batches"] - before["batches"] < served


def _concurrently(*calls) -> list:
    """Run the calls at once (one batching window); their results in order."""
    results: list = [None] * len(calls)
    barrier = threading.Barrier(len(calls))

    def one(i: int) -> None:
        barrier.wait()
        results[i] = calls[i]()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_text_that_is_not_unicode_fails_alone(server):
    bad = b'{"q": ["ok", "\\ud800"], "source": "en", "target": "de"}'

    def good():
        return server.post("/translate", json={"q": SENTENCE, "source": "en", "target": "de"})

    def lone_surrogate():
        return server.post("/translate", content=bad, headers={"Content-Type": "application/json"})

    responses = _concurrently(good, lone_surrogate, good)
    assert [r.status_code for r in responses] == [200, 400, 200]
    assert "not valid Unicode" in responses[1].json()["error"]


def test_requests_of_clients_that_left_are_not_decoded(server):
    before = httpx.get(f"{server.url}/health", timeout=10).json()

    def leaver():
        try:
            return httpx.post(f"{server.url}/translate", json={"q": "Two dogs.", "source": "en",
                                                               "target": "de"}, timeout=0.1)
        except httpx.TimeoutException:  # gone well inside the batching window
            return None

    def stayer():
        return server.post("/translate", json={"q": SENTENCE, "source": "en", "target": "de"})

    results = _concurrently(leaver, stayer, leaver)  # fewer than a batch: the window runs out
    assert results[0] is None and results[2] is None and results[1].status_code == 200
    after = httpx.get(f"{server.url}/health", timeout=10).json()
    assert after["sentences"] - before["sentences"] == 1


def _browser():
    """(chromium, chromedriver) paths or None; CI must have them (`make browser`)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium and driver:
        return chromium, driver
    reason = "no chromium/chromedriver (install them with `make browser`)"
    if os.environ.get("CI"):
        pytest.fail(f"{reason}: CI must run the browser test")
    pytest.skip(reason)


def test_web_page_shows_translation_and_heatmap(server, tmp_path):
    chromium, driver_path = _browser()
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (nmt[dev])")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,800"):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(driver_path))
    try:
        browser.get(server.url + "/")
        browser.find_element(By.ID, "source").send_keys(SENTENCE)
        browser.find_element(By.ID, "go").click()
        wait = WebDriverWait(browser, 60)
        wait.until(lambda b: b.find_element(By.ID, "translation").text.strip())
        cells = browser.find_elements(By.CSS_SELECTOR, "#heatmap tbody td")
        sources = browser.find_elements(By.CSS_SELECTOR, "#heatmap thead th")
        targets = browser.find_elements(By.CSS_SELECTOR, "#heatmap tbody th")
        _model, tokenizer, _cfg = load_for_inference(server.checkpoint)
        assert [th.text for th in sources[1:]] == [*tokenizer.src_pieces(SENTENCE), "</s>"]
        assert targets[-1].text == "</s>"
        assert len(cells) == (len(sources) - 1) * len(targets) > 0
        # coloured by weight; the strongest cell is opaque, which the browser writes as rgb()
        styles = [c.get_attribute("style") for c in cells]
        assert all("rgb" in style for style in styles) and len(set(styles)) > 1
        shot = Path(os.environ.get("NMT_SCREENSHOT", tmp_path / "page.png"))
        assert browser.save_screenshot(str(shot))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        browser.quit()


def test_load_test_smoke_run_has_no_failures(server):
    """scripts/load_test.py, short: as many clients as a batch, so nothing overflows."""
    import asyncio
    import importlib.util

    spec = importlib.util.spec_from_file_location("load_test", ROOT / "scripts" / "load_test.py")
    load_test = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(load_test)
    result = asyncio.run(load_test.run_load(server.url, [SENTENCE, "Two dogs play."], clients=MAX_BATCH,
                                            duration=2.0, max_requests=200))
    assert result["failed"] == 0 and result["requests"] >= MAX_BATCH
    assert result["p50_ms"] <= result["p99_ms"]
    with pytest.raises(SystemExit, match="loopback"):
        load_test.check_loopback("http://192.0.2.1:5000")


def test_sigterm_lets_the_request_in_flight_finish(server):
    """Last in the module: the server stops here."""
    result: dict = {}

    def request() -> None:
        result["response"] = server.post("/translate", json={"q": [SENTENCE] * 100, "source": "en",
                                                             "target": "de"})

    thread = threading.Thread(target=request)
    thread.start()
    deadline = time.monotonic() + 30
    while httpx.get(f"{server.url}/health", timeout=10).json()["pending"] < 1:
        assert time.monotonic() < deadline, "the request never arrived"
        time.sleep(0.02)
    server.proc.send_signal(signal.SIGTERM)  # accepted, waiting or decoding: not answered yet
    thread.join(60)
    assert result["response"].status_code == 200
    assert len(result["response"].json()["translatedText"]) == 100
    # uvicorn re-raises the signal once it has shut down
    assert server.proc.wait(60) in (0, -signal.SIGTERM)
