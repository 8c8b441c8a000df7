"""Worker processes of data preparation that report their death: a worker killed by the
system (most often the out-of-memory killer) stops preparation with an error instead of
leaving it waiting forever for the worker's answer."""

from __future__ import annotations

import contextlib
import multiprocessing
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from nmt.errors import NMTError


@contextlib.contextmanager
def spawn_pool(workers: int, what: str, remedy: str = "free memory",
               initializer: Callable[..., Any] | None = None, initargs: tuple = ()) -> Iterator[ProcessPoolExecutor]:
    """A pool of ``workers`` spawned processes (spawn, not fork: the trainer's process may already
    run torch's thread pools). A killed worker fails every pending task with BrokenProcessPool,
    which leaves the block as a one-line NMTError naming ``what`` the pool was doing; tasks not yet
    started are dropped on any error."""
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=initializer, initargs=initargs)
    try:
        yield pool
    except BrokenProcessPool:
        _kill_survivors(pool)
        raise worker_died(what, remedy) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _kill_survivors(pool: ProcessPoolExecutor) -> None:
    """Kill the pool's remaining workers. The executor terminates the workers it knows of when one
    dies, but a worker it was still starting at that moment is missed, and its shutdown would
    wait for that worker forever."""
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        process.kill()


def worker_died(what: str, remedy: str = "free memory") -> NMTError:
    """The one-line error of a worker process that died while ``what``."""
    return NMTError(f"a worker process died while {what} (killed by the system, most likely for lack of "
                    f"memory); nothing was cached: {remedy}, then run again")


def run_apart(what: str, remedy: str, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a spawned process of its own, whose memory goes back to the system when it ends."""
    with spawn_pool(1, what, remedy) as pool:
        return pool.submit(fn, *args).result()
