"""The server's batching and HTTP layer on a stand-in model (no checkpoint, no socket)."""

from __future__ import annotations

import asyncio

import pytest

from nmt.serve import Batcher, RequestError, ServeOptions


class Recorder:
    """A translate function that uppercases, fails on "BAD", and records what it was given."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, texts: list[str]) -> list[str]:
        self.calls.append(list(texts))
        if any("BAD" in t for t in texts):
            raise ValueError("cannot encode")
        return [t.upper() for t in texts]


def _run(coro_fn, translate, **options):
    async def main():
        batcher = Batcher(translate, ServeOptions(**options))
        batcher.start()
        try:
            return await coro_fn(batcher)
        finally:
            batcher.task.cancel()
            batcher.executor.shutdown(wait=True)

    return asyncio.run(main())


def test_a_failing_request_fails_alone():
    translate = Recorder()

    async def burst(batcher):
        texts = [["a"], ["b", "c"], ["BAD"], ["d"]]
        return await asyncio.gather(*(batcher.submit(t) for t in texts), return_exceptions=True)

    results = _run(burst, translate, batch_window_ms=200, max_batch=8)
    assert results[:2] == [["A"], ["B", "C"]] and results[3] == ["D"]
    assert isinstance(results[2], ValueError)
    assert translate.calls[0] == ["a", "b", "c", "BAD", "d"]  # one batch, then each request alone
    assert translate.calls[1:] == [["a"], ["b", "c"], ["BAD"], ["d"]]


def test_requests_nobody_waits_for_are_not_decoded():
    translate = Recorder()

    async def burst(batcher):
        tasks = [asyncio.create_task(batcher.submit([f"s{i}"])) for i in range(8)]
        await asyncio.sleep(0.05)  # all queued, the window still open
        for task in tasks[::2]:
            task.cancel()  # what a client that disconnects does to its request
        return await asyncio.gather(*tasks[1::2])

    assert _run(burst, translate, batch_window_ms=300, max_batch=16) == [["S1"], ["S3"], ["S5"], ["S7"]]
    assert translate.calls == [["s1", "s3", "s5", "s7"]]


def test_deadline_answers_504_and_drops_waiting_work():
    import time

    calls: list[list[str]] = []

    def slow(texts):
        calls.append(texts)
        time.sleep(0.4)
        return texts

    async def two(batcher):
        first = asyncio.create_task(batcher.submit(["a"]))
        await asyncio.sleep(0.05)  # "a" is decoding; "b" waits behind it past its deadline
        return await asyncio.gather(first, batcher.submit(["b"]), return_exceptions=True)

    results = _run(two, slow, batch_window_ms=0, timeout=0.2)
    assert [r.status for r in results] == [504, 504] and calls == [["a"]]


def test_a_batch_is_bounded_in_tokens_as_well_as_requests():
    translate = Recorder()

    async def burst(batcher):
        jobs = [(["a"], 6), (["b"], 6), (["c"], 3)]
        return await asyncio.gather(*(batcher.submit(t, tokens) for t, tokens in jobs))

    assert _run(burst, translate, batch_window_ms=200, max_batch=8, max_batch_tokens=10) == [["A"], ["B"], ["C"]]
    assert translate.calls == [["a"], ["b", "c"]]  # "b" would have made the first batch 12 tokens


def test_work_run_alone_waits_in_the_bounded_queue():
    import time

    def slow(texts):
        time.sleep(0.3)
        return texts

    async def crowd(batcher):
        first = asyncio.create_task(batcher.submit(["a"]))
        await asyncio.sleep(0.05)  # "a" decoding
        second = asyncio.create_task(batcher.submit(["b"]))  # fills the queue of one
        await asyncio.sleep(0.01)
        with pytest.raises(RequestError) as refused:
            await batcher.submit_alone(lambda: "attention")
        assert refused.value.status == 503
        await asyncio.gather(first, second)
        return await batcher.submit_alone(lambda: "attention")

    assert _run(crowd, slow, batch_window_ms=0, queue_size=1) == "attention"


class FakeBackend:
    src_lang, tgt_lang = "en", "de"

    def translate(self, texts):
        return [t.upper() for t in texts]

    def count_tokens(self, texts):
        return [len(t.split()) + 1 for t in texts]

    def attention(self, text):
        return {"translatedText": text.upper(), "layers": [[[1.0]]]}


@pytest.fixture
def client_for():
    """A TestClient (lifespan running) for ServeOptions(**kwargs) on the stand-in backend."""
    from fastapi.testclient import TestClient

    from nmt.serve import create_app

    clients = []

    def make(**options):
        client = TestClient(create_app(FakeBackend(), ServeOptions(**options)))
        clients.append(client.__enter__())
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def test_api_keys_are_checked_when_configured(client_for):
    body = {"q": "a b", "source": "en", "target": "de"}
    open_server = client_for()
    assert open_server.post("/translate", json=body).json() == {"translatedText": "A B"}
    locked = client_for(api_keys=frozenset({"k1", "k2"}))
    for key in (None, "", "k3", ["k1"]):
        response = locked.post("/translate", json={**body, "api_key": key})
        assert response.status_code == 403 and response.json() == {"error": "Invalid API key"}
    assert locked.post("/attention", json={"q": "a"}).status_code == 403
    assert locked.post("/translate", json={**body, "api_key": "k2"}).status_code == 200
    assert locked.post("/translate", data={**body, "api_key": "k1"}).status_code == 200  # a form too
    assert locked.get("/languages").status_code == 200


def test_limits_and_deep_json_are_client_errors(client_for):
    client = client_for(max_chars=5, max_texts=2, max_body_bytes=100_000, max_batch_tokens=4)
    body = {"source": "en", "target": "de"}
    assert client.post("/translate", json={**body, "q": "abcdef"}).status_code == 413
    assert client.post("/translate", json={**body, "q": ["a", "b", "c"]}).status_code == 413
    too_long = client.post("/translate", json={**body, "q": ["a b", "c d"]})  # 3 + 3 tokens
    assert too_long.status_code == 413 and "--max-batch-tokens" in too_long.json()["error"]
    deep = client.post("/translate", content=b"[" * 50_000, headers={"Content-Type": "application/json"})
    assert deep.status_code == 400 and "nested" in deep.json()["error"]
    assert client.post("/translate", json={**body, "q": "ab"}).json() == {"translatedText": "AB"}


def test_attention_goes_through_the_queue_and_is_capped(client_for):
    from nmt.serve import ATTENTION_MAX_TOKENS

    client = client_for()
    before = client.get("/health").json()["batches"]
    assert client.post("/attention", json={"q": "a b"}).json()["translatedText"] == "A B"
    assert client.get("/health").json()["batches"] == before + 1  # decoded by the batcher
    long = client.post("/attention", json={"q": "w " * ATTENTION_MAX_TOKENS})
    assert long.status_code == 413 and str(ATTENTION_MAX_TOKENS) in long.json()["error"]


def test_health_says_503_when_the_batching_task_has_died(client_for, capsys):
    client = client_for(timeout=0.5)
    body = {"q": "a", "source": "en", "target": "de"}
    assert client.get("/health").status_code == 200

    async def broken(batch):
        raise RuntimeError("a bug outside any request")

    client.app.state.batcher._decode = broken
    assert client.post("/translate", json=body).status_code == 504  # its batch took the task down
    response = client.get("/health")
    assert response.status_code == 503 and "stopped" in response.json()["error"]
    assert client.post("/translate", json=body).status_code == 503  # not left to wait for nothing
    assert "error: the batching task stopped: RuntimeError('a bug outside any request')" in capsys.readouterr().err


def test_a_public_address_without_keys_is_named_in_the_log():
    from nmt.serve import exposure_warning

    assert exposure_warning("0.0.0.0", ServeOptions()) is not None
    assert "192.168.1.5" in exposure_warning("192.168.1.5", ServeOptions())
    assert exposure_warning("example.org", ServeOptions()) is not None
    for loopback in ("127.0.0.1", "::1", "localhost"):
        assert exposure_warning(loopback, ServeOptions()) is None
    assert exposure_warning("0.0.0.0", ServeOptions(api_keys=frozenset({"k"}))) is None
