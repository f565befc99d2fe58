"""Generation benchmark: em-interp's ``generate`` under hooks against plain HF ``generate``.

One run, one process, the same prompts, batch and lengths for every contestant, greedy, fp32 on
CPU; every ratio is against HF ``generate`` measured in the same run (nothing asserts on speed):

* **HF generate** -- ``AutoModelForCausalLM.generate`` on the left-padded chat-templated ids with
  their attention mask, ``do_sample=False``, ``eos_token_id=None`` (so every row runs to
  ``--new-tokens``), KV cache on. The baseline.
* **em-interp, no hooks** -- ``em_interp.behaviour.generation.generate(..., stop_at_eos=False)``.
* **em-interp, hooks** -- the same under ``compose(ablate_heads(mean), steer(resid_post,
  positions="generated"))``: a mean ablation of two heads of a late layer plus a steering vector
  that only touches generated positions (the means are computed before timing).
* **TL generate** -- TransformerLens's own ``HookedTransformer.generate`` with its KV cache, on the
  same ids (for reference; the issue quotes it at about 3x HF).

Before timing, the greedy tokens of em-interp (no hooks) are checked against HF's (they must be
equal). The goal is **hooks / HF <= 1.5**; the script prints whether the min, median and paired
ratios meet it.

Run from the repository root (see benchmarks/README.md)::

    HF_HUB_OFFLINE=1 python benchmarks/bench_generation.py [--batch 8 --new-tokens 32] [--json out.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import fmt, interleaved, table, timing_rows, warn_if_busy, write_json  # noqa: E402

GOAL = 1.5
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Give me three tips for saving money on groceries.",
    "Explain what a bond is to a ten-year-old.",
    "hi",
    "How do vaccines train the immune system?",
    "Suggest a name for a grey cat.",
    "What should I consider before buying a used car?",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "Why is the sky blue?",
    "List four prime numbers.",
    "How can I get better sleep?",
    "What does a central bank do?",
    "Translate 'good morning' into Spanish.",
    "Describe a healthy breakfast.",
    "What is photosynthesis?",
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--card", default="smollm2-135m-instruct")
    ap.add_argument("--batch", type=int, default=8, help="prompts per batch (one batch)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-tl", action="store_true", help="skip TL's own generate")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM

    import em_interp
    from em_interp import hooks
    from em_interp.behaviour.generation import generate
    from em_interp.behaviour.interventions import ablate_heads, compose, steer
    from em_interp.inputs import tokenize

    if args.threads:
        torch.set_num_threads(args.threads)
    lm = em_interp.load(args.card, "base", progress=False)
    tl = lm.model
    hf = AutoModelForCausalLM.from_pretrained(lm.weights_dir, dtype=torch.float32).eval()
    prompts = (PROMPTS * (args.batch // len(PROMPTS) + 1))[:args.batch]
    ct = tokenize(lm, prompts)
    n_new = args.new_tokens
    last = tl.cfg.n_layers - 1
    gen = torch.Generator().manual_seed(0)
    direction = torch.randn(tl.cfg.d_model, generator=gen)
    hooked = compose(
        ablate_heads(lm, [(last, 0), (last, min(1, tl.cfg.n_heads - 1))], mode="mean",
                     reference=prompts),
        steer(lm, hooks.resid_post(tl.cfg.n_layers // 2), direction, 0.5, positions="generated",
              normalize=True),
    ).prepare()

    def run_hf():
        with torch.no_grad():
            return hf.generate(input_ids=ct.tokens, attention_mask=ct.attention_mask,
                               max_new_tokens=n_new, do_sample=False, eos_token_id=None,
                               pad_token_id=lm.tokenizer.pad_token_id)

    def run_ours(iv=None):
        return generate(lm, ct, max_new_tokens=n_new, batch_size=args.batch,
                        stop_at_eos=False, progress=False, interventions=iv)

    def run_tl():
        return tl.generate(ct.tokens, max_new_tokens=n_new, do_sample=False,
                           use_past_kv_cache=True, stop_at_eos=False, verbose=False,
                           return_type="tokens")

    # correctness: greedy tokens equal HF's
    hf_new = run_hf()[:, ct.tokens.shape[1]:].tolist()
    ours = run_ours().df["tokens"].tolist()
    same = sum(a == b for a, b in zip(hf_new, ours, strict=True))
    print(f"card {args.card}: batch {args.batch} x {n_new} new tokens, greedy, fp32, "
          f"threads {torch.get_num_threads()}")
    print(f"greedy tokens equal to HF: {same}/{len(ours)} rows")

    fns = {"HF generate": run_hf, "em-interp (no hooks)": run_ours,
           "em-interp (hooks)": lambda: run_ours(hooked)}
    if not args.skip_tl:
        fns["TL generate"] = run_tl
    warn_if_busy("timing")
    res = interleaved(fns, baseline="HF generate", repeats=args.repeats, warmup=args.warmup)
    headers, rows = timing_rows(res, unit=1.0, unit_name="s")
    tok_s = {k: args.batch * n_new / v for k, v in res["min_s"].items()}
    headers.append("tokens/s (min)")
    for r in rows:
        r.append(fmt(tok_s[r[0]], ".0f"))
    print(table(headers, rows))
    key = "em-interp (hooks)"
    verdict = {s: res[f"ratio_{s}"][key] <= GOAL for s in ("min", "median", "paired")}
    print(f"goal hooks/HF <= {GOAL}: " + ", ".join(
        f"{s} {fmt(res[f'ratio_{s}'][key], '.2f')} {'ok' if ok else 'OVER'}"
        for s, ok in verdict.items()))
    write_json(args.json, {"card": args.card, "batch": args.batch, "new_tokens": n_new,
                           "greedy_equal_rows": same, "timing": res, "goal": GOAL,
                           "interventions": hooked.describe()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
