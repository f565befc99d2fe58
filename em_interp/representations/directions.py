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

1. the base model's refusal vector ``v = E[h_base | risky] - E[h_base | benign]`` (or a given
   ``vector``, e.g. the harmful-minus-harmless direction Arditi et al.'s recipe chooses);
2. ``R`` fitted on the **benign** anchors only, ``v_aligned = v R / ||v R||``;
3. the zero point ``c`` = the organism's benign mean;
4. every prompt's score ``S(x) = (h_org(x) - c) . v_aligned``.

The summary gives class means, Cohen's ``d`` with the pooled SD
``sqrt(((n1 - 1) s1^2 + (n0 - 1) s0^2) / (n1 + n0 - 2))`` and the two-sample KS statistic and
p-value (``scipy.stats.ks_2samp``). The paper reports, at the last layer of Qwen2.5-32B, a risky
mean of 17.34 against the benign zero, ``d = 5.30`` and ``p = 3.7e-294``.

**EM direction vs refusal direction** (:func:`~em_interp.representations.em_refusal.em_vs_refusal`,
in :mod:`em_interp.representations.em_refusal`; the open question of the
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
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float

from em_interp.errors import ConfigError, DataError
from em_interp.representations.procrustes import Complement, ProcrustesResult, procrustes_align
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
)
from em_interp.results import Result

__all__ = ["Direction", "IntrospectionResult", "ProcrustesResult", "cohens_d",
           "introspection_scores", "mean_difference", "procrustes_align"]

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
        return unit(self.vector.float())

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
        return cosine(self.vector.double(), w.double().to(self.vector.device))

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
    if is_store(acts_a):
        if hook is None:
            raise ConfigError("mean_difference(store, ...) needs hook=... (one of store.hooks).")
        store_model, store_prompts = store_meta(acts_a)
        if labels is None:
            labels = store_labels(acts_a)
        acts_a = acts_a.load(hook)
    a = as_acts(acts_a, "acts_a")
    if acts_b is None:
        y = as_labels(labels, a.shape[0])
        sel_a, sel_b = y == positive, y == negative
        if not sel_a.any() or not sel_b.any():
            raise DataError(f"mean_difference needs rows of both labels {positive} and "
                            f"{negative}; found {int(sel_a.sum())} and {int(sel_b.sum())}.")
        a, b = a[sel_a.to(a.device)], a[sel_b.to(a.device)]
    else:
        if labels is not None:
            raise ConfigError("pass either acts_b or labels to mean_difference, not both.")
        b = as_acts(acts_b, "acts_b")
    if a.shape[1] != b.shape[1]:
        raise DataError(f"acts_a has d={a.shape[1]} but acts_b has d={b.shape[1]}; both must "
                        "come from the same hook.")
    v = (mean_rows(a) - mean_rows(b.to(a.device))).float()
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
                         label_names: tuple[str, str] = ("benign", "risky"),
                         vector=None) -> IntrospectionResult:
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
        vector: the base model's refusal vector ``[d]`` at ``hook``, fitted elsewhere (e.g.
            Arditi et al.'s harmful-minus-harmless direction of the ``refusal_direction`` stage,
            :func:`~em_interp.representations.refusal_direction.select_refusal_direction`);
            default: step 1, ``E[h_base | risky] - E[h_base | benign]`` of the fitted prompts.
    """
    from scipy.stats import ks_2samp

    if is_store(base_acts) or is_store(organism_acts):
        if hook is None:
            raise ConfigError("introspection_scores with stores needs hook=... (e.g. "
                              "em_interp.hooks.mlp_post(last_layer)).")
        if labels is None and is_store(base_acts):
            labels = store_labels(base_acts)
        base_acts = base_acts.load(hook) if is_store(base_acts) else base_acts
        organism_acts = organism_acts.load(hook) if is_store(organism_acts) else organism_acts
    hb = as_acts(base_acts, "base_acts")
    ho = as_acts(organism_acts, "organism_acts").to(hb.device)
    if hb.shape != ho.shape:
        raise DataError(f"base_acts {tuple(hb.shape)} and organism_acts {tuple(ho.shape)} must "
                        "be the same prompts at the same hook in both models.")
    y = as_labels(labels, hb.shape[0]).to(hb.device)
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
    if vector is None:
        v = (mean_rows(hb[risky_fit]) - mean_rows(hb[benign_fit]))
    else:
        v = torch.as_tensor(vector).detach().flatten().to(hb.device, torch.float64)
        if v.shape[0] != hb.shape[1]:
            raise DataError(f"vector has {v.shape[0]} entries; the activations at {hook} have "
                            f"{hb.shape[1]}.")
    # 2. rotated into the organism's space with R fitted on benign anchors only
    proc = procrustes_align(hb[benign_fit], ho[benign_fit], complement=complement)
    v_rot = proc.rotate(v.to(proc.left.dtype))
    direction = unit(v_rot)
    # 3. zero point: the organism's benign mean
    zero = mean_rows(ho[benign_fit])
    # 4. project every prompt
    scores = project(ho, direction, zero).float()
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
        procrustes=proc.to_dict(), rotation_cosine=cosine(v, v_rot),
        label_names=tuple(label_names))
