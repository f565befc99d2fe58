"""Activation matrices as the direction analyses take them, and the float64 arithmetic on them.

Every analysis in :mod:`em_interp.representations` takes plain tensors ``[n, d]`` (plus labels:
1 = risky / harmful, 0 = benign / harmless), or an activation store (anything with
``.load(hook)``) with a hook name. Means, projections and weighted sums are accumulated in
float64 in chunks of :data:`CHUNK` rows, so a 32B model's ``[n, 27648]`` activations are never
copied to float64 whole.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from em_interp.errors import DataError

CHUNK = 4096  # rows per chunk when accumulating in float64


def is_store(x) -> bool:
    return hasattr(x, "load") and callable(x.load) and not torch.is_tensor(x)


def as_acts(x, what: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not torch.is_tensor(x):
        raise DataError(f"{what} must be a tensor [n, d] (or an activation store with a hook); "
                        f"got {type(x).__name__}.")
    if x.ndim != 2:
        raise DataError(f"{what} must be [n_prompts, d]; got shape {tuple(x.shape)}. Pool "
                        "positions first (em_interp.inputs.pool, or a store with reduce='last').")
    if x.shape[0] == 0:
        raise DataError(f"{what} has no rows; pass at least one prompt's activations.")
    return x


def as_labels(labels, n: int, what: str = "labels") -> torch.Tensor:
    if labels is None:
        raise DataError(f"{what} are needed (1 = risky/harmful, 0 = benign/harmless); pass "
                        f"labels=..., or a store whose prompt set has labels.")
    y = torch.as_tensor(np.asarray(labels)).long().flatten()
    if y.shape[0] != n:
        raise DataError(f"{what} has {y.shape[0]} entries for {n} prompts.")
    bad = sorted(set(y.unique().tolist()) - {0, 1})
    if bad:
        raise DataError(f"{what} must be 0/1 (1 = risky/harmful, 0 = benign/harmless); found "
                        f"{bad}. Map them, e.g. labels = [int(y == POSITIVE) for y in labels].")
    return y


def store_labels(store):
    labels = getattr(store, "labels", None)
    return None if labels is None else list(labels)


def store_meta(store) -> tuple[dict | None, dict]:
    """(model description, prompt-set description) from a store's manifest, where it has them."""
    man = getattr(store, "manifest", None)
    if callable(man):
        man = man()
    if not isinstance(man, Mapping):
        return None, {}
    model = man.get("model")
    prompts = man.get("prompt_set") or man.get("prompts") or {}
    if not isinstance(prompts, Mapping):
        prompts = {"name": str(prompts)}
    return (dict(model) if isinstance(model, Mapping) else model), dict(prompts)


def mean_rows(x: torch.Tensor) -> torch.Tensor:
    """Row mean accumulated in float64 chunk by chunk (no full float64 copy of ``x``)."""
    total = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    for s in range(0, x.shape[0], CHUNK):
        total += x[s:s + CHUNK].to(torch.float64).sum(0)
    return total / x.shape[0]


def unit(v: torch.Tensor) -> torch.Tensor:
    n = v.norm()
    if not torch.isfinite(n) or n == 0:
        raise DataError("the direction has zero (or non-finite) norm, so it has no unit vector; "
                        "check that the two groups' activations differ.")
    return v / n


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return float("nan")
    return float((a @ b) / (na * nb))


def project(x: torch.Tensor, v: torch.Tensor, center: torch.Tensor | None = None) -> torch.Tensor:
    """``(x - center) . v`` per row in float64, chunked (no float64 copy of all of ``x``)."""
    v = v.to(device=x.device, dtype=torch.float64)
    c = 0.0 if center is None else float(center.to(x.device, torch.float64) @ v)
    return torch.cat([x[s:s + CHUNK].to(torch.float64) @ v
                      for s in range(0, x.shape[0], CHUNK)]) - c


def weighted_rows(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``w @ x`` in float64, chunked over rows of ``x``."""
    out = torch.zeros(w.shape[0], x.shape[1], dtype=torch.float64, device=x.device)
    w = w.to(x.device)
    for s in range(0, x.shape[0], CHUNK):
        out += w[:, s:s + CHUNK] @ x[s:s + CHUNK].to(torch.float64)
    return out
