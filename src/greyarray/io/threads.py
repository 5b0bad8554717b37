"""A thread pool that stops promptly: on an error or a signal, queued work is cancelled."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor


@contextlib.contextmanager
def thread_pool(workers: int) -> Iterator[ThreadPoolExecutor]:
    """ThreadPoolExecutor whose exit cancels pending tasks when the block fails: ``pool.map``
    queues every task at once, and a SIGTERM must not wait for thousands of them."""
    pool = ThreadPoolExecutor(max(1, workers))
    try:
        yield pool
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
