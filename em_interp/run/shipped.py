"""Shipped TOML examples (run configs, sweeps): list them, describe them, and read a file given
by path or by the name of a shipped example, with one error for a missing or broken file."""

from __future__ import annotations

import tomllib
from pathlib import Path

from em_interp.errors import ConfigError


def shipped_names(folder: Path) -> list[str]:
    """Names (file stems) of the ``*.toml`` examples in ``folder``, sorted."""
    return sorted(p.stem for p in folder.glob("*.toml"))


def first_line(folder: Path, name: str) -> str:
    """The comment that opens a shipped example: what ``--list`` prints beside its name."""
    return (folder / f"{name}.toml").read_text().splitlines()[0].lstrip("# ")


def read_toml(path: str | Path, folder: Path, what: str) -> tuple[Path, dict]:
    """``(file, parsed TOML)`` of ``path``, or of the shipped example ``folder/<path>.toml``.

    Raises:
        ConfigError: neither a file nor a shipped example (naming the examples), or not valid
            TOML (naming the line the parser gave).
    """
    p = Path(str(path)).expanduser()
    if not p.is_file() and (folder / f"{path}.toml").is_file():
        p = folder / f"{path}.toml"
    if not p.is_file():
        raise ConfigError(f"{what} {str(path)!r} is neither a file nor a shipped example "
                          f"({', '.join(shipped_names(folder))}). Give the path of a .toml "
                          "file.")
    try:
        return p, tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML ({e}). Fix the line it names.") from None
