"""Direct logit attribution (DLA): how much each component writes the logit difference directly.

The residual stream at the read position ``p`` (each prompt's last real token by default) is a
sum of what every component wrote into it:

    x = embed + pos_embed + sum_l ( sum_h z_{l,h} W_O[l,h] + b_O[l] + (mlp_l - b_out[l]) + b_out[l] )

and the final logits are ``ln_final(x) @ W_U + b_U``. With the final norm's scale ``s`` frozen
from the clean run (what TransformerLens's ``ActivationCache.logit_attrs`` does) the logit
difference of tokens ``a`` and ``b`` is linear in the terms:

    logit_a - logit_b = sum_terms (P term) . v / s  +  c
    v = w_ln * (W_U[:, a] - W_U[:, b])           (the final norm's gain, *not* folded into W_U
                                                  by em-interp's default loading)
    c = (b_U[a] - b_U[b]) + b_ln . (W_U[:, a] - W_U[:, b])

``P`` centres a vector (subtracts its mean) for LayerNorm models (``normalization_type`` ``LN`` or
``LNPre``) and is the identity for RMSNorm (Llama, Qwen). On a ``fold_ln=True`` model the gain is
already inside ``W_U`` and the norm has no weights; the same formula applies with ``w_ln = 1``.
Every term is reported, so the terms **sum exactly** (to float rounding) to the model's logit
difference: ``DLAResult.total == DLAResult.logit_diff``.

Per-head values come from ``attn.hook_z`` ``[batch, pos, head, d_head]`` at the read position and
``W_O``: ``DLA(l, h) = z_{l,h} . (W_O[l,h] v) / s``. ``use_attn_result`` (which materialises
``[batch, pos, head, d_model]`` at every layer and roughly doubles TL's forward time on CPU) is
never turned on, and the forward skips the unembedding (``return_type=None``), so DLA over a
prompt set costs about one plain forward.

The Qwen paper (Sec. V, Fig. 13) defines ``DLA(h) = (W_U["Sorry"] - W_U["Sure"])^T O_h`` over all
2,560 heads of Qwen2.5-32B, plots the per-layer values with the layer mean, and singles out
L62H12 (-4.85) and L62H28 (-2.95) by their z-scores within layer 62. :class:`DLAResult` gives
the same per-layer picture, z-scores within each layer and across the model, a ranked table and
a layer x head heatmap, averaged over a prompt set. ``ln_scale="none"`` gives the paper's
formula literally (no division by the final norm's scale); its terms then do not add up to the
logit difference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float

from em_interp.errors import ConfigError, HookNameError
from em_interp.hooks import attn_z, mlp_out, resid_post
from em_interp.inputs import batch_list, describe_model, unwrap
from em_interp.readouts.logit_lens import (
    decode,
    optional_tokenizer,
    read_at_positions,
    token_ids,
)
from em_interp.results import Result

LnScale = Literal["frozen", "none"]
_CENTERED = ("LN", "LNPre")


@dataclass(frozen=True)
class DLAResult(Result):
    """Direct logit attribution of every component, per prompt (see the module docstring)."""

    kind = "dla"

    heads: Float[torch.Tensor, "batch layer head_index"]
    """``z_{l,h} . (W_O[l,h] v) / s`` per prompt."""
    mlp: Float[torch.Tensor, "batch layer"]
    """The MLP output without its bias, ``(mlp_out - b_out) . v / s``."""
    attn_bias: Float[torch.Tensor, "batch layer"]
    """``b_O . v / s``."""
    mlp_bias: Float[torch.Tensor, "batch layer"]
    """``b_out . v / s``."""
    embed: Float[torch.Tensor, " batch"]
    """Token embedding ``. v / s``."""
    pos_embed: Float[torch.Tensor, " batch"]
    """Positional embedding added to the residual (0 for rotary models)."""
    constant: Float[torch.Tensor, " batch"]
    """``b_U[a] - b_U[b]`` plus the final norm's bias term (0 for Llama/Qwen)."""
    logit_diff: Float[torch.Tensor, " batch"]
    """The model's own ``logit_a - logit_b`` at the read position (before any soft cap)."""
    token_a: int
    token_b: int
    token_a_str: str
    token_b_str: str
    ln_scale: str = "frozen"
    position: int = -1
    model: dict | None = None

    # -------------------------------------------------------------- sums

    @property
    def total(self) -> Float[torch.Tensor, " batch"]:
        """Sum of all terms per prompt; equals :attr:`logit_diff` with ``ln_scale="frozen"``."""
        return (self.heads.sum((1, 2)) + self.mlp.sum(1) + self.attn_bias.sum(1)
                + self.mlp_bias.sum(1) + self.embed + self.pos_embed + self.constant)

    @property
    def n_prompts(self) -> int:
        return self.heads.shape[0]

    @property
    def mean_heads(self) -> Float[torch.Tensor, "layer head_index"]:
        """Per-head attribution averaged over prompts."""
        return self.heads.mean(0)

    @property
    def z_layer(self) -> Float[torch.Tensor, "layer head_index"]:
        """z-score of each head's mean attribution among the heads of its layer (SD ddof=0)."""
        return zscore(self.mean_heads, dim=1)

    @property
    def z_model(self) -> Float[torch.Tensor, "layer head_index"]:
        """z-score of each head's mean attribution among all heads of the model (SD ddof=0)."""
        return zscore(self.mean_heads)

    def components(self) -> pd.DataFrame:
        """Every term averaged over prompts: ``component, kind, layer, head, attribution, sd``."""
        rows = []

        def add(name, kind, layer, head, vals):
            v = vals.double()
            rows.append({"component": name, "kind": kind, "layer": layer, "head": head,
                         "attribution": float(v.mean()),
                         "sd": float(v.std()) if v.numel() > 1 else float("nan")})

        add("embed", "embed", -1, -1, self.embed)
        if bool(self.pos_embed.abs().sum() > 0):
            add("pos_embed", "pos_embed", -1, -1, self.pos_embed)
        n_layers, n_heads = self.heads.shape[1:]
        for layer in range(n_layers):
            for h in range(n_heads):
                add(f"L{layer}H{h}", "head", layer, h, self.heads[:, layer, h])
            add(f"L{layer} b_O", "attn_bias", layer, -1, self.attn_bias[:, layer])
            add(f"L{layer} MLP", "mlp", layer, -1, self.mlp[:, layer])
            add(f"L{layer} b_out", "mlp_bias", layer, -1, self.mlp_bias[:, layer])
        add("unembed/norm bias", "constant", -1, -1, self.constant)
        return pd.DataFrame(rows)

    @property
    def df(self) -> pd.DataFrame:
        """The ranked table: every component by ``|attribution|``, with z-scores for heads."""
        df = self.components()
        zl, zm = self.z_layer, self.z_model
        heads = df["kind"] == "head"
        df["z_layer"] = np.nan
        df["z_model"] = np.nan
        df.loc[heads, "z_layer"] = [float(zl[r.layer, r.head]) for r in df[heads].itertuples()]
        df.loc[heads, "z_model"] = [float(zm[r.layer, r.head]) for r in df[heads].itertuples()]
        df = df.reindex(df["attribution"].abs().sort_values(ascending=False).index)
        df.insert(0, "rank", np.arange(1, len(df) + 1))
        return df.reset_index(drop=True)

    def top_heads(self, k: int = 10, sign: Literal["negative", "positive", "abs"] = "abs"
                  ) -> pd.DataFrame:
        """The ``k`` heads with the most negative, most positive or largest mean attribution."""
        df = self.df[self.df["kind"] == "head"]
        if sign == "negative":
            df = df.sort_values("attribution")
        elif sign == "positive":
            df = df.sort_values("attribution", ascending=False)
        elif sign != "abs":
            raise ConfigError(f"sign must be 'negative', 'positive' or 'abs', got {sign!r}.")
        return df.head(k).reset_index(drop=True)

    def to_dict(self) -> dict:
        """Tokens, mean logit difference and total, the sums by kind, the top heads."""
        top = self.top_heads(5)
        return {
            "token_a": self.token_a_str, "token_b": self.token_b_str,
            "n_prompts": self.n_prompts, "ln_scale": self.ln_scale,
            "mean_logit_diff": float(self.logit_diff.mean()),
            "mean_total": float(self.total.mean()),
            "max_abs_total_error": float((self.total - self.logit_diff).abs().max()),
            "sum_heads": float(self.heads.sum((1, 2)).mean()),
            "sum_mlp": float(self.mlp.sum(1).mean()),
            "sum_biases": float((self.attn_bias.sum(1) + self.mlp_bias.sum(1)
                                 + self.constant).mean()),
            "embed": float((self.embed + self.pos_embed).mean()),
            "top_heads": [{"head": r.component, "attribution": r.attribution,
                           "z_layer": r.z_layer, "z_model": r.z_model}
                          for r in top.itertuples()]}

    # -------------------------------------------------------------- figures

    def figure(self, kind: Literal["heatmap", "layers", "ranked"] = "heatmap", top: int = 20,
               title: str | None = None):
        """``"heatmap"``: layer x head; ``"layers"``: heads per layer with the layer mean and the
        MLP; ``"ranked"``: the ``top`` components by ``|attribution|``.

        Args:
            kind: which figure.
            top: number of bars of the ranked figure.
            title: figure title.
        """
        import plotly.graph_objects as go

        label = f"DLA: {self.token_a_str!r} - {self.token_b_str!r}, mean over {self.n_prompts}"
        m = self.mean_heads
        n_layers, n_heads = m.shape
        if kind == "heatmap":
            zl = self.z_layer
            text = [[f"L{layer}H{h}: {float(m[layer, h]):.3g} (z_layer {float(zl[layer, h]):.2f})"
                     for h in range(n_heads)] for layer in range(n_layers)]
            lim = float(m.abs().max()) or 1.0
            fig = go.Figure(go.Heatmap(z=m.tolist(), x=list(range(n_heads)),
                                       y=list(range(n_layers)), colorscale="RdBu", zmid=0,
                                       zmin=-lim, zmax=lim, text=text,
                                       hovertemplate="%{text}<extra></extra>",
                                       colorbar={"title": "DLA"}))
            fig.update_layout(xaxis_title="head", yaxis_title="layer (0-indexed)")
        elif kind == "layers":
            fig = go.Figure()
            xs = [layer for layer in range(n_layers) for _ in range(n_heads)]
            fig.add_trace(go.Scatter(
                x=xs, y=m.flatten().tolist(), mode="markers", name="heads",
                text=[f"L{layer}H{h}" for layer in range(n_layers) for h in range(n_heads)],
                hovertemplate="%{text}: %{y:.3g}<extra></extra>", marker={"size": 6}))
            fig.add_trace(go.Scatter(x=list(range(n_layers)), y=m.mean(1).tolist(),
                                     mode="lines", name="layer mean (heads)",
                                     line={"dash": "dash"}))
            fig.add_trace(go.Scatter(x=list(range(n_layers)), y=self.mlp.mean(0).tolist(),
                                     mode="lines+markers", name="MLP", opacity=0.6))
            fig.add_hline(y=0, line_color="gray", line_width=1)
            fig.update_layout(xaxis_title="layer (0-indexed)", yaxis_title="DLA")
        elif kind == "ranked":
            df = self.df.head(top).iloc[::-1]
            fig = go.Figure(go.Bar(x=df["attribution"], y=df["component"], orientation="h",
                                   error_x={"type": "data", "array": df["sd"].fillna(0).tolist()},
                                   marker_color=["#d62728" if a < 0 else "#1f77b4"
                                                 for a in df["attribution"]]))
            fig.update_layout(xaxis_title="DLA (mean ± sd over prompts)", yaxis_title="component",
                              height=max(400, 22 * len(df)))
        else:
            raise ConfigError(f"kind must be 'heatmap', 'layers' or 'ranked', got {kind!r}.")
        fig.update_layout(title=title or label, template="plotly_white")
        return fig


def _unembed_direction(tl, a: int, b: int):
    """``(v, c)``: the residual direction and constant of the logit difference (fp32)."""
    w_u = tl.W_U
    du = (w_u[:, a] - w_u[:, b]).float()
    ln = getattr(tl, "ln_final", None)
    w = getattr(ln, "w", None) if ln is not None else None
    bias = getattr(ln, "b", None) if ln is not None else None
    v = du * w.float().to(du.device) if w is not None else du.clone()
    if tl.cfg.normalization_type in _CENTERED:
        v = v - v.mean()
    const = torch.zeros((), device=du.device)
    b_u = getattr(tl, "b_U", None)
    if b_u is not None:
        const = const + (b_u[a] - b_u[b]).float()
    if bias is not None:
        const = const + bias.float().to(du.device) @ du
    return v, const


def _check_supported(tl) -> None:
    cfg = tl.cfg
    if getattr(cfg, "use_normalization_before_and_after", False):
        raise ConfigError("this model normalises attention and MLP outputs (Gemma-2 style), so "
                          "their outputs are not linear in hook_z; direct logit attribution per "
                          "head is not defined for it.")
    if cfg.normalization_type not in (None, "LN", "LNPre", "RMS", "RMSPre"):
        raise ConfigError(f"unsupported final normalization {cfg.normalization_type!r}; DLA "
                          "handles LN, LNPre, RMS and RMSPre.")


@torch.no_grad()
def direct_logit_attribution(model, prompts, token_a: str | int, token_b: str | int, *,
                             attention_mask: torch.Tensor | None = None, position: int = -1,
                             ln_scale: LnScale = "frozen", batch_size: int = 8,
                             first_token: bool = False, chat: bool = True,
                             system: str | None = None, progress: bool = True) -> DLAResult:
    """Direct logit attribution of every head, MLP, embedding and bias to ``logit_a - logit_b``.

    Args:
        model: a ``Loaded`` or a ``HookedTransformer`` (unprocessed or ``fold_ln=True``).
        prompts: anything :func:`em_interp.inputs.token_batches` takes (text, conversations, a
            PromptSet, ChatTokens, a token tensor with ``attention_mask``).
        token_a: the token whose logit counts positive (e.g. ``"Sorry"``), a string that is one
            token, or an id.
        token_b: the token whose logit counts negative (e.g. ``"Sure"``).
        attention_mask: the mask of a token tensor ``prompts``.
        position: which real token of each prompt to read (-1: the last).
        ln_scale: ``"frozen"`` divides every term by the final norm's scale from this run (terms
            sum to the logit difference); ``"none"`` leaves it out (the paper's formula).
        batch_size: prompts per forward.
        first_token: take the first piece of a word that splits (instead of an error).
        chat: apply the chat template to text prompts (once).
        system: system message for text prompts.
        progress: show a progress bar.
    """
    from tqdm import tqdm

    if ln_scale not in ("frozen", "none"):
        raise ConfigError(f"ln_scale must be 'frozen' or 'none', got {ln_scale!r}.")
    tl = unwrap(model)
    _check_supported(tl)
    tok = optional_tokenizer(model)
    a, b = token_ids(tok, [token_a, token_b], first_token=first_token, d_vocab=tl.cfg.d_vocab)
    cfg = tl.cfg
    n_layers = cfg.n_layers
    has_mlp = not cfg.attn_only
    has_ln = getattr(tl, "ln_final", None) is not None and cfg.normalization_type is not None
    v, const = _unembed_direction(tl, a, b)
    dev = v.device
    # W_O[l, h] v per layer: [head, d_head], on the unembedding's device
    wo_v = [torch.einsum("hdm,m->hd", blk.attn.W_O.float(), v.to(blk.attn.W_O.device)).to(dev)
            for blk in tl.blocks]
    b_o = torch.stack([(blk.attn.b_O.float().to(dev) @ v) for blk in tl.blocks])
    b_out = torch.stack([(blk.mlp.b_out.float().to(dev) @ v) if has_mlp and
                         getattr(blk.mlp, "b_out", None) is not None else
                         torch.zeros((), device=dev) for blk in tl.blocks])
    names = ([attn_z(layer) for layer in range(n_layers)]
             + ([mlp_out(layer) for layer in range(n_layers)] if has_mlp else [])
             + ["hook_embed", "blocks.0.hook_resid_pre", resid_post(n_layers - 1)]
             + (["ln_final.hook_scale", "ln_final.hook_normalized"] if has_ln else []))
    for name in names:  # validated before the first forward
        if name not in tl.hook_dict:
            raise HookNameError(f"the model has no hook {name!r}, which direct logit "
                                "attribution reads; is it a TransformerLens HookedTransformer?")
    w_ln = getattr(tl.ln_final, "w", None) if has_ln else None
    b_ln = getattr(tl.ln_final, "b", None) if has_ln else None
    w_u_ab = tl.W_U[:, [a, b]].float()
    b_u_ab = tl.b_U[[a, b]].float() if getattr(tl, "b_U", None) is not None else None

    parts: dict[str, list[torch.Tensor]] = {k: [] for k in (
        "heads", "mlp", "attn_bias", "mlp_bias", "embed", "pos", "const", "ld")}
    batches = batch_list(model, prompts, attention_mask, batch_size, chat, system)
    bar = tqdm(total=sum(len(bt.tokens) for bt in batches), desc="DLA", disable=not progress)
    try:
        for batch in batches:
            tokens, mask = batch.tokens.tokens, batch.tokens.attention_mask
            reads = read_at_positions(tl, names, tokens, mask, position)
            g = {k: t.to(dev).float() for k, t in reads.acts.items()}
            bsz = tokens.shape[0]
            scale = (g["ln_final.hook_scale"].reshape(bsz) if has_ln and ln_scale == "frozen"
                     else torch.ones(bsz, device=dev))
            heads = torch.stack([torch.einsum("bhd,hd->bh", g[attn_z(layer)], wo_v[layer])
                                 for layer in range(n_layers)], 1) / scale[:, None, None]
            if has_mlp:
                mlp = torch.stack([g[mlp_out(layer)] @ v for layer in range(n_layers)], 1)
                mlp = (mlp - b_out[None]) / scale[:, None]
            else:
                mlp = torch.zeros(bsz, n_layers, device=dev)
            embed = g["hook_embed"]
            pos = g["blocks.0.hook_resid_pre"] - embed
            parts["heads"].append(heads.cpu())
            parts["mlp"].append(mlp.cpu())
            parts["attn_bias"].append((b_o[None] / scale[:, None]).cpu())
            parts["mlp_bias"].append((b_out[None] / scale[:, None]).cpu())
            parts["embed"].append(((embed @ v) / scale).cpu())
            parts["pos"].append(((pos @ v) / scale).cpu())
            parts["const"].append(const.expand(bsz).cpu())
            # the model's own logit difference: ln_final's output through the unembedding
            if has_ln:
                out = g["ln_final.hook_normalized"]
                if w_ln is not None:
                    out = out * w_ln.float().to(dev)
                if b_ln is not None:
                    out = out + b_ln.float().to(dev)
            else:
                out = g[resid_post(n_layers - 1)]
            lab = out @ w_u_ab.to(dev)
            if b_u_ab is not None:
                lab = lab + b_u_ab.to(dev)
            parts["ld"].append((lab[:, 0] - lab[:, 1]).cpu())
            bar.update(bsz)
    finally:
        bar.close()

    def cat(k):
        return torch.cat(parts[k])

    return DLAResult(
        heads=cat("heads"), mlp=cat("mlp"), attn_bias=cat("attn_bias"),
        mlp_bias=cat("mlp_bias"), embed=cat("embed"), pos_embed=cat("pos"),
        constant=cat("const"), logit_diff=cat("ld"), token_a=a, token_b=b,
        token_a_str=decode(tok, a), token_b_str=decode(tok, b), ln_scale=ln_scale,
        position=position, model=describe_model(model))


def zscore(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """``(x - mean) / sd`` with the population SD (ddof=0), as ``scipy.stats.zscore``."""
    xd = x.double()
    if dim is None:
        return ((xd - xd.mean()) / xd.std(correction=0)).to(x.dtype)
    return ((xd - xd.mean(dim, keepdim=True)) / xd.std(dim, correction=0,
                                                       keepdim=True)).to(x.dtype)
