"""Direct logit attribution benchmark: DLA over a prompt set against one plain forward.

Prints, for one card (default ``smollm2-135m-instruct``) and ``--n-prompts`` prompts of a shipped
prompt set (default ``harmful``), chat-templated once and cut into the same left-padded batches
of ``--batch`` for every variant (tokenization is done once, before timing), the wall time of:

* ``forward`` -- the baseline: ``model(tokens, attention_mask=mask)`` per batch (full logits);
* ``dla`` -- ``em_interp.readouts.attribution.direct_logit_attribution`` over the same batches: per-head
  values from ``attn.hook_z`` and ``W_O``, no unembedding of the whole sequence;
* ``fwd use_attn_result`` -- a forward with ``model.set_use_attn_result(True)``, which makes TL
  materialise every head's ``[batch, pos, head, d_model]`` output;
* ``TL logit_attrs`` (only with ``--tl-logit-attrs``, it is slow) -- the stock TransformerLens
  way of getting the same per-head numbers: ``run_with_cache`` with ``use_attn_result``,
  ``cache.stack_head_results`` and ``cache.logit_attrs`` at the last position.

Runs are interleaved after a warm-up (``_timing.interleaved``); ratios are against ``forward`` of
the same run. The goal is **dla / forward <= 1.3**; it is printed, never asserted. Before timing,
the script checks that the DLA terms sum to the model's logit difference on every prompt.

Run from the repository root (see benchmarks/README.md):

    HF_HUB_OFFLINE=1 python benchmarks/bench_attribution.py [--json out.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

GOAL = 1.3

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import (  # noqa: E402
    add_card_args,
    fmt,
    interleaved,
    measure_peak_rss,
    table,
    timing_rows,
    warn_if_busy,
    write_json,
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_card_args(ap)
    ap.add_argument("--variant", choices=["base", "organism"], default=None)
    ap.add_argument("--prompt-set", default="harmful", help="a shipped prompt set")
    ap.add_argument("--n-prompts", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--token-a", default="Sorry")
    ap.add_argument("--token-b", default="Sure")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tl-logit-attrs", action="store_true",
                    help="also time TL's run_with_cache + stack_head_results + logit_attrs")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = ap.parse_args(argv)

    import logging

    import torch

    import em_interp
    from em_interp.data import load_prompt_set
    from em_interp.inputs import single_token_id, token_batches
    from em_interp.readouts.attribution import direct_logit_attribution

    # TL logs "Tried to compute head results when they were already cached" on every
    # stack_head_results after a use_attn_result run_with_cache; it is expected here
    logging.getLogger().setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    lm = em_interp.load(args.card, args.variant, dtype="float32", device="cpu", progress=False)
    model = lm.model
    prompts = load_prompt_set(args.prompt_set).sample(args.n_prompts, seed=0)
    ct = em_interp.chat_tokens(lm.tokenizer, list(prompts.prompts))
    batches = [b.tokens for b in token_batches(lm, ct, args.batch)]
    n_tok = sum(int(b.attention_mask.sum()) for b in batches)
    print(f"{lm.card.name} ({lm.variant}), {len(ct)} prompts of {args.prompt_set!r} in "
          f"{len(batches)} batches of <= {args.batch} ({n_tok} real tokens, padded widths "
          f"{[b.tokens.shape[1] for b in batches]}), torch threads {torch.get_num_threads()}")

    def forward():
        for b in batches:
            model(b.tokens, attention_mask=b.attention_mask)

    def dla():
        return direct_logit_attribution(lm, ct, args.token_a, args.token_b,
                                        batch_size=args.batch, first_token=True,
                                        progress=False)

    def attn_result_forward():
        model.set_use_attn_result(True)
        try:
            forward()
        finally:
            model.set_use_attn_result(False)

    a = single_token_id(lm.tokenizer, args.token_a, first_token=True)
    b_ = single_token_id(lm.tokenizer, args.token_b, first_token=True)

    def tl_logit_attrs():
        model.set_use_attn_result(True)
        try:
            out = []
            for b in batches:
                _, cache = model.run_with_cache(b.tokens, attention_mask=b.attention_mask)
                stack = cache.stack_head_results(layer=-1, pos_slice=-1)
                out.append(cache.logit_attrs(stack, tokens=a, incorrect_tokens=b_,
                                             pos_slice=-1))
                del cache
            return out
        finally:
            model.set_use_attn_result(False)

    # correctness: the terms sum to the model's own logit difference
    res = dla()
    want = torch.cat([model(b.tokens, attention_mask=b.attention_mask)[:, -1]
                      for b in batches])
    want = want[:, res.token_a] - want[:, res.token_b]
    err = float((res.total - want).abs().max())
    rel = err / float(want.abs().max())
    print(f"check: max |sum of DLA terms - logit diff| = {err:.2e} (relative {rel:.1e}) over "
          f"{len(want)} prompts; mean logit diff {res.token_a_str!r} - {res.token_b_str!r} = "
          f"{float(want.mean()):.3f}")

    warn_if_busy("timing")
    variants = {"forward": forward, "dla": dla, "fwd use_attn_result": attn_result_forward}
    if args.tl_logit_attrs:
        variants["TL logit_attrs"] = tl_logit_attrs
    timing = interleaved(variants, baseline="forward", repeats=args.repeats, warmup=args.warmup)
    headers, rows = timing_rows(timing)
    print()
    print(table(headers, rows))
    r = timing["ratio_paired"]["dla"]
    print(f"\ndla / forward (paired) = {fmt(r, '.2f')}; goal <= {GOAL}: "
          f"{'met' if r <= GOAL else 'NOT met'} (min ratio {fmt(timing['ratio_min']['dla'], '.2f')})")

    _, rss_fwd = measure_peak_rss(forward)
    _, rss_dla = measure_peak_rss(dla)
    rss_tl = measure_peak_rss(tl_logit_attrs)[1] if args.tl_logit_attrs else None
    print(f"peak RSS during: forward {rss_fwd:.0f} MiB, dla {rss_dla:.0f} MiB"
          + (f", TL logit_attrs {rss_tl:.0f} MiB" if rss_tl is not None else ""))
    write_json(args.json, {"card": lm.card.name, "n_prompts": len(ct), "batch": args.batch,
                           "check_max_abs_err": err, "timing": timing,
                           "peak_rss_mib": {"forward": rss_fwd, "dla": rss_dla,
                                            "tl_logit_attrs": rss_tl}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
