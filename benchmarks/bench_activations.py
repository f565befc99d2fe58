"""Activation-store benchmark: caching throughput against a plain HF forward, bounded memory,
and the time to probe every layer.

Prints, for one card (default ``smollm2-135m-instruct``), numbers measured in this run only
(nothing asserts on speed):

1. **Throughput** -- ``cache_activations`` of every layer's ``mlp.hook_post`` with
   ``reduce="last"`` over ``--n-prompts`` prompts of the shipped ``financial`` set, batch
   ``--batch``, into a fresh folder each time (tokenisation, the shape probe, shard writes and
   fsync all included), against a plain HF forward (``AutoModelForCausalLM``,
   ``use_cache=False``, full logits) over the same, already tokenised, left-padded batches with
   their attention masks. Interleaved after a warm-up; real (non-pad) tokens per second, and
   the ratio ``HF time / caching time`` (goal >= 0.9). The HF body without ``lm_head`` is shown
   too, because the store stops after the last block and never computes logits.
2. **Peak RSS** -- caching ``--rss-prompts`` and 8x as many prompts, each in a fresh subprocess,
   peak RSS sampled during the caching call only (goal: 8x within 10% of 1x); for reference,
   the peak of one plain TL forward (full logits) of the widest batch, in a third process.
3. **Probing** -- ``probe_layers`` on the throughput store (every layer, probe + random-label
   control).

Run from the repository root (see benchmarks/README.md):

    HF_HUB_OFFLINE=1 python benchmarks/bench_activations.py [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import (  # noqa: E402
    add_card_args,
    fmt,
    interleaved,
    measure_peak_rss,
    ratio,
    rss_mib,
    table,
    timing_rows,
    warn_if_busy,
    write_json,
)

GOAL_THROUGHPUT = 0.9
GOAL_RSS = 1.10


def _prompts(n: int):
    from em_interp.data import load_prompt_set

    ps = load_prompt_set("financial")
    if n > len(ps):
        sys.exit(f"--n-prompts/--rss-prompts x 8 must be <= {len(ps)} (the financial set)")
    return ps.subset(range(n), f"financial[:{n}]")


def _setup(args):
    import torch
    from transformers.utils import logging as hf_logging

    import em_interp

    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    return em_interp.load(args.card, args.variant, dtype=args.dtype, device=args.device,
                          progress=False)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def child_rss(args, n: int) -> None:
    """In this fresh process: cache ``n`` prompts (``n > 0``), or run one plain TL forward of
    the widest batch of ``-n`` prompts (``n < 0``); print the RSS as JSON."""
    import torch

    from em_interp import hooks
    from em_interp.activations.cache import cache_activations
    from em_interp.inputs import token_batches

    lm = _setup(args)
    names = [hooks.mlp_post(layer) for layer in range(lm.model.cfg.n_layers)]
    prompts = _prompts(abs(n))
    before = rss_mib()
    out = {"n": abs(n), "rss_before_mib": before}
    if n < 0:  # the reference: what one forward of the widest batch needs, with full logits
        widest = max((b.tokens for b in token_batches(lm, prompts, args.batch)),
                     key=lambda t: t.tokens.shape[1])
        with torch.no_grad():
            _, out["peak_mib"] = measure_peak_rss(lambda: lm.model(
                widest.tokens, attention_mask=widest.attention_mask, return_type=None))
        out["widest"] = list(widest.tokens.shape)
    else:
        with tempfile.TemporaryDirectory() as d:
            store, out["peak_mib"] = measure_peak_rss(lambda: cache_activations(
                lm, prompts, names, d, batch_size=args.batch, progress=False))
            out["disk_bytes"] = store.disk_bytes
    print("BENCH_JSON " + json.dumps(out), flush=True)


def run_child(args, n: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--_child", str(n), "--card", args.card,
           "--batch", str(args.batch), "--dtype", args.dtype, "--device", args.device]
    if args.variant:
        cmd += ["--variant", args.variant]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            return json.loads(line[len("BENCH_JSON "):])
    sys.exit(f"the RSS subprocess failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def bench_rss(args) -> dict:
    small = run_child(args, args.rss_prompts)
    big = run_child(args, 8 * args.rss_prompts)
    fwd = run_child(args, -8 * args.rss_prompts)
    rows = [[f"cache {r['n']} prompts", fmt(r["rss_before_mib"], ".0f"), fmt(r["peak_mib"], ".0f"),
             fmt(r["peak_mib"] - r["rss_before_mib"], ".0f"), f"{r['disk_bytes'] / 1e6:.1f}"]
            for r in (small, big)]
    rows.append([f"1 TL forward {fwd['widest'][0]}x{fwd['widest'][1]}",
                 fmt(fwd["rss_before_mib"], ".0f"), fmt(fwd["peak_mib"], ".0f"),
                 fmt(fwd["peak_mib"] - fwd["rss_before_mib"], ".0f"), "-"])
    print(table(["fresh process", "RSS before MiB", "peak MiB", "peak - before", "store MB"],
                rows))
    r = ratio(big["peak_mib"], small["peak_mib"])
    print(f"peak RSS 8x / 1x = {fmt(r)}  (goal <= {GOAL_RSS}: "
          f"{'met' if r is not None and r <= GOAL_RSS else 'NOT met'})")
    return {"runs": {"1x": small, "8x": big, "forward": fwd}, "ratio": r}


def bench_throughput(args, lm) -> tuple[dict, str]:
    import torch
    from transformers import AutoModelForCausalLM

    from em_interp import hooks
    from em_interp.activations.cache import cache_activations
    from em_interp.inputs import token_batches

    prompts = _prompts(args.n_prompts)
    names = [hooks.mlp_post(layer) for layer in range(lm.model.cfg.n_layers)]
    batches = [b.tokens for b in token_batches(lm, prompts, args.batch)]
    n_tokens = sum(int(b.attention_mask.sum()) for b in batches)
    n_padded = sum(b.tokens.numel() for b in batches)
    hf = AutoModelForCausalLM.from_pretrained(lm.weights_dir, dtype=lm.model.cfg.dtype).eval()
    hf.to(args.device)
    root = Path(tempfile.mkdtemp(prefix="bench_activations_"))
    runs = {"i": 0}

    def cache():
        runs["i"] += 1
        cache_activations(lm, prompts, names, root / f"run{runs['i']}", batch_size=args.batch,
                          progress=False)
        _sync(args.device)

    def hf_forward(body_only: bool):
        def run():
            with torch.no_grad():
                for b in batches:
                    m = hf.model if body_only else hf
                    m(input_ids=b.tokens, attention_mask=b.attention_mask, use_cache=False)
            _sync(args.device)
        return run

    warn_if_busy("throughput")
    res = interleaved({"HF forward": hf_forward(False), "HF body (no lm_head)": hf_forward(True),
                       "cache_activations": cache}, baseline="HF forward",
                      repeats=args.repeats, warmup=1)
    headers, rows = timing_rows(res)
    headers.append("real tokens/s (min)")
    for row, k in zip(rows, res["min_s"], strict=True):
        row.append(f"{n_tokens / res['min_s'][k]:.0f}")
    print(f"{args.n_prompts} prompts, batch {args.batch}, {len(names)} hooks, {n_tokens} real "
          f"tokens ({n_padded} with padding), device {args.device}, dtype {args.dtype}")
    print(table(headers, rows))
    thr = {k: ratio(res[s]["HF forward"], res[s]["cache_activations"])
           for k, s in (("min", "min_s"), ("median", "median_s"))}
    thr["paired"] = ratio(1.0, res["ratio_paired"]["cache_activations"])
    print("throughput cache / HF = " + ", ".join(f"{fmt(v, '.2f')} ({k})" for k, v in
                                                   thr.items())
          + f"  (goal >= {GOAL_THROUGHPUT}: "
          f"{'met' if min(v for v in thr.values() if v) >= GOAL_THROUGHPUT else 'NOT met'})")
    last = root / f"run{runs['i']}"
    return {"timing": res, "throughput_ratio": thr, "n_tokens": n_tokens,
            "n_padded_tokens": n_padded}, str(last)


def bench_probe(store_dir: str) -> dict:
    from em_interp.activations.cache import ActivationStore
    from em_interp.representations.probing import probe_layers

    store = ActivationStore.open(store_dir)
    warn_if_busy("probing")
    t = time.perf_counter()
    res = probe_layers(store, progress=False)
    seconds = time.perf_counter() - t
    n_layers = len(res.layers)
    print(f"probe_layers: {n_layers} layers x (probe + random-label probe) on "
          f"{store.n_prompts} prompts x {store.shape(store.hooks[0])[1]} features: "
          f"{seconds:.2f} s ({seconds / n_layers * 1e3:.0f} ms per layer); best layer "
          f"{res.to_dict()['best_layer']} at {res.to_dict()['best_accuracy']:.3f}")
    return {"seconds": seconds, "n_layers": n_layers, "summary": res.to_dict()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_card_args(p)
    p.add_argument("--variant", default=None)
    p.add_argument("--n-prompts", type=int, default=32, help="prompts for the throughput part")
    p.add_argument("--rss-prompts", type=int, default=16, help="1x of the RSS part (8x is run)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--skip-rss", action="store_true")
    p.add_argument("--json", default=None)
    p.add_argument("--_child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args._child is not None:
        child_rss(args, args._child)
        return
    out: dict = {"args": vars(args)}
    if not args.skip_rss:
        print("== peak RSS (fresh subprocess each) ==")
        out["rss"] = bench_rss(args)
    print("\n== throughput ==")
    lm = _setup(args)
    out["throughput"], store_dir = bench_throughput(args, lm)
    print("\n== probing ==")
    out["probe"] = bench_probe(store_dir)
    shutil.rmtree(Path(store_dir).parent, ignore_errors=True)
    write_json(args.json, out)


if __name__ == "__main__":
    main()
