"""Fine-grained activation patching: single attention heads and selected MLP neurons.

Experiment 4 of the Qwen paper (Sec. III.D, Figs. 6-9) repeats the causal tracing of
Experiment 3 inside the last layers:

* **heads** -- each head's slice ``attn.hook_z[:, pos, h, :]`` (the head's input to ``o_proj``)
  is patched alone: ``Delta S(l, h, k) = S_patched - S_clean`` (:func:`patch_heads`);
* **neurons** -- for layer ``l``, the mean difference of every ``mlp.hook_post`` neuron between
  the source and destination prompt sets (at each prompt's last token),
  ``d_n = E_src[a_n] - E_dst[a_n]``, selects the neurons with ``|d_n| > mean_n |d_n|``
  (:func:`select_neurons`, Figs. 6-7; or the ``top_n`` largest). They are patched **together**
  (one site), and, on request, each alone (:func:`patch_neurons`).

**Selection and measurement on different prompts.** Neurons chosen on the prompts of the pairs
they are then patched on have their effect overstated: the selection picks up those prompts'
noise along with the signal. :func:`patch_neurons` therefore never selects on the pairs it
patches. With ``neurons=None`` it needs ``select_pairs=``, pairs that share no source and no
destination prompt with ``pairs`` (``fit, ev = pairs.split()``, or
:func:`~em_interp.patching.pairs.sample_split_pairs`), and raises
:class:`~em_interp.errors.ConfigError` otherwise; the selection records the prompts it was fit
on. The same holds for heads: choose the layers of :func:`patch_heads` on a sweep over the fit
half and patch the heads on the eval half.

Both run on the batched engine of :mod:`em_interp.patching.sweep` (one forward per site and batch,
the one-token KV-cache path for ``position="last"``, resumable with ``out_dir``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch

from em_interp.errors import ConfigError
from em_interp.hooks import check_layer, mlp_post
from em_interp.inputs import left_align, token_batches, unwrap
from em_interp.metrics import Metric, as_metric
from em_interp.patching.results import (
    HeadPatchingResult,
    NeuronPatchingResult,
    NeuronSelection,
    site_frame,
)
from em_interp.patching.sweep import (
    PatchingConfig,
    Site,
    as_prompt_pairs,
    json_config,
    layers_for,
    run_sites,
)


def patch_heads(model, pairs, metric: Metric | Callable, layers: Sequence[int] | None = None, *,
                position: str | Sequence[int] = "last", batch_size: int = 16,
                use_kv_cache: bool = True, source_model=None,
                out_dir: str | Path | None = None,
                progress: bool = True) -> HeadPatchingResult:
    """Patch every attention head of ``layers`` alone (``attn.hook_z[..., h, :]``).

    Args:
        model: The model the destinations run in.
        pairs: :class:`~em_interp.patching.sweep.PromptPairs` or ``(sources, dests)``.
        metric: The metric (logits or a hook at or after the last layer patched), or a plain
            function ``logits -> [batch]`` (:func:`~em_interp.metrics.as_metric`).
        layers: Layers whose heads are patched; default every layer up to the metric's (pass
            the top layers, as the paper does, for large models).
        position: ``"last"``, ``"all_aligned"`` or a list of ints.
        batch_size: Pairs per batched forward.
        use_kv_cache: One-token KV-cache path for ``position="last"``.
        source_model: Another model (same architecture) to take the sources' heads from.
        out_dir: Resumable output folder.
        progress: Show a progress bar.

    Returns:
        A :class:`~em_interp.patching.results.HeadPatchingResult` (sites ``(layer, head)``).
    """
    metric = as_metric(metric)
    pairs = as_prompt_pairs(pairs)
    cfg = PatchingConfig(components=("attn",), layers=None if layers is None else
                         tuple(layers), position=position if isinstance(position, str)
                         else tuple(position), batch_size=batch_size, use_kv_cache=use_kv_cache)
    tl = unwrap(model)
    sites = [Site(layer, "attn", head=h, label=f"L{layer}H{h}")
             for layer in layers_for(model, metric, cfg.layers) for h in range(tl.cfg.n_heads)]
    run = run_sites(model, pairs, metric, sites, config=cfg, source_model=source_model,
                    out_dir=out_dir, kind="patch_heads", site_spec=["heads", tl.cfg.n_heads],
                    progress=progress)
    result = HeadPatchingResult(deltas=run.deltas, s_clean=run.s_clean, s_source=run.s_source,
                                sites=site_frame(sites), metric=metric.name,
                                position=json.dumps(json_config(cfg)["position"]),
                                pairs_name=pairs.name,
                                meta={"config": json_config(cfg)},
                                source_ids=pairs.source_index, dest_ids=pairs.dest_index)
    if out_dir is not None:
        result.save(Path(out_dir) / "result")
    return result


def _select_on(model, pairs, fit, layer: int, top_n, batch_size: int,
               progress: bool) -> NeuronSelection:
    """:func:`select_neurons` on ``fit``'s prompts, after checking they are not ``pairs``'."""
    shared = pairs.shared_prompts(fit)
    if not shared.empty:
        raise ConfigError(
            f"select_pairs share {len(shared.sources)} source and {len(shared.dests)} "
            "destination prompt(s) with the pairs being patched (compared by content); the "
            "selection would be measured on its own prompts. Split by prompts: fit, ev = "
            "pairs.split(seed=0), or em_interp.patching.pairs.sample_split_pairs(...).")
    sel = select_neurons(model, fit.unique_sources(), fit.unique_dests(), layer, top_n=top_n,
                         batch_size=batch_size, progress=progress)
    ids = fit.prompt_ids()
    return replace(sel, fit_sources=ids.sources, fit_dests=ids.dests,
                   fit_keys=ids.source_keys + ids.dest_keys)


@torch.no_grad()
def _mean_last(model, prompts, hook: str, layer: int, batch_size: int,
               progress: bool) -> tuple[torch.Tensor, int]:
    from tqdm.auto import tqdm

    tl = unwrap(model)
    total, n = None, 0
    grabbed: dict = {}

    def grab(act, hook):
        grabbed["x"] = act[:, -1].double().sum(0)

    for b in tqdm(list(token_batches(model, prompts, batch_size)), disable=not progress,
                  desc=f"mean {hook}"):
        ct = left_align(b.tokens)
        tl.run_with_hooks(ct.tokens, attention_mask=ct.attention_mask, return_type=None,
                          stop_at_layer=layer + 1, fwd_hooks=[(hook, grab)])
        total = grabbed["x"] if total is None else total + grabbed["x"]
        n += len(ct)
    assert total is not None
    return (total / n).cpu(), n


def select_neurons(model, source_prompts, dest_prompts, layer: int, *,
                   top_n: int | None = None, batch_size: int = 16,
                   progress: bool = True) -> NeuronSelection:
    """Rank ``mlp.hook_post`` neurons of ``layer`` by their mean source - destination difference.

    Means are over each prompt's last token (the patched position). With ``top_n=None`` the
    neurons whose ``|difference|`` exceeds the mean ``|difference|`` are selected (Experiment
    4), else the ``top_n`` largest.

    Args:
        model: The model.
        source_prompts: The source set (e.g. risky prompts).
        dest_prompts: The destination set (e.g. benign prompts).
        layer: The layer (0-indexed).
        top_n: Select this many neurons instead of the above-mean rule.
        batch_size: Prompts per forward (each stops after ``layer``).
        progress: Show a progress bar.

    Returns:
        A :class:`~em_interp.patching.results.NeuronSelection`.
    """
    tl = unwrap(model)
    layer = check_layer(tl, layer)
    hook = mlp_post(layer)
    ms, ns = _mean_last(model, source_prompts, hook, layer, batch_size, progress)
    md, nd = _mean_last(model, dest_prompts, hook, layer, batch_size, progress)
    diff = (ms - md).float()
    order = diff.abs().argsort(descending=True, stable=True)
    if top_n is None:
        thr = float(diff.abs().mean())
        sel = order[: int((diff.abs() > thr).sum())]
        rule = "above_mean"
    else:
        if not 1 <= top_n <= diff.numel():
            raise ConfigError(f"top_n={top_n}: pass 1 <= top_n <= d_mlp ({diff.numel()}).")
        sel = order[:top_n]
        thr = float(diff.abs()[sel[-1]])
        rule = f"top_{top_n}"
    return NeuronSelection(layer=layer, mean_diff=diff, selected=sel.clone(), rule=rule,
                           threshold=thr, n_source=ns, n_dest=nd)


def patch_neurons(model, pairs, metric: Metric | Callable, layer: int, *,
                  neurons: NeuronSelection | Sequence[int] | None = None,
                  select_pairs=None, top_n: int | None = None, per_neuron: bool = False,
                  position: str | Sequence[int] = "last", batch_size: int = 16,
                  use_kv_cache: bool = True, source_model=None,
                  out_dir: str | Path | None = None,
                  progress: bool = True) -> NeuronPatchingResult:
    """Patch selected ``mlp.hook_post`` neurons of ``layer`` together (and each alone).

    Args:
        model: The model the destinations run in.
        pairs: :class:`~em_interp.patching.sweep.PromptPairs` or ``(sources, dests)``.
        metric: The metric, or a plain function ``logits -> [batch]``
            (:func:`~em_interp.metrics.as_metric`).
        layer: The layer (0-indexed).
        neurons: A :class:`NeuronSelection`, explicit neuron indices, or ``None`` to select
            them on ``select_pairs`` with :func:`select_neurons`.
        select_pairs: With ``neurons=None``: the pairs whose (unique) source and destination
            prompts select the neurons; they must share no prompt with ``pairs`` (e.g.
            ``fit, ev = pairs.split()``, then ``patch_neurons(model, ev, ...,
            select_pairs=fit)``).
        top_n: With ``neurons=None``: select the ``top_n`` largest differences instead of the
            above-mean rule.
        per_neuron: Also patch every selected neuron alone (one forward per neuron and batch).
        position: ``"last"``, ``"all_aligned"`` or a list of ints.
        batch_size: Pairs per batched forward.
        use_kv_cache: One-token KV-cache path for ``position="last"``.
        source_model: Another model (same architecture) to take the sources' neurons from.
        out_dir: Resumable output folder.
        progress: Show progress bars.

    Returns:
        A :class:`~em_interp.patching.results.NeuronPatchingResult`: site 0 is the set, then
        one site per neuron with ``per_neuron``.

    Raises:
        ConfigError: ``neurons=None`` without ``select_pairs`` (the neurons would be selected
            on the pairs they are patched on), ``select_pairs`` that share a prompt with
            ``pairs``, both ``neurons`` and ``select_pairs``, or invalid neuron indices.
    """
    metric = as_metric(metric)
    pairs = as_prompt_pairs(pairs)
    tl = unwrap(model)
    layer = check_layer(tl, layer)
    selection = None
    if neurons is not None and select_pairs is not None:
        raise ConfigError("pass either neurons= (already chosen) or select_pairs= (pairs to "
                          "choose them on), not both.")
    if neurons is None:
        if select_pairs is None:
            raise ConfigError(
                "patch_neurons(neurons=None) would select the neurons on the very pairs it "
                "patches, which overstates their effect. Split the pairs by prompts and select "
                "on the other half: fit, ev = pairs.split(seed=0); patch_neurons(model, ev, "
                "metric, layer, select_pairs=fit). Or pass neurons= chosen elsewhere.")
        selection = _select_on(model, pairs, as_prompt_pairs(select_pairs), layer, top_n,
                               batch_size, progress)
        idx = selection.selected.tolist()
    elif isinstance(neurons, NeuronSelection):
        if neurons.layer != layer:
            raise ConfigError(f"the neuron selection is for layer {neurons.layer}, not {layer}.")
        selection, idx = neurons, neurons.selected.tolist()
    else:
        idx = [int(i) for i in neurons]
    if not idx or len(set(idx)) != len(idx) or not all(0 <= i < tl.cfg.d_mlp for i in idx):
        raise ConfigError(f"neurons must be distinct indices in 0..{tl.cfg.d_mlp - 1} (d_mlp), "
                          f"at least one; got {len(idx)} ({idx[:5]}...).")
    cfg = PatchingConfig(components=("mlp",), layers=(layer,), position=position
                         if isinstance(position, str) else tuple(position),
                         batch_size=batch_size, use_kv_cache=use_kv_cache)
    layers_for(model, metric, cfg.layers)
    sites = [Site(layer, "mlp", neurons=tuple(idx), label=f"{len(idx)} neurons")]
    if per_neuron:
        sites += [Site(layer, "mlp", neurons=(i,), label=f"N{i}") for i in idx]
    spec = ["neurons", hashlib.sha256(json.dumps(idx).encode()).hexdigest()[:16], per_neuron]
    run = run_sites(model, pairs, metric, sites, config=cfg, source_model=source_model,
                    out_dir=out_dir, kind="patch_neurons", site_spec=spec, progress=progress)
    result = NeuronPatchingResult(deltas=run.deltas, s_clean=run.s_clean, s_source=run.s_source,
                                  sites=site_frame(sites), metric=metric.name,
                                  position=json.dumps(json_config(cfg)["position"]),
                                  pairs_name=pairs.name, meta={"config": json_config(cfg)},
                                  selection=selection, source_ids=pairs.source_index,
                                  dest_ids=pairs.dest_index)
    if out_dir is not None:
        result.save(Path(out_dir) / "result")
    return result
