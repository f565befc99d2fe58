"""Control directions: what an effect of ablating or adding a direction must beat.

An effect of ablating (or adding) a direction ``d`` is evidence about ``d`` only if directions
that carry no information do less. A 2026 study of emergent misalignment found random and
orthogonal directions of the same norm suppressed it about as much as the mapped directions, so
every direction intervention of the toolkit can carry its controls:

* ``"random k"`` -- ``g / ||g|| * ||d||`` with ``g ~ N(0, I)`` (seeded);
* ``"orthogonal k"`` -- a random ``g`` with its component along ``d`` removed, scaled to
  ``||d||``: the same norm, exactly orthogonal to ``d``.

For directional ablation the norm does not matter (the direction is normalised), for steering it
does, so controls always keep ``||d||``.

:func:`control_directions` draws them; ``ablate_direction(..., controls=("random",
"orthogonal"))`` and ``steer(..., controls=...)`` build one intervention per control
(``iv.controls``), and :func:`expand_controls` turns a mapping of named conditions into one that
also runs every control, so :func:`em_interp.behaviour.rates.attack_success_rate` reports the
direction's effect beside its controls' (``ASRResult.controls``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from em_interp.errors import ConfigError

CONTROL_KINDS = ("random", "orthogonal")
CONTROL_SEP = " · control "
"""Joins a condition's name and its control's: ``"ablate refusal · control random 1"``."""


def control_directions(direction: torch.Tensor, *, kinds: Sequence[str] = CONTROL_KINDS,
                       n: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """``n`` same-norm control directions of each kind, named ``"random 1"``, ``"orthogonal 1"``...

    Args:
        direction: the direction under test (any shape; controls have the same shape).
        kinds: ``"random"`` and/or ``"orthogonal"``.
        n: draws per kind.
        seed: seed of the draws (the same seed gives the same controls).
    """
    bad = [k for k in kinds if k not in CONTROL_KINDS]
    if bad or not kinds:
        raise ConfigError(f"controls must be some of {list(CONTROL_KINDS)}, got {list(kinds)}.")
    if n < 1:
        raise ConfigError(f"n_controls must be >= 1, got {n}.")
    d = torch.as_tensor(direction).detach().float()
    flat = d.flatten()
    norm = flat.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise ConfigError("control directions need a direction with a finite, non-zero norm.")
    gen = torch.Generator().manual_seed(int(seed))
    unit = flat / norm
    out: dict[str, torch.Tensor] = {}
    for kind in kinds:
        for k in range(1, n + 1):
            g = torch.randn(flat.shape[0], generator=gen, dtype=torch.float64).float()
            if kind == "orthogonal":
                g = g - (g @ unit) * unit
            out[f"{kind} {k}"] = (g / g.norm() * norm).reshape(d.shape)
    return out


def expand_controls(conditions: Mapping[str, object]) -> tuple[dict[str, object], dict[str, str]]:
    """``conditions`` plus one entry per control of each intervention that carries controls.

    Returns the expanded mapping (each control right after its condition) and ``{control
    condition name: the condition it controls}``.
    """
    out: dict[str, object] = {}
    parent: dict[str, str] = {}
    for name, iv in conditions.items():
        out[name] = iv
        for cname, civ in (getattr(iv, "controls", None) or {}).items():
            full = f"{name}{CONTROL_SEP}{cname}"
            out[full] = civ
            parent[full] = name
    return out, parent
