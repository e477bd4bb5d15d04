"""Ctrl-C and SIGTERM outside the training loop (which has its own handlers: it finishes
the step and saves a checkpoint, overture/stopping.py).

Ctrl-C stops a command by an exception raised where the main thread is, as in any Python
program; so does SIGTERM while the examples are built (``overture prepare``), where it
used to end the process at once. What was being built is removed on the way out
(``building_dir``) and the command ends with one line. A few steps must not be cut in
two, such as spawning a worker process (cut short, the worker read half its start-up
data and printed a traceback after the command's last line): a signal that arrives
inside ``interruptions_deferred`` takes effect when the block ends.
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
    _deferred["signum"] = None  # raised now: nothing is left pending for a later block
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


DEFAULTS = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}


@contextlib.contextmanager
def interrupts_raise(*signums: int):
    """Within the block, each of ``signums`` (SIGINT, SIGTERM) raises KeyboardInterrupt
    (SIGTERM: ``Terminated``), honouring ``interruptions_deferred``; only in the main
    thread and over Python's default handler (an embedding program's or the training
    loop's own stays). The handlers are given back after.

    SIGTERM is raised only around pure-Python work, where the main thread runs Python
    often: inside a long native call (tokenizer training) a handler waits for it to
    return, where the default action ends the process at once."""
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in signums:
            if signal.getsignal(signum) is DEFAULTS[signum]:
                previous[signum] = signal.signal(signum, _interrupt)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if previous and not _deferred["depth"]:
            _deferred["signum"] = None  # nothing pending outlives its handlers
