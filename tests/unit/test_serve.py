"""The server's batching and HTTP layer on a stand-in model (no checkpoint, no socket)."""

from __future__ import annotations

import asyncio

from nmt.serve import Batcher, ServeOptions


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
        worker = asyncio.create_task(batcher.run())
        try:
            return await coro_fn(batcher)
        finally:
            worker.cancel()
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
