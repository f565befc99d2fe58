"""Results and figures of activation patching (:mod:`em_interp.patching.sweep`,
:mod:`em_interp.patching.fine`).

Every patching result holds the per-pair effects ``deltas[site, pair] = S_patched - S_clean``,
the clean and source scores, a table of the patched sites (layer, component, head, neurons) and,
per pair, the index of its source and of its destination prompt (``source_ids``, ``dest_ids``).

**Intervals.** Pairs are not independent: :func:`~em_interp.patching.pairs.sample_pairs` reuses
each prompt in many pairs, and every pair that shares a source prompt shares that prompt's
contribution to the effect. A bootstrap that resamples pairs i.i.d. (and ``SEM = sd / sqrt(K)``)
then understates the spread and its interval undercovers. The default interval of every result
(``summary()``, the figures' error bars, ``to_dict()``) is therefore a **two-way cluster
bootstrap over source and destination prompts** (the pigeonhole bootstrap of
:func:`em_interp.stats.cluster_bootstrap_ci`): each draw resamples the source prompts and,
independently, the destination prompts with replacement, and pair ``k`` gets weight
``count_source(s_k) * count_dest(d_k)``; the interval is the percentile interval of the
weighted means. :func:`site_intervals` draws the prompt counts once, builds the ``[n_boot, K]``
weight matrix and gets every site's bootstrap means as one matrix product, so a 64-layer x
3-component sweep costs one ``[n_boot, K] x [K, sites]`` product.

When one way is degenerate the design is clustered one way only, and resampling the degenerate
way would only add noise: if every source prompt occurs in one pair (pairs given row by row), the
bootstrap resamples the destination prompts alone (and vice versa); if every prompt occurs in one
pair, the pairs are independent and it resamples pairs. The method used is recorded
(``to_dict()["interval"]``, ``summary().attrs["interval"]``). A result saved before the prompt
ids were recorded loads with none and falls back to pairs, and says so.

``sem`` stays a column: it is ``sd(Delta S) / sqrt(K)``, the standard error *if the pairs were
independent*, too small when prompts are shared; ``se`` is the cluster bootstrap's. Each site also
gets ``mde``, the minimum detectable effect of :func:`em_interp.stats.min_detectable_effect`
(alpha 0.05, power 0.8) from its interval's half-width, so a null is reported with the size of
effect the run could have seen, and ``significant`` (the interval excludes 0; per site, not
corrected for the number of sites).

Figures follow the Qwen paper: :meth:`SweepResult.figure` and :func:`plot_forward_reverse`
(Fig. 4: mean effect per layer and component with error bars, forward above reverse),
:meth:`SweepResult.heatmap` (Fig. 10: layer x component), :meth:`HeadPatchingResult.figure`
(head effects, Figs. 8-9), :meth:`NeuronSelection.figure` (Figs. 6-7: mean activation
difference per neuron, above-mean neurons highlighted) and :func:`plot_layer_effects` (Figs. 8-9:
the MLP, its selected neurons and every head of one layer).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float

from em_interp.errors import ConfigError, DataError
from em_interp.results import Result
from em_interp.stats import min_detectable_effect

_COLORS = {"attn": "#ff7f0e", "mlp": "#1f77b4", "resid": "#2ca02c"}


def site_frame(sites) -> pd.DataFrame:
    """One row per :class:`~em_interp.patching.sweep.Site`: layer, component, head, neuron, label."""
    return pd.DataFrame({
        "layer": [s.layer for s in sites],
        "component": [s.component for s in sites],
        "head": [s.head for s in sites],
        "neuron": [s.neurons[0] if s.neurons is not None and len(s.neurons) == 1 else -1
                   for s in sites],
        "n_neurons": [0 if s.neurons is None else len(s.neurons) for s in sites],
        "label": [s.label for s in sites],
    })


def bootstrap_means(values: Float[torch.Tensor, "site pair"], n_boot: int = 1000,
                    seed: int = 0) -> Float[torch.Tensor, "boot site"]:
    """Means of ``n_boot`` i.i.d. resamples (pairs drawn with replacement) of every row of
    ``values``: the interval of earlier versions, right only when no prompt is in two pairs
    (the default is :func:`site_intervals`).

    One multinomial count matrix ``[n_boot, K]`` is drawn and multiplied with the values, so
    every site sees the same resamples and memory is ``n_boot x K`` whatever the number of sites.
    """
    k = values.shape[1]
    rng = np.random.default_rng(seed)
    counts = torch.from_numpy(rng.multinomial(k, np.full(k, 1.0 / k), size=n_boot)).double()
    return (counts @ values.double().T / k).float()


INTERVAL_TWO_WAY = "two-way cluster bootstrap over source and destination prompts"
INTERVAL_DEST = ("cluster bootstrap over destination prompts (each source prompt is in one "
                 "pair)")
INTERVAL_SOURCE = ("cluster bootstrap over source prompts (each destination prompt is in one "
                   "pair)")
INTERVAL_PAIRS = "bootstrap over pairs (each prompt is in one pair: the pairs are independent)"
INTERVAL_UNKNOWN = ("bootstrap over pairs, treated as independent (this result records no "
                    "prompt ids: saved by an older version)")


def _pair_clusters(source_ids, dest_ids, n_pairs: int) -> tuple[list[np.ndarray], str]:
    """The clusters to resample for pairs with these prompt ids, and the method's name.

    Two-way (source, destination) when both ways repeat a prompt; one way when only one does (a
    way whose every prompt is in one pair carries no dependence, and resampling it too would
    only widen the interval); the pairs themselves when no prompt repeats, or when the ids are
    missing (``()``, a result saved by an older version).

    Returns:
        ``(ways, method)``: one or two integer code arrays of length ``n_pairs`` (the order of
        :func:`em_interp.stats.cluster_bootstrap_ci`'s ``clusters``), and the method's name.
    """
    if len(source_ids) == 0 and len(dest_ids) == 0:
        return [np.arange(n_pairs)], INTERVAL_UNKNOWN
    if len(source_ids) != n_pairs or len(dest_ids) != n_pairs:
        raise DataError(f"{len(source_ids)} source ids and {len(dest_ids)} destination ids for "
                        f"{n_pairs} pairs; pass one of each per pair.")
    codes = [np.unique(np.asarray(ids), return_inverse=True)[1].reshape(-1)
             for ids in (source_ids, dest_ids)]
    repeats = [int(c.max()) + 1 < n_pairs for c in codes]
    informative = [int(c.max()) + 1 >= 2 for c in codes]
    s_ok, d_ok = repeats[0] and informative[0], repeats[1] and informative[1]
    if s_ok and d_ok:
        return codes, INTERVAL_TWO_WAY
    if d_ok:
        return [codes[1]], INTERVAL_DEST
    if s_ok:
        return [codes[0]], INTERVAL_SOURCE
    return [np.arange(n_pairs)], INTERVAL_PAIRS


def _counts(rng: np.random.Generator, g: int, n_boot: int) -> np.ndarray:
    """``[n_boot, g]`` multinomial(g, 1/g) counts, drawn exactly as
    :func:`em_interp.stats.cluster_bootstrap_ci` draws them (same seed, same draws)."""
    draws = rng.integers(0, g, size=(n_boot, g)) + g * np.arange(n_boot)[:, None]
    return np.bincount(draws.ravel(), minlength=n_boot * g).reshape(n_boot, g).astype(np.float64)


@dataclass(frozen=True)
class SiteIntervals:
    """Bootstrap intervals of the mean effect of every site (:func:`site_intervals`)."""

    mean: np.ndarray
    """``[site]`` mean over pairs."""
    low: np.ndarray
    high: np.ndarray
    """``[site]`` percentile interval of the mean (NaN for a site with a non-finite effect)."""
    se: np.ndarray
    """``[site]`` standard deviation of the bootstrap means."""
    mde: np.ndarray
    """``[site]`` minimum detectable effect (alpha 0.05, power 0.8) from the half-width."""
    method: str
    """What was resampled: ``INTERVAL_TWO_WAY``, or a one-way or pair bootstrap when a way is
    degenerate (see the module docstring)."""
    confidence: float
    n_boot: int
    """Draws with a non-zero total weight (the ones used)."""
    n_clusters: tuple[int, ...]
    """Clusters per resampled way."""

    @property
    def significant(self) -> np.ndarray:
        """``[site]`` the interval excludes 0."""
        with np.errstate(invalid="ignore"):
            return (self.low > 0) | (self.high < 0)


def site_intervals(values, source_ids=(), dest_ids=(), *, n_boot: int = 2000,
                   confidence: float = 0.95, seed: int = 0,
                   chunk: int = 1 << 22) -> SiteIntervals:
    """Cluster-bootstrap intervals of the mean of every row of ``values [site, pair]``.

    The clusters are the source and destination prompts (one way, or the pairs, when a way is
    degenerate: see the module docstring). The prompt counts of each way are drawn once
    (``[n_boot, G]`` per way) and give each draw's pair weights, ``w[b, k] = count_source[b, s_k] * count_dest[b, d_k]`` (one factor for a one-way design);
    every site's bootstrap means are then ``(w @ values.T) / w.sum(1)``, one matrix product,
    in blocks of about ``chunk`` weights. A row equals
    ``stats.cluster_bootstrap_ci(values[i], clusters, n_boot=..., confidence=..., seed=...)``
    with the same clusters (the same draws, the same percentile rule).

    Args:
        values: ``[site, pair]`` effects (a tensor or an array).
        source_ids: the source prompt of each pair (any hashable ids), or ``()``.
        dest_ids: the destination prompt of each pair, or ``()``.
        n_boot: bootstrap draws.
        confidence: interval level.
        seed: seeds ``numpy.random.default_rng``.
        chunk: weights held in memory at once.

    Raises:
        ConfigError: ``n_boot < 2`` or ``confidence`` outside (0, 1).
        DataError: ids of the wrong length.
    """
    if not 0 < confidence < 1:
        raise ConfigError(f"confidence must be in (0, 1), got {confidence}.")
    if n_boot < 2:
        raise ConfigError(f"n_boot must be >= 2, got {n_boot}.")
    v = (values.detach().double().cpu().numpy() if torch.is_tensor(values)
         else np.asarray(values, dtype=np.float64))
    v = v.reshape(-1, v.shape[-1]) if v.ndim else v.reshape(1, 1)
    n_sites, k = v.shape
    ways, method = _pair_clusters(source_ids, dest_ids, k)
    sizes = tuple(int(c.max()) + 1 for c in ways)
    mean = v.mean(1)
    nan = np.full(n_sites, np.nan)
    if k < 2:
        return SiteIntervals(mean, nan, nan.copy(), nan.copy(), nan.copy(),
                             "none (fewer than two pairs)", confidence, 0, sizes)
    finite = np.isfinite(v).all(1)
    vf = np.where(finite[:, None], v, 0.0)
    rng = np.random.default_rng(seed)
    counts = [_counts(rng, g, n_boot) for g in sizes]
    step = max(1, chunk // k)
    boots = []
    for b0 in range(0, n_boot, step):
        w = counts[0][b0:b0 + step][:, ways[0]]
        if len(ways) == 2:
            w = w * counts[1][b0:b0 + step][:, ways[1]]
        den = w.sum(1)
        keep = den > 0
        boots.append((w[keep] @ vf.T) / den[keep, None])
    boot = np.concatenate(boots)
    lo, hi = np.quantile(boot, [(1 - confidence) / 2, (1 + confidence) / 2], axis=0)
    se = boot.std(0, ddof=1) if boot.shape[0] > 1 else nan.copy()
    per_unit = min_detectable_effect(half_width=1.0, interval_confidence=confidence)
    lo, hi, se = (np.where(finite, x, np.nan) for x in (lo, hi, se))
    return SiteIntervals(mean=mean, low=lo, high=hi, se=se, mde=per_unit * (hi - lo) / 2,
                         method=method, confidence=confidence, n_boot=int(boot.shape[0]),
                         n_clusters=sizes)


@dataclass(frozen=True)
class PatchResult(Result):
    """Per-pair patching effects of a set of sites (base of every patching result)."""

    kind = "patching"

    deltas: Float[torch.Tensor, "site pair"]
    """``S_patched - S_clean`` per site and pair."""
    s_clean: Float[torch.Tensor, " pair"]
    """The destination's unpatched score per pair."""
    s_source: Float[torch.Tensor, " pair"]
    """The source's own score per pair (``S_risky`` of the reverse control's sources)."""
    sites: pd.DataFrame
    """One row per site: ``layer``, ``component``, ``head``, ``neuron``, ``n_neurons``,
    ``label``."""
    metric: str = ""
    position: str = "\"last\""
    pairs_name: str = "pairs"
    meta: dict = field(default_factory=dict)
    source_ids: tuple[int, ...] = ()
    """Per pair, the index of its source prompt in the pairs' source set (``()`` in results
    saved by older versions: the interval then treats pairs as independent)."""
    dest_ids: tuple[int, ...] = ()
    """Per pair, the index of its destination prompt in the destination set."""

    _site_columns = ("layer", "component")

    def __post_init__(self):
        k = int(self.deltas.shape[1])
        for name in ("source_ids", "dest_ids"):
            ids = tuple(int(i) for i in getattr(self, name))
            if ids and len(ids) != k:
                raise DataError(f"{type(self).__name__}.{name} has {len(ids)} ids for {k} "
                                "pairs; pass one per pair (pairs.source_index / "
                                "pairs.dest_index), or () when unknown.")
            object.__setattr__(self, name, ids)

    @property
    def n_pairs(self) -> int:
        return int(self.deltas.shape[1])

    @property
    def df(self) -> pd.DataFrame:
        """Tidy: one row per (site, pair) with ``delta``, ``s_clean`` and ``s_patched``."""
        n_sites, k = self.deltas.shape
        out = self.sites.loc[np.repeat(np.arange(n_sites), k),
                             list(self._site_columns)].reset_index(drop=True)
        out["pair"] = np.tile(np.arange(k), n_sites)
        out["delta"] = self.deltas.reshape(-1).double().numpy()
        clean = self.s_clean.double().numpy()
        out["s_clean"] = np.tile(clean, n_sites)
        out["s_patched"] = out["s_clean"] + out["delta"]
        return out

    def intervals(self, confidence: float = 0.95, n_boot: int = 2000,
                  seed: int = 0) -> SiteIntervals:
        """Every site's cluster-bootstrap interval (:func:`site_intervals` over the pairs'
        source and destination prompts)."""
        return site_intervals(self.deltas, self.source_ids, self.dest_ids, n_boot=n_boot,
                              confidence=confidence, seed=seed)

    def _means(self) -> pd.DataFrame:
        out = self.sites[list(self._site_columns) + ["label"]].copy()
        out["mean"] = self.deltas.double().mean(1).numpy()
        return out

    def summary(self, confidence: float = 0.95, n_boot: int = 2000,
                seed: int = 0) -> pd.DataFrame:
        """Per site: ``mean``; ``ci_low`` / ``ci_high``, the cluster-bootstrap interval of the
        mean over source and destination prompts, its ``se`` and ``mde`` (minimum detectable
        effect), ``significant`` (the interval excludes 0); ``sem = sd / sqrt(K)``, the standard
        error if the pairs were independent (too small when prompts are shared); ``n`` pairs.

        ``attrs["interval"]`` names what was resampled (see the module docstring).
        """
        iv = self.intervals(confidence, n_boot, seed)
        d = self.deltas.double()
        k = d.shape[1]
        out = self._means()
        out["sem"] = (d.std(1, unbiased=True) / k ** 0.5).numpy() if k > 1 else np.nan
        out["se"] = iv.se
        out["ci_low"], out["ci_high"] = iv.low, iv.high
        out["mde"] = iv.mde
        out["significant"] = iv.significant
        out["n"] = k
        out.attrs.update(interval=iv.method, confidence=confidence, n_boot=iv.n_boot,
                         n_clusters=list(iv.n_clusters))
        return out

    def top(self, n: int = 10, by: str = "abs", summary: pd.DataFrame | None = None
            ) -> pd.DataFrame:
        """The ``n`` sites with the largest mean effect (``by="abs"``, ``"pos"`` or ``"neg"``),
        from ``summary`` when given (else :meth:`summary` with its defaults)."""
        s = self.summary() if summary is None else summary
        key = {"abs": s["mean"].abs(), "pos": s["mean"], "neg": -s["mean"]}[by]
        return s.loc[key.sort_values(ascending=False).index[:n]].reset_index(drop=True)

    def to_dict(self) -> dict:
        """Pair and prompt counts, metric, mean scores, the interval method, the ten largest
        mean effects (``top``), the sites whose interval excludes 0 (``significant``, ten at
        most, largest first) and, per the run's resolution, the minimum detectable effect; a
        one-line ``conclusion`` says which (a null is reported with the smallest effect the run
        could have detected)."""
        s = self.summary()
        cols = [c for c in s.columns if c != "n"]
        top = self.top(10, summary=s)
        sig = s[s["significant"]]
        sig = sig.loc[sig["mean"].abs().sort_values(ascending=False).index[:10]]
        mde = s["mde"].dropna()
        mde_d = ({"smallest": float(mde.min()), "median": float(mde.median()),
                  "largest": float(mde.max())} if len(mde) else
                 {"smallest": None, "median": None, "largest": None})
        conf = int(round(100 * s.attrs["confidence"]))
        if len(sig):
            best = sig.iloc[0]
            conclusion = (f"{int(s['significant'].sum())} of {len(s)} sites have a {conf}% "
                          f"interval that excludes 0 (per site, not corrected for {len(s)} "
                          f"sites); the largest is {best['label']} at layer {int(best['layer'])}"
                          f": {best['mean']:+.3g} [{best['ci_low']:.3g}, {best['ci_high']:.3g}].")
        elif len(mde):
            conclusion = (f"No site's {conf}% interval excludes 0: a null at this resolution. "
                          f"The run would have detected (power 0.8, alpha 0.05) an effect of "
                          f"|mean| >= {mde_d['smallest']:.3g} at its most precise site "
                          f"(median over sites {mde_d['median']:.3g}).")
        else:
            conclusion = "No interval: fewer than two pairs."
        ids_s, ids_d = set(self.source_ids), set(self.dest_ids)
        return {"n_pairs": self.n_pairs, "n_sites": int(self.deltas.shape[0]),
                "n_sources": len(ids_s) if ids_s else None,
                "n_dests": len(ids_d) if ids_d else None,
                "metric": self.metric, "position": self.position, "pairs": self.pairs_name,
                "mean_s_clean": float(self.s_clean.mean()),
                "mean_s_source": float(self.s_source.mean()),
                "interval": s.attrs["interval"], "confidence": s.attrs["confidence"],
                "n_boot": s.attrs["n_boot"],
                "sem_meaning": "sd / sqrt(n_pairs): the standard error if the pairs were "
                               "independent (too small when prompts are shared)",
                "top": top[cols].to_dict(orient="records"),
                "significant": sig[cols].to_dict(orient="records"),
                "n_significant": int(s["significant"].sum()),
                "min_detectable_effect": mde_d, "conclusion": conclusion}


def _error_bars(s: pd.DataFrame, error: str) -> dict:
    if error == "sem":
        return {"type": "data", "array": s["sem"].tolist(), "visible": True}
    if error == "ci":
        return {"type": "data", "symmetric": False, "visible": True,
                "array": (s["ci_high"] - s["mean"]).tolist(),
                "arrayminus": (s["mean"] - s["ci_low"]).tolist()}
    raise ConfigError(f"error must be 'ci' or 'sem', got {error!r}")


@dataclass(frozen=True)
class SweepResult(PatchResult):
    """Layer x component patching (:func:`em_interp.patching.sweep.patch_sweep`)."""

    kind = "patching"

    def traces(self, error: str = "ci", showlegend: bool = True) -> list:
        """Plotly traces: mean effect per layer, one line per component, with error bars."""
        import plotly.graph_objects as go

        s = self.summary()
        out = []
        for comp in dict.fromkeys(s["component"]):
            c = s[s["component"] == comp]
            out.append(go.Scatter(x=c["layer"], y=c["mean"], mode="lines+markers", name=comp,
                                  legendgroup=comp, showlegend=showlegend,
                                  line={"color": _COLORS.get(comp)},
                                  error_y=_error_bars(c, error)))
        return out

    def figure(self, error: str = "ci", title: str | None = None):
        """Mean ``Delta S`` per layer and component with error bars (one panel of Fig. 4)."""
        import plotly.graph_objects as go

        fig = go.Figure(self.traces(error))
        fig.add_hline(y=0, line={"color": "gray", "width": 1})
        fig.update_layout(title=title or f"Activation patching, {self.pairs_name} "
                          f"({self.n_pairs} pairs)", xaxis_title="layer (0-indexed)",
                          yaxis_title=f"mean ΔS ± {_err_name(error)}", template="plotly_white")
        return fig

    def heatmap(self, title: str | None = None):
        """Mean ``Delta S`` as a layer x component heatmap (Fig. 10), centred on zero."""
        import plotly.graph_objects as go

        s = self._means()
        grid = s.pivot(index="component", columns="layer", values="mean")
        fig = go.Figure(go.Heatmap(z=grid.values, x=grid.columns.tolist(),
                                   y=grid.index.tolist(), colorscale="RdBu_r", zmid=0,
                                   colorbar={"title": "mean ΔS"}))
        fig.update_layout(title=title or f"Patching heatmap, {self.pairs_name}",
                          xaxis_title="layer (0-indexed)", yaxis_title="component",
                          template="plotly_white")
        return fig


def _err_name(error: str) -> str:
    return "95% CI (prompt bootstrap)" if error == "ci" else "SEM (pairs as independent)"


def plot_forward_reverse(forward: SweepResult, reverse: SweepResult, error: str = "ci",
                         title: str | None = None):
    """Fig. 4: the forward patch (top) and the reverse control (bottom), with error bars.

    Args:
        forward: The sweep of source -> destination pairs (e.g. risky -> benign).
        reverse: The sweep of the reversed pairs (benign -> risky, relative to the risky run).
        error: ``"ci"`` (the 95% cluster-bootstrap interval over source and destination
            prompts, the default) or ``"sem"`` (``sd / sqrt(K)``, pairs as independent).
        title: Figure title.

    Returns:
        A plotly figure with two stacked panels sharing the layer axis.
    """
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=(f"forward: {forward.pairs_name}",
                                        f"reverse: {reverse.pairs_name}"))
    for row, res in ((1, forward), (2, reverse)):
        for tr in res.traces(error, showlegend=row == 1):
            fig.add_trace(tr, row=row, col=1)
        fig.add_hline(y=0, line={"color": "gray", "width": 1}, row=row, col=1)
        fig.update_yaxes(title_text=f"mean ΔS ± {_err_name(error)}", row=row, col=1)
    fig.update_xaxes(title_text="layer (0-indexed)", row=2, col=1)
    fig.update_layout(title=title or "Causal tracing: forward and reverse patching",
                      template="plotly_white", height=650)
    return fig


@dataclass(frozen=True)
class HeadPatchingResult(PatchResult):
    """Per-head patching of ``attn.hook_z`` (:func:`em_interp.patching.fine.patch_heads`)."""

    kind = "patching_heads"
    _site_columns = ("layer", "head")

    def grid(self) -> pd.DataFrame:
        """Mean effect as a layer x head table."""
        return self._means().pivot(index="layer", columns="head", values="mean")

    def figure(self, error: str = "ci", title: str | None = None):
        """Heatmap of mean effect per layer and head; bars with error bars for one layer."""
        import plotly.graph_objects as go

        s = self.summary()
        if s["layer"].nunique() == 1:
            layer = int(s["layer"].iloc[0])
            fig = go.Figure(go.Bar(x=[f"L{layer}H{h}" for h in s["head"]], y=s["mean"],
                                   marker_color=np.where(s["mean"] >= 0, "#d62728", "#1f77b4"),
                                   error_y=_error_bars(s, error)))
            fig.update_layout(xaxis_title="head", yaxis_title=f"mean ΔS ± {_err_name(error)}")
        else:
            g = self.grid()
            fig = go.Figure(go.Heatmap(z=g.values, x=g.columns.tolist(), y=g.index.tolist(),
                                       colorscale="RdBu_r", zmid=0,
                                       colorbar={"title": "mean ΔS"}))
            fig.update_layout(xaxis_title="head", yaxis_title="layer (0-indexed)")
        fig.update_layout(title=title or f"Head patching, {self.pairs_name} ({self.n_pairs} "
                          "pairs)", template="plotly_white")
        return fig


@dataclass(frozen=True)
class NeuronSelection(Result):
    """Neurons of one layer's ``mlp.hook_post`` chosen by their mean activation difference.

    ``mean_diff[n] = mean_source(act_n) - mean_dest(act_n)`` at each prompt's last token;
    ``selected`` are the neurons with ``|mean_diff| > mean(|mean_diff|)`` (Experiment 4) or the
    ``top_n`` largest ``|mean_diff|``, sorted by ``|mean_diff|`` (largest first).
    """

    kind = "neuron_selection"

    layer: int
    mean_diff: Float[torch.Tensor, " d_mlp"]
    selected: torch.Tensor
    rule: str = "above_mean"
    threshold: float = 0.0
    n_source: int = 0
    n_dest: int = 0
    fit_sources: tuple[int, ...] = ()
    """Indices (in the fitting pairs' source set) of the source prompts the means were taken
    over, when :func:`~em_interp.patching.fine.patch_neurons` selected on ``select_pairs``;
    ``()`` otherwise."""
    fit_dests: tuple[int, ...] = ()
    """Indices of the destination prompts the means were taken over (as ``fit_sources``)."""
    fit_keys: tuple[str, ...] = ()
    """Content keys (:func:`~em_interp.patching.pairs.prompt_keys`) of those prompts."""

    @property
    def df(self) -> pd.DataFrame:
        """One row per neuron: ``neuron``, ``mean_diff``, ``abs_diff``, ``selected``."""
        d = self.mean_diff.double().numpy()
        sel = np.zeros(len(d), dtype=bool)
        sel[self.selected.numpy()] = True
        return pd.DataFrame({"layer": self.layer, "neuron": np.arange(len(d)), "mean_diff": d,
                             "abs_diff": np.abs(d), "selected": sel})

    def to_dict(self) -> dict:
        return {"layer": self.layer, "rule": self.rule, "threshold": self.threshold,
                "n_selected": int(self.selected.numel()), "d_mlp": int(self.mean_diff.numel()),
                "top": self.selected[:10].tolist(), "n_source": self.n_source,
                "n_dest": self.n_dest, "fit_sources": list(self.fit_sources),
                "fit_dests": list(self.fit_dests)}

    def figure(self, title: str | None = None):
        """Figs. 6-7: mean activation difference per neuron, selected neurons in red."""
        import plotly.graph_objects as go

        df = self.df
        fig = go.Figure()
        for sel, color, name in ((False, "#7f7f7f", "other"), (True, "#d62728", self.rule)):
            part = df[df["selected"] == sel]
            fig.add_trace(go.Scattergl(x=part["neuron"], y=part["mean_diff"], mode="markers",
                                       marker={"color": color, "size": 4}, name=name))
        for y in (self.threshold, -self.threshold):
            fig.add_hline(y=y, line={"color": "gray", "dash": "dot", "width": 1})
        fig.update_layout(title=title or f"Mean MLP activation difference (source - dest), "
                          f"layer {self.layer}", xaxis_title="neuron (mlp.hook_post)",
                          yaxis_title="mean activation difference", template="plotly_white")
        return fig


@dataclass(frozen=True)
class NeuronPatchingResult(PatchResult):
    """Patching the selected neurons of one layer together (first site), and each alone."""

    kind = "patching_neurons"
    _site_columns = ("layer", "neuron", "n_neurons")
    selection: NeuronSelection | None = None

    def figure(self, error: str = "ci", top: int = 40, title: str | None = None):
        """The set's effect and the ``top`` single-neuron effects (by |mean|), as bars."""
        import plotly.graph_objects as go

        s = self.summary()
        single = s[s["n_neurons"] == 1]
        single = single.loc[single["mean"].abs().sort_values(ascending=False).index[:top]]
        rows = pd.concat([s[s["n_neurons"] != 1], single])
        names = [f"N{n}" if k == 1 else f"{k} neurons" for n, k in
                 zip(rows["neuron"], rows["n_neurons"], strict=True)]
        fig = go.Figure(go.Bar(x=names, y=rows["mean"], error_y=_error_bars(rows, error),
                               marker_color=np.where(rows["mean"] >= 0, "#d62728", "#1f77b4")))
        layer = int(s["layer"].iloc[0])
        fig.update_layout(title=title or f"Neuron patching, layer {layer} ({self.n_pairs} pairs)",
                          xaxis_title="patched neurons", yaxis_title=f"mean ΔS ± "
                          f"{_err_name(error)}", template="plotly_white")
        return fig


def plot_layer_effects(heads: HeadPatchingResult, layer: int, *,
                       neurons: NeuronPatchingResult | None = None,
                       sweep: SweepResult | None = None, error: str = "ci",
                       title: str | None = None):
    """Figs. 8-9: the MLP, its selected neurons and every head of ``layer``, as bars.

    Args:
        heads: Head patching that includes ``layer``.
        layer: The layer to show.
        neurons: Neuron patching at ``layer`` (its first site, the selected set, is shown).
        sweep: A layer sweep with an ``mlp`` component at ``layer`` (shown as "MLP").
        error: ``"ci"`` or ``"sem"``.
        title: Figure title.

    Returns:
        A plotly bar chart.
    """
    import plotly.graph_objects as go

    parts = []
    if sweep is not None:
        s = sweep.summary()
        parts.append(s[(s["layer"] == layer) & (s["component"] == "mlp")].assign(name="MLP"))
    if neurons is not None:
        s = neurons.summary().iloc[:1]
        parts.append(s.assign(name=f"MLP, {int(s['n_neurons'].iloc[0])} selected neurons"))
    h = heads.summary()
    h = h[h["layer"] == layer]
    if h.empty:
        raise ConfigError(f"the head result has no layer {layer}; it has "
                         f"{sorted(heads.sites['layer'].unique().tolist())}.")
    parts.append(h.assign(name=[f"L{layer}H{x}" for x in h["head"]]))
    rows = pd.concat(parts, ignore_index=True)
    fig = go.Figure(go.Bar(x=rows["name"], y=rows["mean"], error_y=_error_bars(rows, error),
                           marker_color=np.where(rows["mean"] >= 0, "#d62728", "#1f77b4")))
    fig.add_hline(y=0, line={"color": "gray", "width": 1})
    fig.update_layout(title=title or f"Layer {layer}: MLP, neurons and heads "
                      f"({heads.n_pairs} pairs)", xaxis_title="component",
                      yaxis_title=f"mean ΔS ± {_err_name(error)}", template="plotly_white")
    return fig
