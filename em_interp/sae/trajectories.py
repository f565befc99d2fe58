"""Latent trajectories: chosen SAE latents at every prompt position and every generation step.

The Qwen paper (Sec. V, Fig. 15) follows one latent through generation: in the organism it stays
quiet over the prompt and spikes at the first generated token; with the suppressor heads L62H12
and L62H28 mean-ablated it no longer fires. :func:`latent_trajectories` measures that: for each
condition (no intervention, or any :mod:`em_interp.behaviour.interventions` object: head ablation, steering,
an SAE splice, a composition) it generates from each prompt with a KV cache
(:func:`em_interp.behaviour.generation.prefill` / :func:`~em_interp.behaviour.generation.decode_step`, the same loop as
``generate``) and reads ``z_k = E(h)_k`` at the SAE's hook for every position the model
processes:

* prompt positions, ``step = t - (T - 1)`` for real token ``t`` of a ``T``-token prompt (so the
  last prompt token, which predicts the first answer token, is step 0);
* generated token ``s`` (fed back at decode step ``s``) at ``step = s`` (1, 2, ...).

The intervention is active for the whole generation and the latent is read *after* it (the
recording hook runs after the condition's hooks on the same point), so a condition that edits
the SAE's hook shows its effect. Greedy by default; with ``temperature > 0`` each (prompt,
condition) draws from its own seeded generator (:func:`em_interp.behaviour.generation.row_generator`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from em_interp import hooks as H
from em_interp.behaviour.generation import (
    decode_step,
    prefill,
    row_generator,
    sample_next,
    stop_token_ids,
)
from em_interp.behaviour.interventions import as_intervention
from em_interp.errors import ConfigError
from em_interp.inputs import as_prompt_list, tokenize, tokenizer_of, unwrap
from em_interp.results import Result
from em_interp.sae.load import check_sae


@dataclasses.dataclass(frozen=True)
class TrajectoryResult(Result):
    """Latent activations per (condition, prompt, step) (see the module docstring)."""

    kind = "sae_trajectories"
    table: pd.DataFrame
    """``condition``, ``prompt_index``, ``step``, ``phase`` (``prompt``/``generated``),
    ``token_id``, ``token``, ``latent``, ``activation``."""
    completions: pd.DataFrame
    """``condition``, ``prompt_index``, ``completion``, ``n_tokens``, ``stop_reason``."""
    latents_read: tuple[int, ...]
    hook: str
    conditions: dict
    """``{condition: intervention.describe()}``."""

    @property
    def df(self) -> pd.DataFrame:
        return self.table

    def mean(self) -> pd.DataFrame:
        """Mean (and SEM) activation over prompts per ``condition``, ``latent``, ``step``."""
        g = self.table.groupby(["condition", "latent", "step"])["activation"]
        out = g.agg(["mean", "count", "std"]).reset_index()
        out["sem"] = out["std"].fillna(0.0) / np.sqrt(out["count"])
        return out

    def to_dict(self) -> dict:
        t = self.table
        out = {"hook": self.hook, "latents": list(self.latents_read),
               "n_prompts": int(t["prompt_index"].nunique()) if len(t) else 0,
               "conditions": {}}
        for cond in self.conditions:
            rows = {}
            for k in self.latents_read:
                part = t[(t["condition"] == cond) & (t["latent"] == k)]
                pr, ge = part[part["phase"] == "prompt"], part[part["phase"] == "generated"]
                first = part[part["step"] == 1]
                rows[str(k)] = {"mean_prompt": float(pr["activation"].mean()) if len(pr)
                                else None,
                                "mean_generated": float(ge["activation"].mean()) if len(ge)
                                else None,
                                "mean_first_generated": float(first["activation"].mean())
                                if len(first) else None,
                                "max": float(part["activation"].max()) if len(part) else None}
            out["conditions"][cond] = rows
        return out

    def figure(self, *, prompt_index: int | None = None, min_step: int | None = None,
               title: str | None = None):
        """Activation against step, one line per (latent, condition): the mean over prompts with
        an SEM band, or one prompt's trajectory (``prompt_index``). Step 0 is the last prompt
        token; positive steps are generated tokens (Fig. 15)."""
        import plotly.graph_objects as go

        if prompt_index is None:
            data = self.mean()
        else:
            data = self.table[self.table["prompt_index"] == prompt_index].rename(
                columns={"activation": "mean"}).assign(sem=0.0)
        if min_step is not None:
            data = data[data["step"] >= min_step]
        fig = go.Figure()
        for (cond, k), part in data.groupby(["condition", "latent"], sort=False):
            part = part.sort_values("step")
            label = f"latent {k} | {cond}"
            if prompt_index is None and (part["sem"] > 0).any():
                x = np.concatenate([part["step"], part["step"][::-1]])
                y = np.concatenate([part["mean"] + part["sem"], (part["mean"] - part["sem"])[::-1]])
                fig.add_trace(go.Scatter(x=x, y=y, fill="toself", opacity=0.15, mode="lines",
                                         line={"width": 0}, showlegend=False, hoverinfo="skip",
                                         legendgroup=label))
            fig.add_trace(go.Scatter(x=part["step"], y=part["mean"], mode="lines+markers",
                                     name=label, legendgroup=label))
        fig.add_vline(x=0.5, line_dash="dot", line_color="gray",
                      annotation_text="generation starts", annotation_position="top right")
        what = "mean over prompts" if prompt_index is None else f"prompt {prompt_index}"
        fig.update_layout(template="plotly_white",
                          title=title or f"SAE latent trajectories at {self.hook} ({what})",
                          xaxis_title="step (<= 0: prompt tokens, > 0: generated tokens)",
                          yaxis_title="latent activation")
        return fig


@torch.no_grad()
def latent_trajectories(model, sae, prompts, latents: int | Sequence[int], *,
                        max_new_tokens: int = 16,
                        conditions: Mapping[str, object] | None = None,
                        temperature: float = 0.0, seed: int = 0, batch_size: int = 8,
                        hook_name: str | None = None, include_prompt: bool = True,
                        stop_at_eos: bool = True, system: str | None = None,
                        progress: bool = True) -> TrajectoryResult:
    """Read SAE latents at every prompt position and generation step, per condition.

    Args:
        model: a ``Loaded`` (or a ``HookedTransformer`` with a tokenizer).
        sae: an SAE-Lens SAE (checked against the model).
        prompts: text prompts, conversations or a ``PromptSet``.
        latents: the latent index(es) to follow.
        max_new_tokens: generation steps.
        conditions: ``{name: intervention or None}``; default ``{"baseline": None}``. E.g.
            ``{"organism": None, "L62H12+H28 mean-ablated": ablate_heads(...)}``.
        temperature: 0 for greedy; otherwise sampling with per-(prompt, condition) seeds.
        seed: sampling seed.
        batch_size: prompts generated together.
        hook_name: read this hook instead of the SAE's own.
        include_prompt: also record the prompt positions (steps <= 0).
        stop_at_eos: stop a row at the model's stop tokens.
        system: a system message for text prompts.
        progress: show a progress bar.

    Returns:
        :class:`TrajectoryResult`.
    """
    tl = unwrap(model)
    hook = check_sae(model, sae, hook_name)
    lat = [int(latents)] if isinstance(latents, (int, np.integer)) else [int(k) for k in latents]
    if not lat or not all(0 <= k < sae.cfg.d_sae for k in lat):
        raise ConfigError(f"latents must be indices in 0..{sae.cfg.d_sae - 1}, got {lat}.")
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    conditions = dict(conditions or {"baseline": None})
    items = as_prompt_list(prompts)
    tok = tokenizer_of(model)
    stops = set(stop_token_ids(model)) if stop_at_eos else set()
    lat_t = torch.tensor(lat, dtype=torch.long, device=sae.W_enc.device)
    rows: list[dict] = []
    comp_rows: list[dict] = []
    described = {}
    bar = tqdm(total=len(items) * len(conditions), desc="latent trajectories",
               disable=not progress, leave=False)
    for ci, (cname, cond) in enumerate(conditions.items()):
        iv = as_intervention(cond)
        described[cname] = iv.describe()
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            ct = tokenize(model, chunk, system=system)
            seen: list[torch.Tensor] = []

            def rec(act, hook, seen=seen):
                seen.append(sae.encode(act.to(sae.W_enc.device))[..., lat_t].float().cpu())

            gens = ([row_generator(seed, start + b, ci) for b in range(len(chunk))]
                    if temperature > 0 else None)
            with iv.applied(tl), H.attached(tl, [(hook, rec)]):
                logits, state = prefill(tl, ct.tokens, ct.attention_mask)
                out_ids: list[list[int]] = [[] for _ in chunk]
                done = [False] * len(chunk)
                reason = ["max_new_tokens"] * len(chunk)
                step_tokens = []
                for step in range(max_new_tokens):
                    nxt = sample_next(logits, temperature=temperature, generators=gens)
                    ids = nxt.tolist()
                    for b, t in enumerate(ids):
                        if not done[b]:
                            if t in stops:
                                done[b], reason[b] = True, "eos"
                            else:
                                out_ids[b].append(t)
                    if all(done) or step == max_new_tokens - 1:
                        break
                    step_tokens.append(ids)
                    logits = decode_step(tl, state, nxt)
            _rows_of(rows, cname, start, ct, seen, step_tokens, out_ids, lat, tok,
                     include_prompt)
            for b in range(len(chunk)):
                comp_rows.append({"condition": cname, "prompt_index": start + b,
                                  "completion": tok.decode(out_ids[b], skip_special_tokens=True),
                                  "n_tokens": len(out_ids[b]), "stop_reason": reason[b]})
            bar.update(len(chunk))
    bar.close()
    table = pd.DataFrame(rows, columns=["condition", "prompt_index", "step", "phase",
                                        "token_id", "token", "latent", "activation"])
    return TrajectoryResult(table=table, completions=pd.DataFrame(comp_rows),
                            latents_read=tuple(lat), hook=hook, conditions=described)


def _rows_of(rows, cname, start, ct, seen, step_tokens, out_ids, lat, tok, include_prompt):
    """Turn the recorded ``[batch, pos, k]`` prefill and ``[batch, 1, k]`` step tensors into
    table rows (a generated token after its row stopped is not recorded)."""
    mask = ct.attention_mask.cpu().bool()
    pre = seen[0]
    for b in range(mask.shape[0]):
        real = mask[b].nonzero().flatten().tolist()
        if include_prompt:
            n = len(real)
            for j, p in enumerate(real):
                tid = int(ct.tokens[b, p])
                piece = tok.decode([tid])
                for kk, k in enumerate(lat):
                    rows.append({"condition": cname, "prompt_index": start + b,
                                 "step": j - (n - 1), "phase": "prompt", "token_id": tid,
                                 "token": piece, "latent": k,
                                 "activation": float(pre[b, p, kk])})
        for s, ids in enumerate(step_tokens, start=1):
            if s > len(out_ids[b]):  # the row had stopped: its token was a stop token
                break
            tid = int(ids[b])
            piece = tok.decode([tid])
            for kk, k in enumerate(lat):
                rows.append({"condition": cname, "prompt_index": start + b, "step": s,
                             "phase": "generated", "token_id": tid, "token": piece,
                             "latent": k, "activation": float(seen[s][b, 0, kk])})
