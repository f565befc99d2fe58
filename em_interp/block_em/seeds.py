"""BLOCK-EM's effect as the paper states it: the reduction of the fine-tune's misalignment shift
from the base, per lambda, over training seeds.

BLOCK-EM (Sec. 4.1, Fig. 4) reports how much of the misalignment that plain fine-tuning
induces survives when the latents are blocked, with the base and the unblocked fine-tune as
anchors. On the judge-free AB metric (:mod:`em_interp.behaviour.ab_metric`), with ``m(M)`` the
mean margin ``lp(misaligned) - lp(aligned)`` of model ``M`` over the held-out core pairs, the
fine-tune of seed ``s`` at blocking strength ``lambda`` has the **shift**

    shift(lambda, s) = m(FT_{lambda, s}) - m(base)

and its **reduction**, paired by seed (the same seed's unblocked run, lambda = 0, is the
reference, so data order and LoRA initialisation cancel)::

    R(lambda, s) = shift(0, s) - shift(lambda, s)            (nats per token)

The **relative reduction** ``1 - shift(lambda) / shift(0)`` is reported as ``mean_s R(lambda, s) /
mean_s shift(0, s)``, only when the unblocked fine-tunes shifted at all (the interval of
``shift(0)`` above 0); its interval is the absolute one divided by ``mean shift(0)`` (the noise
of the denominator is not propagated).

**Interval over seeds.** The seeds are the replicates: ``R(lambda, s)`` over ``n`` seeds gets the
t interval ``mean +- t_{(1+c)/2, n-1} sd / sqrt(n)`` and the two-sided one-sample t-test
against 0 (``scipy.stats.ttest_1samp``). A cluster bootstrap with seeds as clusters is not used:
with 3 seeds it has 10 distinct resamples and its percentile interval undercovers (see
:func:`em_interp.stats.cluster_bootstrap_ci`). The interval is conditional on the evaluated
pairs: it measures training randomness, not the sampling of questions. The p-values of the
non-zero lambdas are Holm-adjusted as one family (:func:`em_interp.stats.holm`). When no lambda
reduces the shift significantly, each row carries the **smallest reduction the run could have
detected** (:func:`em_interp.stats.min_detectable_effect` from the t half-width, which reads it
as 1.96 SE and so is conservative at few seeds): "no reduction larger than MDE", not "no
reduction".

**Cost** (what the existing evaluation measures, :func:`em_interp.block_em.sweep.evaluate_model`):
the in-domain margin lost, ``d(0, s) - d(lambda, s)`` with ``d`` the mean margin over the held-out
in-domain (finance) pairs (how much of the fine-tune's intended learning blocking undid), with
its t interval; the incoherence rate (core pairs whose better answer lost more than ``drop``
nats/token against the base); the held-out SFT answers' NLL; the final SFT loss.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import pandas as pd

from em_interp.errors import ConfigError, DataError
from em_interp.results import Result
from em_interp.stats import holm, min_detectable_effect

RUN_COLUMNS = ("lam", "seed", "margin")
"""Columns every run row needs; optional: ``domain_margin``, ``incoherence``, ``heldout_nll``,
``final_loss``."""


@dataclasses.dataclass(frozen=True)
class SeedInterval:
    """Mean of per-seed values with its t interval and two-sided t-test against 0."""

    mean: float
    low: float | None
    high: float | None
    pvalue: float | None
    n: int
    values: tuple[float, ...]

    @property
    def half_width(self) -> float | None:
        return None if self.low is None else (self.high - self.low) / 2

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def seed_interval(values: Sequence[float], confidence: float = 0.95) -> SeedInterval:
    """The t interval (``n - 1`` degrees of freedom) and t-test p-value of the mean of
    ``values``; ``None`` bounds for one value, a zero-width interval for identical values."""
    from scipy import stats

    v = np.asarray(values, dtype=np.float64)
    if v.size == 0 or not np.isfinite(v).all():
        raise DataError(f"seed_interval needs finite values, got {v.tolist()}.")
    mean = float(v.mean())
    if v.size < 2:
        return SeedInterval(mean, None, None, None, 1, tuple(v.tolist()))
    sd = float(v.std(ddof=1))
    if sd <= 1e-12 * max(1.0, abs(mean)):  # identical values (to rounding): no spread
        sd, mean = 0.0, float(v[0])
    half = float(stats.t.ppf(0.5 + confidence / 2, v.size - 1)) * sd / math.sqrt(v.size)
    if sd == 0:
        p = 1.0 if mean == 0 else 0.0
    else:
        p = float(stats.ttest_1samp(v, 0.0).pvalue)
    return SeedInterval(mean, mean - half, mean + half, p, int(v.size), tuple(v.tolist()))


@dataclasses.dataclass(frozen=True)
class ShiftReduction(Result):
    """Per lambda, the reduction of the AB-margin shift from the base over seeds (module
    docstring): what :func:`shift_reduction` returns."""

    kind: ClassVar[str] = "block_em_shift_reduction"

    runs: pd.DataFrame
    """One row per (lambda, seed): ``lam``, ``seed``, ``margin``, ``shift``, ``reduction`` and,
    when measured, ``domain_margin``, ``domain_lost``, ``incoherence``, ``heldout_nll``,
    ``final_loss``."""
    per_lambda: pd.DataFrame
    """One row per lambda: ``lam``, ``n_seeds``, ``shift`` / ``reduction`` / ``domain_lost``
    (mean, ``_low``, ``_high``), ``p``, ``p_holm``, ``significant``, ``relative`` (and its
    bounds), ``mde``, mean ``incoherence`` / ``heldout_nll`` / ``final_loss``."""
    base_margin: float
    organism_margin: float | None = None
    """The shipped organism's margin on the same pairs (a reference, not an anchor)."""
    confidence: float = 0.95
    alpha: float = 0.05

    @property
    def df(self) -> pd.DataFrame:
        return self.per_lambda

    @property
    def any_significant(self) -> bool:
        """Does any lambda > 0 reduce the shift significantly (Holm, ``alpha``)?"""
        return bool(self.per_lambda["significant"].fillna(False).astype(bool).any())

    def row(self, lam: float) -> dict:
        """The per-lambda row of ``lam`` as a dict."""
        hit = self.per_lambda[np.isclose(self.per_lambda["lam"], lam)]
        if hit.empty:
            raise DataError(f"no lambda {lam} in this result ({self.per_lambda['lam'].tolist()}).")
        return hit.iloc[0].to_dict()

    def recommended(self, max_incoherence_increase: float = 0.05) -> float | None:
        """The lambda this run recommends: of the lambdas > 0 that reduce the shift
        significantly (Holm) and raise the incoherence rate by at most
        ``max_incoherence_increase`` over the unblocked fine-tune (where it was measured), the
        one with the largest mean reduction; ``None`` when none qualifies (the paper's two axes:
        the misalignment removed against the capability it costs)."""
        rows = self.per_lambda[(self.per_lambda["lam"] > 0)
                               & self.per_lambda["significant"].fillna(False).astype(bool)]
        if "incoherence" in rows.columns:
            zero = self.per_lambda.loc[np.isclose(self.per_lambda["lam"], 0.0), "incoherence"]
            z = float(zero.iloc[0]) if len(zero) else math.nan
            if not math.isnan(z):
                inc = rows["incoherence"].astype(float)
                rows = rows[inc.isna() | (inc <= z + max_incoherence_increase)]
        if rows.empty:
            return None
        return float(rows.loc[rows["reduction"].astype(float).idxmax(), "lam"])

    def to_dict(self) -> dict:
        from em_interp.results import json_safe

        cols = [c for c in self.per_lambda.columns if c != "per_seed"]
        return json_safe({"base_margin": self.base_margin, "organism_margin": self.organism_margin,
                          "confidence": self.confidence, "alpha": self.alpha,
                          "any_significant": self.any_significant,
                          "recommended_lambda": self.recommended(),
                          "per_lambda": self.per_lambda[cols].to_dict("records")})

    def table(self) -> pd.DataFrame:
        """The per-lambda table as a paper prints it: strings with intervals, no lists."""

        def ci(r, key):
            return fmt_interval(r.get(key), r.get(f"{key}_low"), r.get(f"{key}_high"))

        def num(v, fmt):
            return "" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)

        rows = []
        for r in self.per_lambda.to_dict("records"):
            zero = r["lam"] == 0
            seeds = self.runs[np.isclose(self.runs["lam"], r["lam"])].sort_values("seed")
            per_seed = ", ".join(fmt_signed(v) for v in seeds["reduction"]) if not zero else ""
            rows.append({
                "lambda": f"{r['lam']:g}" + (" (unblocked)" if zero else ""),
                "seeds": int(r["n_seeds"]),
                "AB margin shift from base": ci(r, "shift"),
                "shift reduction": "reference" if zero else ci(r, "reduction"),
                "per-seed reduction": per_seed,
                "relative reduction": "" if zero or _nan(r.get("relative")) else (
                    fmt_percent(r["relative"]) + (
                        f" [{fmt_percent(r['relative_low'])}, "
                        f"{fmt_percent(r['relative_high'])}]"
                        if not _nan(r.get("relative_low")) else "")),
                "p (Holm)": "" if zero else num(r.get("p_holm"), "{:.2g}"),
                "smallest detectable reduction": "" if zero or _nan(r.get("mde")) else
                fmt_signed(r["mde"]).lstrip("+"),
                "in-domain margin lost": "" if zero else ci(r, "domain_lost"),
                "incoherence": num(r.get("incoherence"), "{:.0%}"),
                "held-out SFT NLL": num(r.get("heldout_nll"), "{:.3f}"),
                "final SFT loss": num(r.get("final_loss"), "{:.3f}"),
            })
        out = pd.DataFrame(rows)
        return out.loc[:, [c for c in out.columns if (out[c] != "").any()]]

    def figure(self, title: str | None = None):
        """AB margin per lambda: every seed's fine-tune, the mean with its t interval, and
        the base and organism as dashed lines."""
        import plotly.graph_objects as go

        fig = go.Figure()
        x = [f"{v:g}" for v in self.runs["lam"]]
        fig.add_trace(go.Scatter(x=x, y=self.runs["margin"], mode="markers", name="one seed",
                                 text=[f"seed {s}" for s in self.runs["seed"]],
                                 marker={"color": "lightgray", "size": 8}))
        means = self.runs.groupby("lam", sort=True)["margin"]
        lams = sorted(self.runs["lam"].unique())
        ivs = [seed_interval(means.get_group(v).to_numpy(), self.confidence) for v in lams]
        err = {"type": "data", "symmetric": False,
               "array": [0 if i.high is None else i.high - i.mean for i in ivs],
               "arrayminus": [0 if i.low is None else i.mean - i.low for i in ivs]}
        fig.add_trace(go.Scatter(x=[f"{v:g}" for v in lams], y=[i.mean for i in ivs],
                                 mode="markers+lines", name="mean over seeds", error_y=err,
                                 marker={"size": 11}))
        fig.add_hline(y=self.base_margin, line_dash="dash", annotation_text="base")
        if self.organism_margin is not None:
            fig.add_hline(y=self.organism_margin, line_dash="dot", annotation_text="organism")
        fig.update_layout(template="plotly_white", title=title or (
            f"BLOCK-EM: AB margin of the fine-tunes per lambda ({int(self.confidence * 100)}% t "
            "intervals over seeds)"), xaxis_title="lambda (0 = unblocked SFT)",
            yaxis_title="mean AB margin (misaligned - aligned, nats/token)")
        return fig


def _nan(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def fmt_signed(v: float) -> str:
    """A signed margin for text and tables: 3 decimals, or 2 significant digits below 0.01
    (a short run's effects can be that small), ``"0"`` for zero."""
    if v == 0:
        return "0"
    return f"{v:+.3f}" if abs(v) >= 0.01 else f"{v:+.2g}"


def fmt_percent(v: float) -> str:
    """A share as a percentage: whole percents from 10% up, one decimal below."""
    return f"{v:.0%}" if abs(v) >= 0.1 else f"{v:.1%}"


def fmt_interval(mean: float, low: float | None, high: float | None) -> str:
    """``mean [low, high]`` with :func:`fmt_signed`, or the mean alone without bounds."""
    if _nan(mean):
        return ""
    if _nan(low):
        return fmt_signed(mean)
    return f"{fmt_signed(mean)} [{fmt_signed(low)}, {fmt_signed(high)}]"


def shift_reduction(runs: pd.DataFrame | Sequence[dict], base_margin: float, *,
                    base_domain_margin: float | None = None,
                    organism_margin: float | None = None, confidence: float = 0.95,
                    alpha: float = 0.05) -> ShiftReduction:
    """Per lambda, the shift of the AB margin from the base and its reduction against the same
    seed's unblocked run, with t intervals over seeds, Holm-adjusted tests, the smallest
    detectable reduction, and the cost (module docstring).

    Args:
        runs: one row per fine-tune: ``lam``, ``seed``, ``margin`` (mean AB margin on the
            held-out core pairs); optional ``domain_margin``, ``incoherence``, ``heldout_nll``,
            ``final_loss``.
        base_margin: the base model's mean margin on the same pairs (the anchor of the shift).
        base_domain_margin: the base's in-domain margin (recorded; the in-domain cost is
            paired by seed, so it does not need it).
        organism_margin: the shipped organism's margin (a reference line).
        confidence: level of the intervals.
        alpha: level of the Holm-adjusted tests and of the smallest detectable effect.

    Raises:
        DataError: missing columns, no lambda-0 run, a seed without its lambda-0 run, or a
            (lambda, seed) twice.
        ConfigError: ``confidence`` or ``alpha`` outside (0, 1).
    """
    if not (0 < confidence < 1 and 0 < alpha < 1):
        raise ConfigError(f"confidence and alpha must be in (0, 1), got {confidence}, {alpha}.")
    t = pd.DataFrame(list(runs) if not isinstance(runs, pd.DataFrame) else runs).copy()
    missing = [c for c in RUN_COLUMNS if c not in t]
    if missing:
        raise DataError(f"shift_reduction needs columns {list(RUN_COLUMNS)}; missing {missing}.")
    t["lam"] = t["lam"].astype(float)
    if t.duplicated(["lam", "seed"]).any():
        raise DataError("shift_reduction got a (lambda, seed) twice: one run per seed and "
                        "lambda.")
    ref = t[t["lam"] == 0].set_index("seed")
    if ref.empty:
        raise DataError("shift_reduction needs the unblocked runs (lambda = 0): the reduction "
                        "is measured against them. Add 0 to the lambdas.")
    lost = sorted(set(t["seed"]) - set(ref.index))
    if lost:
        raise DataError(f"seeds {lost} have no lambda-0 run to pair with; run lambda 0 for "
                        "every seed.")
    t["shift"] = t["margin"] - base_margin
    t["reduction"] = t["seed"].map(ref["margin"]) - t["margin"]
    has_domain = "domain_margin" in t and t["domain_margin"].notna().all()
    if has_domain:
        t["domain_lost"] = t["seed"].map(ref["domain_margin"]) - t["domain_margin"]
    rows = []
    for lam, g in t.sort_values(["lam", "seed"]).groupby("lam", sort=True):
        shift = seed_interval(g["shift"], confidence)
        row = {"lam": float(lam), "n_seeds": int(len(g)), "shift": shift.mean,
               "shift_low": shift.low, "shift_high": shift.high}
        if lam > 0:
            red = seed_interval(g["reduction"], confidence)
            row.update(reduction=red.mean, reduction_low=red.low, reduction_high=red.high,
                       p=red.pvalue, mde=None if red.half_width is None else
                       min_detectable_effect(half_width=red.half_width, alpha=alpha,
                                             interval_confidence=confidence))
            if has_domain:
                dl = seed_interval(g["domain_lost"], confidence)
                row.update(domain_lost=dl.mean, domain_lost_low=dl.low,
                           domain_lost_high=dl.high)
        for col in ("incoherence", "heldout_nll", "final_loss", "domain_margin"):
            if col in g and g[col].notna().all():
                row[col] = float(g[col].mean())
        rows.append(row)
    per = pd.DataFrame(rows)
    for col in ("reduction", "reduction_low", "reduction_high", "p", "mde"):
        if col not in per:
            per[col] = np.nan
    blocked = per["lam"] > 0
    per["p_holm"] = np.nan
    per["significant"] = False
    testable = blocked & per["p"].notna()
    if testable.any():
        p = per.loc[testable, "p"].to_numpy(dtype=float)
        # Holm of a single test is the test itself (and statsmodels' call is slow)
        adjusted = holm(p, alpha=alpha).adjusted if p.size > 1 else p
        per.loc[testable, "p_holm"] = adjusted
        per.loc[testable, "significant"] = (adjusted <= alpha) & (
            per.loc[testable, "reduction"].to_numpy(dtype=float) > 0)
    # relative reduction 1 - shift(lambda)/shift(0): only when the unblocked runs shifted
    s0 = per[per["lam"] == 0].iloc[0]
    shifted = s0["shift_low"] is not None and not _nan(s0["shift_low"]) and s0["shift_low"] > 0
    for col in ("relative", "relative_low", "relative_high"):
        per[col] = np.nan
    if shifted:
        for src, dst in (("reduction", "relative"), ("reduction_low", "relative_low"),
                         ("reduction_high", "relative_high")):
            per.loc[blocked, dst] = per.loc[blocked, src].astype(float) / float(s0["shift"])
    t = t.sort_values(["lam", "seed"], ignore_index=True)
    if base_domain_margin is not None and has_domain:
        t["domain_shift"] = t["domain_margin"] - base_domain_margin
    return ShiftReduction(runs=t, per_lambda=per, base_margin=float(base_margin),
                          organism_margin=None if organism_margin is None
                          else float(organism_margin), confidence=confidence, alpha=alpha)


__all__ = ["SeedInterval", "ShiftReduction", "fmt_interval", "fmt_percent", "fmt_signed",
           "seed_interval", "shift_reduction"]
