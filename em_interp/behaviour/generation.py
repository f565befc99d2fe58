"""Batched, seeded, resumable generation under interventions, with a KV cache.

:func:`generate` samples completions of chat prompts from a ``HookedTransformer`` while any
interventions (:mod:`em_interp.behaviour.interventions`) are active:

* prompts go through the chat template once (one BOS) and are **left-padded** per batch, with an
  attention mask, so every row's next token is read at the last position;
* the prompt runs once (**prefill**) into a TransformerLens ``TransformerLensKeyValueCache``; every
  later step feeds only the newest token (**decode step**), never the whole prefix again. Only
  the last position goes through the final norm and unembedding (``[batch, d_vocab]`` per step);
* rows that stop (EOS) leave the batch: their cache rows are dropped, so the rest run faster;
* decode steps run on :class:`LeanDecoder` -- TL's arithmetic on TL's weights, with rotated keys
  and values in buffers allocated once per batch, one ``scaled_dot_product_attention`` per
  layer, and only the hook points that hold a hook called -- whenever the model is a pre-norm
  rotary decoder with a gated MLP (Llama, Qwen2, Mistral) and every attached hook is at a point
  it reproduces (:func:`lean_decode_blocker`); otherwise, and with a ``step_hook``, every step
  is TL's own forward. The tokens are the same either way (the logits agree to float rounding);
  on SmolLM2 the lean step brings generation under an intervention to HF ``generate``'s speed
  with the same hooks (``benchmarks/bench_generation.py``);
* sampling: ``temperature = 0`` is greedy (argmax, as HF). Otherwise ``p = softmax(logits / T)``,
  cut to the smallest set of tokens whose mass reaches ``top_p`` (nucleus), renormalised, and
  sampled by inverse CDF with one uniform number per row from a ``torch.Generator`` seeded by
  ``(seed, prompt_index, sample)``. A completion therefore depends on the seed and on its prompt,
  not on which other prompts share its batch, nor on ``batch_size``;
* with ``out_path`` every finished row is appended to a JSONL file as one line (the first line is
  a header with the settings); a rerun skips the rows already there, and a header that does not
  match the settings raises :class:`~em_interp.errors.StoreMismatchError`.

The EM evaluations (Betley et al.; BLOCK-EM Sec. 4.1) sample each question many times at
temperature 1 and judge every answer; ASR (Qwen paper Sec. V) generates once per jailbreak prompt.

**Step functions.** :func:`prefill` and :func:`decode_step` are the two forwards ``generate`` is
made of, public so that other analyses can run their own loops (decode-time patching runs two
models in lockstep and patches one layer's last-position state at every step; SAE trajectories
read a latent at each step): attach hooks with :func:`em_interp.hooks.attached` around a call.
``prefill`` runs under ``generated_positions(all False)`` and ``decode_step`` under
``generated_positions(all True)`` (:func:`em_interp.behaviour.interventions.generated_positions`), which is
how ``steer(..., positions="generated")`` knows which positions to steer. Analyses that only
need to act on (or read) each forward use ``generate(..., step_hook=...)`` instead of a loop of
their own: the hook is called before every forward with the step, the tokens fed and which batch
rows are still live, and returns hooks for that forward (:data:`StepHook`;
:mod:`em_interp.patching.generation` runs a second model in lockstep this way).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from tqdm.auto import tqdm
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

from em_interp.atomic import atomic_write_bytes
from em_interp.behaviour.interventions import as_intervention, generated_positions
from em_interp.data import user_text
from em_interp.errors import ConfigError, DataError, StoreMismatchError
from em_interp.hooks import attached
from em_interp.inputs import (
    as_prompt_list,
    describe_model,
    left_pad,
    model_device,
    prompts_hash,
    tokenize,
    tokenizer_of,
    unwrap,
)
from em_interp.models.chat import ChatTokens
from em_interp.results import Result

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
STOP_REASONS = ("eos", "max_new_tokens")

StepHook = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor],
                    Sequence[tuple[str, Callable]] | None]
"""``step_hook(step, tokens, attention_mask, rows) -> fwd_hooks or None``, called by
:func:`generate` before every forward of a batch: ``step == 0`` is the prefill (``tokens`` is
the left-padded prompt batch ``[batch, pos]``, a new batch starts), ``step >= 1`` the decode step
that feeds the ``step``-th generated token (``tokens`` is ``[live, 1]``, ``attention_mask`` all
ones). ``rows`` gives, for each row of ``tokens``, its index in the step-0 batch (finished rows
leave the batch). The returned ``(hook_name, fn)`` pairs are attached for that forward only."""


# ------------------------------------------------------------------ step functions


@dataclass
class DecodeState:
    """What :func:`decode_step` needs between steps: the KV cache and which rows are live."""

    cache: TransformerLensKeyValueCache
    """Keys/values of every position so far (prompt and generated), per layer."""
    rows: Int[torch.Tensor, " batch"]
    """For each live row, its index in the batch given to :func:`prefill`."""
    n_prompt: int
    """Width of the (left-padded) prompt batch."""
    n_generated: int = 0
    """Decode steps run so far."""

    @property
    def attention_mask(self) -> Int[torch.Tensor, "batch pos"]:
        """The mask of every cached position (prompt padding is 0)."""
        return self.cache.previous_attention_mask

    def __len__(self) -> int:
        return int(self.rows.shape[0])


def _last_logits(tl, resid: torch.Tensor) -> Float[torch.Tensor, "batch d_vocab"]:
    """Final norm and unembedding of the last position only."""
    x = resid[:, -1:]
    x = x.to(tl.unembed.W_U.device)
    if tl.cfg.normalization_type is not None:
        x = tl.ln_final(x)
    logits = tl.unembed(x)[:, 0]
    cap = getattr(tl.cfg, "output_logits_soft_cap", -1.0)
    if cap is not None and cap > 0:
        logits = cap * torch.tanh(logits / cap)
    return logits


def prefill(model, tokens: Int[torch.Tensor, "batch pos"],
            attention_mask: Int[torch.Tensor, "batch pos"] | None = None
            ) -> tuple[Float[torch.Tensor, "batch d_vocab"], DecodeState]:
    """Run a left-padded prompt batch once, filling a fresh KV cache.

    Args:
        model: a ``Loaded`` or ``HookedTransformer``.
        tokens: prompt ids, left-padded (e.g. ``tokenize(model, prompts).tokens``).
        attention_mask: 1 for real tokens; default all ones.

    Returns:
        The next-token logits at each row's last position ``[batch, d_vocab]``, and the
        :class:`DecodeState` to pass to :func:`decode_step`.
    """
    tl = unwrap(model)
    device = model_device(model)
    tokens = tokens.to(device)
    mask = (torch.ones_like(tokens) if attention_mask is None else attention_mask).to(device)
    cache = TransformerLensKeyValueCache.init_cache(tl.cfg, tl.cfg.device, tokens.shape[0])
    with generated_positions(torch.zeros(tokens.shape, dtype=torch.bool, device=device)):
        resid = tl(tokens, attention_mask=mask, past_kv_cache=cache,
                   stop_at_layer=tl.cfg.n_layers)
    state = DecodeState(cache=cache, rows=torch.arange(tokens.shape[0]),
                        n_prompt=tokens.shape[1])
    return _last_logits(tl, resid), state


def decode_step(model, state: DecodeState, next_tokens: Int[torch.Tensor, " batch"]
                ) -> Float[torch.Tensor, "batch d_vocab"]:
    """Feed one new token per live row through the model, reusing (and extending) the cache.

    Args:
        model: the model given to :func:`prefill`.
        state: the state from :func:`prefill` (updated in place).
        next_tokens: ``[batch]`` the token chosen for each live row.

    Returns:
        The next-token logits ``[batch, d_vocab]``.
    """
    tl = unwrap(model)
    device = model_device(model)
    toks = next_tokens.reshape(-1, 1).to(device)
    if toks.shape[0] != len(state):
        raise ConfigError(f"decode_step got {toks.shape[0]} tokens for {len(state)} live rows.")
    ones = torch.ones_like(toks)
    with generated_positions(torch.ones(toks.shape, dtype=torch.bool, device=device)):
        resid = tl(toks, attention_mask=ones, past_kv_cache=state.cache,
                   stop_at_layer=tl.cfg.n_layers)
    state.n_generated += 1
    return _last_logits(tl, resid)


def keep_rows(state: DecodeState, keep: Int[torch.Tensor, " n_keep"]) -> None:
    """Drop finished rows: keep only the live rows at positions ``keep`` (indices into the
    current live rows), in place."""
    keep = keep.to(torch.long)
    cache = state.cache
    for entry in cache.entries:
        idx = keep.to(entry.past_keys.device)
        entry.past_keys = entry.past_keys.index_select(0, idx)
        entry.past_values = entry.past_values.index_select(0, idx)
    cache.previous_attention_mask = cache.previous_attention_mask.index_select(
        0, keep.to(cache.previous_attention_mask.device))
    state.rows = state.rows.index_select(0, keep.to(state.rows.device))


def row_generator(seed: int, prompt_index: int, sample: int) -> torch.Generator:
    """The CPU generator of one (prompt, sample): the same numbers whatever the batch."""
    digest = hashlib.sha256(f"{seed}:{prompt_index}:{sample}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def sample_next(logits: Float[torch.Tensor, "batch d_vocab"], *, temperature: float = 0.0,
                top_p: float = 1.0, generators: Sequence[torch.Generator] | None = None
                ) -> Int[torch.Tensor, " batch"]:
    """Choose one token per row: argmax when ``temperature == 0``, else nucleus sampling.

    Args:
        logits: next-token logits.
        temperature: softmax temperature; 0 means greedy.
        top_p: keep the smallest set of most likely tokens whose probability reaches ``top_p``.
        generators: one ``torch.Generator`` per row (needed when sampling).

    Returns:
        ``[batch]`` token ids.
    """
    if temperature == 0:
        return logits.argmax(-1)
    if generators is None or len(generators) != logits.shape[0]:
        raise ConfigError("sampling needs one torch.Generator per row (see row_generator).")
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
    cdf = sorted_p.cumsum(-1)
    if top_p < 1.0:
        cut = (cdf - sorted_p) >= top_p  # tokens entirely beyond the nucleus
        sorted_p = sorted_p.masked_fill(cut, 0.0)
        cdf = sorted_p.cumsum(-1)
    u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in generators])
    target = (u.to(cdf.device) * cdf[:, -1].double()).unsqueeze(-1)
    idx = torch.searchsorted(cdf.double(), target).clamp_max(cdf.shape[-1] - 1)
    return order.gather(-1, idx).squeeze(-1)


# ------------------------------------------------------------------ the lean decode step

# Hook points the lean step calls with exactly the activations TL's decode step gives them (the
# new position only). A hook anywhere else (``ln1.*``, which TL runs three times per block;
# ``attn.hook_rot_k``, which TL gives every cached key; scores and pattern; a torch hook on a
# module) makes ``generate`` keep TL's own forward.
_LEAN_BLOCK_POINTS = ("hook_resid_pre", "attn.hook_q", "attn.hook_k", "attn.hook_v",
                      "attn.hook_rot_q", "attn.hook_z", "hook_attn_out", "hook_resid_mid",
                      "ln2.hook_scale", "ln2.hook_normalized", "mlp.hook_pre",
                      "mlp.hook_pre_linear", "mlp.hook_post", "hook_mlp_out", "hook_resid_post")
_LEAN_TOP_POINTS = ("hook_embed", "ln_final.hook_scale", "ln_final.hook_normalized",
                    "unembed.hook_in", "unembed.hook_out")


def lean_decode_blocker(model) -> str | None:
    """Why :func:`generate` cannot use its lean decode step on ``model`` now, or ``None``.

    The lean step (:class:`LeanDecoder`) covers pre-norm RMSNorm decoders with rotary
    attention (multi-head or grouped-query) and a gated MLP (Llama, Qwen2, Mistral), on one
    device, with hooks only at the points it reproduces.
    """
    from transformer_lens.components import GatedMLP, RMSNorm, RMSNormPre, TransformerBlock
    from transformer_lens.components.abstract_attention import AbstractAttention
    from transformer_lens.hook_points import HookPoint
    from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

    tl = unwrap(model)
    cfg = tl.cfg
    off = {"positional_embedding_type": cfg.positional_embedding_type != "rotary",
           "rotary_adjacent_pairs": cfg.rotary_adjacent_pairs,
           "use_dynamic_ntk_rope": getattr(cfg, "use_dynamic_ntk_rope", False),
           "use_logn_attn": getattr(cfg, "use_logn_attn", False),
           "use_qk_norm": getattr(cfg, "use_qk_norm", False),
           "use_attention_sinks": getattr(cfg, "use_attention_sinks", False),
           "clip_qkv": getattr(cfg, "clip_qkv", None) is not None,
           "attn_types": cfg.attn_types is not None and any(t != "global"
                                                           for t in cfg.attn_types),
           "attention_dir": cfg.attention_dir != "causal",
           "attn_scores_soft_cap": (cfg.attn_scores_soft_cap or -1) > 0,
           "use_attn_result": cfg.use_attn_result, "use_attn_in": cfg.use_attn_in,
           "use_split_qkv_input": cfg.use_split_qkv_input,
           "use_hook_mlp_in": cfg.use_hook_mlp_in, "use_hook_tokens": cfg.use_hook_tokens,
           "parallel_attn_mlp": cfg.parallel_attn_mlp, "attn_only": cfg.attn_only,
           "post_embedding_ln": getattr(cfg, "post_embedding_ln", False),
           "use_normalization_before_and_after": cfg.use_normalization_before_and_after,
           "original_architecture": cfg.original_architecture in POST_NORM_ARCHITECTURES,
           "ungroup_grouped_query_attention": getattr(
               cfg, "ungroup_grouped_query_attention", False),
           "load_in_4bit": cfg.load_in_4bit, "n_devices": cfg.n_devices != 1,
           "act_fn": not cfg.gated_mlp or cfg.is_layer_norm_activation()}
    bad = sorted(k for k, v in off.items() if v)
    if bad:
        return f"config {bad}"
    for blk in tl.blocks:
        if (type(blk) is not TransformerBlock or type(blk.mlp) is not GatedMLP
                or type(blk.ln1) not in (RMSNorm, RMSNormPre)
                or type(blk.ln2) not in (RMSNorm, RMSNormPre)
                or not isinstance(blk.attn, AbstractAttention)
                or getattr(blk.attn, "_attention_dir_override", None) not in (None, "causal")):
            return f"block type {type(blk).__name__}/{type(blk.attn).__name__}"
    if torch.nn.modules.module._global_forward_hooks or \
            torch.nn.modules.module._global_forward_pre_hooks:
        return "a global torch module hook"
    allowed = set(_LEAN_TOP_POINTS) | {f"blocks.{i}.{p}" for i in range(cfg.n_layers)
                                       for p in _LEAN_BLOCK_POINTS}
    for name, m in tl.named_modules():
        if m._forward_hooks or m._forward_pre_hooks:
            if not isinstance(m, HookPoint) or name not in allowed or m._forward_pre_hooks:
                return f"a hook on {name or 'the model'}"
    return None


def _hooked(module, names) -> dict[str, Callable]:
    """The hook points among ``names`` (dotted, under ``module``) that have a forward hook."""
    out = {}
    for n in names:
        hp = module.get_submodule(n)
        if hp._forward_hooks:
            out[n] = hp
    return out


class LeanDecoder:
    """Decode steps with the arithmetic of TL's decode step, without its per-step overhead.

    TL's decode step concatenates each layer's cache, re-applies the rotary embedding to *every*
    cached key, repeats the grouped keys and values to all heads, rebuilds the causal mask, runs
    ``ln1`` three times and calls ~20 hook points per block whether or not they hold a hook.
    Here the rotated keys and values live in buffers allocated once for the whole completion,
    the new position is written in place, attention is one ``scaled_dot_product_attention``
    over the filled part with a boolean padding mask (grouped-query natively), and only hook
    points that hold a hook are called -- with the same activations as in TL (the new position;
    :func:`lean_decode_blocker` lists the points that qualify). Norms, projections, MLP and
    unembedding are TL's formulas on TL's own weights (in HF's storage order they are views,
    no copy), so the logits equal TL's to float rounding.

    Built from the :class:`DecodeState` that :func:`prefill` returns (its cached keys are
    rotated once, at their own positions).
    """

    def __init__(self, model, state: DecodeState, max_steps: int):
        tl = self.tl = unwrap(model)
        cfg = tl.cfg
        mask = state.attention_mask.bool()
        b, n = mask.shape
        self.n = n
        self.mask = torch.zeros(b, n + max_steps, dtype=torch.bool, device=mask.device)
        self.mask[:, :n] = mask
        self.pos = mask.sum(1)  # the position id of each row's next token
        self.top = _hooked(tl, _LEAN_TOP_POINTS)
        self.layers = []
        for blk, entry in zip(tl.blocks, state.cache.entries, strict=True):
            a, mlp = blk.attn, blk.mlp
            grouped = hasattr(a, "_W_K") and not getattr(cfg, "ungroup_grouped_query_attention",
                                                          False)
            wk, bk = (a._W_K, a._b_K) if grouped else (a.W_K, a.b_K)
            wv, bv = (a._W_V, a._b_V) if grouped else (a.W_V, a.b_V)
            n_kv = wk.shape[0]
            keys = a.apply_rotary(entry.past_keys, 0, mask.long())
            kbuf = torch.empty(b, n_kv, n + max_steps, cfg.d_head, dtype=keys.dtype,
                               device=keys.device)
            vbuf = torch.empty_like(kbuf)
            kbuf[:, :, :n] = keys.transpose(1, 2)
            vbuf[:, :, :n] = entry.past_values.transpose(1, 2)
            self.layers.append({
                "blk": blk, "attn": a, "k": kbuf, "v": vbuf,
                "wq": a.W_Q.permute(0, 2, 1).reshape(-1, cfg.d_model), "bq": a.b_Q.reshape(-1),
                "wk": wk.permute(0, 2, 1).reshape(-1, cfg.d_model), "bk": bk.reshape(-1),
                "wv": wv.permute(0, 2, 1).reshape(-1, cfg.d_model), "bv": bv.reshape(-1),
                "wo": a.W_O.permute(2, 0, 1).reshape(cfg.d_model, -1), "bo": a.b_O,
                "wg": mlp.W_gate.T.contiguous(), "wi": mlp.W_in.T.contiguous(),
                "wout": mlp.W_out.T.contiguous(), "bout": mlp.b_out,
                "bin": None if not bool(mlp.b_in.any()) else mlp.b_in, "act": mlp.act_fn,
                "w1": getattr(blk.ln1, "w", None), "w2": getattr(blk.ln2, "w", None),
                "scale": 1.0 / a.attn_scale, "n_kv": n_kv, "gqa": n_kv != cfg.n_heads,
                "hooks": _hooked(blk, _LEAN_BLOCK_POINTS)})

    def __len__(self) -> int:
        return int(self.pos.shape[0])

    def keep(self, keep: Int[torch.Tensor, " n_keep"]) -> None:
        """Keep only the live rows at positions ``keep`` (as :func:`keep_rows`)."""
        idx = keep.to(torch.long).to(self.mask.device)
        self.mask, self.pos = self.mask.index_select(0, idx), self.pos.index_select(0, idx)
        for layer in self.layers:
            layer["k"] = layer["k"].index_select(0, idx)
            layer["v"] = layer["v"].index_select(0, idx)

    def _norm(self, x, w, hooks, prefix):
        """TL's ``RMSNorm`` (``RMSNormPre`` when ``w`` is None), with its hook points."""
        dtype = self.tl.cfg.dtype
        if dtype not in (torch.float32, torch.float64):
            x = x.to(torch.float32)
        scale = (x.pow(2).mean(-1, keepdim=True) + self.tl.cfg.eps).sqrt()
        if (h := hooks.get(prefix + "hook_scale")) is not None:
            scale = h(scale)
        x = x / scale
        if (h := hooks.get(prefix + "hook_normalized")) is not None:
            x = h(x)
        x = x.to(dtype)
        return x if w is None else x * w

    def _rotate(self, x, cos, sin):
        """TL's rotary embedding (``rotate_every_two`` with halves) at the given positions."""
        rd = cos.shape[-1]
        xr = x[..., :rd] if rd < x.shape[-1] else x
        half = rd // 2
        flip = torch.cat((-xr[..., half:], xr[..., :half]), dim=-1)
        out = xr * cos + flip * sin
        return out if rd == x.shape[-1] else torch.cat((out, x[..., rd:]), dim=-1)

    def step(self, next_tokens: Int[torch.Tensor, " batch"]) -> Float[torch.Tensor, "batch d_vocab"]:
        """Feed one token per live row; return the next-token logits ``[batch, d_vocab]``."""
        tl, cfg, t = self.tl, self.tl.cfg, self.n
        b = int(next_tokens.shape[0])
        n_heads, d_head = cfg.n_heads, cfg.d_head
        self.mask[:, t] = True
        keep = self.mask[:, None, None, :t + 1]
        pos = self.pos
        tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        with generated_positions(torch.ones(b, 1, dtype=torch.bool, device=pos.device)):
            x = tl.embed(next_tokens.reshape(b, 1).to(self.mask.device))
            if (h := self.top.get("hook_embed")) is not None:
                x = h(x)
            for layer in self.layers:
                hk, a = layer["hooks"], layer["attn"]
                if (h := hk.get("hook_resid_pre")) is not None:
                    x = h(x)
                y = self._norm(x, layer["w1"], hk, "ln1.")
                q = F.linear(y, layer["wq"], layer["bq"]).view(b, 1, n_heads, d_head)
                k = F.linear(y, layer["wk"], layer["bk"]).view(b, 1, layer["n_kv"], d_head)
                v = F.linear(y, layer["wv"], layer["bv"]).view(b, 1, layer["n_kv"], d_head)
                if (h := hk.get("attn.hook_q")) is not None:
                    q = h(q)
                if (h := hk.get("attn.hook_k")) is not None:
                    k = h(k)
                if (h := hk.get("attn.hook_v")) is not None:
                    v = h(v)
                key = a.rotary_cos.data_ptr()
                if key not in tables:
                    tables[key] = (a.rotary_cos[pos][:, None, None, :],
                                   a.rotary_sin[pos][:, None, None, :])
                cos, sin = tables[key]
                q = self._rotate(q, cos, sin)
                if (h := hk.get("attn.hook_rot_q")) is not None:
                    q = h(q)
                layer["k"][:, :, t] = self._rotate(k, cos, sin)[:, 0]
                layer["v"][:, :, t] = v[:, 0]
                z = F.scaled_dot_product_attention(
                    q.transpose(1, 2), layer["k"][:, :, :t + 1], layer["v"][:, :, :t + 1],
                    attn_mask=keep, scale=layer["scale"], enable_gqa=layer["gqa"])
                z = z.transpose(1, 2)  # [batch, 1, head, d_head], as attn.hook_z
                if (h := hk.get("attn.hook_z")) is not None:
                    z = h(z)
                out = F.linear(z.reshape(b, 1, n_heads * d_head), layer["wo"], layer["bo"])
                if (h := hk.get("hook_attn_out")) is not None:
                    out = h(out)
                x = x + out
                if (h := hk.get("hook_resid_mid")) is not None:
                    x = h(x)
                y = self._norm(x, layer["w2"], hk, "ln2.")
                pre = F.linear(y, layer["wg"])
                if (h := hk.get("mlp.hook_pre")) is not None:
                    pre = h(pre)
                lin = F.linear(y, layer["wi"])
                if (h := hk.get("mlp.hook_pre_linear")) is not None:
                    lin = h(lin)
                post = layer["act"](pre) * lin
                if layer["bin"] is not None:
                    post = post + layer["bin"]
                if (h := hk.get("mlp.hook_post")) is not None:
                    post = h(post)
                out = F.linear(post, layer["wout"], layer["bout"])
                if (h := hk.get("hook_mlp_out")) is not None:
                    out = h(out)
                x = x + out
                if (h := hk.get("hook_resid_post")) is not None:
                    x = h(x)
        self.n += 1
        self.pos = pos + 1
        return _last_logits(tl, x)


# ------------------------------------------------------------------ result


@dataclass(frozen=True)
class GenerationResult(Result):
    """Completions, one row per (prompt, sample)."""

    kind = "generation"

    table: pd.DataFrame
    """Columns ``prompt_index, prompt, sample, completion, n_tokens, stop_reason, tokens``."""
    settings: dict = field(default_factory=dict)
    """The generation settings (the JSONL header)."""
    interventions: dict = field(default_factory=dict)
    """``describe()`` of the interventions that were active."""
    intervention_state: dict = field(default_factory=dict)
    """Their tensors (reference means, directions), saved with the result."""

    @property
    def df(self) -> pd.DataFrame:
        """One row per (prompt, sample); ``n_tokens`` excludes the stop token."""
        return self.table

    @property
    def completions(self) -> list[str]:
        """The completions in row order."""
        return self.table["completion"].tolist()

    def to_dict(self) -> dict:
        t = self.table
        return {"n_rows": len(t), "n_prompts": int(t["prompt_index"].nunique()) if len(t) else 0,
                "mean_n_tokens": float(t["n_tokens"].mean()) if len(t) else None,
                "frac_eos": float((t["stop_reason"] == "eos").mean()) if len(t) else None,
                "settings": {k: v for k, v in self.settings.items() if k != "model"},
                "interventions": self.interventions}

    def figure(self, title: str | None = None):
        """Histogram of completion lengths, coloured by stop reason."""
        import plotly.graph_objects as go

        fig = go.Figure()
        for reason in STOP_REASONS:
            sub = self.table[self.table["stop_reason"] == reason]
            if len(sub):
                fig.add_trace(go.Histogram(x=sub["n_tokens"], name=reason, opacity=0.75))
        fig.update_layout(barmode="overlay", template="plotly_white",
                          title=title or "Completion lengths",
                          xaxis_title="generated tokens", yaxis_title="completions")
        return fig


# ------------------------------------------------------------------ prompts




def _prompt_rows(model, prompts, system: str | None) -> tuple[list[list[int]], list[str], str]:
    """Unpadded token ids and a display text per prompt, and a hash of the input."""
    if isinstance(prompts, ChatTokens) or torch.is_tensor(prompts) or (
            isinstance(prompts, tuple) and len(prompts) == 2 and torch.is_tensor(prompts[0])):
        ct = tokenize(model, prompts)
        rows = [ct.tokens[i][ct.attention_mask[i].bool()].tolist() for i in range(len(ct))]
        tok = getattr(model, "tokenizer", None)
        texts = [t or (tok.decode(r) if tok is not None else "") for t, r in zip(
            ct.texts, rows, strict=True)]
        return rows, texts, prompts_hash(prompts)
    items = as_prompt_list(prompts)
    ct = tokenize(model, items, system=system)
    rows = [ct.tokens[i][ct.attention_mask[i].bool()].tolist() for i in range(len(ct))]
    return rows, [user_text(p) for p in items], prompts_hash(items, system=system)


def stop_token_ids(model, extra: Sequence[int | str] | None = None) -> list[int]:
    """The ids that end a completion: the tokenizer's EOS, the ``eos_token_id`` of the weights'
    ``generation_config.json`` (as HF ``generate`` uses), and ``extra`` (ids or single tokens)."""
    ids: list[int] = []
    tok = getattr(model, "tokenizer", None) or getattr(unwrap(model), "tokenizer", None)
    if tok is not None and tok.eos_token_id is not None:
        ids.append(int(tok.eos_token_id))
    wdir = getattr(model, "weights_dir", None)
    if wdir is not None and (Path(wdir) / "generation_config.json").is_file():
        eos = json.loads((Path(wdir) / "generation_config.json").read_text()).get("eos_token_id")
        ids += [int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
    for e in extra or ():
        if isinstance(e, str):
            from em_interp.inputs import single_token_id

            ids.append(single_token_id(tokenizer_of(model), e))
        else:
            ids.append(int(e))
    return sorted(set(ids))


# ------------------------------------------------------------------ JSONL store


def _read_store(path: Path, header: dict) -> dict[tuple[int, int], dict]:
    """Rows already in ``path`` (a partial last line is cut off); a mismatching header raises."""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        log.warning("%s: dropping an unfinished last line (an interrupted run)", path)
        with path.open("r+b") as fh:
            fh.truncate(end)
        data = data[:end]
    lines = data.decode("utf-8").splitlines()
    if not lines:
        raise DataError(f"{path}: the file is empty; delete it to start again.")
    try:
        first = json.loads(lines[0])
    except json.JSONDecodeError:
        first = None
    if not isinstance(first, dict) or "__header__" not in first:
        raise StoreMismatchError(f"{path} is not a generation file (no header line); pass another "
                                 "out_path or delete it.")
    saved = first["__header__"]
    if saved != header:
        diff = sorted(k for k in set(saved) | set(header) if saved.get(k) != header.get(k))
        detail = "; ".join(f"{k}: file {saved.get(k)!r} vs now {header.get(k)!r}"
                           for k in diff)[:800]
        raise StoreMismatchError(f"{path} was written with other settings ({detail}). Use the "
                                 "same settings to resume, or another out_path (or delete the "
                                 "file) to start again.")
    done = {}
    for lineno, line in enumerate(lines[1:], 2):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}); delete the line or the "
                            "file.") from None
        done[(int(row["prompt_index"]), int(row["sample"]))] = row
    return done


def _append_lines(path: Path, lines: list[str]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        for line in lines:  # one write per row: a crash leaves at most one partial last line
            os.write(fd, (line + "\n").encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------ generate


@torch.no_grad()
def generate(model, prompts, *, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, n_samples: int = 1, seed: int = 0, batch_size: int = 8,
             interventions=(), stop_at_eos: bool = True, out_path: str | Path | None = None,
             progress: bool = True, system: str | None = None,
             stop_tokens: Sequence[int | str] | None = None,
             step_hook: StepHook | None = None) -> GenerationResult:
    """Generate completions of chat prompts under interventions (see the module docstring).

    Args:
        model: a ``Loaded`` (or a ``HookedTransformer`` with a tokenizer).
        prompts: user messages, conversations, a ``PromptSet``, or ``ChatTokens``.
        max_new_tokens: most tokens to generate per completion.
        temperature: 0 for greedy; the EM evaluations sample at 1.
        top_p: nucleus sampling mass (1 keeps every token).
        n_samples: completions per prompt.
        seed: seed of the per-(prompt, sample) generators.
        batch_size: completions generated together.
        interventions: an intervention, a list of them, or ``None``; active for every forward
            (attached to ``model``).
        stop_at_eos: stop a completion at a stop token (:func:`stop_token_ids`).
        out_path: JSONL file to append finished rows to and resume from.
        progress: show a progress bar.
        system: system prompt for text prompts.
        stop_tokens: extra stop tokens (ids, or strings that are one token).
        step_hook: called before every forward of a batch with ``(step, tokens,
            attention_mask, rows)``; the forward hooks it returns are attached for that forward
            only (see :data:`StepHook`). Decode-time patching (running a second model in
            lockstep) and per-step readouts are built on it. Its ``__qualname__`` goes into the
            settings; state it keeps between steps must be reset at ``step == 0``.

    Returns:
        A :class:`GenerationResult` with one row per (prompt, sample), sorted.
    """
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    if temperature < 0:
        raise ConfigError(f"temperature must be >= 0, got {temperature}.")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p}.")
    if n_samples < 1 or batch_size < 1:
        raise ConfigError(f"n_samples and batch_size must be >= 1, got {n_samples}, "
                          f"{batch_size}.")
    if temperature == 0 and n_samples > 1:
        log.warning("temperature=0 with n_samples=%d: greedy samples are identical", n_samples)
    tl = unwrap(model)
    iv = as_intervention(interventions)
    rows, texts, p_hash = _prompt_rows(model, prompts, system)
    stops = stop_token_ids(model, stop_tokens) if stop_at_eos else []
    tok = getattr(model, "tokenizer", None) or tl.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else (stops[0] if stops else 0)
    header = {"format": FORMAT_VERSION, "max_new_tokens": max_new_tokens,
              "temperature": temperature, "top_p": top_p, "n_samples": n_samples, "seed": seed,
              "stop_at_eos": stop_at_eos, "stop_tokens": stops, "system": system,
              "n_prompts": len(rows), "prompts_hash": p_hash, "model": describe_model(model),
              "interventions": iv.describe()}
    if step_hook is not None:
        header["step_hook"] = getattr(step_hook, "__qualname__", type(step_hook).__qualname__)
    header = json.loads(json.dumps(header))  # JSON-normalised, as it is read back

    done: dict[tuple[int, int], dict] = {}
    path = Path(out_path) if out_path is not None else None
    if path is not None:
        if path.is_file() and path.stat().st_size > 0:
            done = _read_store(path, header)
        else:
            atomic_write_bytes(path, (json.dumps({"__header__": header}) + "\n").encode())
    todo = [(i, s) for i in range(len(rows)) for s in range(n_samples) if (i, s) not in done]
    device = model_device(model)
    bar = tqdm(total=len(rows) * n_samples, initial=len(done), desc="generate",
               disable=not progress)
    with iv.applied(tl):
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            new = _generate_chunk(tl, [rows[i] for i, _ in chunk], chunk, pad=pad, stops=stops,
                                  max_new_tokens=max_new_tokens, temperature=temperature,
                                  top_p=top_p, seed=seed, device=device, step_hook=step_hook)
            out = []
            for (i, s), (ids, reason) in zip(chunk, new, strict=True):
                row = {"prompt_index": i, "prompt": texts[i], "sample": s,
                       "completion": tok.decode(ids, skip_special_tokens=True),
                       "n_tokens": len(ids), "stop_reason": reason, "tokens": ids}
                done[(i, s)] = row
                out.append(json.dumps(row, ensure_ascii=False))
            if path is not None:
                _append_lines(path, out)
            bar.update(len(chunk))
    bar.close()
    table = pd.DataFrame([done[k] for k in sorted(done)],
                         columns=["prompt_index", "prompt", "sample", "completion", "n_tokens",
                                  "stop_reason", "tokens"])
    return GenerationResult(table=table, settings=header, interventions=iv.describe(),
                            intervention_state=iv.state())


def _generate_chunk(tl, rows: list[list[int]], keys: list[tuple[int, int]], *, pad: int,
                    stops: list[int], max_new_tokens: int, temperature: float, top_p: float,
                    seed: int, device, step_hook: StepHook | None = None
                    ) -> list[tuple[list[int], str]]:
    """The sampling loop of one batch: prefill, then one decode step per token; finished rows
    leave the batch. ``step_hook`` (see :data:`StepHook`) may attach hooks to each forward."""
    batch = left_pad(rows, pad, device=device)
    tokens, mask = batch.tokens, batch.attention_mask
    gens = [row_generator(seed, i, s) for i, s in keys] if temperature > 0 else None
    out: list[list[int]] = [[] for _ in rows]
    reason = ["max_new_tokens"] * len(rows)
    stop_set = set(stops)
    with _step_hooks(tl, step_hook, 0, tokens, mask, torch.arange(len(rows))):
        logits, state = prefill(tl, tokens, mask)
    lean = None
    if step_hook is None and max_new_tokens > 1 and lean_decode_blocker(tl) is None and (
            tokens.shape[1] + max_new_tokens <= tl.blocks[0].attn.rotary_cos.shape[0]):
        lean = LeanDecoder(tl, state, max_new_tokens)
    live = list(range(len(rows)))
    for step in range(max_new_tokens):
        nxt = sample_next(logits, temperature=temperature, top_p=top_p,
                          generators=None if gens is None else [gens[i] for i in live])
        keep = []
        for j, (i, t) in enumerate(zip(live, nxt.tolist(), strict=True)):
            if t in stop_set:
                reason[i] = "eos"
            else:
                out[i].append(t)
                keep.append(j)
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(live):
            idx = torch.tensor(keep)
            if lean is None:
                keep_rows(state, idx)
            else:
                lean.keep(idx)
            nxt = nxt[idx.to(nxt.device)]
            live = [live[j] for j in keep]
        if lean is not None:
            logits = lean.step(nxt)
            continue
        toks = nxt.reshape(-1, 1)
        with _step_hooks(tl, step_hook, step + 1, toks, torch.ones_like(toks), state.rows):
            logits = decode_step(tl, state, nxt)
    return [(o, r) for o, r in zip(out, reason, strict=True)]


def _step_hooks(tl, step_hook: StepHook | None, step: int, tokens: torch.Tensor,
                mask: torch.Tensor, rows: torch.Tensor):
    """Attach the hooks ``step_hook`` returns for this forward (nothing without a hook)."""
    if step_hook is None:
        return contextlib.nullcontext()
    return attached(tl, list(step_hook(step, tokens, mask, rows) or ()))
