"""Atomic writes: a file or folder is either whole at its final path or absent.

Everything overture publishes (checkpoints, final/, caches, the default corpus, reports)
goes through ``publish_dir`` (folders) or ``atomic_file`` (files), so a crash never leaves a half-written result where a
reader would take it for a whole one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
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


def fresh_tmp_dir(dest: Path) -> Path:
    """An empty working folder beside ``dest``, private to this process."""
    tmp = Path(dest).with_name(Path(dest).name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


@contextlib.contextmanager
def building_dir(dest: Path) -> Iterator[Path]:
    """``fresh_tmp_dir(dest)`` for the block to fill (and publish), removed if the block
    raises: an error, Ctrl-C or SIGTERM leaves no half-built folder behind (kill -9
    still can; a later build by a process of the same pid clears it)."""
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
