"""The EM direction against the refusal direction, layer by layer, with real nulls.

The open question of the convergent-linear-representations note (``003``): is the direction
along which emergent misalignment moves the activations the refusal direction? Per layer,

* the EM direction ``e = E_x[h_org(x) - h_base(x)]`` over the same prompts through both models,
* the refusal direction ``r = E[h_base | harmful] - E[h_base | harmless]``,
* their cosine ``cos(e, r)``.

Two nulls, each over ``n_null`` seeded draws shared by every layer:

* **label-shuffled** (the headline): ``r`` recomputed from shuffled harmful/harmless labels. It
  keeps the anisotropy of activation space, where almost any two activation-derived directions
  have a cosine far from 0. The p-value is corrected across layers by the max statistic
  (``p_shuffled_fwer``): the share of shuffles whose largest ``|cos|`` over *all* layers reaches
  this layer's.
* **random directions** (secondary): ``cos(e, g)``, ``g ~ N(0, I)``, a band of about
  ``+-1.96/sqrt(d)``; leaving it says little, since activation space is anisotropic.

Also the projection of each model's activations on ``r / ||r||``, per layer.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float

from em_interp.errors import ConfigError, DataError
from em_interp.hooks import layer_of
from em_interp.representations.directions import Direction
from em_interp.representations.vectors import (
    as_acts,
    as_labels,
    cosine,
    is_store,
    mean_rows,
    project,
    store_labels,
    store_meta,
    unit,
    weighted_rows,
)
from em_interp.results import Result

__all__ = ["EMvsRefusalResult", "LayerComparison", "em_vs_refusal"]


def _layer_of(key) -> int:
    if isinstance(key, int) and not isinstance(key, bool):
        return key
    layer = layer_of(str(key))
    if layer is None:
        raise DataError(f"cannot read a layer from {key!r}; key per-layer activations by layer "
                        "index or by hook name ('blocks.<l>.<hook>').")
    return layer


def _per_layer(x, what: str, hook_template: str | None,
               layers: Sequence[int] | None) -> tuple[list[int], list[str | None],
                                                      Callable[[int], torch.Tensor]]:
    """(layers, hook names, lazy loader by position) for any per-layer activation input."""
    if is_store(x):
        if hook_template is None:
            raise ConfigError(f"{what} is a store: pass hook_template='blocks.{{layer}}.<hook>' "
                              "(e.g. 'blocks.{layer}.hook_resid_post').")
        if layers is None:
            pattern = re.compile("^" + re.escape(hook_template).replace(
                re.escape("{layer}"), r"(\d+)") + "$")
            found = [int(m.group(1)) for h in getattr(x, "hooks", []) if (m := pattern.match(h))]
            if not found:
                raise DataError(f"{what}: no hook of the store matches {hook_template!r}; its "
                                f"hooks are {list(getattr(x, 'hooks', []))[:6]}.")
            layers = sorted(found)
        names = [hook_template.format(layer=layer) for layer in layers]
        return list(layers), list(names), lambda i: x.load(names[i])
    if torch.is_tensor(x) or isinstance(x, np.ndarray):
        t = torch.as_tensor(x)
        if t.ndim != 3:
            raise DataError(f"{what} as one tensor must be [layer, n, d]; got {tuple(t.shape)}.")
        all_layers = list(range(t.shape[0]))
        use = list(layers) if layers is not None else all_layers
        names = [hook_template.format(layer=layer) if hook_template else None for layer in use]
        return use, names, lambda i: t[use[i]]
    if isinstance(x, Mapping):
        items = sorted(((_layer_of(k), k) for k in x), key=lambda p: p[0])
        if layers is not None:
            items = [p for p in items if p[0] in set(layers)]
        use = [p[0] for p in items]
        names = [k if isinstance(k, str) else (hook_template.format(layer=layer)
                                               if hook_template else None)
                 for layer, k in items]
        return use, names, lambda i: torch.as_tensor(x[items[i][1]])
    if isinstance(x, Sequence):
        use = list(layers) if layers is not None else list(range(len(x)))
        names = [hook_template.format(layer=layer) if hook_template else None for layer in use]
        return use, names, lambda i: torch.as_tensor(x[use[i]])
    raise DataError(f"{what} must be a dict {{layer or hook: [n, d]}}, a list per layer, a "
                    f"tensor [layer, n, d], or a store; got {type(x).__name__}.")


@dataclass(frozen=True)
class EMvsRefusalResult(Result):
    """Per layer: cosine(EM direction, refusal direction), null bands, projections."""

    kind = "em_vs_refusal"

    layers: list[int]
    hooks: list
    """Hook name per layer (``None`` where the input did not name it)."""
    cosine: Float[torch.Tensor, " layer"]
    random_lo: Float[torch.Tensor, " layer"]
    """Lower null quantile of cos(EM, random Gaussian direction)."""
    random_hi: Float[torch.Tensor, " layer"]
    shuffled_lo: Float[torch.Tensor, " layer"]
    """Lower null quantile of cos(EM, refusal direction from label-shuffled prompts)."""
    shuffled_hi: Float[torch.Tensor, " layer"]
    p_random: Float[torch.Tensor, " layer"]
    """Two-sided permutation p-value ``(1 + #{|null| >= |cos|}) / (1 + n_null)``, random null."""
    p_shuffled: Float[torch.Tensor, " layer"]
    """The same for the label-shuffled null, at each layer alone."""
    p_shuffled_fwer: Float[torch.Tensor, " layer"]
    """The label-shuffled p-value corrected across layers by the max statistic: the share of
    shuffles whose largest |cosine| over all layers reaches this layer's |cosine| (+1
    correction). This is the headline test: "the EM direction is aligned with refusal at L"."""
    em_norm: Float[torch.Tensor, " layer"]
    refusal_norm: Float[torch.Tensor, " layer"]
    proj_base: Float[torch.Tensor, "layer batch"]
    """Projection of each prompt's base activation on the unit refusal direction."""
    proj_organism: Float[torch.Tensor, "layer batch"]
    """The same for the organism."""
    em_directions: Float[torch.Tensor, "layer d"]
    refusal_directions: Float[torch.Tensor, "layer d"]
    labels: torch.Tensor | None
    """``[batch]`` labels of the EM prompts, when known (1 = harmful/risky)."""
    n_null: int
    seed: int
    ci: float
    model: dict | str | None = None

    def direction(self, layer: int, which: Literal["em", "refusal"] = "em") -> Direction:
        """The EM or refusal direction at ``layer`` as a :class:`Direction`."""
        i = self.layers.index(layer)
        vec = (self.em_directions if which == "em" else self.refusal_directions)[i]
        return Direction(vector=vec, hook=self.hooks[i], model=self.model, name=which)

    @property
    def df(self) -> pd.DataFrame:
        """One row per layer: cosine, null bands, p-values, norms, mean projections."""
        return pd.DataFrame({
            "layer": self.layers, "hook": self.hooks, "cosine": self.cosine.numpy(),
            "random_lo": self.random_lo.numpy(), "random_hi": self.random_hi.numpy(),
            "shuffled_lo": self.shuffled_lo.numpy(), "shuffled_hi": self.shuffled_hi.numpy(),
            "p_random": self.p_random.numpy(), "p_shuffled": self.p_shuffled.numpy(),
            "p_shuffled_fwer": self.p_shuffled_fwer.numpy(),
            "em_norm": self.em_norm.numpy(), "refusal_norm": self.refusal_norm.numpy(),
            "proj_base": self.proj_base.mean(1).numpy(),
            "proj_organism": self.proj_organism.mean(1).numpy(),
            "proj_shift": (self.proj_organism - self.proj_base).mean(1).numpy()})

    @property
    def projections(self) -> pd.DataFrame:
        """Tidy projections: one row per (layer, model, prompt) with the prompt's label."""
        n = self.proj_base.shape[1]
        lab = (self.labels.numpy() if self.labels is not None else np.full(n, -1))
        frames = []
        for name, p in (("base", self.proj_base), ("organism", self.proj_organism)):
            for i, layer in enumerate(self.layers):
                frames.append(pd.DataFrame({"layer": layer, "model": name,
                                            "prompt": np.arange(n), "label": lab,
                                            "projection": p[i].numpy()}))
        return pd.concat(frames, ignore_index=True)

    def significant_layers(self, alpha: float = 0.05) -> list[int]:
        """Layers whose cosine lies outside the label-shuffled null, corrected across layers."""
        return [layer for layer, p in zip(self.layers, self.p_shuffled_fwer.tolist(), strict=True)
                if p < alpha]

    def to_dict(self) -> dict:
        """Per-layer cosines, bands and p-values; the layer of the largest defined cosine (a
        layer the fine-tune left unchanged has a zero EM direction and an undefined cosine)."""
        defined = ~torch.isnan(self.cosine)
        i = int(self.cosine.abs().nan_to_num(nan=-1.0).argmax()) if defined.any() else None
        outside_random = ((self.cosine < self.random_lo) | (self.cosine > self.random_hi))
        return {"layers": self.layers, "cosine": self.cosine.tolist(),
                "p_shuffled_fwer": self.p_shuffled_fwer.tolist(),
                "significant_layers": self.significant_layers(),
                "n_outside_random_band": int(outside_random.sum()),
                "random_band": [self.random_lo.tolist(), self.random_hi.tolist()],
                "shuffled_band": [self.shuffled_lo.tolist(), self.shuffled_hi.tolist()],
                "p_shuffled": self.p_shuffled.tolist(),
                "max_abs_cosine_layer": None if i is None else self.layers[i],
                "max_abs_cosine": None if i is None else float(self.cosine[i]),
                "n_undefined": int((~defined).sum()), "n_null": self.n_null,
                "ci": self.ci, "seed": self.seed,
                "proj_shift": (self.proj_organism - self.proj_base).mean(1).tolist()}

    def figure(self, title: str | None = None):
        """Top: cosine per layer with both null bands. Bottom: mean projection on the refusal
        direction, base vs organism."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        x = self.layers
        fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                            subplot_titles=("cos(EM direction, refusal direction)",
                                            "projection on the unit refusal direction"))
        for lo, hi, name, color in ((self.random_lo, self.random_hi, "random directions",
                                     "rgba(150,150,150,0.25)"),
                                    (self.shuffled_lo, self.shuffled_hi, "label-shuffled",
                                     "rgba(31,119,180,0.2)")):
            fig.add_trace(go.Scatter(x=x + x[::-1], y=hi.tolist() + lo.tolist()[::-1],
                                     fill="toself", fillcolor=color, line={"width": 0},
                                     name=f"null: {name} ({self.ci:.0%})", hoverinfo="skip"),
                          row=1, col=1)
        fig.add_trace(go.Scatter(x=x, y=self.cosine.tolist(), mode="lines+markers",
                                 name="cosine", line={"color": "#d62728"}), row=1, col=1)
        for p, name, color in ((self.proj_base, "base", "#1f77b4"),
                               (self.proj_organism, "organism", "#d62728")):
            sem = p.std(1) / math.sqrt(max(p.shape[1], 1))
            fig.add_trace(go.Scatter(x=x, y=p.mean(1).tolist(), mode="lines+markers",
                                     name=f"{name} (mean ± s.e.)", line={"color": color},
                                     error_y={"type": "data", "array": sem.tolist()}),
                          row=2, col=1)
        fig.update_layout(title=title or "EM direction vs refusal direction",
                          template="plotly_white", height=650)
        fig.update_xaxes(title_text="layer (0-indexed)", row=2, col=1)
        fig.update_yaxes(title_text="cosine", row=1, col=1)
        fig.update_yaxes(title_text="projection", row=2, col=1)
        return fig


def em_vs_refusal(base, organism, labels=None, *, refusal_base=None, refusal_labels=None,
                  hook_template: str | None = None, layers: Sequence[int] | None = None,
                  n_null: int = 200, seed: int = 0, ci: float = 0.95,
                  model: dict | str | None = None, progress: bool = True) -> EMvsRefusalResult:
    """Per layer, the cosine between the EM direction and the refusal direction, with null bands.

    ``base`` and ``organism`` hold each layer's activations ``[n, d]`` of the **same prompts**
    through the two models; the EM direction is ``mean(organism - base)``. The refusal direction
    is ``mean(harmful) - mean(harmless)`` of the base, from ``base`` with ``labels``, or from a
    separate set ``refusal_base`` with ``refusal_labels`` (e.g. EM direction on ``em_questions``,
    refusal on ``harmful``).

    Args:
        base: per-layer base activations: ``{layer or hook: [n, d]}``, a list per layer, a tensor
            ``[layer, n, d]``, or a store (with ``hook_template``).
        organism: the organism's, in the same form and prompt order.
        labels: ``[n]`` 1 = harmful, 0 = harmless, for the refusal direction when
            ``refusal_base`` is not given (default: the store's labels); also used to split the
            projections by label.
        refusal_base: per-layer base activations of a separate harmful/harmless set.
        refusal_labels: its labels (default: its store's labels).
        hook_template: e.g. ``"blocks.{layer}.hook_resid_post"``, to read stores and name hooks.
        layers: the layers to compare (default: all given).
        n_null: draws per null distribution.
        seed: seed of the random directions and label shuffles (the same draws at every layer).
        ci: central mass of the null bands (0.95 gives the 2.5 and 97.5 percentiles).
        model: recorded in the result.
        progress: show a progress bar over layers.
    """
    from tqdm import tqdm

    if not 0 < ci < 1:
        raise ConfigError(f"ci must be in (0, 1), got {ci}.")
    if n_null < 1:
        raise ConfigError(f"n_null must be >= 1, got {n_null}.")
    if labels is None and is_store(base):
        labels = store_labels(base)
    if refusal_base is not None and refusal_labels is None and is_store(refusal_base):
        refusal_labels = store_labels(refusal_base)
    if model is None and is_store(organism):
        model = store_meta(organism)[0]
    lay_b, names_b, get_b = _per_layer(base, "base", hook_template, layers)
    lay_o, _, get_o = _per_layer(organism, "organism", hook_template, lay_b)
    if lay_o != lay_b:
        raise DataError(f"base and organism cover different layers: {lay_b} vs {lay_o}.")
    if refusal_base is not None:
        lay_r, _, get_r = _per_layer(refusal_base, "refusal_base", hook_template, lay_b)
        if lay_r != lay_b:
            raise DataError(f"refusal_base covers layers {lay_r}, not {lay_b}.")
    else:
        get_r, refusal_labels = get_b, labels
    gen = torch.Generator().manual_seed(seed)
    nulls = _NullDraws(n_null, gen)
    rows: list[LayerComparison] = []
    y_em = None
    for i, _layer in enumerate(tqdm(lay_b, desc="EM vs refusal", disable=not progress)):
        hb = as_acts(get_b(i), f"base[{_layer}]")
        ho = as_acts(get_o(i), f"organism[{_layer}]").to(hb.device)
        if hb.shape != ho.shape:
            raise DataError(f"layer {_layer}: base {tuple(hb.shape)} and organism "
                            f"{tuple(ho.shape)} must be the same prompts.")
        hr = hb if refusal_base is None else as_acts(get_r(i), f"refusal_base[{_layer}]")
        yr = as_labels(refusal_labels, hr.shape[0], "refusal labels")
        if i == 0 and labels is not None:
            y_em = as_labels(labels, hb.shape[0])
        rows.append(_compare_layer(hb, ho, hr, yr, nulls, ci))
    # Family-wise p over layers: the max statistic of the label-shuffled null (the same shuffles
    # at every layer), so "outside the null at layer L" is corrected for looking at every layer.
    max_null = torch.stack([r.shuffled_null.abs() for r in rows]).max(0).values
    p_max = [_perm_p(max_null, r.cosine) for r in rows]

    def vec(key):
        return torch.tensor([getattr(r, key) for r in rows], dtype=torch.float32)

    return EMvsRefusalResult(
        layers=list(lay_b), hooks=list(names_b), cosine=vec("cosine"),
        random_lo=vec("random_lo"), random_hi=vec("random_hi"),
        shuffled_lo=vec("shuffled_lo"), shuffled_hi=vec("shuffled_hi"),
        p_random=vec("p_random"), p_shuffled=vec("p_shuffled"),
        p_shuffled_fwer=torch.tensor(p_max, dtype=torch.float32),
        em_norm=vec("em_norm"), refusal_norm=vec("refusal_norm"),
        proj_base=torch.stack([r.proj_base for r in rows]),
        proj_organism=torch.stack([r.proj_organism for r in rows]),
        em_directions=_stack_padded([r.em_direction for r in rows]),
        refusal_directions=_stack_padded([r.refusal_direction for r in rows]),
        labels=None if y_em is None else y_em.cpu(), n_null=n_null, seed=seed, ci=ci,
        model=model)


@dataclass(frozen=True)
class LayerComparison:
    """The EM direction against the refusal direction at one layer (see :func:`em_vs_refusal`)."""

    cosine: float
    """cos(EM direction, refusal direction)."""
    random_lo: float
    random_hi: float
    """Central ``ci`` band of the cosine with random Gaussian directions (the weak null)."""
    shuffled_lo: float
    shuffled_hi: float
    """Central ``ci`` band of the cosine with refusal directions from shuffled labels."""
    p_random: float
    """Two-sided permutation p-value against the random-direction null."""
    p_shuffled: float
    """Two-sided permutation p-value against the label-shuffled null (this layer alone)."""
    em_norm: float
    refusal_norm: float
    proj_base: torch.Tensor
    """``[n]`` projections of the base activations on the unit refusal direction."""
    proj_organism: torch.Tensor
    """``[n]`` the organism's."""
    em_direction: torch.Tensor
    refusal_direction: torch.Tensor
    shuffled_null: torch.Tensor
    """``[n_null]`` cosines under the label-shuffled null (for the max-statistic correction)."""


class _NullDraws:
    """Random directions and label shuffles drawn once and reused at every layer."""

    def __init__(self, n: int, gen: torch.Generator):
        self.n, self.gen = n, gen
        self._g: torch.Tensor | None = None
        self._perms: torch.Tensor | None = None

    def directions(self, d: int) -> torch.Tensor:
        if self._g is None or self._g.shape[1] != d:
            self._g = torch.randn(self.n, d, generator=self.gen, dtype=torch.float64)
        return self._g

    def shuffles(self, n_items: int) -> torch.Tensor:
        if self._perms is None:
            self._perms = torch.stack([torch.randperm(n_items, generator=self.gen)
                                       for _ in range(self.n)])
        return self._perms


def _compare_layer(hb, ho, hr, yr, nulls: _NullDraws, ci: float) -> LayerComparison:
    n1, n0 = int((yr == 1).sum()), int((yr == 0).sum())
    if n1 == 0 or n0 == 0:
        raise DataError(f"the refusal direction needs harmful (1) and harmless (0) prompts; "
                        f"got {n1} and {n0}.")
    em = (mean_rows(ho) - mean_rows(hb))
    ref = (mean_rows(hr[yr.to(hr.device) == 1]) - mean_rows(hr[yr.to(hr.device) == 0])).to(em.device)
    cos = cosine(em, ref)
    q = torch.tensor([(1 - ci) / 2, 1 - (1 - ci) / 2], dtype=torch.float64)
    # random-direction null: cos(em, g), g ~ N(0, I)
    gd = nulls.directions(em.shape[0]).to(em.device)
    null_r = (gd @ em) / (gd.norm(dim=1) * em.norm()).clamp_min(1e-300)
    # label-shuffled null: refusal direction from shuffled labels
    ys = yr[nulls.shuffles(yr.shape[0])]  # [n_null, n]
    w = torch.where(ys == 1, 1.0 / n1, -1.0 / n0).to(torch.float64)
    null_dirs = weighted_rows(w, hr).to(em.device)  # [n_null, d]
    null_s = (null_dirs @ em) / (null_dirs.norm(dim=1) * em.norm()).clamp_min(1e-300)
    rhat = unit(ref)
    return LayerComparison(
        cosine=cos, random_lo=float(torch.quantile(null_r, q[0])),
        random_hi=float(torch.quantile(null_r, q[1])),
        shuffled_lo=float(torch.quantile(null_s, q[0])),
        shuffled_hi=float(torch.quantile(null_s, q[1])),
        p_random=_perm_p(null_r, cos), p_shuffled=_perm_p(null_s, cos),
        em_norm=float(em.norm()), refusal_norm=float(ref.norm()),
        proj_base=project(hb, rhat).float().cpu(), proj_organism=project(ho, rhat).float().cpu(),
        em_direction=em.float().cpu(), refusal_direction=ref.float().cpu(),
        shuffled_null=null_s.float().cpu())






def _perm_p(null: torch.Tensor, stat: float) -> float:
    if math.isnan(stat):
        return float("nan")
    return float((1 + (null.abs() >= abs(stat) - 1e-12).sum()) / (1 + null.numel()))


def _stack_padded(vs: list[torch.Tensor]) -> torch.Tensor:
    d = max(v.shape[0] for v in vs)
    if all(v.shape[0] == d for v in vs):
        return torch.stack(vs)
    raise DataError("em_vs_refusal layers have different widths; compare hooks of one kind "
                    "(all resid_post, or all mlp_post).")
