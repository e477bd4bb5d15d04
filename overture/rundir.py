"""The run folder: made writable, locked for one run at a time, left clean on failure.

Two runs on one ``output_dir`` would interleave ``metrics.jsonl`` and delete each other's
checkpoint folders mid-save, so the main process holds an exclusive ``flock`` on
``OUTPUT_DIR/.lock`` for the whole run. The kernel drops the lock when the process dies
(even by SIGKILL), so a crashed run never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

from .config import ConfigError

log = logging.getLogger(__name__)

LOCK = ".lock"


@contextlib.contextmanager
def claim_run_dir(run_dir: Path, main_process: bool = True) -> Iterator[Path]:
    """Create ``run_dir`` if needed, lock it and clear what a crashed run left half-written.

    On the non-main processes of a multi-process run this does nothing (rank 0 holds the
    lock for all). A run that fails before writing anything removes the folder it made.
    """
    run_dir = Path(run_dir)
    if not main_process:
        yield run_dir
        return
    # the folders this call makes (run_dir and any missing parents): removed again if
    # the run fails before writing anything
    made = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        handle = open(run_dir / LOCK, "a+", encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"output_dir={str(run_dir)!r} cannot be written "
                          f"({err.strerror or err}); choose a folder you can write to") from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise ConfigError(f"output_dir={str(run_dir)!r} is in use by another run "
                              f"({holder}); wait for it to end or choose another "
                              "output_dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        remove_partial_writes(run_dir)
        yield run_dir
    finally:
        handle.close()  # releases the lock
        if made:
            _remove_if_empty(run_dir, made)


def remove_partial_writes(run_dir: Path) -> list[Path]:
    """Delete what an interrupted save leaves: ``*.tmp`` / ``*.tmp-*`` working folders and
    ``*.old`` folders kept aside during a publish. Only called under the run lock, so no
    other writer owns them."""
    removed = []
    for folder in (run_dir, run_dir / "checkpoints"):
        if not folder.is_dir():
            continue
        for child in folder.iterdir():
            if child.is_dir() and (child.name.endswith((".tmp", ".old")) or ".tmp-" in child.name):
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child)
    if removed:
        log.info("removed %d incomplete folder(s) left by an interrupted run: %s",
                 len(removed), ", ".join(p.name for p in removed))
    return removed


def _remove_if_empty(run_dir: Path, made: list[Path]) -> None:
    """A run that failed before writing anything leaves no folder behind: not its run
    folder, nor the parents it made for it (``made``, innermost first)."""
    with contextlib.suppress(OSError):
        if [p.name for p in run_dir.iterdir()] == [LOCK]:
            (run_dir / LOCK).unlink()
            for folder in made:
                folder.rmdir()  # OSError (not empty) stops at the first one in use
