"""Ctrl-C and SIGTERM outside the training loop (which has its own handlers: it finishes
the step and saves a checkpoint, overture/stopping.py).

There a signal stops the command as Ctrl-C does in Python, by an exception raised where
the main thread is: what was being built is removed on the way out (``building_dir``) and
the command ends with one line. A few steps must not be cut in two, such as spawning a
worker process (cut short, the worker read half its start-up data and printed a traceback
after the command's last line): a signal that arrives inside ``interruptions_deferred``
takes effect when the block ends.
"""

from __future__ import annotations

import contextlib
import signal
import threading


class Terminated(KeyboardInterrupt):
    """SIGTERM outside the training loop, raised where Ctrl-C's KeyboardInterrupt is."""


_deferred = {"depth": 0, "signum": None}


def _interrupt(signum: int, frame=None) -> None:
    if _deferred["depth"]:
        _deferred["signum"] = _deferred["signum"] or signum
        return
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


@contextlib.contextmanager
def interruptions_deferred():
    """A SIGINT or SIGTERM that arrives in the block is raised when the block ends."""
    _deferred["depth"] += 1
    try:
        yield
    finally:
        _deferred["depth"] -= 1
        if not _deferred["depth"] and _deferred["signum"] is not None:
            signum, _deferred["signum"] = _deferred["signum"], None
            _interrupt(signum)


@contextlib.contextmanager
def interrupts_raise():
    """Within the block, SIGINT raises KeyboardInterrupt and SIGTERM ``Terminated``
    (each where its handler is still Python's default, in the main thread only); the
    handlers are given back after."""
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum, default in ((signal.SIGINT, signal.default_int_handler),
                                (signal.SIGTERM, signal.SIG_DFL)):
            if signal.getsignal(signum) is default:  # an embedding program's own stays
                previous[signum] = signal.signal(signum, _interrupt)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
