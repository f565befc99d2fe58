"""Activation-patching benchmark: em-interp's sweep against a naive loop and TransformerLens.

The work (the issue's benchmark): SmolLM2-135M-Instruct, ``--pairs`` (64) random risky ->
benign pairs from the shipped ``financial`` set, every layer (30) x 3 components (``attn`` =
``attn.hook_z``, ``mlp`` = ``mlp.hook_post``, ``resid`` = ``hook_resid_pre``), the last position,
metric ``logit["Sorry"] - logit["Sure"]`` (a logit metric: no early stop, the most work).

Rows (numbers measured in this run; ratios against the naive loop of the same run):

1. **em-interp (KV cache)** -- ``patch_sweep``: per batch, the source and destination states
   once, then one one-token forward per (layer, component) from layer l on, reusing the
   destination's frozen prefix KV cache;
2. **em-interp (full seq)** (with ``--full-seq``) -- the same with ``use_kv_cache=False``
   (each patched forward runs the whole sequence from layer l);
3. **naive loop** -- per pair, a source run (cache of the needed hooks) and a clean run, then
   one full-sequence forward per site with a hook patching the last position;
4. **TL patching** -- ``transformer_lens.patching.generic_activation_patch`` per pair (it takes
   no attention mask and its metric must be a scalar), restricted to the last position with an
   ``index_df`` so the work is the same, with ``run_with_cache`` of the source.

Rows 3-4 take too long on a 2-core CPU for the full work, so they run on a documented subset
(``--naive-pairs`` pairs x every ``--layer-step``-th layer x 3 components) and are extrapolated
linearly in pairs x sites (the per-pair source/clean runs in proportion). ``max|diff|``
compares each row's deltas with the KV-cache sweep on the pairs and sites both computed.

    HF_HUB_OFFLINE=1 python benchmarks/bench_patching.py [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import (  # noqa: E402
    add_card_args,
    fmt,
    measure_peak_rss,
    table,
    warn_if_busy,
    write_json,
)

HOOK = {"resid": "hook_resid_pre", "attn": "attn.hook_z", "mlp": "mlp.hook_post"}
TL_ACT = {"resid": "resid_pre", "attn": "z", "mlp": "post"}
COMPONENTS = ("attn", "mlp", "resid")


def _pairs(k: int, seed: int):
    from em_interp.data import load_prompt_set
    from em_interp.patching.sweep import sample_pairs

    fin = load_prompt_set("financial")
    return sample_pairs(fin.where(1), fin.where(0), k, seed, name="risky -> benign")


def naive_loop(lm, pairs, metric, layers, k_sub):
    """One full-sequence forward per pair and site; returns ``(deltas [sites, k], forwards)``."""
    import torch

    from em_interp.inputs import tokenize

    tl = lm.model
    sites = [(la, c) for la in layers for c in COMPONENTS]
    names = [f"blocks.{la}.{HOOK[c]}" for la, c in sites]
    out = torch.zeros(len(sites), k_sub)
    n = 0
    with torch.no_grad():
        for k in range(k_sub):
            src = tokenize(lm, [pairs.sources[k]]).tokens
            dst = tokenize(lm, [pairs.dests[k]]).tokens
            _, cache = tl.run_with_cache(src, names_filter=lambda name: name in names)
            clean = metric(tl(dst))[0]
            n += 2
            for i, name in enumerate(names):
                def patch(act, hook, name=name, cache=cache):
                    act[:, -1] = cache[name][:, -1]
                    return act

                out[i, k] = metric(tl.run_with_hooks(dst, fwd_hooks=[(name, patch)]))[0] - clean
                n += 1
    return out, n


def tl_patching(lm, pairs, metric, layers, k_sub):
    """``transformer_lens.patching.generic_activation_patch`` per pair, last position only."""
    import pandas as pd
    import torch
    from transformer_lens import patching as tlp

    from em_interp.inputs import tokenize

    tl = lm.model
    index = pd.DataFrame({"layer": list(layers), "pos": [-1] * len(layers)})
    out = torch.zeros(len(layers) * len(COMPONENTS), k_sub)
    n = 0
    with torch.no_grad():
        for k in range(k_sub):
            src = tokenize(lm, [pairs.sources[k]]).tokens
            dst = tokenize(lm, [pairs.dests[k]]).tokens
            _, cache = tl.run_with_cache(src)
            clean = metric(tl(dst))[0]
            n += 2
            for j, comp in enumerate(COMPONENTS):
                res = tlp.generic_activation_patch(
                    tl, dst, cache, lambda lg, c=clean: metric(lg)[0] - c,
                    tlp.layer_pos_patch_setter, TL_ACT[comp], index_df=index)
                out[[i * len(COMPONENTS) + j for i in range(len(layers))], k] = res.cpu()
                n += len(layers)
    return out, n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_card_args(ap)
    ap.add_argument("--pairs", type=int, default=64, help="pairs in the full sweep")
    ap.add_argument("--batch", type=int, default=16, help="pairs per batched forward")
    ap.add_argument("--naive-pairs", type=int, default=4, help="pairs of the naive/TL subset")
    ap.add_argument("--layer-step", type=int, default=5,
                    help="naive/TL subset: every n-th layer")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--skip-tl", action="store_true", help="skip the TransformerLens row")
    ap.add_argument("--full-seq", action="store_true",
                    help="also time use_kv_cache=False on the full work (slow on a CPU)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")  # TL's patching draws a bar per call

    import torch

    import em_interp
    from em_interp.metrics import logit_diff
    from em_interp.patching.sweep import COMPONENTS as ORDER
    from em_interp.patching.sweep import patch_sweep, plan_sweep

    if args.threads:
        torch.set_num_threads(args.threads)
    lm = em_interp.load(args.card, progress=False)
    n_layers = lm.model.cfg.n_layers
    pairs = _pairs(args.pairs, args.seed)
    metric = logit_diff(lm, "Sorry", "Sure")
    assert ORDER == COMPONENTS
    plan = plan_sweep(lm, pairs, metric, batch_size=args.batch)
    print(f"card {args.card}, {args.pairs} pairs, {n_layers} layers x 3 components, "
          f"batch {args.batch}, torch threads {torch.get_num_threads()}")
    print("plan:", plan.describe())
    n_sites = n_layers * len(COMPONENTS)
    rows, payload = [], {"plan": plan.to_dict(), "args": vars(args)}

    warn_if_busy("em-interp sweep")
    t = time.perf_counter()
    fast, rss_fast = measure_peak_rss(lambda: patch_sweep(lm, pairs, metric,
                                                          batch_size=args.batch, progress=False))
    t_fast = time.perf_counter() - t
    print(f"em-interp (KV cache): {t_fast:.1f} s")
    full = t_full = rss_full = None
    if args.full_seq:
        warn_if_busy("em-interp full-sequence sweep")
        t = time.perf_counter()
        full, rss_full = measure_peak_rss(lambda: patch_sweep(
            lm, pairs, metric, batch_size=args.batch, use_kv_cache=False, progress=False))
        t_full = time.perf_counter() - t
        print(f"em-interp (full seq): {t_full:.1f} s")
    slow_plan = plan_sweep(lm, pairs, metric, batch_size=args.batch, use_kv_cache=False)

    layers = list(range(0, n_layers, args.layer_step))
    k_sub = min(args.naive_pairs, args.pairs)
    sub_rows = [la * len(COMPONENTS) + j for la in layers for j in range(len(COMPONENTS))]
    ref = fast.deltas[sub_rows, :k_sub]
    scale = (args.pairs / k_sub) * ((n_sites + 2) / (len(sub_rows) + 2))
    full_naive_forwards = args.pairs * (n_sites + 2)

    warn_if_busy("naive loop")
    t = time.perf_counter()
    (naive, n_naive), rss_naive = measure_peak_rss(
        lambda: naive_loop(lm, pairs, metric, layers, k_sub))
    t_naive_sub = time.perf_counter() - t
    t_naive = t_naive_sub * scale
    print(f"naive loop: {t_naive_sub:.1f} s for {n_naive} forwards -> {t_naive:.0f} s")
    t_tl = None
    if not args.skip_tl:
        warn_if_busy("TransformerLens patching")
        t = time.perf_counter()
        (tlres, n_tl), rss_tl = measure_peak_rss(
            lambda: tl_patching(lm, pairs, metric, layers, k_sub))
        t_tl = (time.perf_counter() - t) * scale
        print(f"TL patching: {t_tl / scale:.1f} s for {n_tl} forwards -> {t_tl:.0f} s")

    def diff(x):
        return float((x - ref).abs().max())

    rows.append(["em-interp (KV cache)", plan.forwards, fmt(t_fast, ".1f"), "measured",
                 fmt(t_naive / t_fast, ".1f"), "0", fmt(rss_fast, ".0f")])
    if full is not None:
        rows.append(["em-interp (full seq)", slow_plan.forwards, fmt(t_full, ".1f"),
                     "measured", fmt(t_naive / t_full, ".1f"),
                     fmt(float((full.deltas - fast.deltas).abs().max()), ".1e"),
                     fmt(rss_full, ".0f")])
    rows.append(["naive loop", full_naive_forwards, fmt(t_naive, ".1f"),
                 f"x{scale:.0f} of {n_naive}", "1.0", fmt(diff(naive), ".1e"),
                 fmt(rss_naive, ".0f")])
    if t_tl is not None:
        rows.append(["TL patching", full_naive_forwards, fmt(t_tl, ".1f"),
                     f"x{scale:.0f} of {n_tl}", fmt(t_naive / t_tl, ".1f"),
                     fmt(diff(tlres), ".1e"), fmt(rss_tl, ".0f")])
    print()
    print(table(["", "forwards", "time s", "time is", "speed-up vs naive", "max|diff|",
                 "peak RSS MiB"], rows))
    speedup = t_naive / t_fast
    print(f"\nspeed-up of the KV-cache sweep over the naive loop: {speedup:.1f}x "
          f"(goal >= 10x: {'met' if speedup >= 10 else 'NOT met'})")
    top = fast.top(5)
    print("top sites (mean delta):", ", ".join(
        f"L{r.layer} {r.component} {r.mean:+.3f}" for r in top.itertuples()))
    payload.update(times_s={"kv": t_fast, "full_seq": t_full, "naive_extrapolated": t_naive,
                            "tl_extrapolated": t_tl},
                   subset={"pairs": k_sub, "layers": layers, "scale": scale},
                   max_abs_diff={"full_seq": None if full is None else float(
                       (full.deltas - fast.deltas).abs().max()),
                                 "naive": diff(naive),
                                 "tl": None if t_tl is None else diff(tlres)},
                   peak_rss_mib={"kv": rss_fast, "full_seq": rss_full, "naive": rss_naive},
                   speedup=speedup, top=top.to_dict(orient="records"))
    write_json(args.json, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
