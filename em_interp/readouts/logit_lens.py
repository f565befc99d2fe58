"""Logit lens: read the residual stream after every block through the model's own unembedding.

For block ``l`` and the read position ``p`` of a prompt (its last real token by default) the lens
logits are

    lens_l = unembed(ln_final(resid_post_l[p]))

i.e. what the model would predict if it stopped after block ``l``. The last block's lens equals
the model's logits exactly. The Qwen paper (Sec. V, Fig. 12) follows a refusal token
(``"Sorry"``) against a compliance token (``"Sure"``) this way, before and after ablating the
heads L62H12 and L62H28; pass the tokens you care about as ``track`` (strings are looked up with
:func:`em_interp.inputs.single_token_id`: a word that is not one token is an error that shows how
it splits, ``first_token=True`` takes its first piece; ids pass through).

* **Prompt sets.** ``prompts`` is anything :func:`em_interp.inputs.token_batches` takes (strings,
  conversations, a PromptSet, ChatTokens, a token tensor with ``attention_mask``); batches are
  tokenized, left-padded and run ``batch_size`` at a time. The result keeps every prompt's
  trajectory; :meth:`LogitLensResult.summary` and the figure average them with a Student-t
  confidence band ``mean +- t_{(1+ci)/2, n-1} * sd / sqrt(n)``.
* **Interventions.** The forward runs under whatever hooks are active, so an intervention entered
  around the call shows in the lens. ``conditions={name: intervention}`` runs the prompts once per
  condition, entering each intervention around its run, and returns **one** result with a line per
  token per condition. An intervention is a context manager (entered once per condition, so a
  reusable class-based one and a one-shot ``contextlib`` one both work), a zero-argument callable
  returning one (``lambda: hooks.attached(model, [...])``), or ``None`` (no intervention).
* **Memory.** Only the residual at each prompt's read position is kept per layer (a hook slices it
  during the forward), so a batch holds ``n_layers x batch x d_model`` whatever the prompt length;
  the lens logits are computed a few layers at a time and only the tracked tokens' values and the
  top-1 token are kept.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from jaxtyping import Float, Int

from em_interp.errors import ConfigError, DataError, TokenizationError
from em_interp.hooks import attached, resid_post
from em_interp.inputs import (
    batch_list,
    first_positions,
    last_positions,
    single_token_id,
    tokenizer_of,
    unwrap,
)
from em_interp.results import Result

DEFAULT_CONDITION = "model"
_LAYER_CHUNK = 8  # layers unembedded at once


# ------------------------------------------------------------------ shared helpers


def read_positions(attention_mask: Int[torch.Tensor, "batch pos"],
                   position: int = -1) -> Int[torch.Tensor, " batch"]:
    """Column index of each row's ``position``-th real token (``-1``: the last real token).

    Works for left- and right-padded batches. Negative positions count back from each row's last
    real token, non-negative ones forward from its first.
    """
    mask = attention_mask.bool()
    n_real = mask.sum(-1)
    if position < 0:
        idx = last_positions(mask) + 1 + position
        bad = n_real < -position
    else:
        idx = first_positions(mask) + position
        bad = n_real <= position
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise TokenizationError(f"position {position} does not exist in prompt {i}, which has "
                                f"{int(n_real[i])} real tokens; pick a position every prompt has "
                                "(-1 is each prompt's last token).")
    return idx


def token_ids(tokenizer, tokens: Sequence[str | int], *, first_token: bool = False,
              d_vocab: int | None = None) -> list[int]:
    """Ids of ``tokens`` via :func:`em_interp.inputs.single_token_id` (ids pass through)."""
    if isinstance(tokens, str | int):
        tokens = [tokens]
    if tokenizer is None and not all(isinstance(t, int) for t in tokens):
        raise TokenizationError("this model has no tokenizer, so tokens must be given as ids; "
                                "load it with em_interp.load (which attaches one) or pass ids.")
    ids = [single_token_id(tokenizer, t, first_token=first_token) for t in tokens]
    if d_vocab is not None:
        bad = [i for i in ids if not 0 <= i < d_vocab]
        if bad:
            raise TokenizationError(f"token ids {bad} are outside the vocabulary (d_vocab = "
                                    f"{d_vocab}).")
    return ids


def token_id(tokenizer, text: str) -> int:
    """The id of the first token of ``text`` (no special tokens), looked up, never typed in.

    Kept for older code; new code uses :func:`em_interp.inputs.single_token_id`, which refuses
    a word that splits unless asked for its first piece.
    """
    return single_token_id(tokenizer, text, first_token=True)


def optional_tokenizer(model, tokenizer=None):
    """``tokenizer``, else the model's, else ``None`` (a bare model built without one)."""
    if tokenizer is not None:
        return tokenizer
    try:
        return tokenizer_of(model)
    except TokenizationError:
        return None


def decode(tokenizer, i: int) -> str:
    """The text of token ``i`` (its id as text when there is no tokenizer)."""
    return str(i) if tokenizer is None else tokenizer.decode([i])


def as_context(intervention, name: str = "intervention"):
    """A context manager from an intervention: the object itself, ``callable()``, or a no-op."""
    import contextlib

    if intervention is None:
        return contextlib.nullcontext()
    if hasattr(intervention, "__enter__") and hasattr(intervention, "__exit__"):
        return intervention
    if callable(intervention):
        cm = intervention()
        if not (hasattr(cm, "__enter__") and hasattr(cm, "__exit__")):
            raise ConfigError(f"condition {name!r}: the callable returned a "
                              f"{type(cm).__name__}, not a context manager.")
        return cm
    raise ConfigError(f"condition {name!r} must be a context manager (e.g. "
                      "em_interp.behaviour.interventions.ablate_heads(...)), a zero-argument callable "
                      f"returning one, or None; got {type(intervention).__name__}.")


def _check_conditions(conditions) -> dict[str, object]:
    if conditions is None:
        return {DEFAULT_CONDITION: None}
    if not isinstance(conditions, Mapping) or not conditions:
        raise ConfigError("conditions must be a non-empty dict {name: intervention}, e.g. "
                          "{'clean': None, 'ablated': ablate_heads(model, [(L, h)])}.")
    for name, cm in conditions.items():
        if not isinstance(name, str):
            raise ConfigError(f"condition names must be strings, got {name!r}.")
        if not (cm is None or callable(cm)
                or (hasattr(cm, "__enter__") and hasattr(cm, "__exit__"))):
            raise ConfigError(f"condition {name!r} must be a context manager, a zero-argument "
                              f"callable returning one, or None; got {type(cm).__name__}.")
    return dict(conditions)




def _t_band(x: torch.Tensor, ci: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, lo, hi) over dim -1 with a Student-t interval (NaN band for n < 2)."""
    from scipy.stats import t as student_t

    n = x.shape[-1]
    mean = x.double().mean(-1)
    if n < 2:
        nan = torch.full_like(mean, float("nan"))
        return mean, nan, nan
    half = float(student_t.ppf((1 + ci) / 2, n - 1)) * x.double().std(-1) / math.sqrt(n)
    return mean, mean - half, mean + half


# ------------------------------------------------------------------ result


@dataclass(frozen=True)
class LogitLensResult(Result):
    """Per-layer values of tracked tokens at the read position of each prompt, per condition."""

    kind = "logit_lens"

    probs_by_condition: Float[torch.Tensor, "condition layer batch token"]
    """Softmax probability of each tracked token."""
    logits_by_condition: Float[torch.Tensor, "condition layer batch token"]
    """Lens logit of each tracked token."""
    top_ids_by_condition: torch.Tensor
    """``[condition, layer, batch]`` id of the most likely token."""
    top_probs_by_condition: Float[torch.Tensor, "condition layer batch"]
    """Its probability."""
    token_ids: list[int]
    """The tracked token ids."""
    token_strs: list[str]
    """The tracked tokens, decoded."""
    top_strs_by_condition: list
    """``[condition][layer][batch]`` decoded most likely token."""
    conditions: list[str]
    """Condition names, in order (``["model"]`` without ``conditions=``)."""
    position: int = -1
    """The read position (-1: each prompt's last real token)."""

    # -------------------------------------------------------------- single-condition views

    def _single(self, what: str) -> int:
        if len(self.conditions) != 1:
            raise DataError(f"this result has {len(self.conditions)} conditions "
                            f"{self.conditions}; use .condition(name).{what} or "
                            f".{what}_by_condition.")
        return 0

    @property
    def probs(self) -> Float[torch.Tensor, "layer batch token"]:
        """``[layer, batch, token]`` probabilities of a single-condition result."""
        return self.probs_by_condition[self._single("probs")]

    @property
    def logits(self) -> Float[torch.Tensor, "layer batch token"]:
        """``[layer, batch, token]`` lens logits of a single-condition result."""
        return self.logits_by_condition[self._single("logits")]

    @property
    def top_ids(self) -> torch.Tensor:
        """``[layer, batch]`` top-1 ids of a single-condition result."""
        return self.top_ids_by_condition[self._single("top_ids")]

    @property
    def top_probs(self) -> Float[torch.Tensor, "layer batch"]:
        """``[layer, batch]`` top-1 probabilities of a single-condition result."""
        return self.top_probs_by_condition[self._single("top_probs")]

    @property
    def top_strs(self) -> list[list[str]]:
        """``[layer][batch]`` decoded top-1 tokens of a single-condition result."""
        return self.top_strs_by_condition[self._single("top_strs")]

    def condition(self, name: str) -> LogitLensResult:
        """The result of one condition alone."""
        if name not in self.conditions:
            raise DataError(f"no condition {name!r}; this result has {self.conditions}.")
        c = self.conditions.index(name)
        return LogitLensResult(
            probs_by_condition=self.probs_by_condition[c:c + 1],
            logits_by_condition=self.logits_by_condition[c:c + 1],
            top_ids_by_condition=self.top_ids_by_condition[c:c + 1],
            top_probs_by_condition=self.top_probs_by_condition[c:c + 1],
            token_ids=list(self.token_ids), token_strs=list(self.token_strs),
            top_strs_by_condition=[self.top_strs_by_condition[c]], conditions=[name],
            position=self.position)

    # -------------------------------------------------------------- tables

    @property
    def n_layers(self) -> int:
        return self.probs_by_condition.shape[1]

    @property
    def n_prompts(self) -> int:
        return self.probs_by_condition.shape[2]

    @property
    def df(self) -> pd.DataFrame:
        """Tidy table: one row per (condition, layer, prompt, tracked token)."""
        n_c, n_l, n_b, n_t = self.probs_by_condition.shape
        grid = torch.cartesian_prod(torch.arange(n_c), torch.arange(n_l), torch.arange(n_b),
                                    torch.arange(n_t))
        c, layer, b, t = grid.unbind(1)
        top_strs = [self.top_strs_by_condition[ci][li][bi]
                    for ci, li, bi in zip(c.tolist(), layer.tolist(), b.tolist(), strict=True)]
        return pd.DataFrame({
            "condition": [self.conditions[i] for i in c.tolist()], "layer": layer.numpy(),
            "prompt": b.numpy(), "token": [self.token_strs[i] for i in t.tolist()],
            "token_id": [self.token_ids[i] for i in t.tolist()],
            "prob": self.probs_by_condition.flatten().numpy(),
            "logit": self.logits_by_condition.flatten().numpy(),
            "top_token": top_strs,
            "top_prob": self.top_probs_by_condition[c, layer, b].numpy()})

    def summary(self, value: str = "prob", ci: float = 0.95) -> pd.DataFrame:
        """Mean over prompts with a Student-t ``ci`` band, per (condition, token, layer).

        Args:
            value: ``"prob"`` or ``"logit"``.
            ci: confidence level of the band.
        """
        if value not in ("prob", "logit"):
            raise ConfigError(f"value must be 'prob' or 'logit', got {value!r}.")
        x = self.probs_by_condition if value == "prob" else self.logits_by_condition
        mean, lo, hi = _t_band(x.permute(0, 3, 1, 2), ci)  # [condition, token, layer]
        rows = []
        for ci_, cname in enumerate(self.conditions):
            for t, tok in enumerate(self.token_strs):
                for layer in range(self.n_layers):
                    rows.append({"condition": cname, "token": tok, "token_id": self.token_ids[t],
                                 "layer": layer, "mean": float(mean[ci_, t, layer]),
                                 "ci_lo": float(lo[ci_, t, layer]),
                                 "ci_hi": float(hi[ci_, t, layer]), "n": self.n_prompts})
        return pd.DataFrame(rows)

    def to_dict(self) -> dict:
        """Final-layer and peak mean probability of each tracked token, per condition."""
        mean = self.probs_by_condition.mean(2)  # [condition, layer, token]
        by = {c: {s: {"final_prob": float(mean[i, -1, t]), "peak_prob": float(mean[i, :, t].max()),
                      "peak_layer": int(mean[i, :, t].argmax())}
                  for t, s in enumerate(self.token_strs)}
              for i, c in enumerate(self.conditions)}
        out = {"n_layers": self.n_layers, "n_prompts": self.n_prompts,
               "conditions": list(self.conditions), "position": self.position,
               "by_condition": by}
        if len(self.conditions) == 1:
            out["tokens"] = by[self.conditions[0]]
        return out

    # -------------------------------------------------------------- figure

    def figure(self, prompt: int | None = None, value: str = "prob", ci: float = 0.95,
               title: str | None = None):
        """Plotly lines across layers: one per tracked token per condition.

        Args:
            prompt: ``None`` (default) plots the mean over prompts with a ``ci`` band; an index
                plots that prompt alone (with its top-1 token per layer when there is one
                condition).
            value: ``"prob"`` or ``"logit"``.
            ci: confidence level of the band.
            title: figure title.
        """
        import plotly.colors
        import plotly.graph_objects as go

        palette = plotly.colors.qualitative.Plotly
        dashes = ["solid", "dash", "dot", "dashdot", "longdash", "longdashdot"]
        layers = list(range(self.n_layers))
        x_all = self.probs_by_condition if value == "prob" else self.logits_by_condition
        fig = go.Figure()
        multi = len(self.conditions) > 1
        for c, cname in enumerate(self.conditions):
            for t, s in enumerate(self.token_strs):
                color = palette[t % len(palette)]
                name = f"{s!r} ({cname})" if multi else repr(s)
                line = {"color": color, "dash": dashes[c % len(dashes)]}
                if prompt is not None:
                    fig.add_trace(go.Scatter(x=layers, y=x_all[c, :, prompt, t].tolist(),
                                             mode="lines+markers", name=name, line=line))
                    continue
                mean, lo, hi = _t_band(x_all[c, :, :, t], ci)
                if not torch.isnan(lo).all():
                    fig.add_trace(go.Scatter(
                        x=layers + layers[::-1], y=hi.tolist() + lo.tolist()[::-1],
                        fill="toself", line={"width": 0}, hoverinfo="skip", showlegend=False,
                        fillcolor=_rgba(color, 0.15), name=f"{name} {ci:.0%} CI"))
                fig.add_trace(go.Scatter(x=layers, y=mean.tolist(), mode="lines+markers",
                                         name=name, line=line))
        if prompt is not None and not multi and value == "prob":
            fig.add_trace(go.Scatter(
                x=layers, y=self.top_probs_by_condition[0, :, prompt].tolist(), mode="markers",
                name="top-1", text=[self.top_strs_by_condition[0][layer][prompt]
                                    for layer in layers],
                hovertemplate="layer %{x}: %{text} (%{y:.3f})", marker={"symbol": "x"}))
        what = "probability" if value == "prob" else "lens logit"
        scope = (f"prompt {prompt}" if prompt is not None
                 else f"mean over {self.n_prompts} prompts, {ci:.0%} CI")
        fig.update_layout(title=title or f"Logit lens ({scope})",
                          xaxis_title="layer (resid_post, 0-indexed)", yaxis_title=what,
                          template="plotly_white")
        return fig


def _rgba(color: str, alpha: float) -> str:
    color = color.lstrip("#")
    r, g, b = (int(color[i:i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


# ------------------------------------------------------------------ the lens


@torch.no_grad()
def logit_lens(
    model,
    prompts,
    track: Sequence[str | int],
    *,
    tokenizer=None,
    attention_mask: torch.Tensor | None = None,
    position: int = -1,
    conditions: Mapping[str, object] | None = None,
    batch_size: int = 8,
    first_token: bool = False,
    chat: bool = True,
    system: str | None = None,
    progress: bool = True,
) -> LogitLensResult:
    """Run the logit lens at ``position`` of every prompt, under each condition.

    Args:
        model: a ``Loaded`` or a ``HookedTransformer``.
        prompts: anything :func:`em_interp.inputs.token_batches` takes: text, conversations, a
            PromptSet, ChatTokens, or a token tensor ``[batch, pos]`` (with ``attention_mask``).
        track: tokens to follow: strings (each must be one token, see ``first_token``) or ids.
        tokenizer: the tokenizer for ``track`` and decoding (default: the model's).
        attention_mask: the mask of a token tensor ``prompts`` (left- or right-padded).
        position: which real token of each prompt to read (-1: the last).
        conditions: ``{name: intervention}``; each intervention is a context manager, a
            zero-argument callable returning one, or ``None``. Default: one run as is.
        batch_size: prompts per forward.
        first_token: take the first piece of a word that splits into several tokens instead of
            raising :class:`~em_interp.errors.TokenizationError`.
        chat: apply the chat template to text prompts (once).
        system: system message for text prompts.
        progress: show a progress bar.
    """
    from tqdm import tqdm

    tl = unwrap(model)
    tok = optional_tokenizer(model, tokenizer)
    ids = token_ids(tok, track, first_token=first_token, d_vocab=tl.cfg.d_vocab)
    conds = _check_conditions(conditions)
    batches = batch_list(model, prompts, attention_mask, batch_size, chat, system)
    n_total = sum(len(b.tokens) for b in batches)
    cap = float(getattr(tl.cfg, "output_logits_soft_cap", 0.0) or 0.0)
    out_dev = tl.unembed.W_U.device
    ids_t = torch.tensor(ids, device=out_dev)
    per_cond = []
    bar = tqdm(total=n_total * len(conds), desc="logit lens", disable=not progress)
    try:
        for name, intervention in conds.items():
            probs, logits, top_p, top_i = [], [], [], []
            with as_context(intervention, name):
                for batch in batches:
                    resid = _read_resid(tl, batch.tokens.tokens, batch.tokens.attention_mask,
                                        position).to(out_dev)  # [layer, batch, d_model]
                    p, lg, tp, ti = _lens(tl, resid, ids_t, cap)
                    probs.append(p)
                    logits.append(lg)
                    top_p.append(tp)
                    top_i.append(ti)
                    bar.update(len(batch.tokens))
            per_cond.append((torch.cat(probs, 1), torch.cat(logits, 1), torch.cat(top_p, 1),
                             torch.cat(top_i, 1)))
    finally:
        bar.close()
    top_ids = torch.stack([c[3] for c in per_cond])
    decoded = {i: decode(tok, i) for i in top_ids.unique().tolist()}
    return LogitLensResult(
        probs_by_condition=torch.stack([c[0] for c in per_cond]),
        logits_by_condition=torch.stack([c[1] for c in per_cond]),
        top_ids_by_condition=top_ids,
        top_probs_by_condition=torch.stack([c[2] for c in per_cond]),
        token_ids=ids, token_strs=[decode(tok, i) for i in ids],
        top_strs_by_condition=[[[decoded[i] for i in row] for row in c.tolist()]
                               for c in top_ids],
        conditions=list(conds), position=position)


@dataclass(frozen=True)
class PositionReads:
    """What :func:`read_at_positions` kept: each hook's activation at each row's read position."""

    acts: dict[str, torch.Tensor]
    """``{hook name: activation [batch, ...]}`` (trailing axes of the hook kept, e.g.
    ``[batch, head_index, d_head]`` for ``attn.hook_z``); each on its block's device."""
    columns: Int[torch.Tensor, " batch"]
    """The column read in each row (padded coordinates, see :func:`read_positions`)."""
    position: int = -1
    """The read position asked for (``-1``: each row's last real token)."""

    @property
    def hooks(self) -> list[str]:
        """The hook names, in the order they were asked for."""
        return list(self.acts)

    def __getitem__(self, hook: str) -> torch.Tensor:
        """``reads[hook]``: that hook's ``[batch, ...]`` activation."""
        if hook not in self.acts:
            raise DataError(f"no hook {hook!r} was read; these were: {self.hooks[:4]}"
                            f"{' ...' if len(self.acts) > 4 else ''}.")
        return self.acts[hook]


def read_at_positions(model, names: Sequence[str], tokens: torch.Tensor, mask: torch.Tensor,
                      position: int = -1) -> PositionReads:
    """One forward (no unembedding) keeping only each row's read position at each hook.

    Returns:
        A :class:`PositionReads`: ``reads[name]`` (or ``reads.acts[name]``) is
        ``activation[batch, ...]`` at the read column of each row; activations stay on their
        block's device.
    """
    tl = unwrap(model)
    idx = read_positions(mask, position)
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    got: dict[str, torch.Tensor] = {}

    def grab(act, hook):
        got[hook.name] = act[rows.to(act.device), idx.to(act.device)].detach()

    names = list(dict.fromkeys(names))
    with attached(tl, [(name, grab) for name in names]):
        tl(tokens, attention_mask=mask, return_type=None)
    return PositionReads(acts={name: got[name] for name in names}, columns=idx,
                         position=position)


def _read_resid(tl, tokens, mask, position) -> torch.Tensor:
    """``[layer, batch, d_model]``: every block's output at each row's read position."""
    names = [resid_post(layer) for layer in range(tl.cfg.n_layers)]
    reads = read_at_positions(tl, names, tokens, mask, position)
    dev = tl.unembed.W_U.device
    return torch.stack([reads.acts[name].to(dev) for name in names])


def _lens(tl, resid, ids, cap):
    """Tracked probs/logits and top-1 of the lens, a few layers at a time (fp32 softmax)."""
    probs, logits, top_p, top_i = [], [], [], []
    for s in range(0, resid.shape[0], _LAYER_CHUNK):
        x = resid[s:s + _LAYER_CHUNK]
        if getattr(tl, "ln_final", None) is not None:
            x = tl.ln_final(x)
        lg = tl.unembed(x).float()  # [chunk, batch, vocab]
        if cap > 0:
            lg = cap * torch.tanh(lg / cap)
        p = lg.softmax(-1)
        tp, ti = p.max(-1)
        probs.append(p[..., ids].cpu())
        logits.append(lg[..., ids].cpu())
        top_p.append(tp.cpu())
        top_i.append(ti.cpu())
    return torch.cat(probs), torch.cat(logits), torch.cat(top_p), torch.cat(top_i)
