"""Batches made on a background thread ahead of the training loop, optionally in pinned memory."""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

from nmt.data.batching import Batch


def pinned(batch: Batch) -> Batch:
    """``batch`` with its tensors in page-locked memory, so that copies to the GPU can be async."""
    return dataclasses.replace(batch, **{f.name: getattr(batch, f.name).pin_memory()
                                         for f in dataclasses.fields(batch)
                                         if isinstance(getattr(batch, f.name), torch.Tensor)})


class Prefetcher:
    """Batches made on a background thread, ``depth`` ahead of the training loop.

    ``batches`` yields collated Batch objects (drawing from the sampler); ``position`` returns the
    sampler's state and is read right after each batch is drawn, so ``position_dict`` names what
    the training loop has consumed, not what the thread has run ahead to. With ``pin`` the batches
    land in pinned memory, so that ``Batch.to(cuda, non_blocking=True)`` overlaps the copy with
    the GPU's work. numpy and the pinning release the GIL, so the thread costs the loop little.
    """

    _END = object()

    def __init__(self, batches: Iterator[Batch], position: Callable[[], dict[str, Any]], pin: bool,
                 depth: int = 2) -> None:
        self._source, self._position, self._pin = batches, position, pin
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.position_dict = position()

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> Batch:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="nmt-prefetch", daemon=True)
            self._thread.start()
        item = self._queue.get()
        if item is self._END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        batch, self.position_dict = item
        return batch

    def _work(self) -> None:
        try:
            for batch in self._source:
                item = (pinned(batch) if self._pin else batch, self._position())
                if not self._put(item):
                    return
            self._put(self._END)
        except BaseException as e:  # noqa: BLE001 - handed to the training thread, which raises it
            self._put(e)

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
