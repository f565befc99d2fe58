"""The on-disk cache root.

Converted models (GGUF -> safetensors), verified wheel downloads, built test models, trained
organisms and judge verdicts live under :func:`cache_dir` (``~/.cache/em_interp``, or
``$EM_INTERP_CACHE``). Everything in it is written through :mod:`em_interp.atomic`.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "EM_INTERP_CACHE"

def cache_dir() -> Path:
    """The cache root: ``$EM_INTERP_CACHE`` if set, else ``~/.cache/em_interp``."""
    root = os.environ.get(CACHE_ENV)
    path = Path(root).expanduser() if root else Path.home() / ".cache" / "em_interp"
    path.mkdir(parents=True, exist_ok=True)
    return path
