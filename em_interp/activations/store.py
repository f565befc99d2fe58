"""The activation store on disk: the shard format, the manifest, and reading rows back.

:func:`em_interp.activations.cache.cache_activations` computes activations and writes them here;
:class:`ActivationStore` reads them for every later analysis (probes, directions, SAE training,
BLOCK-EM stage 1) without running the model again.

**Format.** A folder with ``manifest.json`` (settings, model identity, hooks, shapes, dtype,
prompt hash, labels, the list of finished shards) and ``shard_KKKKK.safetensors`` files. Shard
``k`` holds prompts ``[k * shard_size, (k + 1) * shard_size)``: one ``[rows, *trailing]`` tensor
per hook, named by the hook, plus ``__lengths__`` (tokens per prompt) when every token is kept
(``reduce="none"``; the rows of prompt ``i`` are ``offsets[i]:offsets[i+1]``). Shards are plain
safetensors files with 8-byte-aligned data, so ``safetensors.torch.load_file`` reads them and
this module memory-maps them.

**Atomicity.** A shard is written to a hidden ``.shard_K.safetensors.partial-PID``, flushed,
renamed into place, and only then listed in the manifest, itself replaced atomically
(``em_interp.atomic.atomic_write_bytes``). The manifest is the only source of truth: an
unlisted or wrong-sized file is never read as good.

**Disk.** A hook of width ``d`` per layer over ``L`` layers and ``N`` prompts takes
``L * d * N * itemsize`` bytes (:func:`disk_estimate`); the Qwen paper's scale (Sec. III.A:
64 layers x d_mlp 27648 x 12,000 prompts, bf16) is 42.5 GB. Reading streams shard by shard
(:meth:`ActivationStore.iter_batches`) or maps the file (:meth:`ActivationStore.load`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import struct
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from jaxtyping import Int

from em_interp.atomic import atomic_write_bytes
from em_interp.errors import ConfigError, DataError, StoreMismatchError
from em_interp.inputs import Reduce

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LENGTHS_KEY = "__lengths__"
REDUCES = ("last", "mean", "none")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64}
_ST_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.float64: "F64", torch.int64: "I64"}
_ST_DTYPES = {v: k for k, v in _ST_NAMES.items()}


# ------------------------------------------------------------------ small helpers


def human_bytes(n: float) -> str:
    """``n`` bytes in decimal units (``42.5 GB``)."""
    k = min(4, int(math.log10(max(abs(n), 1)) // 3))
    return f"{n:.0f} B" if k == 0 else f"{n / 1000 ** k:.1f} {('kB', 'MB', 'GB', 'TB')[k - 1]}"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def resolve_dtype(dtype, default: torch.dtype) -> torch.dtype:
    if dtype is None:
        return default
    if isinstance(dtype, torch.dtype) and dtype in _ST_NAMES and dtype != torch.int64:
        return dtype
    if isinstance(dtype, str) and dtype.replace("torch.", "") in DTYPES:
        return DTYPES[dtype.replace("torch.", "")]
    raise ConfigError(f"dtype {dtype!r} is not supported; use None (the model's dtype) or one of "
                      f"{sorted(DTYPES)}.")

@contextlib.contextmanager
def locked(folder: Path):
    """Hold an exclusive lock on ``folder`` (released by the OS if the process dies)."""
    fh = open(folder / ".lock", "a+")  # noqa: SIM115 -- held for the body
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataError(f"another process is writing the activation store {str(folder)!r}; "
                            "wait for it to finish, or use another out_dir.") from None
        yield
    finally:
        fh.close()


def remove_partials(folder: Path) -> None:
    for p in folder.glob(".*.partial-*"):
        p.unlink(missing_ok=True)


def write_manifest(folder: Path, manifest: dict) -> None:
    atomic_write_bytes(folder / MANIFEST, json.dumps(manifest, indent=1).encode())


def read_manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{str(path)!r} is not valid JSON ({e.msg}); the store is damaged: "
                        "delete the folder or pass overwrite=True.") from None
    if (manifest.get("format"), manifest.get("format_version")) != (
            "em-interp-activations", FORMAT_VERSION):
        raise DataError(f"{str(path)!r} is not an em-interp activation store of format "
                        f"{FORMAT_VERSION}; recompute it with overwrite=True.")
    return manifest


def clear(folder: Path) -> None:
    (folder / MANIFEST).unlink(missing_ok=True)
    for p in folder.glob("shard_*.safetensors"):
        p.unlink()
    remove_partials(folder)


# ------------------------------------------------------------------ the shard writer


class ShardWriter:
    """Writes one shard: header first, then each batch's rows at their final offsets."""

    def __init__(self, path: Path, layout: Mapping[str, tuple[int, ...]], dtype: torch.dtype,
                 lengths: Sequence[int] | None):
        self.path = path
        self.itemsize = torch.empty(0, dtype=dtype).element_size()
        header, offset = {}, 0
        if lengths is not None:
            header[LENGTHS_KEY] = {"dtype": "I64", "shape": [len(lengths)],
                                   "data_offsets": [0, 8 * len(lengths)]}
            offset = 8 * len(lengths)
        self.place, self.written = {}, dict.fromkeys(layout, 0)  # name -> (offset, row bytes, rows)
        for name, shape in layout.items():
            nbytes = math.prod(shape) * self.itemsize
            header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            self.place[name] = (offset, math.prod(shape[1:]) * self.itemsize, shape[0])
            offset += nbytes
        header["__metadata__"] = {"format": "em-interp activation shard"}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-(8 + len(blob)) % 8)  # 8-byte aligned data: tensors can be mmapped
        self.data_start = 8 + len(blob)
        self.size = self.data_start + offset
        self.tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
        self.fh = open(self.tmp, "wb")  # noqa: SIM115 -- closed in finish/abort
        self.fh.write(struct.pack("<Q", len(blob)) + blob)
        if lengths is not None:
            self.fh.write(torch.tensor(list(lengths), dtype=torch.int64).numpy().tobytes())
        self.fh.truncate(self.size)

    def write(self, name: str, row: int, rows: torch.Tensor) -> None:
        """Write ``rows`` (``[n, *trailing]``) of hook ``name`` starting at shard row ``row``."""
        offset, row_bytes, total = self.place[name]
        if row + rows.shape[0] > total:
            raise RuntimeError(f"shard {self.path.name}: {name} rows past {total}")
        self.fh.seek(self.data_start + offset + row * row_bytes)
        self.fh.write(rows.contiguous().reshape(-1).view(torch.uint8).numpy())
        self.written[name] += rows.shape[0]

    def finish(self) -> int:
        """Flush, check every row was written, and rename into place; return the file size."""
        short = {k: (v, self.place[k][2]) for k, v in self.written.items()
                 if v != self.place[k][2]}
        if short:
            self.abort()
            raise RuntimeError(f"shard {self.path.name}: rows written != rows expected: {short}")
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        os.replace(self.tmp, self.path)
        return self.size

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self.fh.close()
        self.tmp.unlink(missing_ok=True)


def shard_name(k: int) -> str:
    return f"shard_{k:05d}.safetensors"

# ------------------------------------------------------------------ reading


class ActivationStore:
    """A finished activation store on disk (open one with :meth:`open`).

    Rows are prompts for ``reduce="last"``/``"mean"`` and tokens for ``"none"``; every hook's
    matrix is ``[n_rows, *trailing]`` (see :meth:`shape`). Tensors come from memory-mapped
    shards: :meth:`load` of a one-shard store costs no memory until rows are read.
    """

    def __init__(self, path: Path, manifest: dict):
        self.path = Path(path)
        self._manifest = manifest
        self._headers: dict[int, tuple[int, dict]] = {}

    @classmethod
    def open(cls, out_dir: str | Path) -> ActivationStore:
        """Open a finished store written by
        :func:`~em_interp.activations.cache.cache_activations` (or :meth:`from_tensors`).

        Raises:
            DataError: no store there, an unfinished one, or a missing / truncated shard.
        """
        folder = Path(out_dir)
        manifest = read_manifest(folder)
        if manifest is None:
            raise DataError(f"{str(folder)!r} is not an activation store (no {MANIFEST}); create "
                            "one with em_interp.activations.cache.cache_activations(...).")
        if not manifest.get("complete"):
            raise DataError(
                f"the activation store {str(folder)!r} is unfinished ({len(manifest['shards'])} "
                f"of {math.ceil(manifest['n_prompts'] / manifest['shard_size'])} shards); run "
                "cache_activations again with the same arguments to finish it.")
        for s in manifest["shards"]:
            p = folder / s["file"]
            if not p.is_file() or p.stat().st_size != s["bytes"]:
                raise DataError(f"shard {str(p)!r} is missing or has the wrong size; the store is "
                                "damaged: recompute it with "
                                "cache_activations(..., overwrite=True).")
        return cls(folder, manifest)

    # ---------------------------------------------------------------- metadata

    @property
    def manifest(self) -> dict:
        """The manifest (a copy): settings, model identity, shapes, labels, shards."""
        return json.loads(json.dumps(self._manifest))

    @property
    def hooks(self) -> list[str]:
        """The hook names stored, in the order they were asked for."""
        return list(self._manifest["hooks"])

    @property
    def n_prompts(self) -> int:
        """Number of prompts."""
        return int(self._manifest["n_prompts"])

    @property
    def n_rows(self) -> int:
        """Rows per hook: ``n_prompts``, or the number of tokens for ``reduce="none"``."""
        return int(sum(s["rows"] for s in self._manifest["shards"]))

    @property
    def reduce(self) -> str:
        """``"last"``, ``"mean"`` or ``"none"``."""
        return self._manifest["reduce"]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the rows are stored in."""
        return DTYPES[self._manifest["dtype"]]

    def _tuple(self, key: str) -> tuple | None:
        value = self._manifest.get(key)
        return None if value is None else tuple(value)

    @property
    def labels(self) -> tuple[int, ...] | None:
        """The prompt set's labels (``None`` if the prompts were not a labelled PromptSet)."""
        return self._tuple("labels")

    @property
    def split(self) -> tuple[str, ...] | None:
        """The prompt set's ``train``/``test`` split (``None`` if not a PromptSet)."""
        return self._tuple("split")

    @property
    def groups(self) -> tuple[str, ...] | None:
        """The prompt set's groups (template / topic of each prompt), if any."""
        return self._tuple("groups")

    @property
    def disk_bytes(self) -> int:
        """Bytes on disk: shards plus manifest."""
        return int(sum(s["bytes"] for s in self._manifest["shards"])
                   + (self.path / MANIFEST).stat().st_size)

    def shape(self, hook: str) -> tuple[int, ...]:
        """``(n_prompts, *trailing)`` for last/mean, ``(n_tokens, *trailing)`` for none."""
        self._check(hook)
        return (self.n_rows, *self._manifest["shapes"][hook])

    def __repr__(self) -> str:
        m = self._manifest
        return (f"ActivationStore({str(self.path)!r}, model={m.get('card') or m.get('model_name')}"
                f"{':' + m['variant'] if m.get('variant') else ''}, {len(m['hooks'])} hooks, "
                f"n_prompts={m['n_prompts']}, reduce={m['reduce']!r}, dtype={m['dtype']}, "
                f"{human_bytes(self.disk_bytes)})")

    def _check(self, hook: str) -> None:
        if hook not in self._manifest["shapes"]:
            import difflib

            close = difflib.get_close_matches(hook, self.hooks, n=3, cutoff=0.6)
            raise DataError(f"the store has no hook {hook!r}" +
                            (f" (closest: {', '.join(close)})" if close else "") +
                            f"; it holds {len(self.hooks)} hooks, e.g. {self.hooks[:3]}. Cache it "
                            "with cache_activations into another out_dir.")

    # ---------------------------------------------------------------- shard views

    def _header(self, k: int) -> tuple[int, dict]:
        if k not in self._headers:
            path = self.path / self._manifest["shards"][k]["file"]
            with open(path, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
            self._headers[k] = (8 + n, header)
        return self._headers[k]

    def _view(self, k: int, key: str) -> torch.Tensor:
        """Shard ``k``'s tensor ``key``, memory-mapped privately (a fresh mapping per call, so
        writing into a returned tensor changes neither the file nor later reads)."""
        data_start, header = self._header(k)
        info = header[key]
        dtype = _ST_DTYPES[info["dtype"]]
        shard = self._manifest["shards"][k]
        storage = torch.UntypedStorage.from_file(str(self.path / shard["file"]), shared=False,
                                                 nbytes=shard["bytes"])
        itemsize = torch.empty(0, dtype=dtype).element_size()
        begin = data_start + info["data_offsets"][0]
        return torch.empty(0, dtype=dtype).set_(storage, begin // itemsize,
                                                tuple(info["shape"]))

    def _row_bounds(self) -> list[int]:
        bounds = [0]
        for s in self._manifest["shards"]:
            bounds.append(bounds[-1] + s["rows"])
        return bounds

    # ---------------------------------------------------------------- reading rows

    def load(self, hook: str, *, dtype: str | torch.dtype | None = None) -> torch.Tensor:
        """The whole ``[n_rows, *trailing]`` matrix of ``hook``.

        One shard: a memory-mapped view (pages are read on first use; writing to it never
        changes the file). Several: one tensor filled shard by shard. ``dtype`` converts.
        """
        self._check(hook)
        shards = self._manifest["shards"]
        if len(shards) == 1:
            out = self._view(0, hook)
        else:
            out = torch.empty(self.shape(hook), dtype=self.dtype)
            bounds = self._row_bounds()
            for k in range(len(shards)):
                out[bounds[k]:bounds[k + 1]] = self._view(k, hook)
        if dtype is not None:
            out = out.to(resolve_dtype(dtype, self.dtype))
        return out

    @property
    def offsets(self) -> Int[torch.Tensor, " n_prompts_plus_1"]:
        """Row offsets ``[n_prompts + 1]``: the rows of prompt ``i`` are
        ``offsets[i]:offsets[i+1]`` (one row per prompt unless ``reduce="none"``)."""
        if self.reduce != "none":
            return torch.arange(self.n_prompts + 1, dtype=torch.long)
        lengths = torch.cat([self._view(k, LENGTHS_KEY)
                             for k in range(len(self._manifest["shards"]))])
        return torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])

    def iter_batches(self, hook: str, batch_size: int, *, shuffle: bool = False,
                     seed: int = 0) -> Iterator[torch.Tensor]:
        """Stream ``hook``'s rows in batches of ``batch_size`` (the last may be smaller).

        Memory is one batch. ``shuffle=True`` visits the rows in a random order fixed by
        ``seed`` (a permutation of all rows, read from the memory-mapped shards), which is
        what SAE training on token-level activations wants.
        """
        self._check(hook)
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}.")
        bounds = self._row_bounds()
        n, edges = bounds[-1], torch.tensor(bounds[1:], dtype=torch.long)
        order = (torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle
                 else torch.arange(n))
        views = [self._view(k, hook) for k in range(len(bounds) - 1)]
        for i in range(0, n, batch_size):
            idx = order[i:i + batch_size]
            shard = torch.searchsorted(edges, idx, right=True)
            out = torch.empty((len(idx), *self.shape(hook)[1:]), dtype=self.dtype)
            for k in shard.unique().tolist():
                sel = shard == k
                out[sel] = views[k][idx[sel] - bounds[k]]
            yield out

    # ---------------------------------------------------------------- building from tensors

    @classmethod
    def from_tensors(cls, out_dir: str | Path, tensors: Mapping[str, torch.Tensor], *,
                     labels: Sequence[int] | None = None, split: Sequence[str] | None = None,
                     groups: Sequence[str] | None = None, reduce: Reduce = "last",
                     lengths: Sequence[int] | None = None, shard_size: int | None = None,
                     prompts_hash: str | None = None, description: dict | None = None,
                     overwrite: bool = False) -> ActivationStore:
        """Write activations you already have as a store in the format of
        :func:`~em_interp.activations.cache.cache_activations` (synthetic data for tests, activations
        from another tool).

        Args:
            out_dir: the store's folder.
            tensors: ``{hook name: [n_rows, *trailing]}``, one dtype, the same rows.
            labels: an integer label per prompt.
            split: ``"train"``/``"test"`` per prompt.
            groups: a group name per prompt.
            reduce: what a row is; ``"none"`` needs ``lengths`` (tokens per prompt).
            lengths: tokens per prompt for ``reduce="none"``.
            shard_size: prompts per shard (default: one shard).
            prompts_hash: the hash of the prompts the rows came from, so that two stores can be
                paired (model and ``control_store``); default: a hash of the tensors.
            description: free JSON data kept as the manifest's ``prompt_set``.
            overwrite: replace a store already in ``out_dir``.
        """
        from em_interp import __version__

        names = list(tensors)
        if not names:
            raise ConfigError("from_tensors needs at least one {hook name: tensor}.")
        dtype, rows = tensors[names[0]].dtype, tensors[names[0]].shape[0]
        for h, t in tensors.items():
            if t.dtype != dtype or dtype not in DTYPES.values() or t.ndim < 2 or \
                    t.shape[0] != rows or rows == 0:
                raise ConfigError(f"tensor {h!r} is {tuple(t.shape)} {t.dtype}; every tensor must"
                                  " be [n_rows > 0, ...] with one floating dtype.")
        if reduce not in REDUCES or (reduce == "none") != (lengths is not None) or (
                lengths is not None and sum(lengths) != rows):
            raise ConfigError(f"reduce={reduce!r}: use 'last', 'mean', or 'none' with lengths "
                              f"(tokens per prompt) that sum to the {rows} rows.")
        lengths = None if lengths is None else [int(x) for x in lengths]
        n = rows if lengths is None else len(lengths)
        for what, value in (("labels", labels), ("split", split), ("groups", groups)):
            if value is not None and len(value) != n:
                raise DataError(f"{what} has {len(value)} entries for {n} prompts.")
        size, folder = shard_size or n, Path(out_dir)
        folder.mkdir(parents=True, exist_ok=True)
        h = hashlib.sha256()
        for name, t in tensors.items():
            h.update(name.encode())
            h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy())
        with locked(folder):
            if read_manifest(folder) is not None and not overwrite:
                raise StoreMismatchError(f"{str(folder)!r} already holds an activation store; "
                                         "use another out_dir or pass overwrite=True.")
            clear(folder)
            offsets = [0, *torch.tensor(lengths or [1] * n).cumsum(0).tolist()]
            manifest = {
                "format": "em-interp-activations", "format_version": FORMAT_VERSION,
                "em_interp_version": __version__, "card": None, "variant": None,
                "model": {"model_name": "from_tensors", "fingerprint": h.hexdigest()[:16]},
                "model_name": "from_tensors", "hooks": names, "n_prompts": n,
                "prompts_hash": prompts_hash or h.hexdigest()[:16], "reduce": reduce,
                "dtype": dtype_name(dtype), "batch_size": size, "shard_size": size,
                "shapes": {k: list(t.shape[1:]) for k, t in tensors.items()}, "n_rows": rows,
                "labels": None if labels is None else [int(x) for x in labels],
                "label_names": {}, "split": None if split is None else list(split),
                "groups": None if groups is None else list(groups), "prompt_set": description,
                "shards": [], "complete": True}
            for k, start in enumerate(range(0, n, size)):
                stop_i = min(start + size, n)
                r0, r1 = offsets[start], offsets[stop_i]
                layout = {name: (r1 - r0, *t.shape[1:]) for name, t in tensors.items()}
                writer = ShardWriter(folder / shard_name(k), layout, dtype,
                                      None if lengths is None else lengths[start:stop_i])
                for name, t in tensors.items():
                    writer.write(name, 0, t[r0:r1].detach().cpu())
                manifest["shards"].append({"file": shard_name(k), "start": start,
                                           "stop": stop_i, "rows": r1 - r0,
                                           "bytes": writer.finish()})
            manifest["estimated_bytes"] = sum(s["bytes"] for s in manifest["shards"])
            write_manifest(folder, manifest)
        return cls.open(folder)


def disk_estimate(n_layers: int, width: int, n_prompts: int, dtype: str = "bfloat16",
                  tokens_per_prompt: float = 1.0) -> int:
    """Bytes a store of one ``width``-wide hook per layer takes: ``n_layers * width * n_prompts *
    tokens_per_prompt * itemsize`` (the Qwen paper's scale: ``disk_estimate(64, 27648, 12000)``
    = 42.5 GB)."""
    itemsize = torch.empty(0, dtype=resolve_dtype(dtype, torch.float32)).element_size()
    return int(n_layers * width * n_prompts * tokens_per_prompt * itemsize)


__all__ = ["ActivationStore", "disk_estimate", "human_bytes"]
