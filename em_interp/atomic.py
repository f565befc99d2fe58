"""Atomic files and folders: a reader sees the old version or the whole new one, never a mix.

Files (:func:`atomic_write_bytes`) are written to a hidden temporary sibling, flushed and
``fsync``-ed, then moved over the target with :func:`os.replace`, which is atomic on POSIX and on
Windows within one file system.

Folders (:func:`atomic_dir`) are built in a hidden temporary sibling; a ``.complete`` marker is
written last (:func:`is_complete` looks for it, so a half-written folder is never taken for a
finished one). A folder cannot be swapped in one system call, so replacing an existing one
takes three steps, ordered so that no crash loses both versions:

1. the old folder is renamed aside (``.NAME.old-<token>``);
2. the new one is renamed into place;
3. the old one is deleted.

A crash between 1 and 2 leaves the old version intact under its aside name, and the next
:func:`atomic_dir` on the same path puts it back (when nothing newer took its place) before
starting. Temporary names carry the process id, the thread id and a random part, so two threads
or processes writing one path never collide on a temporary name; the last to finish wins.
Files and the parent directory are ``fsync``-ed where the platform allows it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil

MARKER = ".complete"
_SWAP_TRIES = 100


def _token() -> str:
    return f"{os.getpid()}-{threading.get_ident()}-{uuid.uuid4().hex[:8]}"


def _pid_of(name: str) -> int:
    try:
        return int(name.rsplit("-", 3)[-3])
    except (ValueError, IndexError):
        return -1


def _fsync_dir(folder: Path) -> None:
    """Flush a directory entry (a rename) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb+") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(folder)


def is_complete(folder: Path) -> bool:
    """True when ``folder`` was finished by :func:`atomic_dir` (its marker file exists)."""
    return (folder / MARKER).is_file()


def _recover(final: Path) -> None:
    """Undo a crash between 'old aside' and 'new in'; remove leftovers of dead writers."""
    for p in final.parent.glob(f".{final.name}.old-*"):
        if not final.exists() and is_complete(p):
            with contextlib.suppress(OSError):  # another writer may have just put one in place
                os.replace(p, final)
        elif not psutil.pid_exists(_pid_of(p.name)) or final.exists():
            shutil.rmtree(p, ignore_errors=True)
    for p in final.parent.glob(f".{final.name}.partial-*"):
        pid = _pid_of(p.name)
        if pid != os.getpid() and not psutil.pid_exists(pid):
            shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(final: Path, meta: dict | None = None) -> Iterator[Path]:
    """Write a folder atomically: yield a temporary sibling, swap it in for ``final`` on success.

    On an exception the temporary folder is deleted and ``final`` is left as it was. ``meta``
    goes into the ``.complete`` marker with the finishing time.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _recover(final)
    tmp = final.parent / f".{final.name}.partial-{_token()}"
    tmp.mkdir()
    try:
        yield tmp
        info = {"finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **(meta or {})}
        (tmp / MARKER).write_text(json.dumps(info, indent=2))
        _fsync_tree(tmp)
        asides = []
        for attempt in range(_SWAP_TRIES):  # another writer may swap its folder in between
            if final.exists():
                asides.append(final.parent / f".{final.name}.old-{_token()}")
                with contextlib.suppress(FileNotFoundError):
                    os.replace(final, asides[-1])
            try:
                os.replace(tmp, final)
                break
            except OSError:
                if attempt == _SWAP_TRIES - 1:
                    raise
        _fsync_dir(final.parent)
        for aside in asides:
            shutil.rmtree(aside, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file so that readers see either the old content or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{_token()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))
