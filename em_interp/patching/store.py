"""The resumable output folder and the cost plan of an activation-patching run.

A patching run (:func:`em_interp.patching.sweep.patch_sweep`, :mod:`em_interp.patching.fine`) is cut
into units of (layer, batch of pairs). With ``out_dir`` every unit is written atomically as it
finishes, so a run killed at any point loses at most the unit in flight:

    out_dir/
      manifest.json                 what was run: model, pairs, metric, position, batch size,
                                    sites per layer (a mismatch raises StoreMismatchError)
      cfg.json                      the PatchingConfig
      clean/pairs_<start>.safetensors       s_clean, s_source of the batch starting at <start>
      layer_<L>/pairs_<start>.safetensors   delta [sites of layer L, pairs of the batch]
      result/                       the finished Result (written at the end)

A rerun computes, per batch, only the layers whose file is missing (the batch's source and
destination states are computed once for all of them) and skips batches that are complete.
Layers may be added in a later run with the same ``out_dir`` (the manifest does not fix them).
Batches are deterministic (:func:`em_interp.inputs.token_batches`), so resumed results equal an
uninterrupted run's bit for bit.

:class:`SweepPlan` counts the work left before anything runs: forwards, block x token
evaluations against a naive per-pair loop, the destination KV cache of one batch, and (after
one timed batch) a time estimate. The Qwen paper's scale, 64 layers x 3 components x 2500 pairs,
is 157 batches of 16 and 30,144 patched one-token forwards.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from em_interp.atomic import atomic_write_bytes
from em_interp.errors import StoreMismatchError


def save_tensors(path: Path, tensors: dict) -> None:
    """Write ``tensors`` (fp32, CPU) to ``path`` atomically as safetensors."""
    from safetensors.torch import save

    data = save({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()})
    atomic_write_bytes(path, data)


class PatchStore:
    """The (layer, batch) units of one run, in ``out_dir`` or (without one) in memory."""

    def __init__(self, out_dir: str | Path | None, manifest: dict, cfg: dict):
        self.root = None if out_dir is None else Path(out_dir)
        self.memory: dict = {}
        if self.root is None:
            return
        path = self.root / "manifest.json"
        if path.is_file():
            old = json.loads(path.read_text())
            diff = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
            if diff:
                raise StoreMismatchError(
                    f"{str(self.root)!r} holds a patching run with different {', '.join(diff)} "
                    f"(stored {[old.get(k) for k in diff]!r}, now "
                    f"{[manifest.get(k) for k in diff]!r}). Pass a new out_dir, or delete the "
                    "folder to start over.")
        else:
            self.root.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.root / "cfg.json", json.dumps(cfg, indent=1).encode())
            atomic_write_bytes(path, json.dumps(manifest, indent=1).encode())

    def _path(self, layer: int | None, start: int) -> Path:
        assert self.root is not None
        sub = "clean" if layer is None else f"layer_{layer:03d}"
        return self.root / sub / f"pairs_{start:07d}.safetensors"

    def has(self, layer: int | None, start: int) -> bool:
        """Whether the unit (``layer``, or the clean scores for ``None``) is stored."""
        if self.root is None:
            return (layer, start) in self.memory
        return self._path(layer, start).is_file()

    def put(self, layer: int | None, start: int, tensors: dict) -> None:
        """Store one unit (atomically on disk)."""
        if self.root is None:
            self.memory[(layer, start)] = {k: v.detach().float().cpu()
                                           for k, v in tensors.items()}
        else:
            save_tensors(self._path(layer, start), tensors)

    def get(self, layer: int | None, start: int) -> dict[str, torch.Tensor]:
        """Read one unit."""
        if self.root is None:
            return self.memory[(layer, start)]
        from safetensors.torch import load_file

        return load_file(str(self._path(layer, start)))


@dataclass(frozen=True)
class SweepPlan:
    """What a patching run will do: counts of forwards, the cache size, a time estimate."""

    n_pairs: int
    n_batches: int
    batches_to_run: int
    layers: tuple[int, ...]
    sites_per_layer: int
    fast: bool
    """The one-token KV-cache path (``position="last"``)."""
    forwards: int
    """Model calls still to run: the batches' source and destination states, one call per
    site and batch, and (full-sequence path) one block per layer to advance the residual."""
    patched_forwards: int
    naive_forwards: int
    """A per-pair loop over the same work: a source and a clean run per pair, one full
    forward per pair and site."""
    block_tokens: int
    """Block x token evaluations still to run (the compute, roughly)."""
    naive_block_tokens: int
    kv_cache_mib: float
    """The destination KV cache of one batch on the fast path, in MiB."""
    seconds_per_batch: float | None = None
    estimate_s: float | None = None
    """``seconds_per_batch x batches_to_run`` (with ``time_batch=True``)."""
    done_units: int = 0
    """(layer, batch) units already stored in ``out_dir``."""

    def describe(self) -> str:
        """One line for logs and notebooks."""
        eta = "" if self.estimate_s is None else f"; about {self.estimate_s:.0f} s"
        return (f"{self.n_pairs} pairs in {self.n_batches} batches ({self.batches_to_run} to "
                f"run) x {len(self.layers)} layers x {self.sites_per_layer} sites: "
                f"{self.forwards} forwards ({self.patched_forwards} patched, "
                f"{'one token from layer l' if self.fast else 'full sequence'}); a naive loop "
                f"runs {self.naive_forwards}; compute {self.block_tokens:.3g} block-tokens vs "
                f"{self.naive_block_tokens:.3g} naive{eta}")

    def to_dict(self) -> dict:
        return asdict(self)


def make_plan(*, d_len: list[int], s_len: list[int], layers, sites_per_layer: int,
              batch_size: int, fast: bool, stop: int, n_layers: int, kv_bytes: int,
              store: PatchStore) -> SweepPlan:
    """Count the work left (see :class:`SweepPlan`).

    ``d_len`` / ``s_len`` are the destination / source lengths per pair, ``stop`` the blocks a
    scored forward runs, ``kv_bytes`` the KV-cache bytes per token and layer.
    """
    k, bs = len(d_len), batch_size
    starts = list(range(0, k, bs))
    todo = [(s, [la for la in layers if not store.has(la, s)]) for s in starts]
    todo = [(s, ls) for s, ls in todo if ls or not store.has(None, s)]
    fwd = patched = blocks = 0
    for s, ls in todo:
        rows = range(s, min(s + bs, k))
        wd, ws = max(d_len[i] for i in rows), max(s_len[i] for i in rows)
        fwd += 4 if fast else 3 + (max(ls, default=-1) + 1)
        patched += len(ls) * sites_per_layer
        blocks += len(rows) * stop * (wd + ws)
        for layer in ls:
            blocks += sites_per_layer * len(rows) * (stop - layer) * (1 if fast else wd)
    naive_blocks = sum(n_layers * (d_len[i] * (len(layers) * sites_per_layer + 1) + s_len[i])
                       for i in range(k))
    width = max(max(d_len[s:s + bs]) for s in starts)
    kv = stop * min(bs, k) * width * kv_bytes / 2**20 if fast else 0.0
    return SweepPlan(n_pairs=k, n_batches=len(starts), batches_to_run=len(todo),
                     layers=tuple(layers), sites_per_layer=sites_per_layer, fast=fast,
                     forwards=fwd + patched, patched_forwards=patched,
                     naive_forwards=k * (len(layers) * sites_per_layer + 2),
                     block_tokens=blocks, naive_block_tokens=naive_blocks,
                     kv_cache_mib=round(kv, 2),
                     done_units=len(starts) * len(layers) - sum(len(ls) for _, ls in todo))
