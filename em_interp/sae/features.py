"""Which SAE latents track a label (refusal, harmfulness, misalignment): Figs. 14-15 of the Qwen
paper, Sec. V.

For each prompt ``i`` the SAE's token-averaged latents ``z_bar(x_i)`` (BLOCK-EM eq. 3; see
:mod:`em_interp.sae.encode`) are compared with a per-prompt label ``y_i`` (1 = refused / harmful
/ misaligned, 0 otherwise, or any number). Per latent ``k``:

* mean activation ``m_k = 1/n sum_i z_bar_k(x_i)`` and the fraction of prompts where it fires;
* Pearson correlation

      rho_k = sum_i (z_bar_ik - m_k)(y_i - y_bar) / sqrt(sum_i (z_bar_ik - m_k)^2 sum_i (y_i - y_bar)^2)

  with its two-sided p-value (t = rho sqrt((n-2)/(1-rho^2)), n-2 degrees of freedom; the same as
  ``scipy.stats.pearsonr``). A latent that never varies has no correlation (NaN, ranked last).

**Is the best latent more than chance?** With ``n`` prompts and thousands of latents, the
largest ``|rho_k|`` is large under pure noise (about 0.4-0.5 at ``n = 64`` and a few thousand
latents, 0.7-0.8 at ``n = 16``),
so neither ``max |rho|`` nor the raw p-values mean anything alone. Two references are computed:

* a **permutation null of max |rho|**: the labels are permuted ``B`` times (200 by default) and,
  for each permutation ``b``, ``M_b = max_k |rho_k(y_b)|`` is recomputed over all latents. With
  the latents and the permuted labels standardised (``X~`` ``[n, d]``, ``Y~`` ``[B, n]``, unit
  norm columns / rows, centred), every correlation is one matrix product ``R = Y~ X~``
  (``[B, d]``, in chunks of permutations). The p-value of the observed maximum counts the
  observed labelling as one permutation, ``p = (1 + #{b : M_b >= max_k |rho_k|}) / (1 + B)``
  (:func:`em_interp.stats.permutation_pvalues`), and the same null gives each latent a
  family-wise (max-T) adjusted p-value ``(1 + #{b : M_b >= |rho_k|}) / (1 + B)``. Reported with
  the null's 95th percentile of ``max |rho|``: the value chance reaches 5% of the time;
* **Benjamini-Hochberg** over the latents' raw p-values (:func:`em_interp.stats.bh_fdr`):
  "``N`` latents significant at FDR 5%".

The paper plots ``m_k`` against ``rho_k`` (Fig. 14: a "safety-context" latent correlates with
refusal, a jailbreak latent #2492 anti-correlates), then looks at what the extreme latents fire
on. :func:`analyze_features` does all of it in one call: the correlations, the top and bottom
latents by ``rho``, and for each of them the prompts with the highest ``z_bar_k`` and the token
where it peaks (with context; BOS/EOS/pad skipped, since a chat template's shared prefix makes
them peak identically in every prompt). Figures: the scatter (``figure("scatter")``) and ranked bars
(``figure("bars")``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from tqdm.auto import tqdm

from em_interp.data import user_text
from em_interp.errors import ConfigError, DataError
from em_interp.inputs import as_prompt_list, n_prompts, tokenizer_of
from em_interp.results import Result
from em_interp.sae.data import special_token_ids
from em_interp.sae.encode import encode_activations, hook_activation_batches
from em_interp.sae.load import check_sae
from em_interp.stats import bh_fdr, permutation_matrix, permutation_pvalues

N_PERMUTATIONS = 200
"""Label permutations of the max-|r| null by default."""


def pearson(latents: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pearson ``r`` of every column of ``latents`` ``[n, d]`` with ``labels`` ``[n]``, and the
    two-sided p-values (NaN where a column or the labels are constant)."""
    from scipy import stats

    x = np.asarray(latents, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    n = x.shape[0]
    xc = x - x.mean(0)
    yc = y - y.mean()
    sxx = (xc * xc).sum(0)
    syy = float(yc @ yc)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (xc.T @ yc) / np.sqrt(sxx * syy)
        r = np.where((sxx > 1e-24 * n) & (syy > 0), np.clip(r, -1.0, 1.0), np.nan)
        t = r * np.sqrt((n - 2) / np.maximum(1.0 - r * r, 1e-300))
        p = 2.0 * stats.t.sf(np.abs(t), df=n - 2) if n > 2 else np.full_like(r, np.nan)
    p = np.where(np.abs(r) >= 1.0, 0.0, p)
    return r, np.where(np.isnan(r), np.nan, p)


def max_abs_r_null(latents: np.ndarray, permuted_labels: np.ndarray, *,
                   chunk: int = 64) -> np.ndarray:
    """``[B]``: for each row of ``permuted_labels`` ``[B, n]``, the largest ``|r|`` over the
    columns of ``latents`` ``[n, d]`` (constant columns left out), as one matrix product of the
    standardised matrices per chunk of ``chunk`` permutations (module docstring)."""
    x = np.asarray(latents, dtype=np.float64)
    n = x.shape[0]
    xc = x - x.mean(0)
    sxx = np.sqrt((xc * xc).sum(0))
    live = sxx > np.sqrt(1e-24 * n)
    xs = xc[:, live] / sxx[live]  # [n, d_live], unit-norm centred columns
    y = np.asarray(permuted_labels, dtype=np.float64).reshape(-1, n)
    out = np.zeros(y.shape[0])
    if not live.any():
        return out
    for i in range(0, y.shape[0], chunk):
        yc = y[i:i + chunk] - y[i:i + chunk].mean(1, keepdims=True)
        yn = np.sqrt((yc * yc).sum(1, keepdims=True))
        ys = np.divide(yc, yn, out=np.zeros_like(yc), where=yn > 0)
        out[i:i + chunk] = np.abs(ys @ xs).max(1)
    return np.minimum(out, 1.0)


@dataclasses.dataclass(frozen=True)
class FeatureCorrelations(Result):
    """Per-latent mean activation and correlation with a per-prompt label (module docstring)."""

    kind = "sae_feature_correlations"
    mean_activation: np.ndarray
    """``[d_sae]`` mean of ``z_bar`` over prompts."""
    frac_active: np.ndarray
    """``[d_sae]`` fraction of prompts with ``z_bar > 0``."""
    pearson_r: np.ndarray
    """``[d_sae]`` Pearson correlation with the label (NaN for constant latents)."""
    p_value: np.ndarray
    """``[d_sae]`` two-sided p-value of ``pearson_r``."""
    mean_by_label: dict
    """``{label: [d_sae] mean z_bar over the prompts with that label}`` (binary labels)."""
    n_prompts: int
    label_name: str = "label"
    hook: str | None = None
    p_bh: np.ndarray | None = None
    """``[d_sae]`` Benjamini-Hochberg adjusted ``p_value`` over the varying latents (NaN for
    constant ones)."""
    fdr_alpha: float = 0.05
    """Level of the false discovery rate for :attr:`n_significant`."""
    null_max_abs_r: np.ndarray | None = None
    """``[B]`` max over latents of ``|r|`` under each of ``B`` label permutations (``None``:
    no null was drawn)."""

    @property
    def max_abs_r(self) -> float | None:
        """The largest ``|r|`` over the latents (``None`` when none varies)."""
        live = ~np.isnan(self.pearson_r)
        return float(np.abs(self.pearson_r[live]).max()) if live.any() else None

    @property
    def n_significant(self) -> int | None:
        """Latents significant at FDR :attr:`fdr_alpha` (Benjamini-Hochberg)."""
        if self.p_bh is None:
            return None
        return int(np.sum(np.nan_to_num(self.p_bh, nan=1.0) <= self.fdr_alpha))

    @property
    def n_permutations(self) -> int:
        return 0 if self.null_max_abs_r is None else int(len(self.null_max_abs_r))

    @property
    def p_max_abs_r(self) -> float | None:
        """Permutation p-value of the observed max ``|r|``, ``(1 + #{M_b >= max|r|}) / (1 +
        B)`` (``None`` without a null)."""
        if self.null_max_abs_r is None or self.max_abs_r is None:
            return None
        return permutation_pvalues([self.max_abs_r], self.null_max_abs_r[:, None]).p_max

    def null_quantile(self, q: float = 0.95) -> float | None:
        """The ``q`` quantile of max ``|r|`` under the permutation null."""
        if self.null_max_abs_r is None or not len(self.null_max_abs_r):
            return None
        return float(np.quantile(self.null_max_abs_r, q))

    @property
    def p_fwer(self) -> np.ndarray | None:
        """``[d_sae]`` family-wise (max-T) adjusted permutation p-value of each latent,
        ``(1 + #{M_b >= |r_k|}) / (1 + B)`` (NaN for constant latents)."""
        if self.null_max_abs_r is None:
            return None
        null = np.sort(np.asarray(self.null_max_abs_r, dtype=np.float64))
        a = np.abs(self.pearson_r)
        tol = 1e-12 * np.maximum(1.0, np.nan_to_num(a))  # ties count against the latent
        at_least = len(null) - np.searchsorted(null, np.nan_to_num(a) - tol, side="left")
        return np.where(np.isnan(a), np.nan, (1 + at_least) / (1 + len(null)))

    @property
    def df(self) -> pd.DataFrame:
        """One row per latent, by ``pearson_r`` descending (NaN last): ``latent``,
        ``mean_activation``, ``frac_active``, ``pearson_r``, ``p_value``, ``p_bh``, ``p_fwer``
        (when computed), ``mean_<label>``..."""
        cols = {"latent": np.arange(len(self.pearson_r)),
                "mean_activation": self.mean_activation, "frac_active": self.frac_active,
                "pearson_r": self.pearson_r, "p_value": self.p_value}
        if self.p_bh is not None:
            cols["p_bh"] = self.p_bh
        fwer = self.p_fwer
        if fwer is not None:
            cols["p_fwer"] = fwer
        for k, v in self.mean_by_label.items():
            cols[f"mean_{self.label_name}_{k}"] = np.asarray(v)
        return pd.DataFrame(cols).sort_values("pearson_r", ascending=False,
                                              na_position="last", kind="stable",
                                              ignore_index=True)

    def top(self, n: int = 10) -> pd.DataFrame:
        """The ``n`` latents most positively correlated with the label."""
        return self.df.dropna(subset=["pearson_r"]).head(n).reset_index(drop=True)

    def bottom(self, n: int = 10) -> pd.DataFrame:
        """The ``n`` latents most negatively correlated with the label (most negative first)."""
        d = self.df.dropna(subset=["pearson_r"])
        return d.tail(n).iloc[::-1].reset_index(drop=True)

    def to_dict(self) -> dict:
        live = ~np.isnan(self.pearson_r)
        top, bottom = self.top(5), self.bottom(5)

        def rows(d):
            return [{"latent": int(r.latent), "pearson_r": float(r.pearson_r),
                     "p_bh": float(r.p_bh) if "p_bh" in d else None}
                    for r in d.itertuples(index=False)]

        return {"hook": self.hook, "label": self.label_name, "n_prompts": self.n_prompts,
                "d_sae": int(len(self.pearson_r)), "n_varying_latents": int(live.sum()),
                "top": rows(top), "bottom": rows(bottom), "max_abs_r": self.max_abs_r,
                "p_max_abs_r": self.p_max_abs_r, "n_permutations": self.n_permutations,
                "null_max_abs_r_q95": self.null_quantile(0.95),
                "n_significant_fdr": self.n_significant, "fdr_alpha": self.fdr_alpha}

    def table(self, n: int = 5) -> pd.DataFrame:
        """The ``n`` most positive and ``n`` most negative latents as a paper's table:
        ``side``, ``latent``, ``r``, ``p`` (raw), ``p_BH``, ``p_FWER`` (permutation max-T),
        ``mean activation``, ``fraction active``."""
        parts = [self.top(n).assign(side="positive"), self.bottom(n).assign(side="negative")]
        d = pd.concat(parts, ignore_index=True).drop_duplicates("latent")
        out = pd.DataFrame({"side": d["side"], "latent": d["latent"].astype(int),
                            "r": d["pearson_r"].round(3), "p": d["p_value"].map(_fmt_p)})
        if "p_bh" in d:
            out["p_BH"] = d["p_bh"].map(_fmt_p)
        if "p_fwer" in d:
            out["p_FWER (permutation)"] = d["p_fwer"].map(_fmt_p)
        out["mean activation"] = d["mean_activation"].map(lambda v: float(f"{v:.3g}"))
        out["fraction active"] = d["frac_active"].round(2)
        return out.reset_index(drop=True)

    def figure(self, kind: str = "scatter", *, n: int = 15, highlight: Sequence[int] = (),
               title: str | None = None):
        """``"scatter"``: mean activation vs Pearson r per latent (Fig. 14), the top/bottom ``n``
        coloured; ``"bars"``: the top and bottom ``n`` latents' r, ranked."""
        import plotly.graph_objects as go

        d = self.df.dropna(subset=["pearson_r"])
        top, bottom = set(self.top(n)["latent"]), set(self.bottom(n)["latent"])
        if kind == "scatter":
            fig = go.Figure()
            groups = [("other", ~d["latent"].isin(top | bottom | set(highlight)), "lightgray"),
                      (f"top {n} (r > 0)", d["latent"].isin(top), "#2ca02c"),
                      (f"bottom {n} (r < 0)", d["latent"].isin(bottom), "#ff7f0e"),
                      ("highlighted", d["latent"].isin(set(highlight)), "#d62728")]
            for name, sel, color in groups:
                part = d[sel]
                if len(part):
                    fig.add_trace(go.Scatter(
                        x=part["pearson_r"], y=part["mean_activation"], mode="markers",
                        name=name, marker={"color": color, "size": 6},
                        text=[f"latent {k}" for k in part["latent"]],
                        hovertemplate="%{text}<br>r=%{x:.3f}<br>mean=%{y:.3g}<extra></extra>"))
            fig.update_layout(xaxis_title=f"Pearson r with {self.label_name}",
                              yaxis_title="mean activation (z-bar)")
        elif kind == "bars":
            part = pd.concat([self.top(n), self.bottom(n).iloc[::-1]]).drop_duplicates("latent")
            fig = go.Figure(go.Bar(
                x=[f"#{k}" for k in part["latent"]], y=part["pearson_r"],
                marker_color=["#2ca02c" if r > 0 else "#ff7f0e" for r in part["pearson_r"]]))
            fig.update_layout(xaxis_title="latent", yaxis_title=f"Pearson r with "
                                                                f"{self.label_name}")
            q95 = self.null_quantile(0.95)
            if q95 is not None:
                for y in (q95, -q95):
                    fig.add_hline(y=y, line_dash="dash", line_color="gray")
                fig.add_annotation(x=1, xref="paper", y=q95, showarrow=False, yshift=10,
                                   xanchor="right", text=f"±{q95:.2f}: max |r| reached by 5% "
                                   f"of {self.n_permutations} label permutations")
        else:
            raise ValueError(f"kind must be 'scatter' or 'bars', got {kind!r}")
        fig.update_layout(template="plotly_white", title=title or (
            f"SAE latents vs {self.label_name}" + (f" at {self.hook}" if self.hook else "")
            + f" ({self.n_prompts} prompts)"))
        return fig


def _fmt_p(p) -> str:
    """A p-value for a table: 3 significant digits, ``<1e-300`` style below float range."""
    if p is None or not np.isfinite(p):
        return ""
    return f"{p:.2g}" if p >= 1e-300 else "<1e-300"


def feature_correlations(latents: Float[torch.Tensor, "n d_sae"], labels: Sequence[float], *,
                         label_name: str = "label", hook: str | None = None,
                         n_permutations: int = N_PERMUTATIONS, seed: int = 0,
                         fdr_alpha: float = 0.05, groups: Sequence | None = None
                         ) -> FeatureCorrelations:
    """Mean activation and Pearson correlation with ``labels`` of every latent, with the
    permutation null of max ``|r|`` and Benjamini-Hochberg over latents (module docstring).

    Args:
        latents: per-prompt latents ``[n_prompts, d_sae]`` (e.g. :func:`~em_interp.sae.encode`
            with ``reduce="mean"``).
        labels: one number per prompt (1 = refused, 0 = complied, or any score).
        label_name: what the label is, for tables and figures.
        hook: the SAE's hook, recorded.
        n_permutations: label permutations of the max-|r| null (0: no null).
        seed: seeds the permutations.
        fdr_alpha: false discovery rate for :attr:`FeatureCorrelations.n_significant`.
        groups: a group id per prompt: the permutations keep each group's label composition
            (:func:`em_interp.stats.permutation_matrix`, scheme ``"both"``); ``None``: free
            permutations (prompts exchangeable).

    Returns:
        :class:`FeatureCorrelations`.
    """
    x = (latents.detach().float().cpu().numpy() if torch.is_tensor(latents)
         else np.asarray(latents, dtype=np.float64))
    y = np.asarray(labels, dtype=np.float64)
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise DataError(f"latents must be [n_prompts, d_sae] with one label per prompt; got "
                        f"{x.shape} latents and {y.shape} labels.")
    if x.shape[0] < 3:
        raise DataError("correlations need at least 3 prompts.")
    if np.unique(y).size < 2:
        raise DataError(f"every prompt has the same {label_name} ({y[0]}); correlations need "
                        "both classes (e.g. harmful and harmless prompts).")
    if n_permutations < 0:
        raise ConfigError(f"n_permutations must be >= 0 (0: no null), got {n_permutations}.")
    r, p = pearson(x, y)
    values = np.unique(y)
    by = {str(int(v) if float(v).is_integer() else v): x[y == v].mean(0)
          for v in values} if values.size <= 10 else {}
    null = None
    if n_permutations:
        perms = permutation_matrix(y, n_permutations, seed=seed, groups=groups)
        null = max_abs_r_null(x, perms)
    return FeatureCorrelations(mean_activation=x.mean(0), frac_active=(x > 0).mean(0),
                               pearson_r=r, p_value=p, mean_by_label=by,
                               n_prompts=int(x.shape[0]), label_name=label_name, hook=hook,
                               p_bh=bh_fdr(p, alpha=fdr_alpha).adjusted, fdr_alpha=fdr_alpha,
                               null_max_abs_r=null)


# ------------------------------------------------------------------ full analysis


@dataclasses.dataclass(frozen=True)
class FeatureAnalysis(Result):
    """Correlations of every latent with a label, plus what the extreme latents fire on."""

    kind = "sae_feature_analysis"
    correlations: FeatureCorrelations
    examples: pd.DataFrame
    """Per kept latent (``latent_rank``: the top latents by r, then the bottom ones): the
    ``n_examples`` prompts with the highest z-bar (``rank``) and the token where the latent
    peaks in each (``position`` among the prompt's real tokens, ``token``, ``max_activation``,
    ``context`` with the token in ``[[...]]``; BOS/EOS/pad are skipped unless nothing else
    fires). Columns also ``side`` (top/bottom), ``prompt_index``, ``prompt``, ``label``,
    ``z_bar``."""
    latents: torch.Tensor
    """``[n_prompts, d_sae]`` z-bar of every prompt (what the correlations were computed on)."""
    hook: str

    @property
    def df(self) -> pd.DataFrame:
        """The per-latent table of :attr:`correlations` (``pearson_r`` descending)."""
        return self.correlations.df

    def top_tokens(self, latent: int) -> pd.DataFrame:
        """The examples of one latent (top prompts, peak token and context)."""
        return self.examples[self.examples["latent"] == latent].reset_index(drop=True)

    def to_dict(self) -> dict:
        out = self.correlations.to_dict()
        for side in ("top", "bottom"):
            for item in out[side]:
                ex = self.top_tokens(item["latent"])
                item["peak_tokens"] = ex["token"].head(3).tolist()
        return out

    def figure(self, kind: str = "scatter", **kwargs):
        """``"scatter"`` or ``"bars"`` (see :meth:`FeatureCorrelations.figure`)."""
        return self.correlations.figure(kind, **kwargs)


@torch.no_grad()
def analyze_features(model, sae, prompts, labels: Sequence[float] | None = None, *,
                     label_name: str | None = None, top_k: int = 10, n_examples: int = 5,
                     context: int = 6, hook_name: str | None = None, batch_size: int = 8,
                     chat: bool = True, system: str | None = None,
                     n_permutations: int = N_PERMUTATIONS, seed: int = 0,
                     fdr_alpha: float = 0.05, progress: bool = True) -> FeatureAnalysis:
    """Correlate every latent with ``labels`` and show what the extreme latents fire on.

    Args:
        model: a ``Loaded`` or ``HookedTransformer``.
        sae: an SAE-Lens SAE (checked against the model).
        prompts: text prompts or a ``PromptSet``.
        labels: one number per prompt; ``None`` takes a labelled ``PromptSet``'s labels.
        label_name: name of the label (default: the prompt set's name for label 1, else
            ``"label"``).
        top_k: latents kept on each side (most positive and most negative r).
        n_examples: top-activating prompts per kept latent.
        context: tokens of context on each side of a latent's peak token.
        hook_name: the hook, if not the SAE's own.
        batch_size: prompts per forward.
        chat: apply the chat template to text prompts.
        system: a system message for text prompts.
        n_permutations: label permutations of the max-|r| null (0: none).
        seed: seeds the permutations.
        fdr_alpha: false discovery rate of the Benjamini-Hochberg count.
        progress: show a progress bar.

    Returns:
        :class:`FeatureAnalysis`.
    """
    hook = check_sae(model, sae, hook_name)
    if labels is None:
        labels = getattr(prompts, "labels", None)
        if labels is None:
            raise DataError("no labels: pass labels= (one per prompt) or a labelled PromptSet.")
        names = getattr(prompts, "label_names", {}) or {}
        label_name = label_name or names.get(1) or "label"
    label_name = label_name or "label"
    n = n_prompts(prompts)
    if len(labels) != n:
        raise DataError(f"{len(labels)} labels for {n} prompts.")
    zbar = torch.empty((n, sae.cfg.d_sae), dtype=torch.float32)
    bar = tqdm(total=n, desc="SAE features", disable=not progress, leave=False)
    for start, _, mask, acts in hook_activation_batches(model, hook, prompts,
                                                        batch_size=batch_size, chat=chat,
                                                        system=system):
        z = encode_activations(sae, acts, mask, "mean").float()
        zbar[start:start + z.shape[0]] = z.cpu()
        bar.update(z.shape[0])
    bar.close()
    corr = feature_correlations(zbar, labels, label_name=label_name, hook=hook,
                                n_permutations=n_permutations, seed=seed, fdr_alpha=fdr_alpha)
    chosen = [("top", int(k)) for k in corr.top(top_k)["latent"]] + [
        ("bottom", int(k)) for k in corr.bottom(top_k)["latent"]]
    examples = _examples(model, sae, hook, prompts, labels, zbar, chosen,
                         n_examples=n_examples, context=context, chat=chat, system=system)
    return FeatureAnalysis(correlations=corr, examples=examples, latents=zbar, hook=hook)


def _examples(model, sae, hook, prompts, labels, zbar, chosen, *, n_examples, context,
              chat, system) -> pd.DataFrame:
    """Per chosen latent: the prompts with the highest z-bar and the token where the latent
    peaks in each (special tokens such as BOS are skipped unless nothing else fires)."""
    cols = ["latent", "side", "latent_rank", "rank", "prompt_index", "prompt", "label",
            "z_bar", "max_activation", "position", "token", "context"]
    want: dict[int, list[tuple[str, int, int, int]]] = {}
    for j, (side, k) in enumerate(chosen):
        order = torch.argsort(zbar[:, k], descending=True, stable=True)[:n_examples]
        for rank, i in enumerate(order.tolist()):
            if zbar[i, k] > 0:
                want.setdefault(i, []).append((side, k, j, rank))
    if not want:
        return pd.DataFrame(columns=cols)
    items = None if torch.is_tensor(prompts) else as_prompt_list(prompts)
    idx = sorted(want)
    tok = tokenizer_of(model)
    special = torch.tensor(sorted(special_token_ids(model)), dtype=torch.long)
    sub = [items[i] for i in idx] if items is not None else prompts[idx]
    lat = torch.tensor(sorted({k for _, k in chosen}), dtype=torch.long)
    col = {int(k): j for j, k in enumerate(lat.tolist())}
    rows = []
    for start, toks, mask, acts in hook_activation_batches(model, hook, sub, batch_size=8,
                                                           chat=chat, system=system):
        z = sae.encode(acts.to(sae.W_enc.device))[..., lat.to(sae.W_enc.device)].float().cpu()
        real = mask.cpu().bool()
        plain = real & ~torch.isin(toks.cpu(), special)
        for b in range(z.shape[0]):
            i = idx[start + b]
            ids = toks[b][real[b]].tolist()
            first = int(real.shape[1] - len(ids))
            for side, k, j, rank in want[i]:
                zk = z[b, :, col[k]]
                allowed = plain[b] if (zk.masked_fill(~plain[b], 0) > 0).any() else real[b]
                pos = int(zk.masked_fill(~allowed, float("-inf")).argmax())
                p = pos - first
                piece = tok.decode([ids[p]])
                rows.append({"latent": k, "side": side, "latent_rank": j, "rank": rank,
                             "prompt_index": i,
                             "prompt": user_text(items[i]) if items is not None else "",
                             "label": float(labels[i]), "z_bar": float(zbar[i, k]),
                             "max_activation": float(zk[pos]), "position": p, "token": piece,
                             "context": f"{tok.decode(ids[max(0, p - context):p])}[[{piece}]]"
                                        f"{tok.decode(ids[p + 1:p + 1 + context])}"})
    out = pd.DataFrame(rows, columns=cols)
    return out.sort_values(["latent_rank", "rank"], ignore_index=True)

