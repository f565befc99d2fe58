"""Activation patching (causal tracing): layer x component sweeps over prompt pairs.

For a pair ``k`` of a **source** prompt (e.g. risky) and a **destination** prompt (e.g. benign),
run the destination, replace one component's activation at layer ``l`` and the chosen
position(s) by the source's, and score the run with a metric ``S`` (a
:class:`~em_interp.metrics.Metric`: a logit difference, or the projection of a hook's activation
on a direction). The causal effect is

    Delta S(l, c, k) = S_patched(l, c, k) - S_clean(k)

where ``S_clean`` is the destination's own unpatched score. This is Experiment 3 of the Qwen
paper (Sec. III.C, Fig. 4): the **forward** patch takes K = 2500 random (risky -> benign) pairs,
and the **reverse control** takes (benign -> risky) pairs and measures the effect relative to the
risky run, ``Delta S_rev = S_patched - S_risky`` -- the same formula with the roles swapped
(:meth:`PromptPairs.reverse`). Components (Sec. III.C, "the input to ``mlp_down_proj`` or
``self_attn.o_proj``"):

* ``attn`` -- ``blocks.l.attn.hook_z`` (all heads; per head in :mod:`em_interp.patching.fine`);
* ``mlp``  -- ``blocks.l.mlp.hook_post``;
* ``resid`` -- ``blocks.l.hook_resid_pre`` (everything written before block ``l``).

**Positions.** Source and destination differ in length. ``"last"`` (the default) patches each
prompt's last real token into the destination's last real token: it is where the metric reads,
and the only position every pair has in common by meaning (the end of the chat template).
``"all_aligned"`` patches the right-aligned overlap (destination position ``-j`` gets source
position ``-j`` for ``j = 1 .. min(len_src, len_dst)``). An explicit list of ints patches those
positions together (``0`` = first real token, ``-1`` = last); a position a prompt does not have
raises :class:`~em_interp.errors.TokenizationError` before any forward.

**Speed.** ``transformer_lens.patching`` runs one forward per (pair or batch, layer, position)
over the full sequence. Here, per batch of pairs:

* the source activations are read once, only for the hooks and positions patched;
* every (layer, component) is one batched forward;
* with ``"last"``, nothing before the last token changes, so the destination's prefix keys and
  values are computed once into a frozen TransformerLens KV cache and each patched forward runs
  **one token from layer l on** (``start_at_layer=l``, ``past_kv_cache``, the attention mask);
  other position modes start the full sequence at layer ``l`` from the destination's residual;
* a metric that reads a hook stops every forward after that block (``stop_at_layer``).

Each patched run starts from bit-identical inputs to the clean run, so patching a run with its
own activations gives ``Delta S = 0`` exactly. With ``out_dir``, every (layer, batch of pairs) is
written atomically as it finishes, and a rerun skips what is done (a different model, metric,
pair set or setting raises :class:`~em_interp.errors.StoreMismatchError`).

Head-level and neuron-level patching (Experiment 4) are in :mod:`em_interp.patching.fine`,
result types and figures in :mod:`em_interp.patching.results`, the resumable folder and the
plan in :mod:`em_interp.patching.store`, and prefix / decode-time patching while generating
(BLOCK-EM F.1) in :mod:`em_interp.patching.generation`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import torch

from em_interp.errors import ConfigError, DataError, StoreMismatchError, TokenizationError
from em_interp.hooks import attached, attn_z, check_hook, check_layer, mlp_post, resid_pre
from em_interp.inputs import (
    describe_model,
    left_align,
    n_prompts,
    prompts_hash,
    token_batches,
    unwrap,
)
from em_interp.metrics import Metric
from em_interp.models.chat import ChatTokens
from em_interp.patching.results import SweepResult, site_frame
from em_interp.patching.store import PatchStore, SweepPlan, make_plan

log = logging.getLogger(__name__)

Component = Literal["resid", "attn", "mlp"]
COMPONENTS: tuple[str, ...] = ("attn", "mlp", "resid")
_HOOK_OF = {"resid": resid_pre, "attn": attn_z, "mlp": mlp_post}
STORE_VERSION = 1


# ------------------------------------------------------------------ pairs


def _take(prompts, idx: Sequence[int]):
    """The prompts at ``idx`` of any input :func:`em_interp.inputs.tokenize` accepts."""
    idx = list(idx)
    if isinstance(prompts, ChatTokens):
        return ChatTokens(prompts.tokens[idx], prompts.attention_mask[idx],
                          [prompts.texts[i] for i in idx])
    if torch.is_tensor(prompts):
        return (prompts[None] if prompts.ndim == 1 else prompts)[idx]
    if isinstance(prompts, tuple) and len(prompts) == 2 and torch.is_tensor(prompts[0]):
        return prompts[0][idx], prompts[1][idx]
    if hasattr(prompts, "subset") and hasattr(prompts, "meta"):  # a PromptSet
        return prompts.subset(idx)
    if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts
                                    and isinstance(prompts[0], dict)):
        prompts = [prompts]
    return [prompts[i] for i in idx]


@dataclass(frozen=True)
class PromptPairs:
    """K (source, destination) prompt pairs, as indices into two prompt collections.

    ``source_set`` / ``dest_set`` are anything :func:`em_interp.inputs.tokenize` accepts (lists
    of strings or conversations, a :class:`~em_interp.data.PromptSet`, token tensors,
    ``(tokens, attention_mask)``, :class:`~em_interp.models.chat.ChatTokens`); pair ``k`` is
    ``(source_set[source_index[k]], dest_set[dest_index[k]])``.
    """

    source_set: object
    dest_set: object
    source_index: tuple[int, ...]
    dest_index: tuple[int, ...]
    name: str = "pairs"
    """A label for figures, e.g. ``"forward (risky -> benign)"``."""

    def __post_init__(self):
        if len(self.source_index) != len(self.dest_index):
            raise DataError(f"pairs {self.name!r}: {len(self.source_index)} source indices for "
                            f"{len(self.dest_index)} destination indices.")
        if not self.source_index:
            raise DataError(f"pairs {self.name!r} is empty; pass at least one pair.")
        for what, idx, pool in (("source", self.source_index, self.source_set),
                                ("destination", self.dest_index, self.dest_set)):
            n = n_prompts(pool)
            bad = [i for i in idx if not 0 <= i < n]
            if bad:
                raise DataError(f"pairs {self.name!r}: {what} index {bad[0]} is out of range "
                                f"for {n} prompts.")

    def __len__(self) -> int:
        return len(self.source_index)

    @classmethod
    def from_lists(cls, sources, dests, name: str = "pairs") -> PromptPairs:
        """Pair ``sources[k]`` with ``dests[k]`` (equal lengths)."""
        ns, nd = n_prompts(sources), n_prompts(dests)
        if ns != nd:
            raise DataError(f"{ns} sources for {nd} destinations; pass equal numbers, or use "
                            "sample_pairs to draw random pairs.")
        return cls(sources, dests, tuple(range(ns)), tuple(range(nd)), name)

    @property
    def sources(self):
        """The source prompt of every pair, in pair order."""
        return _take(self.source_set, self.source_index)

    @property
    def dests(self):
        """The destination prompt of every pair, in pair order."""
        return _take(self.dest_set, self.dest_index)

    def reverse(self, name: str | None = None) -> PromptPairs:
        """The same pairs with source and destination swapped (the reverse control)."""
        return PromptPairs(self.dest_set, self.source_set, self.dest_index, self.source_index,
                     name or f"reverse of {self.name}")

    def unique_sources(self):
        """Each source prompt once (for statistics over the source set)."""
        return _take(self.source_set, sorted(set(self.source_index)))

    def unique_dests(self):
        """Each destination prompt once."""
        return _take(self.dest_set, sorted(set(self.dest_index)))

    def hash(self) -> str:
        """A stable hash of the pair prompts, in order."""
        h = hashlib.sha256()
        for part in (prompts_hash(self.sources), prompts_hash(self.dests)):
            h.update(part.encode())
        return h.hexdigest()[:16]


def sample_pairs(source_prompts, dest_prompts, k: int, seed: int = 0, *,
                 name: str = "pairs") -> PromptPairs:
    """``k`` distinct random (source, destination) pairs, uniformly from all combinations.

    The Qwen paper samples K = 2500 risky -> benign pairs (Sec. III.C); its reverse control is
    ``sample_pairs(...).reverse()`` (or a fresh draw with the sets swapped).

    Args:
        source_prompts: The source prompt set (any prompt input, e.g. a PromptSet).
        dest_prompts: The destination prompt set.
        k: Number of pairs; at most ``len(source_prompts) * len(dest_prompts)``.
        seed: Seed of the draw (same seed, same pairs).
        name: A label for the pairs.

    Returns:
        The :class:`PromptPairs`.
    """
    ns, nd = n_prompts(source_prompts), n_prompts(dest_prompts)
    if not 1 <= k <= ns * nd:
        raise DataError(f"cannot draw {k} distinct pairs from {ns} sources x {nd} destinations;"
                        f" pass 1 <= k <= {ns * nd}.")
    flat = random.Random(seed).sample(range(ns * nd), k)
    return PromptPairs(source_prompts, dest_prompts, tuple(f // nd for f in flat),
                 tuple(f % nd for f in flat), name)


def as_prompt_pairs(pairs) -> PromptPairs:
    """A :class:`PromptPairs` from ``PromptPairs``, a tuple ``(sources, dests)`` or a list of 2-tuples."""
    if isinstance(pairs, PromptPairs):
        return pairs
    if isinstance(pairs, tuple) and len(pairs) == 2:
        return PromptPairs.from_lists(pairs[0], pairs[1])
    if isinstance(pairs, list) and pairs and all(isinstance(p, tuple) and len(p) == 2
                                                 for p in pairs):
        return PromptPairs.from_lists([p[0] for p in pairs], [p[1] for p in pairs])
    raise DataError("pairs must be a PromptPairs (see sample_pairs), a tuple (sources, dests) or a "
                    f"list of (source, dest) tuples; got {type(pairs).__name__}.")


# ------------------------------------------------------------------ config and sites


@dataclass(frozen=True)
class PatchingConfig:
    """Settings of a patching run (written to ``cfg.json`` beside a resumable run)."""

    components: tuple[str, ...] = COMPONENTS
    """Which components to patch at every layer: ``"attn"``, ``"mlp"``, ``"resid"``."""
    layers: tuple[int, ...] | None = None
    """Layers (0-indexed); ``None`` = every layer up to the one the metric reads."""
    position: str | tuple[int, ...] = "last"
    """``"last"``, ``"all_aligned"`` or explicit positions of the real tokens (``-1`` = last)."""
    batch_size: int = 16
    """Pairs per batched forward."""
    use_kv_cache: bool = True
    """With ``position="last"``: reuse the destination's prefix KV cache and run one token
    from layer l on. ``False`` runs the full sequence (slower, the same numbers)."""

    def __post_init__(self):
        comps = tuple(self.components)
        bad = [c for c in comps if c not in COMPONENTS]
        if not comps or bad or len(set(comps)) != len(comps):
            raise ConfigError(f"components {list(comps)!r}: pass distinct names from "
                              f"{list(COMPONENTS)}.")
        object.__setattr__(self, "components", comps)
        pos = self.position
        if isinstance(pos, str):
            if pos not in ("last", "all_aligned"):
                raise ConfigError(f"position {pos!r}: use 'last', 'all_aligned' or a list of "
                                  "ints (0 = first real token, -1 = last).")
        else:
            pos = tuple(pos)
            if not pos or not all(isinstance(p, int) and not isinstance(p, bool) for p in pos):
                raise ConfigError(f"position {pos!r}: an explicit position is a non-empty list "
                                  "of ints (0 = first real token, -1 = last).")
            pos = "last" if pos == (-1,) else tuple(dict.fromkeys(pos))
        object.__setattr__(self, "position", pos)
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"batch_size must be an int >= 1, got {self.batch_size!r}.")

    @property
    def fast(self) -> bool:
        """Whether the one-token KV-cache path runs."""
        return self.position == "last" and self.use_kv_cache


@dataclass(frozen=True)
class Site:
    """One patched activation: a component at a layer, optionally one head or some neurons."""

    layer: int
    component: str
    head: int = -1
    """A head of ``attn.hook_z`` (``-1``: all heads)."""
    neurons: tuple[int, ...] | None = None
    """Neurons of ``mlp.hook_post`` patched together (``None``: all)."""
    label: str = ""

    @property
    def hook(self) -> str:
        return _HOOK_OF[self.component](self.layer)

    def put(self, act: torch.Tensor, rows, cols, src: torch.Tensor) -> None:
        """``act[rows, cols, <site>] = src`` in place (``src`` is ``[n, ...]``)."""
        src = src.to(device=act.device, dtype=act.dtype)
        rows, cols = rows.to(act.device), cols.to(act.device)
        if self.head >= 0:
            act[rows, cols, self.head] = src[:, self.head]
        elif self.neurons is not None:
            idx = torch.as_tensor(self.neurons, device=act.device)
            sub = act[rows, cols]
            sub[:, idx] = src[:, idx]
            act[rows, cols] = sub
        else:
            act[rows, cols] = src


def layers_for(model, metric: Metric, layers) -> list[int]:
    tl = unwrap(model)
    top = tl.cfg.n_layers - 1 if metric.layer is None else metric.layer
    if layers is None:
        return list(range(top + 1))
    out = sorted({check_layer(tl, int(layer)) for layer in layers})
    late = [layer for layer in out if layer > top]
    if late:
        raise ConfigError(f"layers {late} come after the block the metric reads ({metric.hook}):"
                          f" patching them cannot change it. Drop them (layers <= {top}).")
    return out


# ------------------------------------------------------------------ positions




def _resolve_positions(position, s_mask, d_mask, start: int):
    """``(rows, src_cols, dst_cols)``: destination ``[rows, dst_cols]`` gets source
    ``[rows, src_cols]`` (padded coordinates of left-padded batches)."""
    ls, ld = s_mask.sum(-1).tolist(), d_mask.sum(-1).tolist()
    ws, wd = s_mask.shape[1], d_mask.shape[1]
    rows, sc, dc = [], [], []
    for i, (a, b) in enumerate(zip(ls, ld, strict=True)):
        if position == "last":
            offs = [-1]
        elif position == "all_aligned":
            offs = list(range(-min(a, b), 0))
        else:
            offs = []
            for p in position:
                if not (-min(a, b) <= p < min(a, b)):
                    raise TokenizationError(
                        f"position {p} does not exist in pair {start + i}: its source has {a} "
                        f"tokens and its destination {b}. Use positions in {-min(a, b)}.."
                        f"{min(a, b) - 1} for every pair (0 = first real token, -1 = last), or "
                        "position='last' / 'all_aligned'.")
                offs.append((p, p) if p >= 0 else p)
        for o in offs:
            if isinstance(o, tuple):  # from the start of the real tokens
                sc.append(ws - a + o[0])
                dc.append(wd - b + o[1])
            else:
                sc.append(ws + o)
                dc.append(wd + o)
            rows.append(i)
    dev = d_mask.device
    return (torch.tensor(rows, device=dev), torch.tensor(sc, device=dev),
            torch.tensor(dc, device=dev))


# ------------------------------------------------------------------ forwards


def _score(tl, out, grabbed: dict, metric: Metric) -> torch.Tensor:
    """The metric of one forward: from the grabbed hook, or logits of the last position only
    (only the columns in ``metric.logit_ids`` when it names them)."""
    if metric.hook is not None:
        return metric(grabbed["metric"]).float()
    w, b = tl.unembed.W_U, tl.unembed.b_U
    x = out[:, -1:].to(w.device)
    if tl.cfg.normalization_type is not None:
        x = tl.ln_final(x)
    if metric.logit_ids:
        idx = torch.as_tensor(metric.logit_ids, device=w.device)
        logits = x.new_zeros(*x.shape[:-1], w.shape[1])
        logits[..., idx] = x @ w[:, idx] + b[idx]
    else:
        logits = tl.unembed(x)
    cap = getattr(tl.cfg, "output_logits_soft_cap", 0.0) or 0.0
    if cap > 0:
        logits = cap * torch.tanh(logits / cap)
    return metric(logits).float()


def _metric_hook(metric: Metric, grabbed: dict):
    def grab(act, hook):
        grabbed["metric"] = act[:, -1:].detach()
    return [(metric.hook, grab)] if metric.hook is not None else []


def _stop(tl, metric: Metric) -> int | None:
    """``stop_at_layer`` of a scored forward: after the metric's block; all blocks for logits
    (unembedded here, last position only); ``None`` for a hook after the blocks."""
    if metric.hook is None:
        return tl.cfg.n_layers
    return metric.stop_layer


def _run(tl, inp, fwd_hooks, **kwargs):
    """One forward of ``tl`` with ``fwd_hooks`` attached for its duration (only these are
    removed afterwards: hooks of an intervention around the sweep stay active)."""
    with attached(tl, fwd_hooks):
        return tl(inp, **kwargs)


def _grab_hooks(names, rows, cols, store: dict):
    def make(name):
        def hook(act, hook):
            store[name] = act[rows.to(act.device), cols.to(act.device)].detach().clone()
        return hook
    return [(n, make(n)) for n in names]


@torch.no_grad()
def _last_token_state(tl, ct: ChatTokens, metric: Metric, grab: Sequence[str]):
    """Destination-style run: prefix into a frozen KV cache, then the last token with hooks.

    Returns ``(cache, activations at the last position per hook, score)``.
    """
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    tok, mask = ct.tokens, ct.attention_mask
    stop = _stop(tl, metric)
    cache = TransformerLensKeyValueCache.init_cache(tl.cfg, tl.cfg.device, tok.shape[0])
    if tok.shape[1] > 1:
        tl(tok[:, :-1], attention_mask=mask[:, :-1], past_kv_cache=cache,
           stop_at_layer=tl.cfg.n_layers if stop is None else stop)
    cache.freeze()
    acts: dict = {}
    grabbed: dict = {}
    allrows = torch.arange(tok.shape[0], device=tok.device)
    hooks = _grab_hooks(grab, allrows, torch.zeros_like(allrows), acts) + _metric_hook(
        metric, grabbed)
    out = _run(tl, tok[:, -1:], hooks, attention_mask=mask[:, -1:], past_kv_cache=cache,
               stop_at_layer=stop)
    return cache, acts, _score(tl, out, grabbed, metric)


@torch.no_grad()
def _full_state(tl, ct: ChatTokens, metric: Metric, grab: Sequence[str], rows, cols):
    """Full-sequence run grabbing ``act[rows, cols]`` of each hook; returns ``(acts, score)``."""
    acts: dict = {}
    grabbed: dict = {}
    hooks = _grab_hooks(grab, rows, cols, acts) + _metric_hook(metric, grabbed)
    out = _run(tl, ct.tokens, hooks, attention_mask=ct.attention_mask,
               stop_at_layer=_stop(tl, metric))
    return acts, _score(tl, out, grabbed, metric)


def _patch_hook(site: Site, rows, cols, src: torch.Tensor):
    def hook(act, hook):
        act = act.clone()
        site.put(act, rows, cols, src)
        return act
    return hook


@torch.no_grad()
def _patched_forward(tl, site: Site, start_resid, src_act, rows, cols, metric: Metric,
                     **kwargs) -> torch.Tensor:
    """Run from ``site.layer`` with ``start_resid``, ``site`` patched at ``[rows, cols]``."""
    grabbed: dict = {}
    hooks = [(site.hook, _patch_hook(site, rows, cols, src_act))] + _metric_hook(metric, grabbed)
    out = _run(tl, start_resid, hooks, start_at_layer=site.layer,
               stop_at_layer=_stop(tl, metric), **kwargs)
    return _score(tl, out, grabbed, metric)


# ------------------------------------------------------------------ plan


def _lengths(model, prompts, batch_size: int) -> list[int]:
    out: list[int] = []
    for b in token_batches(model, prompts, max(batch_size, 64)):
        out += b.tokens.lengths
    return out


def _plan(tl, pairs: PromptPairs, cfg: PatchingConfig, layers, sites_per_layer: int,
          store: PatchStore, metric: Metric, model, src_model) -> SweepPlan:
    n_kv = tl.cfg.n_key_value_heads or tl.cfg.n_heads
    d_len = _lengths(model, pairs.dests, cfg.batch_size)
    s_len = _lengths(src_model, pairs.sources, cfg.batch_size)
    long = [i for i, (a, b) in enumerate(zip(s_len, d_len, strict=True))
            if max(a, b) > tl.cfg.n_ctx]
    if long:
        raise DataError(f"{len(long)} pair(s) have a prompt longer than the model's context of "
                        f"{tl.cfg.n_ctx} tokens (pairs {long[:5]}); drop or shorten them.")
    return make_plan(d_len=d_len, s_len=s_len,
                     layers=layers, sites_per_layer=sites_per_layer,
                     batch_size=cfg.batch_size, fast=cfg.fast,
                     stop=_stop(tl, metric) or tl.cfg.n_layers, n_layers=tl.cfg.n_layers,
                     kv_bytes=2 * n_kv * tl.cfg.d_head * tl.cfg.dtype.itemsize, store=store)


# ------------------------------------------------------------------ the engine


def _check_models(model, src_model) -> None:
    a, b = unwrap(model).cfg, unwrap(src_model).cfg
    for key in ("n_layers", "d_model", "n_heads", "d_head", "d_mlp"):
        if getattr(a, key) != getattr(b, key):
            raise ConfigError(f"source_model has {key}={getattr(b, key)}, the model "
                              f"{getattr(a, key)}: patching needs the same architecture.")


def run_sites(model, pairs, metric: Metric, sites: Sequence[Site], *, config: PatchingConfig,
              source_model=None, out_dir: str | Path | None = None, kind: str = "patch_sweep",
              site_spec=None, progress: bool = True, dry_run: bool = False,
              time_batch: bool = False):
    """Patch every site for every pair; the engine under every patching function.

    Returns ``(plan, deltas [n_sites, K], s_clean [K], s_source [K])`` (``plan`` alone with
    ``dry_run``). ``site_spec`` (JSON) identifies the sites in the manifest of ``out_dir``.
    """
    from tqdm.auto import tqdm

    pairs = as_prompt_pairs(pairs)
    tl = unwrap(model)
    src_model = model if source_model is None else source_model
    src_tl = unwrap(src_model)
    _check_models(model, src_model)
    metric.check(tl)
    for s in sites:  # every hook name is checked before the first forward
        check_hook(tl, s.hook)
    layers = sorted({s.layer for s in sites})
    if metric.layer is not None and layers and layers[-1] > metric.layer:
        raise ConfigError(f"a site at layer {layers[-1]} comes after the block the metric reads "
                          f"({metric.hook}); drop layers > {metric.layer}.")
    by_layer = {layer: [s for s in sites if s.layer == layer] for layer in layers}
    if len({len(v) for v in by_layer.values()}) > 1:
        raise ConfigError("every layer must have the same number of sites.")
    per_layer = len(by_layer[layers[0]]) if layers else 0
    manifest = {"version": STORE_VERSION, "kind": kind, "pairs": pairs.hash(),
                "n_pairs": len(pairs), "metric": [metric.name, metric.hook],
                "model": describe_model(model),
                "source_model": None if source_model is None else describe_model(source_model),
                "position": list(config.position) if isinstance(config.position, tuple)
                else config.position, "batch_size": config.batch_size, "fast": config.fast,
                "sites": site_spec if site_spec is not None else [s.label for s in sites[
                    :per_layer]]}
    store = PatchStore(out_dir, manifest, json_config(config))
    if isinstance(config.position, tuple):  # impossible positions raise before any forward
        for b_s, b_d in zip(token_batches(src_model, pairs.sources, config.batch_size),
                            token_batches(model, pairs.dests, config.batch_size), strict=True):
            _resolve_positions(config.position, b_s.tokens.attention_mask,
                               b_d.tokens.attention_mask, b_s.start)
    plan = _plan(tl, pairs, config, layers, per_layer, store, metric, model, src_model)
    if dry_run and not time_batch:
        return plan
    k, bs = len(pairs), config.batch_size
    starts = list(range(0, k, bs))
    if store.root is not None and store.has(None, 0):
        _check_fingerprint(tl, src_tl, pairs, metric, config, store, model)
    log.info("patching: %s", plan.describe())
    bar = tqdm(total=sum(len([la for la in layers if not store.has(la, s)]) for s in starts),
               disable=not progress, desc=f"patching {plan.forwards} forwards", unit="layer")
    t_first = None
    try:
        for start in starts:
            todo = [la for la in layers if not store.has(la, start)]
            if not todo and store.has(None, start):
                continue
            t0 = time.perf_counter()
            _run_batch(tl, src_tl, model, src_model, pairs, start, bs, metric, by_layer, todo,
                       config, store, bar)
            if t_first is None:
                t_first = time.perf_counter() - t0
                est = t_first * plan.batches_to_run
                log.info("patching: first batch took %.2f s; about %.0f s for all %d batches",
                         t_first, est, plan.batches_to_run)
                bar.set_postfix_str(f"about {est:.0f} s in all")
                if dry_run:
                    return replace(plan, seconds_per_batch=t_first, estimate_s=est)
    finally:
        bar.close()
    if dry_run:  # nothing was left to run
        return plan
    deltas = torch.zeros(len(sites), k)
    s_clean, s_source = torch.zeros(k), torch.zeros(k)
    order = {id(s): i for i, s in enumerate(sites)}
    for start in starts:
        stop = min(start + bs, k)
        clean = store.get(None, start)
        s_clean[start:stop], s_source[start:stop] = clean["s_clean"], clean["s_source"]
        for layer in layers:
            d = store.get(layer, start)["delta"]
            for j, s in enumerate(by_layer[layer]):
                deltas[order[id(s)], start:stop] = d[j]
    return plan, deltas, s_clean, s_source


def json_config(config: PatchingConfig) -> dict:
    """``config`` as JSON data."""
    d = asdict(config)
    d["position"] = list(config.position) if isinstance(config.position, tuple) else \
        config.position
    return d


def _batch(model, prompts, start: int, bs: int) -> ChatTokens:
    b = next(token_batches(model, prompts, bs, start=start, stop=start + bs))
    return left_align(b.tokens)


def _check_fingerprint(tl, src_tl, pairs, metric, config, store, model) -> None:
    """Recompute the first batch's clean scores and compare them with the stored ones."""
    d_ct = _batch(model, pairs.dests, 0, config.batch_size)
    if config.fast:
        _, _, s = _last_token_state(tl, d_ct, metric, [])
    else:
        rows = torch.arange(len(d_ct), device=d_ct.tokens.device)
        _, s = _full_state(tl, d_ct, metric, [], rows, torch.full_like(rows, -1))
    old = store.get(None, 0)["s_clean"]
    if not torch.allclose(s.cpu(), old, atol=1e-4, rtol=1e-4):
        raise StoreMismatchError(
            f"{str(store.root)!r}: the stored clean scores of the first batch differ from this "
            f"run's (max |diff| {float((s.cpu() - old).abs().max()):.3g}): a different metric "
            "(e.g. another direction) or different weights. Pass a new out_dir, or delete it.")


def _run_batch(tl, src_tl, model, src_model, pairs, start, bs, metric, by_layer, todo, config,
               store, bar) -> None:
    s_ct = _batch(src_model, pairs.sources, start, bs)
    d_ct = _batch(model, pairs.dests, start, bs)
    hooks_needed = sorted({s.hook for la in todo for s in by_layer[la]})
    d_mask = d_ct.attention_mask
    if config.fast:
        _, src_acts, s_source = _last_token_state(src_tl, s_ct, metric, hooks_needed)
        cache, own, s_clean = _last_token_state(tl, d_ct, metric,
                                                [resid_pre(la) for la in todo])
        n = len(d_ct)
        rows = torch.arange(n, device=d_mask.device)
        cols = torch.zeros_like(rows)
        for layer in todo:
            start_resid = own[resid_pre(layer)][:, None]
            deltas = [_patched_forward(tl, s, start_resid, src_acts[s.hook], rows, cols, metric,
                                       attention_mask=d_mask, past_kv_cache=cache) - s_clean
                      for s in by_layer[layer]]
            store.put(layer, start, {"delta": torch.stack(deltas)})
            bar.update(1)
    else:
        rows, sc, dc = _resolve_positions(config.position, s_ct.attention_mask, d_mask, start)
        src_acts, s_source = _full_state(src_tl, s_ct, metric, hooks_needed,
                                         rows.to(s_ct.tokens.device), sc.to(s_ct.tokens.device))
        _, s_clean = _full_state(tl, d_ct, metric, [], rows[:0], dc[:0])
        with torch.no_grad():
            resid = tl(d_ct.tokens, attention_mask=d_mask, stop_at_layer=0)
            for layer in range(max(todo, default=-1) + 1):
                if layer in todo:
                    deltas = [_patched_forward(tl, s, resid, src_acts[s.hook], rows, dc, metric,
                                               attention_mask=d_mask) - s_clean
                              for s in by_layer[layer]]
                    store.put(layer, start, {"delta": torch.stack(deltas)})
                    bar.update(1)
                resid = tl(resid, start_at_layer=layer, stop_at_layer=layer + 1,
                           attention_mask=d_mask)
    store.put(None, start, {"s_clean": s_clean, "s_source": s_source})


# ------------------------------------------------------------------ the sweep


def patch_sweep(model, pairs, metric: Metric, *, components: Sequence[str] = COMPONENTS,
                layers: Sequence[int] | None = None, position: str | Sequence[int] = "last",
                batch_size: int = 16, use_kv_cache: bool = True, source_model=None,
                out_dir: str | Path | None = None, progress: bool = True,
                dry_run: bool = False, time_batch: bool = False) -> SweepResult | SweepPlan:
    """Layer x component activation patching over prompt pairs (Experiment 3, Fig. 4 / 10).

    For every pair, layer and component, the destination runs with that component's
    activation at the chosen position(s) replaced by the source's, and
    ``Delta S = S_patched - S_clean`` is recorded (see the module docstring).

    Args:
        model: The model (``Loaded`` or ``HookedTransformer``) the destination runs in.
        pairs: :class:`PromptPairs` (see :func:`sample_pairs`), a tuple ``(sources, dests)`` or a
            list of ``(source, dest)`` tuples; prompts are strings, conversations or tokens.
        metric: A :class:`~em_interp.metrics.Metric` (logits or one hook's activation).
        components: Any of ``"attn"`` (``attn.hook_z``), ``"mlp"`` (``mlp.hook_post``),
            ``"resid"`` (``hook_resid_pre``).
        layers: Layers to patch (0-indexed); default every layer up to the metric's.
        position: ``"last"``, ``"all_aligned"`` or a list of ints (patched together).
        batch_size: Pairs per batched forward.
        use_kv_cache: Use the one-token KV-cache path for ``position="last"``.
        source_model: Run the sources in another model of the same architecture (default:
            ``model``), e.g. patch base-model activations into the organism.
        out_dir: Make the run resumable: each (layer, batch) is written there as it finishes.
        progress: Show a tqdm progress bar.
        dry_run: Return the :class:`SweepPlan` (counts of forwards) without running.
        time_batch: With ``dry_run``, run the first batch and add a time estimate to the plan.

    Returns:
        A :class:`~em_interp.patching.results.SweepResult` (or the plan with ``dry_run``).
    """
    cfg = PatchingConfig(components=tuple(components), layers=None if layers is None else
                         tuple(layers), position=position if isinstance(position, str)
                         else tuple(position), batch_size=batch_size, use_kv_cache=use_kv_cache)
    layer_list = layers_for(model, metric, cfg.layers)
    sites = [Site(layer, c, label=c) for layer in layer_list for c in cfg.components]
    out = run_sites(model, pairs, metric, sites, config=cfg, source_model=source_model,
                    out_dir=out_dir, kind="patch_sweep", progress=progress, dry_run=dry_run,
                    time_batch=time_batch)
    if isinstance(out, SweepPlan):
        return out
    _, deltas, s_clean, s_source = out
    result = SweepResult(deltas=deltas, s_clean=s_clean, s_source=s_source,
                         sites=site_frame(sites), metric=metric.name,
                         position=json.dumps(json_config(cfg)["position"]),
                         pairs_name=as_prompt_pairs(pairs).name, meta={"config": json_config(cfg)})
    if out_dir is not None:
        result.save(Path(out_dir) / "result")
    return result


def plan_sweep(model, pairs, metric: Metric, **kwargs) -> SweepPlan:
    """The :class:`SweepPlan` of :func:`patch_sweep` with the same arguments, run nothing.

    Pass ``time_batch=True`` to run the first batch and get a time estimate; with ``out_dir``
    the plan counts only what is not stored yet.
    """
    return patch_sweep(model, pairs, metric, dry_run=True, progress=False, **kwargs)


def relative_effect(result: SweepResult) -> torch.Tensor:
    """``Delta S / (S_source - S_clean)`` per site and pair: the fraction of the gap restored."""
    gap = (result.s_source - result.s_clean)[None]
    return result.deltas / torch.where(gap.abs() > 1e-12, gap, torch.full_like(gap, math.nan))

