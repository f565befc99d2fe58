"""SAE benchmark: training through em-interp against SAE-Lens's own trainer, encode throughput,
and training from an activation store against training from text.

One run, one process, CPU fp32, the card's model (default ``smollm2-135m-instruct``); every
ratio is against a baseline measured in the same run (nothing asserts on speed):

1. **Training throughput** -- the same activations (real tokens of ``--prompts`` prompts at
   ``blocks.<layer>.hook_resid_post``, collected once, in memory), the same SAE (standard,
   ``--expansion``), seed, batch and steps:

   * *SAE-Lens SAETrainer* -- ``SAETrainer(cfg, sae, data_provider, evaluator=None).fit()`` on a
     shuffling iterator over the tensor: the baseline;
   * *em-interp train_sae (fit)* -- ``train_sae(model, hook, tensor, cfg)``, timing only the
     trainer's ``fit`` as ``train_sae`` records it (``result.train_seconds``): what the toolkit's
     data provider and loss recorder cost. **Goal: SAE-Lens time / em-interp time >= 0.95**;
   * *em-interp train_sae (call)* -- the whole call: also the SAE-Lens folder, reloading the SAE
     and the final explained variance / L0 / dead fraction (no CE loss).

2. **Encode throughput** -- ``encode(model, sae, prompts, "mean")`` (z-bar over real tokens,
   batched, forward stopped after the SAE's block) against the bare forward it needs
   (``model(tokens, attention_mask, stop_at_layer=layer + 1)`` on the same batches).

3. **Store vs text** -- training ``--n-saes`` SAEs (different seeds) on the same data:
   *from text* through SAE-Lens's ``LanguageModelSAETrainingRunner`` (``train_sae`` with local
   text: the model runs again for every SAE) against *from a store*: ``cache_activations(...,
   reduce="none")`` once, then ``train_sae`` from the store for each SAE. Same token budget,
   batch and SAE.

Run from the repository root (see benchmarks/README.md)::

    HF_HUB_OFFLINE=1 python benchmarks/bench_sae.py [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import (  # noqa: E402
    add_card_args,
    fmt,
    interleaved,
    table,
    timing_rows,
    warn_if_busy,
    write_json,
)

GOAL = 0.95


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_card_args(ap)
    ap.add_argument("--layer", type=int, default=None, help="default: max(n_layers - 6, n_layers // 2)")
    ap.add_argument("--prompts", type=int, default=32, help="prompts from the harmful set")
    ap.add_argument("--expansion", type=int, default=4)
    ap.add_argument("--batch", type=int, default=256, help="tokens per SAE step")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n-saes", type=int, default=2, help="SAEs trained in part 3")
    ap.add_argument("--text-steps", type=int, default=8, help="SAE steps per SAE in part 3")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-text", action="store_true", help="skip part 3")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import torch
    from sae_lens import SAETrainer, TrainingSAE
    from sae_lens.util import temporary_seed

    import em_interp
    from em_interp import hooks
    from em_interp.activations.cache import cache_activations
    from em_interp.data import load_prompt_set
    from em_interp.hooks import check_layer
    from em_interp.sae import SAETrainConfig, encode, train_sae
    from em_interp.sae.data import special_token_ids, tensor_batches
    from em_interp.sae.evaluate import collect_token_activations
    from em_interp.sae.train import quiet_sae_lens, trainer_config, training_sae_config

    if args.threads:
        torch.set_num_threads(args.threads)
    lm = em_interp.load(args.card, "base", progress=False)
    tl = lm.model
    layer = max(tl.cfg.n_layers - 6, tl.cfg.n_layers // 2) if args.layer is None else args.layer
    hook = hooks.resid_post(check_layer(tl, layer))
    prompts = load_prompt_set("harmful").sample(args.prompts, seed=0)
    work = Path(tempfile.mkdtemp(prefix="bench_sae_"))
    out: dict = {"card": args.card, "hook": hook, "threads": torch.get_num_threads(),
                 "args": vars(args)}
    print(f"{args.card}  hook {hook}  d_in {tl.cfg.d_model}  d_sae "
          f"{tl.cfg.d_model * args.expansion}  threads {torch.get_num_threads()}")

    # ---------------------------------------------------------------- 1. training throughput
    t = time.perf_counter()
    acts = collect_token_activations(lm, hook, prompts, exclude_token_ids=special_token_ids(lm))
    print(f"activations: {tuple(acts.shape)} from {len(prompts)} prompts "
          f"({time.perf_counter() - t:.1f} s)")
    cfg = SAETrainConfig(expansion_factor=args.expansion, batch_size=args.batch,
                         training_tokens=args.batch * args.steps, ce_loss=False, seed=0,
                         normalize_activations="none", out_dir=str(work / "sae"))
    fit_times: list[float] = []

    def run_sae_lens():
        with temporary_seed(cfg.seed), quiet_sae_lens(progress=False):
            sae = TrainingSAE.from_dict(training_sae_config(cfg, acts.shape[1], "cpu",
                                                            hook).to_dict())
            provider = tensor_batches(acts, cfg.batch_size, cfg.seed)
            SAETrainer(cfg=trainer_config(cfg, "cpu"), sae=sae, data_provider=provider,
                       evaluator=None).fit()

    def run_toolkit():
        res = train_sae(lm, hook, acts, cfg, overwrite=True, progress=False)
        fit_times.append(res.train_seconds)

    warn_if_busy("training")
    res = interleaved({"SAE-Lens SAETrainer": run_sae_lens, "em-interp train_sae": run_toolkit},
                      baseline="SAE-Lens SAETrainer", repeats=args.repeats, warmup=1)
    base = res["times_s"]["SAE-Lens SAETrainer"]
    fits = fit_times[-len(base):]
    res["times_s"]["em-interp train_sae (fit)"] = fits
    tokens = args.batch * args.steps
    headers = ["", "min s", "median s", "tokens/s (min)", "SAE-Lens / this (min)",
               "SAE-Lens / this (paired)"]
    rows = []
    import statistics

    for name, ts in (("SAE-Lens SAETrainer", base), ("em-interp train_sae (fit)", fits),
                     ("em-interp train_sae (call)", res["times_s"]["em-interp train_sae"])):
        paired = statistics.median(b / x for b, x in zip(base, ts, strict=True))
        rows.append([name, fmt(min(ts), ".2f"), fmt(statistics.median(ts), ".2f"),
                     fmt(tokens / min(ts), ".0f"), fmt(min(base) / min(ts), ".3f"),
                     fmt(paired, ".3f")])
    print(f"\n1. SAE training, {args.steps} steps x {args.batch} tokens "
          f"(throughput ratio = SAE-Lens time / em-interp time; goal >= {GOAL})")
    print(table(headers, rows))
    ratio_fit = statistics.median(b / x for b, x in zip(base, fits, strict=True))
    print(f"   fit throughput ratio (paired) {ratio_fit:.3f}: "
          f"{'meets' if ratio_fit >= GOAL else 'misses'} the goal >= {GOAL}")
    out["training"] = {**res, "fit_ratio_paired": ratio_fit, "tokens": tokens}

    # ---------------------------------------------------------------- 2. encode throughput
    sae = train_sae(lm, hook, acts, cfg, progress=False).sae
    n_tok = sum(tokenize_lengths(lm, prompts))
    from em_interp.inputs import token_batches

    batches = [b.tokens for b in token_batches(lm, prompts, 8)]

    def run_forward():
        with torch.no_grad():
            for ct in batches:
                tl(ct.tokens, attention_mask=ct.attention_mask, return_type=None,
                   stop_at_layer=layer + 1)

    def run_encode():
        encode(lm, sae, prompts, "mean", batch_size=8, progress=False)

    warn_if_busy("encode")
    enc = interleaved({"forward to the hook": run_forward, "encode (z-bar)": run_encode},
                      baseline="forward to the hook", repeats=args.repeats, warmup=1)
    print(f"\n2. encode over {len(prompts)} prompts ({n_tok} tokens), batch 8, reduce='mean' "
          "(ratio = time / bare forward)")
    h, r = timing_rows(enc)
    print(table(h + ["tokens/s (min)"],
                [row + [fmt(n_tok / enc["min_s"][row[0]], ".0f")] for row in r]))
    out["encode"] = {**enc, "tokens": n_tok}

    # ---------------------------------------------------------------- 3. store vs text
    if not args.skip_text:
        texts = [p if isinstance(p, str) else p[-1]["content"] for p in prompts.prompts]
        # the runner's buffer (n_batches_in_buffer x context_size tokens) must hold a batch
        ctx = 32
        small = dict(expansion_factor=args.expansion, batch_size=256,
                     training_tokens=256 * args.text_steps, ce_loss=False,
                     normalize_activations="none", context_size=ctx,
                     n_batches_in_buffer=-(-256 // ctx))
        warn_if_busy("store vs text")
        t = time.perf_counter()
        for s in range(args.n_saes):
            train_sae(lm, hook, texts_dataset(texts),
                      SAETrainConfig(**small, seed=s, out_dir=str(work / f"text{s}")),
                      overwrite=True, progress=False)
        t_text = time.perf_counter() - t
        t = time.perf_counter()
        store = cache_activations(lm, prompts, hook, work / "store", reduce="none",
                                  progress=False)
        t_cache = time.perf_counter() - t
        t = time.perf_counter()
        for s in range(args.n_saes):
            train_sae(lm, hook, store, SAETrainConfig(**small, seed=s,
                                                      out_dir=str(work / f"store{s}")),
                      overwrite=True, progress=False)
        t_store = time.perf_counter() - t
        print(f"\n3. {args.n_saes} SAEs x {args.text_steps} steps x 256 tokens: from text "
              "(SAE-Lens runner) vs from an activation store")
        print(table(["", "total s", "per SAE s", "text / this"],
                    [["from text (runner)", fmt(t_text, ".1f"),
                      fmt(t_text / args.n_saes, ".1f"), "1.00"],
                     ["store: cache once", fmt(t_cache, ".1f"), "-", "-"],
                     ["store: train", fmt(t_store, ".1f"), fmt(t_store / args.n_saes, ".1f"),
                      fmt(t_text / t_store, ".2f")],
                     ["store: cache + train", fmt(t_cache + t_store, ".1f"),
                      fmt((t_cache + t_store) / args.n_saes, ".1f"),
                      fmt(t_text / (t_cache + t_store), ".2f")]]))
        out["store_vs_text"] = {"text_s": t_text, "cache_s": t_cache, "store_train_s": t_store,
                                "n_saes": args.n_saes, "store_rows": store.n_rows}
    shutil.rmtree(work, ignore_errors=True)
    write_json(args.json, out)
    return 0


def tokenize_lengths(lm, prompts) -> list[int]:
    from em_interp.inputs import tokenize

    return tokenize(lm, prompts).lengths


def texts_dataset(texts: list[str]):
    from em_interp.sae import text_dataset

    return text_dataset(texts)


if __name__ == "__main__":
    raise SystemExit(main())
