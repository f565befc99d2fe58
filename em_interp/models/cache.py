"""The on-disk cache and atomic folder writes.

Converted models (GGUF -> safetensors), verified wheel downloads and built test models live
under :func:`cache_dir` (``~/.cache/em_interp``, or ``$EM_INTERP_CACHE``).

A folder is written by :func:`atomic_dir`: everything goes into a hidden ``.NAME.partial-PID``
sibling, a ``.complete`` marker is written last, and only then is the folder renamed into place.
A run killed half-way leaves a partial folder that no reader takes for a finished one
(:func:`is_complete` looks for the marker), and the next run deletes it and starts again.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

CACHE_ENV = "EM_INTERP_CACHE"
MARKER = ".complete"


def cache_dir() -> Path:
    """The cache root: ``$EM_INTERP_CACHE`` if set, else ``~/.cache/em_interp``."""
    root = os.environ.get(CACHE_ENV)
    path = Path(root).expanduser() if root else Path.home() / ".cache" / "em_interp"
    path.mkdir(parents=True, exist_ok=True)
    return path


def is_complete(folder: Path) -> bool:
    """True when ``folder`` was finished by :func:`atomic_dir` (its marker file exists)."""
    return (folder / MARKER).is_file()


def _remove_stale_partials(final: Path) -> None:
    for p in final.parent.glob(f".{final.name}.partial-*"):
        try:
            pid = int(p.name.rsplit("-", 1)[1])
        except ValueError:
            pid = -1
        if pid != os.getpid() and not psutil.pid_exists(pid):
            shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(final: Path, meta: dict | None = None) -> Iterator[Path]:
    """Write a folder atomically: yield a temporary sibling, rename it to ``final`` on success.

    On an exception the temporary folder is deleted and ``final`` is left as it was. An old,
    unfinished ``final`` (no marker) is replaced.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(final)
    tmp = final.parent / f".{final.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        info = {"finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **(meta or {})}
        (tmp / MARKER).write_text(json.dumps(info, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file so that readers see either the old content or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
