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
(:meth:`~em_interp.patching.pairs.PromptPairs.reverse`). Components (Sec. III.C, "the input to ``mlp_down_proj`` or
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

**Engine.** Every patching function is a list of :class:`Site` objects run by :func:`run_sites`
(which returns a :class:`SiteRun`); :func:`plan_sites` makes the same checks and counts the same
work without running it (a :class:`~em_interp.patching.store.SweepPlan`). A metric may be a
:class:`~em_interp.metrics.Metric` or a plain function ``logits -> [batch]``
(:func:`~em_interp.metrics.as_metric`).

The prompt pairs are in :mod:`em_interp.patching.pairs`, head-level and neuron-level patching
(Experiment 4) in :mod:`em_interp.patching.fine`, result types and figures in
:mod:`em_interp.patching.results`, the resumable folder and the plan in
:mod:`em_interp.patching.store`, and prefix / decode-time patching while generating
(BLOCK-EM F.1) in :mod:`em_interp.patching.generation`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import torch

from em_interp.errors import ConfigError, DataError, StoreMismatchError, TokenizationError
from em_interp.hooks import attached, attn_z, check_hook, check_layer, mlp_post, resid_pre
from em_interp.inputs import describe_model, left_align, token_batches, unwrap
from em_interp.metrics import Metric, as_metric
from em_interp.models.chat import ChatTokens
from em_interp.patching.pairs import PromptPairs, as_prompt_pairs, sample_pairs
from em_interp.patching.results import SweepResult, site_frame
from em_interp.patching.store import PatchStore, SweepPlan, make_plan

log = logging.getLogger(__name__)

Component = Literal["resid", "attn", "mlp"]
COMPONENTS: tuple[str, ...] = ("attn", "mlp", "resid")
_HOOK_OF = {"resid": resid_pre, "attn": attn_z, "mlp": mlp_post}
STORE_VERSION = 1

__all__ = ["COMPONENTS", "PatchingConfig", "PromptPairs", "Site", "SiteRun", "as_prompt_pairs",
           "json_config", "layers_for", "patch_sweep", "plan_sites", "plan_sweep",
           "relative_effect", "run_sites", "sample_pairs"]


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


def layers_for(model, metric: Metric | Callable, layers) -> list[int]:
    """``layers`` checked against the model and the metric (``None``: every layer up to the one
    the metric reads)."""
    metric = as_metric(metric)
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


@dataclass(frozen=True)
class SiteRun:
    """What :func:`run_sites` computed: the effect of every site on every pair."""

    plan: SweepPlan
    """The plan the run followed (counted before it started)."""
    sites: tuple[Site, ...]
    """The sites, in the order of the rows of :attr:`deltas`."""
    deltas: torch.Tensor
    """``[n_sites, K]``: ``S_patched - S_clean`` per site and pair."""
    s_clean: torch.Tensor
    """``[K]``: each destination's own unpatched score."""
    s_source: torch.Tensor
    """``[K]``: each source's own score."""


@dataclass(frozen=True)
class _Setup:
    """Everything a run needs, checked and counted before the first forward."""

    pairs: PromptPairs
    model: object
    src_model: object
    metric: Metric
    config: PatchingConfig
    layers: list[int]
    by_layer: dict[int, list[Site]]
    store: PatchStore
    plan: SweepPlan

    @property
    def starts(self) -> list[int]:
        return list(range(0, len(self.pairs), self.config.batch_size))

    def todo(self, start: int) -> list[int]:
        return [la for la in self.layers if not self.store.has(la, start)]

    def check_store(self) -> None:
        """Before resuming: recompute the first batch's clean scores and compare them with the
        stored ones (one forward; a plain plan never pays it)."""
        if self.store.root is not None and self.store.has(None, 0):
            _check_fingerprint(unwrap(self.model), self.pairs, self.metric, self.config,
                               self.store, self.model)

    def run_batch(self, start: int, todo: list[int], bar=None) -> None:
        _run_batch(unwrap(self.model), unwrap(self.src_model), self.model, self.src_model,
                   self.pairs, start, self.config.batch_size, self.metric, self.by_layer, todo,
                   self.config, self.store, bar)


def _setup(model, pairs, metric, sites: Sequence[Site], *, config: PatchingConfig,
           source_model, out_dir, kind: str, site_spec) -> _Setup:
    """Check everything (hooks, layers, positions, lengths, the store) and count the work."""
    metric = as_metric(metric)
    pairs = as_prompt_pairs(pairs)
    tl = unwrap(model)
    src_model = model if source_model is None else source_model
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
    setup = _Setup(pairs=pairs, model=model, src_model=src_model, metric=metric, config=config,
                   layers=layers, by_layer=by_layer, store=store, plan=plan)
    return setup


def plan_sites(model, pairs, metric: Metric | Callable, sites: Sequence[Site], *, config: PatchingConfig,
               source_model=None, out_dir: str | Path | None = None, kind: str = "patch_sweep",
               site_spec=None, time_batch: bool = False) -> SweepPlan:
    """The :class:`SweepPlan` of :func:`run_sites` with the same arguments; runs nothing, or
    (``time_batch=True``) only the first batch still to do, to add a time estimate.

    Every check of :func:`run_sites` runs here too, so a plan that comes back is a run that
    starts. With ``out_dir`` the plan counts only what is not stored yet (and a timed batch is
    stored there, so the run that follows skips it).
    """
    setup = _setup(model, pairs, metric, sites, config=config, source_model=source_model,
                   out_dir=out_dir, kind=kind, site_spec=site_spec)
    plan = setup.plan
    if not time_batch:
        return plan
    setup.check_store()
    for start in setup.starts:
        todo = setup.todo(start)
        if not todo and setup.store.has(None, start):
            continue
        t0 = time.perf_counter()
        setup.run_batch(start, todo)
        t = time.perf_counter() - t0
        log.info("patching: one batch took %.2f s; about %.0f s for all %d batches", t,
                 t * plan.batches_to_run, plan.batches_to_run)
        return replace(plan, seconds_per_batch=t, estimate_s=t * plan.batches_to_run)
    return plan  # nothing was left to run


def run_sites(model, pairs, metric: Metric | Callable, sites: Sequence[Site], *, config: PatchingConfig,
              source_model=None, out_dir: str | Path | None = None, kind: str = "patch_sweep",
              site_spec=None, progress: bool = True) -> SiteRun:
    """Patch every site for every pair; the engine under every patching function.

    ``metric`` is a :class:`~em_interp.metrics.Metric` or a function ``logits -> [batch]``
    (:func:`~em_interp.metrics.as_metric`); ``pairs`` anything :func:`as_prompt_pairs` takes.
    ``site_spec`` (JSON) identifies the sites in the manifest of ``out_dir``. Count the work
    first with :func:`plan_sites`.

    Returns:
        A :class:`SiteRun` (``deltas [n_sites, K]``, ``s_clean [K]``, ``s_source [K]``).
    """
    from tqdm.auto import tqdm

    setup = _setup(model, pairs, metric, sites, config=config, source_model=source_model,
                   out_dir=out_dir, kind=kind, site_spec=site_spec)
    plan, store, layers = setup.plan, setup.store, setup.layers
    k, bs, starts = len(setup.pairs), config.batch_size, setup.starts
    setup.check_store()
    log.info("patching: %s", plan.describe())
    bar = tqdm(total=sum(len(setup.todo(s)) for s in starts), disable=not progress,
               desc=f"patching {plan.forwards} forwards", unit="layer")
    t_first = None
    try:
        for start in starts:
            todo = setup.todo(start)
            if not todo and store.has(None, start):
                continue
            t0 = time.perf_counter()
            setup.run_batch(start, todo, bar)
            if t_first is None:
                t_first = time.perf_counter() - t0
                est = t_first * plan.batches_to_run
                log.info("patching: first batch took %.2f s; about %.0f s for all %d batches",
                         t_first, est, plan.batches_to_run)
                bar.set_postfix_str(f"about {est:.0f} s in all")
    finally:
        bar.close()
    deltas = torch.zeros(len(sites), k)
    s_clean, s_source = torch.zeros(k), torch.zeros(k)
    order = {id(s): i for i, s in enumerate(sites)}
    for start in starts:
        stop = min(start + bs, k)
        clean = store.get(None, start)
        s_clean[start:stop], s_source[start:stop] = clean["s_clean"], clean["s_source"]
        for layer in layers:
            d = store.get(layer, start)["delta"]
            for j, s in enumerate(setup.by_layer[layer]):
                deltas[order[id(s)], start:stop] = d[j]
    return SiteRun(plan=plan, sites=tuple(sites), deltas=deltas, s_clean=s_clean,
                   s_source=s_source)


def json_config(config: PatchingConfig) -> dict:
    """``config`` as JSON data."""
    d = asdict(config)
    d["position"] = list(config.position) if isinstance(config.position, tuple) else \
        config.position
    return d


def _batch(model, prompts, start: int, bs: int) -> ChatTokens:
    b = next(token_batches(model, prompts, bs, start=start, stop=start + bs))
    return left_align(b.tokens)


def _check_fingerprint(tl, pairs, metric, config, store, model) -> None:
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
            if bar is not None:
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
                    if bar is not None:
                        bar.update(1)
                resid = tl(resid, start_at_layer=layer, stop_at_layer=layer + 1,
                           attention_mask=d_mask)
    store.put(None, start, {"s_clean": s_clean, "s_source": s_source})


# ------------------------------------------------------------------ the sweep


def patch_sweep(model, pairs, metric: Metric | Callable, *, components: Sequence[str] = COMPONENTS,
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
            list of ``(source, dest)`` tuples; prompts are strings, conversations or tokens
            (in the list form: 1-D or ``[1, pos]`` id tensors, or one-prompt ``ChatTokens``).
        metric: A :class:`~em_interp.metrics.Metric` (logits or one hook's activation), or a
            plain function ``logits -> [batch]`` (see :func:`~em_interp.metrics.as_metric`).
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
        dry_run: Return the :class:`SweepPlan` (counts of forwards) without running
            (:func:`plan_sweep`).
        time_batch: With ``dry_run``, run the first batch and add a time estimate to the plan.

    Returns:
        A :class:`~em_interp.patching.results.SweepResult` (or the plan with ``dry_run``).
    """
    metric = as_metric(metric)
    pairs = as_prompt_pairs(pairs)
    cfg = PatchingConfig(components=tuple(components), layers=None if layers is None else
                         tuple(layers), position=position if isinstance(position, str)
                         else tuple(position), batch_size=batch_size, use_kv_cache=use_kv_cache)
    layer_list = layers_for(model, metric, cfg.layers)
    sites = [Site(layer, c, label=c) for layer in layer_list for c in cfg.components]
    common = dict(config=cfg, source_model=source_model, out_dir=out_dir, kind="patch_sweep")
    if dry_run:
        return plan_sites(model, pairs, metric, sites, time_batch=time_batch, **common)
    run = run_sites(model, pairs, metric, sites, progress=progress, **common)
    result = SweepResult(deltas=run.deltas, s_clean=run.s_clean, s_source=run.s_source,
                         sites=site_frame(sites), metric=metric.name,
                         position=json.dumps(json_config(cfg)["position"]),
                         pairs_name=pairs.name, meta={"config": json_config(cfg)},
                         source_ids=pairs.source_index, dest_ids=pairs.dest_index)
    if out_dir is not None:
        result.save(Path(out_dir) / "result")
    return result


def plan_sweep(model, pairs, metric: Metric | Callable, **kwargs) -> SweepPlan:
    """The :class:`SweepPlan` of :func:`patch_sweep` with the same arguments, run nothing.

    Pass ``time_batch=True`` to run the first batch and get a time estimate; with ``out_dir``
    the plan counts only what is not stored yet.
    """
    kwargs.pop("progress", None)
    return patch_sweep(model, pairs, as_metric(metric), dry_run=True, progress=False, **kwargs)


def relative_effect(result: SweepResult) -> torch.Tensor:
    """``Delta S / (S_source - S_clean)`` per site and pair: the fraction of the gap restored."""
    gap = (result.s_source - result.s_clean)[None]
    return result.deltas / torch.where(gap.abs() > 1e-12, gap, torch.full_like(gap, math.nan))

