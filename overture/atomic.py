"""Atomic writes: a file or folder is either whole at its final path or absent.

Everything overture publishes (checkpoints, final/, caches, the default corpus, reports)
goes through ``publish_dir`` (folders) or ``atomic_file`` (files), so a crash never leaves a half-written result where a
reader would take it for a whole one.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import secrets
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


def fresh_tmp_dir(dest: Path) -> Path:
    """An empty working folder beside ``dest``, private to this process."""
    tmp = Path(dest).with_name(Path(dest).name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


@contextlib.contextmanager
def building_dir(dest: Path) -> Iterator[Path]:
    """A new, empty working folder beside ``dest`` for the block to fill (and publish),
    removed if the block raises: an error, Ctrl-C or SIGTERM leaves no half-built folder.

    A ``kill -9`` (or the out-of-memory killer) still can: nothing runs then. So the
    folder, ``DEST.tmp-HOST-RANDOM``, is locked (``flock``) while the block runs, and each
    build of ``dest`` first removes this host's working folders for it that nobody holds
    locked any more. A lock, not a process id, tells a live build from a dead one: the
    kernel drops it when its process dies, and it holds across containers and process
    namespaces, where ids repeat. Another host's folders (a cache shared over a network
    file system) are never touched; where folders cannot be locked, none is removed.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    prefix = f"{dest.name}.tmp-{socket.gethostname()}-"
    for child in dest.parent.glob(glob.escape(prefix) + "*"):
        with _locked(child) as held:
            if held:  # its build ended without cleaning up
                shutil.rmtree(child, ignore_errors=True)
    # made under a name no build removes, locked, then renamed (the lock follows the
    # folder): a working folder is never seen unlocked while its build runs. mkdir, not
    # mkdtemp: the cache keeps the umask's permissions (mkdtemp's 0700 would hide a
    # shared cache from the other users)
    token = secrets.token_hex(6)
    new = dest.with_name(f".{dest.name}.new-{token}")
    new.mkdir()
    with _locked(new):
        tmp = dest.with_name(prefix + token)
        os.rename(new, tmp)
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``folder`` for the block; yields whether it was
    taken (False: another process holds it, the folder is gone or not a folder, or this
    file system has no locks)."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = True
        except OSError:
            held = False
        yield held
    finally:
        os.close(fd)  # releases the lock


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
