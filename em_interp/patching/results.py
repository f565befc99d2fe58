"""Results and figures of activation patching (:mod:`em_interp.patching.sweep`,
:mod:`em_interp.patching.fine`).

Every patching result holds the per-pair effects ``deltas[site, pair] = S_patched - S_clean``,
the clean and source scores, and a table of the patched sites (layer, component, head,
neurons). Per site it reports the mean effect, its standard error
``SEM = sd(Delta S) / sqrt(K)`` and a percentile bootstrap confidence interval of the mean
(pairs resampled with replacement; all sites share the same resamples).

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

from em_interp.results import Result

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
    """Means of ``n_boot`` resamples (pairs drawn with replacement) of every row of ``values``.

    One multinomial count matrix ``[n_boot, K]`` is drawn and multiplied with the values, so
    every site sees the same resamples and memory is ``n_boot x K`` whatever the number of sites.
    """
    k = values.shape[1]
    rng = np.random.default_rng(seed)
    counts = torch.from_numpy(rng.multinomial(k, np.full(k, 1.0 / k), size=n_boot)).double()
    return (counts @ values.double().T / k).float()


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

    _site_columns = ("layer", "component")

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

    def summary(self, confidence: float = 0.95, n_boot: int = 1000,
                seed: int = 0) -> pd.DataFrame:
        """Per site: ``mean``, ``sem``, bootstrap ``ci_low`` / ``ci_high`` of the mean, ``n``."""
        d = self.deltas.double()
        k = d.shape[1]
        out = self.sites[list(self._site_columns) + ["label"]].copy()
        out["mean"] = d.mean(1).numpy()
        out["sem"] = (d.std(1, unbiased=True) / k ** 0.5).numpy() if k > 1 else np.nan
        boots = bootstrap_means(self.deltas, n_boot, seed).double()
        a = (1 - confidence) / 2
        out["ci_low"] = torch.quantile(boots, a, dim=0).numpy()
        out["ci_high"] = torch.quantile(boots, 1 - a, dim=0).numpy()
        out["n"] = k
        return out

    def top(self, n: int = 10, by: str = "abs") -> pd.DataFrame:
        """The ``n`` sites with the largest mean effect (``by="abs"``, ``"pos"`` or ``"neg"``)."""
        s = self.summary()
        key = {"abs": s["mean"].abs(), "pos": s["mean"], "neg": -s["mean"]}[by]
        return s.loc[key.sort_values(ascending=False).index[:n]].reset_index(drop=True)

    def to_dict(self) -> dict:
        """Pair count, metric, mean scores and the ten largest mean effects."""
        top = self.top(10)
        return {"n_pairs": self.n_pairs, "n_sites": int(self.deltas.shape[0]),
                "metric": self.metric, "position": self.position, "pairs": self.pairs_name,
                "mean_s_clean": float(self.s_clean.mean()),
                "mean_s_source": float(self.s_source.mean()),
                "top": top.drop(columns=["n"]).to_dict(orient="records")}


def _error_bars(s: pd.DataFrame, error: str) -> dict:
    if error == "sem":
        return {"type": "data", "array": s["sem"].tolist(), "visible": True}
    if error == "ci":
        return {"type": "data", "symmetric": False, "visible": True,
                "array": (s["ci_high"] - s["mean"]).tolist(),
                "arrayminus": (s["mean"] - s["ci_low"]).tolist()}
    raise ValueError(f"error must be 'ci' or 'sem', got {error!r}")


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

        s = self.summary(n_boot=1)
        grid = s.pivot(index="component", columns="layer", values="mean")
        fig = go.Figure(go.Heatmap(z=grid.values, x=grid.columns.tolist(),
                                   y=grid.index.tolist(), colorscale="RdBu_r", zmid=0,
                                   colorbar={"title": "mean ΔS"}))
        fig.update_layout(title=title or f"Patching heatmap, {self.pairs_name}",
                          xaxis_title="layer (0-indexed)", yaxis_title="component",
                          template="plotly_white")
        return fig


def _err_name(error: str) -> str:
    return "95% bootstrap CI" if error == "ci" else "SEM"


def plot_forward_reverse(forward: SweepResult, reverse: SweepResult, error: str = "ci",
                         title: str | None = None):
    """Fig. 4: the forward patch (top) and the reverse control (bottom), with error bars.

    Args:
        forward: The sweep of source -> destination pairs (e.g. risky -> benign).
        reverse: The sweep of the reversed pairs (benign -> risky, relative to the risky run).
        error: ``"ci"`` (bootstrap 95% CI) or ``"sem"``.
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
        return self.summary(n_boot=1).pivot(index="layer", columns="head", values="mean")

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
                "n_dest": self.n_dest}

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
        raise ValueError(f"the head result has no layer {layer}; it has "
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
