"""Worker processes for data preparation (text examples, image checks): one pool, whose
workers end with the main process, and whose broken state becomes one line.

A ``concurrent.futures`` executor, not ``multiprocessing.Pool``: a worker that dies breaks
the executor with an error, where a Pool starts another in its place, forever (a script
without a ``__main__`` guard re-ran itself in every spawned worker and hung).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from .errors import RunError


@contextlib.contextmanager
def worker_pool(workers: int, broken: Callable[[], str], *, start: str = "spawn",
                initializer: Callable | None = None, initargs: tuple = ()
                ) -> Iterator[ProcessPoolExecutor]:
    """A ``ProcessPoolExecutor`` of ``workers`` processes started by ``start`` ("spawn" or
    "fork"), each running ``initializer(*initargs)`` first.

    A worker that ended before its task was done (killed, out of memory, crashed, or an
    error while it started) raises ``BrokenProcessPool`` from ``submit()``, ``map()`` or
    ``result()``; inside the block that becomes ``RunError(broken())``. The pool is shut
    down on the way out, its queued tasks cancelled.
    """
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(start),
                               initializer=_start_worker, initargs=(initializer, initargs))
    try:
        yield pool
    except BrokenProcessPool as err:
        raise RunError(broken()) from err
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _start_worker(initializer: Callable | None, initargs: tuple) -> None:
    # a worker ends with the main process, however that ends (SIGTERM, kill -9, out of
    # memory): the executor's queues never tell it, and it would wait on them forever
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with, args=(parent.sentinel,), daemon=True).start()
    if initializer is not None:
        initializer(*initargs)


def _exit_with(sentinel) -> None:
    """Wait for the main process's ``sentinel`` (ready when it has ended), then exit."""
    multiprocessing.connection.wait([sentinel])
    os._exit(1)
