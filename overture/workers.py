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
import signal
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from .errors import RunError
from .interrupts import interruptions_deferred


@contextlib.contextmanager
def worker_pool(workers: int, broken: Callable[[], str], *, start: str | None = None,
                initializer: Callable | None = None, initargs: tuple = ()
                ) -> Iterator[ProcessPoolExecutor]:
    """A ``ProcessPoolExecutor`` of ``workers`` processes started by ``start`` ("spawn",
    "fork", ...; None: the platform's default), each running ``initializer(*initargs)``
    first.

    A worker that ended before its task was done (killed, out of memory, crashed, or an
    error while it started) raises ``BrokenProcessPool`` from ``submit()``, ``map()`` or
    ``result()``; inside the block that becomes ``RunError(broken())``. Leaving the block
    any other way before its tasks are done (Ctrl-C, SIGTERM, an error, a generator
    closed) ends the workers at once: their work is pure, so nothing is lost, and neither
    the command nor a second Ctrl-C waits for the tasks queued.
    """
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(start),
                               initializer=_start_worker, initargs=(initializer, initargs))
    try:
        yield pool
    except BrokenProcessPool as err:
        raise RunError(broken()) from err
    except BaseException:
        with interruptions_deferred():  # a second Ctrl-C must not leave them running
            _end_workers(pool)
            pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _end_workers(pool: ProcessPoolExecutor) -> None:
    """Terminate the pool's worker processes (Python 3.14 has this as a method)."""
    if hasattr(pool, "terminate_workers"):
        pool.terminate_workers()
        return
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        if process.is_alive():
            process.terminate()


def _start_worker(initializer: Callable | None, initargs: tuple) -> None:
    # Ctrl-C reaches every process of the terminal's group: the main process ends the
    # workers, which would otherwise each print a KeyboardInterrupt traceback
    signal.signal(signal.SIGINT, signal.SIG_IGN)
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
