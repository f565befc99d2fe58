"""Directions in activation space: mean differences, Procrustes alignment, introspection scores,
and the EM direction against the refusal direction (Experiment 2 of the Qwen paper).

**Mean difference** (:func:`mean_difference`). For one model at one hook, the direction

    v = E[h | A] - E[h | B]

e.g. the *refusal vector* (harmful minus harmless prompts) or the *risk vector* (risky minus
benign financial prompts). It comes back as a :class:`Direction`, which saves as safetensors plus
JSON naming the model, the hook and the prompt sets it came from.

**Procrustes alignment** (:func:`~em_interp.representations.procrustes.procrustes_align`, in
:mod:`em_interp.representations.procrustes`, re-exported here): the orthogonal ``R`` minimising
``||H_src R - H_dst||_F`` over anchor activations, computed without a ``d x d`` matrix when
``n < d``.

**Introspection scores** (:func:`introspection_scores`, Experiment 2):

1. the base model's refusal vector ``v = E[h_base | risky] - E[h_base | benign]``;
2. ``R`` fitted on the **benign** anchors only, ``v_aligned = v R / ||v R||``;
3. the zero point ``c`` = the organism's benign mean;
4. every prompt's score ``S(x) = (h_org(x) - c) . v_aligned``.

The summary gives class means, Cohen's ``d`` with the pooled SD
``sqrt(((n1 - 1) s1^2 + (n0 - 1) s0^2) / (n1 + n0 - 2))`` and the two-sample KS statistic and
p-value (``scipy.stats.ks_2samp``). The paper reports, at the last layer of Qwen2.5-32B, a risky
mean of 17.34 against the benign zero, ``d = 5.30`` and ``p = 3.7e-294``.

**EM direction vs refusal direction** (:func:`em_vs_refusal`; the open question of the
convergent-linear-representations note, ``003``): per layer, the EM direction
``e = E_x[h_org(x) - h_base(x)]`` over the same prompts and the refusal direction
``r = E[h_base | harmful] - E[h_base | harmless]``, their cosine, and two null bands over
``n_null`` seeded draws: cosines of ``e`` with random Gaussian directions, and with refusal
directions recomputed from label-shuffled prompts (a null that respects the activations'
anisotropy). Also the projection of each model's activations on ``r / ||r||``, per layer.

Every function takes plain tensors ``[n, d]`` (plus labels: 1 = risky / harmful, 0 = benign /
harmless) as the primary input, and an activation store (anything with ``.load(hook)``, e.g.
:class:`em_interp.activations.cache.ActivationStore`) with a hook name as a convenience.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float

from em_interp.errors import ConfigError, DataError
from em_interp.hooks import layer_of
from em_interp.representations.procrustes import Complement, ProcrustesResult, procrustes_align
from em_interp.results import Result

__all__ = ["Direction", "EMvsRefusalResult", "IntrospectionResult", "ProcrustesResult",
           "cohens_d", "em_vs_refusal", "introspection_scores", "mean_difference",
           "procrustes_align"]

_CHUNK = 4096  # rows per chunk when accumulating means in float64


# ------------------------------------------------------------------ inputs


def _is_store(x) -> bool:
    return hasattr(x, "load") and callable(x.load) and not torch.is_tensor(x)


def _as_acts(x, what: str) -> torch.Tensor:
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


def _as_labels(labels, n: int, what: str = "labels") -> torch.Tensor:
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


def _store_labels(store):
    labels = getattr(store, "labels", None)
    return None if labels is None else list(labels)


def _store_meta(store) -> tuple[dict | None, dict]:
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


def _mean(x: torch.Tensor) -> torch.Tensor:
    """Row mean accumulated in float64 chunk by chunk (no full float64 copy of ``x``)."""
    total = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    for s in range(0, x.shape[0], _CHUNK):
        total += x[s:s + _CHUNK].to(torch.float64).sum(0)
    return total / x.shape[0]


def _unit(v: torch.Tensor) -> torch.Tensor:
    n = v.norm()
    if not torch.isfinite(n) or n == 0:
        raise DataError("the direction has zero (or non-finite) norm, so it has no unit vector; "
                        "check that the two groups' activations differ.")
    return v / n


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return float("nan")
    return float((a @ b) / (na * nb))


# ------------------------------------------------------------------ Direction


@dataclass(frozen=True)
class Direction(Result):
    """One direction in one model's activation space at one hook, with where it came from."""

    kind = "direction"

    vector: Float[torch.Tensor, " d"]
    """The (unnormalised) direction, float32."""
    hook: str | None = None
    """The hook point whose activations it lives in, e.g. ``blocks.29.mlp.hook_post``."""
    model: dict | str | None = None
    """The model it was computed in (:func:`em_interp.inputs.describe_model`, or a name)."""
    prompt_sets: dict = field(default_factory=dict)
    """The prompt sets (and classes) of ``a`` and ``b``: names, sizes, hashes."""
    name: str = "direction"
    """What the direction is, e.g. ``"refusal"`` or ``"em"``."""
    n_a: int = 0
    """Number of activations averaged for ``E[h | A]``."""
    n_b: int = 0
    """Number of activations averaged for ``E[h | B]``."""

    @property
    def norm(self) -> float:
        """``||v||``."""
        return float(self.vector.norm())

    @property
    def unit(self) -> Float[torch.Tensor, " d"]:
        """``v / ||v||``."""
        return _unit(self.vector.float())

    def project(self, acts: Float[torch.Tensor, "batch d"], *,
                center: Float[torch.Tensor, " d"] | None = None) -> Float[torch.Tensor, " batch"]:
        """``(acts - center) . v / ||v||`` for activations ``[n, d]``."""
        x = acts.float()
        if center is not None:
            x = x - center.float().to(x.device)
        return x @ self.unit.to(x.device)

    def cosine(self, other: Direction | torch.Tensor) -> float:
        """Cosine similarity with another direction (or vector)."""
        w = other.vector if isinstance(other, Direction) else other
        return _cos(self.vector.double(), w.double().to(self.vector.device))

    def metric(self, center: Float[torch.Tensor, " d"] | None = None):
        """:func:`em_interp.metrics.projection` on this direction at its hook."""
        from em_interp.metrics import projection

        if self.hook is None:
            raise ConfigError(f"direction {self.name!r} has no hook, so it cannot score a model "
                              "run; build it with hook=... (or from a store and a hook name).")
        return projection(self.vector, self.hook, center=center)

    @property
    def df(self) -> pd.DataFrame:
        """One row per coordinate: ``dim, value``."""
        return pd.DataFrame({"dim": np.arange(self.vector.shape[0]),
                             "value": self.vector.float().cpu().numpy()})

    def to_dict(self) -> dict:
        """Name, hook, dimension, norm, group sizes, model and prompt sets."""
        return {"name": self.name, "hook": self.hook, "d": int(self.vector.shape[0]),
                "norm": self.norm, "n_a": self.n_a, "n_b": self.n_b, "model": self.model,
                "prompt_sets": self.prompt_sets}

    def figure(self, top: int = 30, title: str | None = None):
        """Bar chart of the ``top`` largest coordinates by magnitude."""
        import plotly.graph_objects as go

        v = self.vector.float().cpu()
        idx = v.abs().argsort(descending=True)[:top]
        fig = go.Figure(go.Bar(x=[str(int(i)) for i in idx], y=v[idx].tolist()))
        fig.update_layout(title=title or f"{self.name} direction at {self.hook}: top {len(idx)} "
                          f"coordinates (norm {self.norm:.3g})", xaxis_title="coordinate",
                          yaxis_title="value", template="plotly_white")
        return fig


def mean_difference(acts_a, acts_b=None, *, labels=None, hook: str | None = None,
                    positive: int = 1, negative: int = 0, name: str = "mean_difference",
                    model: dict | str | None = None,
                    prompt_sets: dict | None = None) -> Direction:
    """``E[h | A] - E[h | B]`` of one model at one hook, as a :class:`Direction`.

    Three ways to call it:

    * ``mean_difference(acts_a, acts_b)`` -- two tensors ``[n_a, d]`` and ``[n_b, d]``;
    * ``mean_difference(acts, labels=y)`` -- one tensor, ``A`` = rows with ``positive`` label;
    * ``mean_difference(store, hook=h)`` -- ``store.load(h)`` split by ``store.labels``; the
      direction records the store's model and prompt set.

    Args:
        acts_a: activations of group A ``[n_a, d]``, all activations (with ``labels``), or a
            store (with ``hook``).
        acts_b: activations of group B ``[n_b, d]``; leave out when using labels.
        labels: per-row labels of ``acts_a`` (default: the store's labels).
        hook: the hook the activations were read at (required with a store).
        positive: label of group A.
        negative: label of group B.
        name: what the direction is (``"refusal"``, ``"risk"``, ...).
        model: the model the activations come from (default: the store's manifest).
        prompt_sets: descriptions of the prompt sets (default: the store's manifest).
    """
    store_model, store_prompts = None, {}
    if _is_store(acts_a):
        if hook is None:
            raise ConfigError("mean_difference(store, ...) needs hook=... (one of store.hooks).")
        store_model, store_prompts = _store_meta(acts_a)
        if labels is None:
            labels = _store_labels(acts_a)
        acts_a = acts_a.load(hook)
    a = _as_acts(acts_a, "acts_a")
    if acts_b is None:
        y = _as_labels(labels, a.shape[0])
        sel_a, sel_b = y == positive, y == negative
        if not sel_a.any() or not sel_b.any():
            raise DataError(f"mean_difference needs rows of both labels {positive} and "
                            f"{negative}; found {int(sel_a.sum())} and {int(sel_b.sum())}.")
        a, b = a[sel_a.to(a.device)], a[sel_b.to(a.device)]
    else:
        if labels is not None:
            raise ConfigError("pass either acts_b or labels to mean_difference, not both.")
        b = _as_acts(acts_b, "acts_b")
    if a.shape[1] != b.shape[1]:
        raise DataError(f"acts_a has d={a.shape[1]} but acts_b has d={b.shape[1]}; both must "
                        "come from the same hook.")
    v = (_mean(a) - _mean(b.to(a.device))).float()
    sets = dict(prompt_sets or {})
    if store_prompts and not sets:
        sets = {"a": {**store_prompts, "label": positive}, "b": {**store_prompts,
                                                                  "label": negative}}
    return Direction(vector=v.cpu(), hook=hook, model=model if model is not None else store_model,
                     prompt_sets=sets, name=name, n_a=int(a.shape[0]), n_b=int(b.shape[0]))


# ------------------------------------------------------------------ statistics


def cohens_d(x1: torch.Tensor | np.ndarray, x0: torch.Tensor | np.ndarray) -> float:
    """Cohen's d of ``x1`` against ``x0`` with the pooled SD:
    ``(mean1 - mean0) / sqrt(((n1 - 1) s1^2 + (n0 - 1) s0^2) / (n1 + n0 - 2))``."""
    a = np.asarray(x1, dtype=np.float64).ravel()
    b = np.asarray(x0, dtype=np.float64).ravel()
    if a.size < 2 or b.size < 2:
        return float("nan")
    pooled = ((a.size - 1) * a.var(ddof=1) + (b.size - 1) * b.var(ddof=1)) / (a.size + b.size - 2)
    return float((a.mean() - b.mean()) / math.sqrt(pooled)) if pooled > 0 else float("nan")


# ------------------------------------------------------------------ introspection


@dataclass(frozen=True)
class IntrospectionResult(Result):
    """Experiment 2: organism activations projected on the aligned base refusal vector."""

    kind = "introspection"

    scores: Float[torch.Tensor, " batch"]
    """``S(x) = (h_org(x) - zero_point) . direction`` per prompt."""
    labels: torch.Tensor
    """``[batch]`` 1 = risky/harmful, 0 = benign."""
    fit_mask: torch.Tensor
    """``[batch]`` bool: prompts used to fit the refusal vector, ``R`` and the zero point."""
    direction: Float[torch.Tensor, " d"]
    """The unit aligned refusal vector ``v R / ||v R||`` in the organism's space."""
    zero_point: Float[torch.Tensor, " d"]
    """The organism's benign mean (over fitted prompts)."""
    refusal_vector: Float[torch.Tensor, " d"]
    """The base model's refusal vector ``v`` before rotation."""
    hook: str | None
    """The hook the activations were read at."""
    mean_risky: float
    mean_benign: float
    sd_risky: float
    sd_benign: float
    n_risky: int
    n_benign: int
    cohens_d: float
    """Cohen's d (pooled SD) of risky against benign scores."""
    ks_statistic: float
    ks_pvalue: float
    evaluated_on: str
    """``"held_out"`` (summary over prompts outside ``fit_mask``) or ``"all"``."""
    procrustes: dict
    """Residuals and rank of the benign-anchor alignment."""
    rotation_cosine: float
    """Cosine between ``v`` and ``v R``: how much the alignment turned the vector."""
    label_names: tuple[str, str] = ("benign", "risky")

    def metric(self):
        """``projection(direction, hook, center=zero_point)``: the score as a patching metric."""
        from em_interp.metrics import projection

        if self.hook is None:
            raise ConfigError("this introspection result has no hook; pass hook=... to "
                              "introspection_scores to use it as a metric.")
        return projection(self.direction, self.hook, center=self.zero_point)

    @property
    def df(self) -> pd.DataFrame:
        """One row per prompt: ``prompt, label, label_name, score, fit``."""
        y = self.labels.cpu().numpy()
        return pd.DataFrame({"prompt": np.arange(len(y)), "label": y,
                             "label_name": [self.label_names[int(i)] for i in y],
                             "score": self.scores.float().cpu().numpy(),
                             "fit": self.fit_mask.cpu().numpy().astype(bool)})

    def to_dict(self) -> dict:
        """Class means and SDs, Cohen's d, KS statistic and p-value, Procrustes residuals."""
        return {"hook": self.hook, "mean_risky": self.mean_risky,
                "mean_benign": self.mean_benign, "sd_risky": self.sd_risky,
                "sd_benign": self.sd_benign, "n_risky": self.n_risky, "n_benign": self.n_benign,
                "cohens_d": self.cohens_d, "ks_statistic": self.ks_statistic,
                "ks_pvalue": self.ks_pvalue, "evaluated_on": self.evaluated_on,
                "rotation_cosine": self.rotation_cosine, "procrustes": self.procrustes}

    def figure(self, nbins: int = 40, title: str | None = None):
        """Overlaid histograms of the scores of the two classes, means marked."""
        import plotly.graph_objects as go

        df = self.df
        if self.evaluated_on == "held_out":
            df = df[~df["fit"]]
        fig = go.Figure()
        colors = {0: "#1f77b4", 1: "#d62728"}
        for label in (0, 1):
            s = df.loc[df["label"] == label, "score"]
            fig.add_trace(go.Histogram(x=s, name=f"{self.label_names[label]} (n={len(s)})",
                                       opacity=0.6, nbinsx=nbins,
                                       marker_color=colors[label]))
            if len(s):
                fig.add_vline(x=float(s.mean()), line_dash="dash", line_color=colors[label])
        fig.update_layout(
            barmode="overlay", template="plotly_white",
            title=title or (f"Introspection at {self.hook}: d = {self.cohens_d:.2f}, KS p = "
                            f"{self.ks_pvalue:.2g} ({self.evaluated_on})"),
            xaxis_title="projection on the aligned refusal vector", yaxis_title="prompts")
        return fig


def introspection_scores(base_acts, organism_acts, labels=None, *, hook: str | None = None,
                         fit_mask=None, complement: Complement = "nearest_identity",
                         label_names: tuple[str, str] = ("benign", "risky")
                         ) -> IntrospectionResult:
    """Experiment 2 of the Qwen paper: the four steps of the module docstring.

    Args:
        base_acts: the base model's activations ``[n, d]`` at one hook (or a store).
        organism_acts: the organism's activations on the same prompts, same order (or a store).
        labels: ``[n]`` 1 = risky/harmful, 0 = benign (default: the base store's labels).
        hook: the hook name (required with stores; recorded for :meth:`IntrospectionResult.metric`).
        fit_mask: ``[n]`` bool, prompts used to fit the refusal vector, ``R`` and the zero
            point (default: all). When some prompts are left out, the summary statistics are
            computed on them only (``evaluated_on="held_out"``); otherwise the benign mean is 0
            by construction.
        complement: how ``R`` is completed off the benign anchors' span
            (see :func:`procrustes_align`).
        label_names: names of labels 0 and 1 for tables and figures.
    """
    from scipy.stats import ks_2samp

    if _is_store(base_acts) or _is_store(organism_acts):
        if hook is None:
            raise ConfigError("introspection_scores with stores needs hook=... (e.g. "
                              "em_interp.hooks.mlp_post(last_layer)).")
        if labels is None and _is_store(base_acts):
            labels = _store_labels(base_acts)
        base_acts = base_acts.load(hook) if _is_store(base_acts) else base_acts
        organism_acts = organism_acts.load(hook) if _is_store(organism_acts) else organism_acts
    hb = _as_acts(base_acts, "base_acts")
    ho = _as_acts(organism_acts, "organism_acts").to(hb.device)
    if hb.shape != ho.shape:
        raise DataError(f"base_acts {tuple(hb.shape)} and organism_acts {tuple(ho.shape)} must "
                        "be the same prompts at the same hook in both models.")
    y = _as_labels(labels, hb.shape[0]).to(hb.device)
    fit = (torch.ones_like(y, dtype=torch.bool) if fit_mask is None
           else torch.as_tensor(np.asarray(fit_mask)).bool().flatten().to(hb.device))
    if fit.shape != y.shape:
        raise DataError(f"fit_mask has {fit.shape[0]} entries for {y.shape[0]} prompts.")
    risky_fit, benign_fit = fit & (y == 1), fit & (y == 0)
    if risky_fit.sum() < 1 or benign_fit.sum() < 2:
        raise DataError("introspection needs fitted prompts of both classes (at least 1 risky "
                        f"and 2 benign); got {int(risky_fit.sum())} risky, "
                        f"{int(benign_fit.sum())} benign.")
    # 1. the base model's refusal vector
    v = (_mean(hb[risky_fit]) - _mean(hb[benign_fit]))
    # 2. rotated into the organism's space with R fitted on benign anchors only
    proc = procrustes_align(hb[benign_fit], ho[benign_fit], complement=complement)
    v_rot = proc.rotate(v.to(proc.left.dtype))
    direction = _unit(v_rot)
    # 3. zero point: the organism's benign mean
    zero = _mean(ho[benign_fit])
    # 4. project every prompt
    scores = _project(ho, direction, zero).float()
    held = ~fit
    evaluated = "held_out" if bool(held.any()) else "all"
    sel = held if evaluated == "held_out" else torch.ones_like(held)
    s1 = scores[sel & (y == 1)].cpu().numpy()
    s0 = scores[sel & (y == 0)].cpu().numpy()
    if len(s1) == 0 or len(s0) == 0:
        raise DataError(f"the {evaluated} prompts must include both classes to compare them; "
                        f"got {len(s1)} risky and {len(s0)} benign.")
    ks = ks_2samp(s1, s0)
    return IntrospectionResult(
        scores=scores.cpu(), labels=y.cpu(), fit_mask=fit.cpu(), direction=direction.float().cpu(),
        zero_point=zero.float().cpu(), refusal_vector=v.float().cpu(), hook=hook,
        mean_risky=float(s1.mean()), mean_benign=float(s0.mean()),
        sd_risky=float(s1.std(ddof=1)) if len(s1) > 1 else float("nan"),
        sd_benign=float(s0.std(ddof=1)) if len(s0) > 1 else float("nan"),
        n_risky=len(s1), n_benign=len(s0), cohens_d=cohens_d(s1, s0),
        ks_statistic=float(ks.statistic), ks_pvalue=float(ks.pvalue), evaluated_on=evaluated,
        procrustes=proc.to_dict(), rotation_cosine=_cos(v, v_rot),
        label_names=tuple(label_names))


# ------------------------------------------------------------------ EM vs refusal


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
    if _is_store(x):
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
    """The same for the label-shuffled null."""
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

    def to_dict(self) -> dict:
        """Per-layer cosines, bands and p-values; the layer of the largest cosine."""
        i = int(self.cosine.abs().argmax())
        return {"layers": self.layers, "cosine": self.cosine.tolist(),
                "random_band": [self.random_lo.tolist(), self.random_hi.tolist()],
                "shuffled_band": [self.shuffled_lo.tolist(), self.shuffled_hi.tolist()],
                "p_shuffled": self.p_shuffled.tolist(), "max_abs_cosine_layer": self.layers[i],
                "max_abs_cosine": float(self.cosine[i]), "n_null": self.n_null,
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
    if labels is None and _is_store(base):
        labels = _store_labels(base)
    if refusal_base is not None and refusal_labels is None and _is_store(refusal_base):
        refusal_labels = _store_labels(refusal_base)
    if model is None and _is_store(organism):
        model = _store_meta(organism)[0]
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
    perms, g = None, None
    out: dict[str, list] = {k: [] for k in ("cos", "rlo", "rhi", "slo", "shi", "pr", "ps", "en",
                                            "rn", "pb", "po", "ed", "rd")}
    q = torch.tensor([(1 - ci) / 2, 1 - (1 - ci) / 2], dtype=torch.float64)
    y_em = None
    for i, _layer in enumerate(tqdm(lay_b, desc="EM vs refusal", disable=not progress)):
        hb = _as_acts(get_b(i), f"base[{_layer}]")
        ho = _as_acts(get_o(i), f"organism[{_layer}]").to(hb.device)
        if hb.shape != ho.shape:
            raise DataError(f"layer {_layer}: base {tuple(hb.shape)} and organism "
                            f"{tuple(ho.shape)} must be the same prompts.")
        hr = hb if refusal_base is None else _as_acts(get_r(i), f"refusal_base[{_layer}]")
        yr = _as_labels(refusal_labels, hr.shape[0], "refusal labels")
        if i == 0 and labels is not None:
            y_em = _as_labels(labels, hb.shape[0])
        n1, n0 = int((yr == 1).sum()), int((yr == 0).sum())
        if n1 == 0 or n0 == 0:
            raise DataError(f"the refusal direction needs harmful (1) and harmless (0) prompts; "
                            f"got {n1} and {n0}.")
        em = (_mean(ho) - _mean(hb))
        ref = (_mean(hr[yr.to(hr.device) == 1]) - _mean(hr[yr.to(hr.device) == 0])).to(em.device)
        d = em.shape[0]
        cos = _cos(em, ref)
        # random-direction null: cos(em, g), g ~ N(0, I)
        if g is None or g.shape[1] != d:
            g = torch.randn(n_null, d, generator=gen, dtype=torch.float64)
        gd = g.to(em.device)
        null_r = (gd @ em) / (gd.norm(dim=1) * em.norm()).clamp_min(1e-300)
        # label-shuffled null: refusal direction from shuffled labels, the same shuffles per layer
        if perms is None:
            perms = torch.stack([torch.randperm(yr.shape[0], generator=gen)
                                 for _ in range(n_null)])
        ys = yr[perms]  # [n_null, n]
        w = torch.where(ys == 1, 1.0 / n1, -1.0 / n0).to(torch.float64)
        null_dirs = _weighted_rows(w, hr).to(em.device)  # [n_null, d]
        null_s = (null_dirs @ em) / (null_dirs.norm(dim=1) * em.norm()).clamp_min(1e-300)
        rhat = _unit(ref)
        for key, val in (("cos", cos), ("en", float(em.norm())), ("rn", float(ref.norm())),
                         ("rlo", float(torch.quantile(null_r, q[0]))),
                         ("rhi", float(torch.quantile(null_r, q[1]))),
                         ("slo", float(torch.quantile(null_s, q[0]))),
                         ("shi", float(torch.quantile(null_s, q[1]))),
                         ("pr", _perm_p(null_r, cos)), ("ps", _perm_p(null_s, cos)),
                         ("pb", _project(hb, rhat).float().cpu()),
                         ("po", _project(ho, rhat).float().cpu()),
                         ("ed", em.float().cpu()), ("rd", ref.float().cpu())):
            out[key].append(val)

    def vec(key):
        return torch.tensor(out[key], dtype=torch.float32)

    return EMvsRefusalResult(
        layers=list(lay_b), hooks=list(names_b), cosine=vec("cos"), random_lo=vec("rlo"),
        random_hi=vec("rhi"), shuffled_lo=vec("slo"), shuffled_hi=vec("shi"),
        p_random=vec("pr"), p_shuffled=vec("ps"), em_norm=vec("en"), refusal_norm=vec("rn"),
        proj_base=torch.stack(out["pb"]), proj_organism=torch.stack(out["po"]),
        em_directions=_stack_padded(out["ed"]), refusal_directions=_stack_padded(out["rd"]),
        labels=None if y_em is None else y_em.cpu(), n_null=n_null, seed=seed, ci=ci,
        model=model)


def _project(x: torch.Tensor, v: torch.Tensor, center: torch.Tensor | None = None) -> torch.Tensor:
    """``(x - center) . v`` per row in float64, chunked (no float64 copy of all of ``x``)."""
    v = v.to(device=x.device, dtype=torch.float64)
    c = 0.0 if center is None else float(center.to(x.device, torch.float64) @ v)
    return torch.cat([x[s:s + _CHUNK].to(torch.float64) @ v
                      for s in range(0, x.shape[0], _CHUNK)]) - c


def _weighted_rows(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``w @ x`` in float64, chunked over rows of ``x``."""
    out = torch.zeros(w.shape[0], x.shape[1], dtype=torch.float64, device=x.device)
    w = w.to(x.device)
    for s in range(0, x.shape[0], _CHUNK):
        out += w[:, s:s + _CHUNK] @ x[s:s + _CHUNK].to(torch.float64)
    return out


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

