"""Atomic writes: a file or folder is either whole at its final path or absent.

Everything overture publishes (checkpoints, final/, caches, the default corpus, reports)
goes through ``publish_dir`` (folders) or ``atomic_file`` (files), so a crash never leaves a half-written result where a
reader would take it for a whole one.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

COMPLETE = "COMPLETE"
"""Marker file written last into a folder that is whole (checkpoints, caches)."""


def publish_dir(tmp: Path, dest: Path, replace: bool = True) -> bool:
    """Move the finished folder ``tmp`` to ``dest`` with renames only.

    With ``replace``, an existing ``dest`` is kept aside until the new one is in place.
    Without it, an existing ``dest`` wins (another process published the same content
    first) and ``tmp`` is removed. Returns True when ``tmp`` became ``dest``.
    """
    tmp, dest = Path(tmp), Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() and not replace:
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    old = dest.with_name(dest.name + ".old")
    if dest.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dest, old)
    try:
        os.replace(tmp, dest)
    except OSError:  # a concurrent publisher got there first (non-empty dest)
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    finally:
        shutil.rmtree(old, ignore_errors=True)
    return True


def tmp_dir_path(dest: Path) -> Path:
    """The working folder of this process for ``dest``: ``DEST.tmp-HOST-PID`` beside it
    (the host too: a cache folder may be shared by the machines of a cluster)."""
    dest = Path(dest)
    return dest.with_name(f"{dest.name}.tmp-{socket.gethostname()}-{os.getpid()}")


def fresh_tmp_dir(dest: Path) -> Path:
    """An empty working folder beside ``dest``, private to this process. The working
    folders for ``dest`` that ended processes of this host left (``kill -9``, out of
    memory: nothing could remove them) are removed first."""
    tmp = tmp_dir_path(dest)
    prefix = tmp.name[:-len(str(os.getpid()))]
    if tmp.parent.is_dir():
        for child in tmp.parent.glob(glob.escape(prefix) + "*"):
            pid = child.name[len(prefix):]
            if pid.isdigit() and not _running(int(pid)):
                shutil.rmtree(child, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _running(pid: int) -> bool:
    """Whether process ``pid`` of this host exists (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def building_dir(dest: Path) -> Iterator[Path]:
    """``fresh_tmp_dir(dest)`` for the block to fill (and publish), removed if the block
    raises: an error, Ctrl-C or SIGTERM leaves no half-built folder behind (``kill -9``
    still can; the next build of ``dest`` on this host removes it)."""
    tmp = fresh_tmp_dir(dest)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; once the block succeeds it is renamed to
    ``path``, otherwise removed."""
    path = Path(path)
    tmp = path.with_name(f"{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
