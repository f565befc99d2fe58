"""A sweep's summary: every point's headline numbers, across-seed intervals, sweep.json/html.

**Headline numbers.** A finished point's ``results.json`` holds each stage's summary; its
numbers become flat dotted keys (``probing.best_accuracy``, ``sae.features.max_abs_r``; lists,
records and the stages' prompt ids are left out). BLOCK-EM's fine-tunes are read from the point's
saved ``effect`` result, one row per (lambda, training seed): margin, shift, reduction,
incoherence, held-out NLL.

**Across-seed intervals.** For a metric ``m`` and an axis value ``x`` (the other non-seed axes
held fixed: one curve per combination), the observations are the finished points at ``x``, each
with its seed ``s_i``. The estimate is their mean and the interval the percentile cluster
bootstrap with **seeds as clusters** (:func:`em_interp.stats.cluster_bootstrap_ci`): draw
``G`` seeds with replacement from the ``G`` observed, weight each observation by its seed's
count, take the weighted mean ``sum_i w_i m_i / sum_i w_i``; the interval is the 2.5% and 97.5%
quantiles over draws. With one observation per seed this is the ordinary bootstrap over seeds;
several observations sharing a seed (e.g. two fine-tunes of one seed) move together. For
BLOCK-EM's lambda curves the observations are the fine-tunes at each lambda, clustered by
(point seed, training seed). With 3 seeds there are only 10 distinct resamples and the
percentile interval undercovers (about ``sqrt((G-1)/G)`` too narrow): sweep.html shows every
seed's point beside it. Fewer than two seeds give no interval (``None``).

Outputs are written atomically (:mod:`em_interp.atomic`).
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
import time
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd

from em_interp.atomic import atomic_write_text
from em_interp.results import Result, json_safe
from em_interp.run.sweep.spec import SweepPoint, SweepSpec, value_label

DEFAULT_METRICS = ("probing.best_accuracy", "introspection.cohens_d",
                   "refusal_direction.refusal_harmful", "refusal_direction.refusal_harmful_ablated",
                   "dla.mean_logit_diff", "dla.logit_diff_after_ablation",
                   "sae.features.max_abs_r", "sae.quality.explained_variance",
                   "block_em.ab_organism")
"""Headline keys plotted when the sweep file names no ``metrics`` (those a point has)."""
BLOCK_EM_METRICS = ("reduction", "incoherence", "shift", "heldout_nll")
"""Per-fine-tune BLOCK-EM columns plotted against lambda."""
N_BOOT = 2000


def headline(results: dict, limit_depth: int = 3) -> dict[str, float]:
    """Numeric scalars of a run's results.json as dotted keys (see the module docstring)."""
    out: dict[str, float] = {}

    def walk(d: dict, prefix: str, depth: int) -> None:
        for k, v in d.items():
            if k == "prompts":
                continue
            key = f"{prefix}{k}"
            if isinstance(v, bool):
                out[key] = float(v)
            elif isinstance(v, int | float) and math.isfinite(v):
                out[key] = float(v)
            elif isinstance(v, dict) and depth < limit_depth:
                walk(v, key + ".", depth + 1)

    walk(results, "", 0)
    return out


def block_em_rows(run_dir: Path) -> list[dict]:
    """One row per BLOCK-EM fine-tune of a finished run (``[]`` without the stage)."""
    folder = run_dir / "stages" / "block_em" / "results" / "effect"
    if not folder.is_dir():
        return []
    from em_interp.results import load_result

    runs = load_result(folder).runs
    keep = [c for c in ("lam", "seed", "margin", *BLOCK_EM_METRICS) if c in runs.columns]
    return json_safe(runs[keep].to_dict("records"))


def point_record(p: SweepPoint, state: dict, out: Path) -> dict:
    """A point's entry in sweep.json: axes, key, status, attempts, error, headline numbers."""
    run_dir = out / "points" / p.key
    rec = {"index": p.index, "axes": json_safe(p.axes), "label": p.label, "seed": p.seed,
           "card": p.config.card, "key": p.key, "run_dir": f"points/{p.key}",
           "status": state.get("status", "pending"), "attempts": state.get("attempts", 0),
           "seconds": state.get("seconds"), "error": state.get("error"),
           "headline": {}, "block_em": []}
    if rec["status"] in ("finished", "cached") and (run_dir / "results.json").is_file():
        rec["headline"] = headline(json.loads((run_dir / "results.json").read_text()))
        rec["block_em"] = block_em_rows(run_dir)
    return rec


def across_seed_interval(values, seeds, *, n_boot: int = N_BOOT, confidence: float = 0.95,
                         seed: int = 0):
    """Mean of ``values`` and its cluster-bootstrap interval with ``seeds`` as clusters.

    Returns a :class:`~em_interp.stats.BootstrapCI`, or ``None`` with fewer than two distinct
    seeds (no spread to resample).
    """
    from em_interp.stats import cluster_bootstrap_ci

    seeds = [str(s) for s in seeds]
    if len(set(seeds)) < 2:
        return None
    return cluster_bootstrap_ci(np.asarray(values, dtype=float), seeds, n_boot=n_boot,
                                confidence=confidence, seed=seed)


@dataclasses.dataclass(frozen=True)
class SweepSummary(Result):
    """A sweep's points and its across-seed intervals (what sweep.json holds)."""

    kind: ClassVar[str] = "sweep"

    points: pd.DataFrame
    """One row per (point, metric): ``index``, ``label``, ``seed``, the axes' labels, ``status``,
    ``metric``, ``value``."""
    intervals: pd.DataFrame
    """One row per (metric, axis, axis value, curve): ``metric``, ``axis``, ``x``, ``x_label``,
    ``curve``, ``n``, ``n_seeds``, ``estimate``, ``low``, ``high`` (``NaN`` below 2 seeds)."""
    confidence: float = 0.95

    @property
    def df(self) -> pd.DataFrame:
        return self.intervals

    def to_dict(self) -> dict:
        return {"intervals": json_safe(self.intervals.astype(object).where(
            self.intervals.notna(), None).to_dict("records")), "confidence": self.confidence}

    def figure(self, metric: str | None = None, axis: str | None = None):
        """One metric against one axis: each seed's value (grey) and the mean with its interval."""
        import plotly.graph_objects as go

        iv = self.intervals
        if iv.empty:
            return go.Figure().update_layout(title="no finished points to plot")
        metric = metric or iv["metric"].iloc[0]
        axis = axis or iv[iv["metric"] == metric]["axis"].iloc[0]
        t = iv[(iv["metric"] == metric) & (iv["axis"] == axis)]
        pts = self.points[(self.points["metric"] == metric) & (self.points["axis"] == axis)]
        fig = go.Figure()
        numeric = axis != "checkpoint" and bool(t["x"].map(
            lambda v: isinstance(v, int | float) and not isinstance(v, bool)).all())
        # lambda grids are logarithmic and include 0: evenly spaced categories, in order
        categorical = not numeric or axis == "lambda"
        for curve, g in t.groupby("curve", sort=False):
            p = pts[pts["curve"] == curve]
            if numeric:
                g, p = (f.assign(_x=f["x"].astype(float)).sort_values("_x") for f in (g, p))
            fig.add_trace(go.Scatter(
                x=p["x_label"] if categorical else p["x"], y=p["value"], mode="markers",
                marker={"color": "rgba(120,120,120,0.6)", "size": 7},
                text=[f"seed {s}" for s in p["seed"]], name=f"{curve} (one seed each)",
                legendgroup=curve))
            fig.add_trace(go.Scatter(
                x=g["x_label"] if categorical else g["x"], y=g["estimate"],
                mode="lines+markers", name=f"{curve} (mean)", legendgroup=curve,
                error_y={"type": "data", "symmetric": False,
                         "array": (g["high"] - g["estimate"]).fillna(0),
                         "arrayminus": (g["estimate"] - g["low"]).fillna(0)}))
        if categorical:
            order = (t.assign(_x=t["x"].astype(float)).sort_values("_x") if numeric
                     else t)["x_label"].drop_duplicates()
            fig.update_xaxes(type="category", categoryorder="array",
                             categoryarray=list(order))
        fig.update_layout(
            title=f"{metric} vs {axis}: mean over seeds, {self.confidence:.0%} cluster-bootstrap "
                  "interval (seeds as clusters)", xaxis_title=axis, yaxis_title=metric,
            template="plotly_white", height=420)
        return fig


def summarize(records: list[dict], axes: list[str], metrics: tuple[str, ...] = (), *,
              confidence: float = 0.95, n_boot: int = N_BOOT) -> SweepSummary:
    """Intervals over seeds of each metric along each non-seed axis, and BLOCK-EM's lambda."""
    done = [r for r in records if r["status"] in ("finished", "cached")]
    have = set().union(*(r["headline"] for r in done)) if done else set()
    chosen = [m for m in (metrics or DEFAULT_METRICS) if m in have]
    if not chosen and not metrics:
        chosen = sorted(have)[:8]
    plot_axes = [a for a in axes if a != "seed"]
    rows = []  # (metric, axis, x, x_label, curve, seed, cluster, value)
    for axis in plot_axes:
        others = [a for a in plot_axes if a != axis]
        for r in done:
            curve = ", ".join(f"{a}={value_label(r['axes'][a])}" for a in others) or "all"
            x = r["axes"][axis]
            for m in chosen:
                if m in r["headline"]:
                    rows.append((m, axis, x, value_label(x), curve, r["seed"], r["seed"],
                                 r["headline"][m]))
    if not plot_axes:  # seeds only: one interval per metric
        for r in done:
            for m in chosen:
                if m in r["headline"]:
                    rows.append((m, "seed", "all", "all", "all", r["seed"], r["seed"],
                                 r["headline"][m]))
    lam_others = [a for a in plot_axes if a != "block_em.lambdas"]
    for r in done:
        curve = ", ".join(f"{a}={value_label(r['axes'][a])}" for a in lam_others) or "all"
        for b in r["block_em"]:
            for m in BLOCK_EM_METRICS:
                v = b.get(m)
                if v is None or (m == "reduction" and b["lam"] == 0):
                    continue
                rows.append((f"block_em.{m}", "lambda", float(b["lam"]),
                             value_label(float(b["lam"])), curve, r["seed"],
                             f"{r['seed']}/{b['seed']}", float(v)))
    cols = ["metric", "axis", "x", "x_label", "curve", "seed", "cluster", "value"]
    pts = pd.DataFrame(rows, columns=cols)
    out = []
    for (metric, axis, x_label, curve), g in pts.groupby(["metric", "axis", "x_label", "curve"],
                                                         sort=False):
        ci = across_seed_interval(g["value"], g["cluster"], n_boot=n_boot,
                                  confidence=confidence)
        out.append({"metric": metric, "axis": axis, "x": g["x"].iloc[0], "x_label": x_label,
                    "curve": curve, "n": len(g), "n_seeds": g["cluster"].nunique(),
                    "estimate": float(g["value"].mean()),
                    "low": math.nan if ci is None else ci.low,
                    "high": math.nan if ci is None else ci.high})
    iv = pd.DataFrame(out, columns=["metric", "axis", "x", "x_label", "curve", "n", "n_seeds",
                                    "estimate", "low", "high"])
    if iv["x"].map(lambda v: isinstance(v, list | dict)).any():
        iv["x"] = iv["x"].map(lambda v: value_label(v) if isinstance(v, list | dict) else v)
        pts["x"] = pts["x"].map(lambda v: value_label(v) if isinstance(v, list | dict) else v)
    return SweepSummary(points=pts, intervals=iv, confidence=confidence)


def write_summary(out: Path, spec: SweepSpec, records: list[dict], *, backend: str,
                  seconds: float) -> tuple[Path, Path]:
    """Write ``sweep.json`` and ``sweep.html`` into the sweep folder (atomically)."""
    import em_interp

    summary = summarize(records, list(spec.axes), spec.metrics)
    have = set().union(*(r["headline"] for r in records))
    missing = [m for m in spec.metrics if m not in have and not m.startswith("block_em.")]
    counts = {s: sum(r["status"] == s for r in records)
              for s in ("finished", "cached", "failed", "pending")}
    doc = {"source": spec.source, "base": spec.base, "axes": json_safe(spec.axes),
           "set": json_safe(spec.overrides), "seed_keys": list(spec.seed_keys),
           "resources": dataclasses.asdict(spec.resources), "backend": backend,
           "em_interp": em_interp.__version__, "seconds": round(seconds, 2), "counts": counts,
           "missing_metrics": missing, "points": records, **summary.to_dict(),
           "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    sweep_json = out / "sweep.json"
    atomic_write_text(sweep_json, json.dumps(json_safe(doc), indent=1))
    sweep_html = out / "sweep.html"
    atomic_write_text(sweep_html, _html(doc, summary))
    return sweep_json, sweep_html


def _seconds(s) -> str:
    return "" if s is None else f"{s:.1f}"


def _html(doc: dict, summary: SweepSummary) -> str:
    import plotly.offline

    rows = "".join(
        f"<tr><td>{r['index']}</td><td>{html.escape(r['label'])}</td>"
        f"<td class='{r['status']}'>{r['status']}</td><td>{r['attempts']}</td>"
        f"<td>{_seconds(r['seconds'])}</td>"
        f"<td><a href='{r['run_dir']}/report.html'>{r['key']}</a></td>"
        f"<td>{html.escape(r['error'] or '')[:300]}</td></tr>" for r in doc["points"])
    figs = []
    iv = summary.intervals
    for i, (metric, axis) in enumerate(iv[["metric", "axis"]].drop_duplicates().itertuples(
            index=False)):
        fig = summary.figure(metric, axis)
        figs.append("<figure>" + fig.to_html(full_html=False, include_plotlyjs=False,
                                             div_id=f"sweep-fig{i}", default_width="100%",
                                             default_height="420px") + "</figure>")
    c = doc["counts"]
    missing = (f"<p class='failed'>[sweep].metrics names {', '.join(doc['missing_metrics'])}, "
               "which no finished point reports (see a point's results.json for the keys)."
               "</p>" if doc["missing_metrics"] else "")
    failed = (f"<p class='failed'>{c['failed']} point(s) failed every attempt; they are listed "
              "below with their errors and left out of the plots. Rerun the sweep to retry "
              "them (finished points are not recomputed).</p>" if c["failed"] else "")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>em-interp sweep</title>
<style>body{{font-family:system-ui,sans-serif;margin:0 auto;max-width:1100px;padding:24px}}
table{{border-collapse:collapse;font-size:.88em}}td,th{{border:1px solid #d0d7de;padding:3px 8px;
text-align:left}}.failed{{color:#b42318}}.meta{{color:#57606a}}</style>
<script type="text/javascript">{plotly.offline.get_plotlyjs()}</script></head><body>
<h1>em-interp sweep</h1>
<p class="meta">{html.escape(doc['source'])} · base <code>{html.escape(doc['base'])}</code> ·
backend {doc['backend']} · {len(doc['points'])} points: {c['finished']} run now,
{c['cached']} finished earlier, {c['failed']} failed · {doc['seconds']:.1f} s ·
em-interp {doc['em_interp']}</p>
<p>Each curve: the mean over the points at each axis value (other axes fixed) with its
{summary.confidence:.0%} percentile cluster-bootstrap interval, seeds as clusters; grey: one point
per seed. With few seeds the interval is approximate (3 seeds give 10 distinct resamples).</p>
{failed}{missing}
<table><tr><th>#</th><th>axes</th><th>status</th><th>attempts</th><th>seconds</th>
<th>run folder</th><th>error</th></tr>{rows}</table>
{''.join(figs) or '<p>No finished points with numbers to plot.</p>'}
</body></html>
"""
