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
