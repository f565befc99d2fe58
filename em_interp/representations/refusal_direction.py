"""Choosing a refusal direction the way Arditi et al. (2024) do.

"Refusal in Language Models Is Mediated by a Single Direction" (Arditi et al., NeurIPS 2024,
Sec. 2.3-2.4 and App. C) finds, in many chat models, one residual-stream direction whose removal
stops refusals and whose addition causes them. The Qwen introspection paper's refusal vector
(Experiment 2) and the EM-vs-refusal comparison rest on such a direction, so the toolkit chooses
it by their recipe, with selection and evaluation on different prompts.

**Candidates** (fit split). For each layer ``l`` of a range, at the last prompt token ``i = -1``
of the residual stream entering block ``l`` (``resid_pre``)::

    r_l = mean_{x harmful} h_l(x)[-1] - mean_{x harmless} h_l(x)[-1]

**Selection** (validation split, disjoint from the fit split). Every candidate is scored by the
refusal score ``s(x) = log P(R | x) - log(1 - P(R | x))`` of the next token
(:func:`em_interp.metrics.refusal_score`, ``R`` = refusal-opening tokens), averaged over prompts:

* ``bypass`` -- ``s`` on harmful prompts with ``r_l`` ablated: ``x <- x - (x . r^) r^`` at the
  stream entering block 0 and at every ``attn_out`` / ``mlp_out`` write, every position
  (:func:`~em_interp.behaviour.interventions.ablate_direction`, ``hook="writes"``): low is good;
* ``induce`` -- ``s`` on harmless prompts with ``r_l`` added to ``resid_pre(l)`` at every
  position (:func:`~em_interp.behaviour.interventions.steer`): must be above ``induce_min``
  (0: refusal more likely than not);
* ``kl`` -- ``KL(p || p_ablated)`` of the next-token distribution on harmless prompts with
  ``r_l`` ablated: must stay below ``kl_max`` (0.1), so the direction is not generic;
* depth -- ``l < max_layer_fraction * n_layers`` (0.8): candidates near the unembedding tend to
  be token directions.

The chosen direction is the candidate with the lowest ``bypass`` among those passing every
filter; when none passes, the lowest ``bypass`` among those of allowed depth, and
``passed_filters`` is False (the report says so). The whole table is kept
(:attr:`RefusalDirectionResult.candidates`), with the prompts each step used.

Arditi et al. report that ablating the chosen direction takes refusal of held-out harmful
requests near zero in every model they study, and that adding it makes models refuse harmless
ones; :func:`em_interp.behaviour.rates.attack_success_rate` on a third, held-out split measures
both (the ``refusal_direction`` run stage does).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch

from em_interp.errors import ConfigError, DataError
from em_interp.hooks import resid_pre
from em_interp.inputs import describe_model, token_batches, unwrap
from em_interp.metrics import REFUSAL_OPENINGS, refusal_score, refusal_token_ids
from em_interp.representations.directions import Direction
from em_interp.results import Result

__all__ = ["RefusalDirectionResult", "candidate_layers", "select_refusal_direction"]


@dataclass(frozen=True)
class RefusalDirectionResult(Result):
    """The chosen refusal direction, with every candidate's scores on the validation split."""

    kind = "refusal_direction"

    direction: Direction
    """The chosen ``r_l`` (unnormalised), at ``resid_pre(layer)``."""
    layer: int
    candidates: pd.DataFrame
    """One row per candidate layer: ``layer, norm, bypass, induce, kl, depth_ok, induce_ok,
    kl_ok, passes, selected``."""
    baseline_harmful: float
    """Mean refusal score of the validation harmful prompts, no intervention."""
    baseline_harmless: float
    """Mean refusal score of the validation harmless prompts, no intervention."""
    passed_filters: bool
    """False when no candidate passed every filter (the lowest ``bypass`` was taken anyway)."""
    refusal_tokens: tuple[int, ...] = ()
    refusal_token_text: tuple[str, ...] = ()
    fit_ids: tuple[str, ...] = ()
    """Ids of the prompts the candidates were fitted on."""
    validation_ids: tuple[str, ...] = ()
    """Ids of the prompts the candidate was chosen on."""
    settings: dict = field(default_factory=dict)

    @property
    def df(self) -> pd.DataFrame:
        """The candidate table."""
        return self.candidates

    def to_dict(self) -> dict:
        row = self.candidates[self.candidates["selected"]].iloc[0]
        return {"layer": self.layer, "hook": self.direction.hook, "norm": self.direction.norm,
                "bypass": float(row["bypass"]), "induce": float(row["induce"]),
                "kl": float(row["kl"]), "baseline_harmful": self.baseline_harmful,
                "baseline_harmless": self.baseline_harmless,
                "passed_filters": self.passed_filters,
                "n_candidates": len(self.candidates),
                "n_passing": int(self.candidates["passes"].sum()),
                "refusal_tokens": list(self.refusal_token_text),
                "n_fit": len(self.fit_ids), "n_validation": len(self.validation_ids),
                "settings": self.settings}

    def figure(self, title: str | None = None):
        """Per candidate layer: the bypass and induce scores against the unablated baselines,
        and the KL on harmless prompts; the chosen layer marked."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        c = self.candidates
        fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                            row_heights=[0.65, 0.35])
        for col, name, colour in (("bypass", "harmful, direction ablated", "#d62728"),
                                  ("induce", "harmless, direction added", "#1f77b4")):
            fig.add_trace(go.Scatter(x=c["layer"], y=c[col], mode="lines+markers", name=name,
                                     line={"color": colour}), row=1, col=1)
        for y, name in ((self.baseline_harmful, "harmful, baseline"),
                        (self.baseline_harmless, "harmless, baseline")):
            fig.add_hline(y=y, line_dash="dot", line_color="grey", annotation_text=name,
                          row=1, col=1)
        fig.add_trace(go.Scatter(x=c["layer"], y=c["kl"], mode="lines+markers",
                                 name="KL on harmless (ablated)", line={"color": "#7f7f7f"}),
                      row=2, col=1)
        kl_max = self.settings.get("kl_max")
        if kl_max is not None:
            fig.add_hline(y=kl_max, line_dash="dash", line_color="black", row=2, col=1)
        fig.add_vline(x=self.layer, line_dash="dash", line_color="green")
        fig.update_yaxes(title_text="refusal score (log-odds)", row=1, col=1)
        fig.update_yaxes(title_text="KL (nats)", row=2, col=1)
        fig.update_xaxes(title_text="candidate layer (resid_pre)", row=2, col=1)
        fig.update_layout(template="plotly_white", title=title or (
            f"Refusal-direction candidates on {len(self.validation_ids)} validation prompts: "
            f"layer {self.layer} chosen" + ("" if self.passed_filters
                                           else " (no candidate passed every filter)")))
        return fig


def candidate_layers(n_layers: int, layers: Sequence[int] | None = None, *,
                     max_layer_fraction: float = 0.8) -> list[int]:
    """The candidate layers: ``layers`` (negatives count from the end) or, by default, every
    layer from a quarter of the depth up to ``max_layer_fraction`` of it."""
    if not 0 < max_layer_fraction <= 1:
        raise ConfigError(f"max_layer_fraction must be in (0, 1], got {max_layer_fraction}.")
    if layers is None:
        top = max(1, int(max_layer_fraction * n_layers))
        return list(range(min(n_layers // 4, top - 1), top))
    out = []
    for la in layers:
        if not -n_layers <= int(la) < n_layers:
            raise ConfigError(f"candidate layer {la} is outside the model's {n_layers} layers "
                              f"(valid: {-n_layers} .. {n_layers - 1}).")
        out.append(int(la) % n_layers)
    if not out:
        raise ConfigError("no candidate layers: give at least one, or None for the default.")
    return sorted(set(out))


@torch.no_grad()
def _last_logits(model, prompts, batch_size: int, iv=None) -> torch.Tensor:
    """``logits[:, -1]`` of each prompt (left-padded batches), float32, under ``iv``."""
    tl = unwrap(model)
    out = []
    for batch in token_batches(model, prompts, batch_size):
        if iv is None:
            logits = tl(batch.tokens.tokens, attention_mask=batch.tokens.attention_mask)
        else:
            with iv.applied(tl):
                logits = tl(batch.tokens.tokens, attention_mask=batch.tokens.attention_mask)
        out.append(logits[:, -1].float())
    return torch.cat(out)


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """``KL(p || q)`` per row from logits."""
    lp, lq = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1)


def select_refusal_direction(model, fit, validation, *, layers: Sequence[int] | None = None,
                             refusal_tokens: Sequence[str | int] = REFUSAL_OPENINGS,
                             kl_max: float = 0.1, induce_min: float = 0.0,
                             max_layer_fraction: float = 0.8, batch_size: int = 8,
                             progress: bool = True) -> RefusalDirectionResult:
    """Fit a candidate refusal direction per layer on ``fit`` and choose one on ``validation``.

    Args:
        model: a ``Loaded`` (the base model, usually).
        fit: a labelled ``PromptSet`` (1 = harmful, 0 = harmless) for the candidates.
        validation: a labelled ``PromptSet``, disjoint from ``fit``, for the selection.
        layers: candidate layers (default: a quarter of the depth to ``max_layer_fraction``).
        refusal_tokens: the set ``R`` of the refusal score (words give their first token).
        kl_max: largest mean KL on harmless prompts under ablation a candidate may have.
        induce_min: the refusal score adding a candidate must exceed on harmless prompts.
        max_layer_fraction: candidates must lie below this fraction of the depth.
        batch_size: prompts per forward.
        progress: show a progress bar over candidates.

    Returns:
        A :class:`RefusalDirectionResult`.

    Raises:
        DataError: the splits share a prompt, or lack harmful or harmless prompts.
    """
    from tqdm import tqdm

    from em_interp.activations.cache import cache_activations
    from em_interp.behaviour.interventions import ablate_direction, steer
    from em_interp.representations.directions import mean_difference

    tl = unwrap(model)
    n_layers = tl.cfg.n_layers
    cands = candidate_layers(n_layers, layers, max_layer_fraction=max_layer_fraction)
    for name, ps in (("fit", fit), ("validation", validation)):
        labels = getattr(ps, "labels", None)
        if labels is None or not {0, 1} <= {int(x) for x in labels}:
            raise DataError(f"the {name} prompts need labels 1 (harmful) and 0 (harmless), "
                            "e.g. load_prompt_set('harmful').train().")
    shared = set(fit.ids) & set(validation.ids)
    if shared:
        raise DataError(f"the fit and validation prompts share {len(shared)} prompt(s) (e.g. "
                        f"{sorted(shared)[:3]}); split them first, e.g. with PromptSet.sample "
                        "and its complement.")
    ids = refusal_token_ids(model, refusal_tokens)
    metric = refusal_score(model, ids)
    names = [resid_pre(la) for la in cands]
    acts = cache_activations(model, fit, names, batch_size=batch_size, progress=False)
    vy = [int(x) for x in validation.labels]
    harmful = validation.subset([i for i, y in enumerate(vy) if y == 1])
    harmless = validation.subset([i for i, y in enumerate(vy) if y == 0])
    base_harmful = _last_logits(model, harmful, batch_size)
    base_harmless = _last_logits(model, harmless, batch_size)
    rows, directions = [], {}

    def score(last_logits: torch.Tensor) -> torch.Tensor:
        return metric(last_logits.unsqueeze(1))  # the metric reads position -1 of [b, pos, v]

    for la, hook in zip(tqdm(cands, desc="refusal-direction candidates", disable=not progress),
                        names, strict=True):
        d = mean_difference(acts, hook=hook, name="refusal", model=describe_model(model))
        directions[la] = d
        if not d.norm > 0:  # e.g. resid_pre(0) when every prompt ends in the same token
            rows.append({"layer": la, "norm": d.norm, "bypass": float("nan"),
                         "induce": float("nan"), "kl": float("nan")})
            continue
        abl = ablate_direction(model, d.vector)
        bypass = score(_last_logits(model, harmful, batch_size, abl))
        abl_harmless = _last_logits(model, harmless, batch_size, abl)
        add = steer(model, hook, d.vector, 1.0)
        induce = score(_last_logits(model, harmless, batch_size, add))
        kl = _kl(base_harmless, abl_harmless)
        rows.append({"layer": la, "norm": d.norm, "bypass": float(bypass.mean()),
                     "induce": float(induce.mean()), "kl": float(kl.mean())})
    table = pd.DataFrame(rows)
    table["depth_ok"] = table["layer"] < max_layer_fraction * n_layers
    table["induce_ok"] = table["induce"] > induce_min
    table["kl_ok"] = table["kl"] < kl_max
    table["passes"] = table["depth_ok"] & table["induce_ok"] & table["kl_ok"]
    scored = table[table["bypass"].notna()]
    if scored.empty:
        raise DataError(f"every candidate direction at layers {cands} is zero: the harmful and "
                        "harmless fit prompts do not differ there; try later layers.")
    pool = scored[scored["passes"]]
    passed = not pool.empty
    if not passed:
        pool = scored[scored["depth_ok"]] if scored["depth_ok"].any() else scored
    chosen = int(pool.loc[pool["bypass"].idxmin(), "layer"])
    table["selected"] = table["layer"] == chosen
    tok = getattr(model, "tokenizer", None)
    return RefusalDirectionResult(
        direction=directions[chosen], layer=chosen, candidates=table,
        baseline_harmful=float(score(base_harmful).mean()),
        baseline_harmless=float(score(base_harmless).mean()),
        passed_filters=passed, refusal_tokens=ids,
        refusal_token_text=tuple(tok.decode([i]) for i in ids) if tok is not None else (),
        fit_ids=tuple(fit.ids), validation_ids=tuple(validation.ids),
        settings={"kl_max": kl_max, "induce_min": induce_min,
                  "max_layer_fraction": max_layer_fraction, "position": "last prompt token",
                  "hook": "resid_pre", "ablation": "every write (Arditi et al.)",
                  "addition": "resid_pre of the candidate's layer, every position, scale 1"})
