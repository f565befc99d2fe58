"""Generation benchmark: em-interp's ``generate`` under hooks against plain HF ``generate``.

One run, one process, the same prompts, batch and lengths for every contestant, greedy, fp32 on
CPU; every ratio is against HF ``generate`` measured in the same run (nothing asserts on speed):

* **HF generate** -- ``AutoModelForCausalLM.generate`` on the left-padded chat-templated ids with
  their attention mask, ``do_sample=False``, ``eos_token_id=None`` (so every row runs to
  ``--new-tokens``), KV cache on. The baseline.
* **HF generate (hooks)** -- the same with PyTorch hooks doing what the em-interp hooks do (the
  reference of the hooked row): the two heads' slices of the last layer's ``o_proj`` input
  replaced by their means, and ``alpha * d`` added to the output of decoder layer
  ``n_layers // 2`` in decode steps only (the positions holding generated tokens).
* **em-interp, no hooks** -- ``em_interp.behaviour.generation.generate(..., stop_at_eos=False)``.
* **em-interp, hooks** -- the same under ``compose(ablate_heads(mean), steer(resid_post,
  positions="generated"))``: a mean ablation of two heads of the last layer plus a steering
  vector that only touches generated positions (the means are computed before timing).
* **TL generate** -- TransformerLens's own ``HookedTransformer.generate`` with its KV cache, on the
  same left-padded ids, told so (``padding_side="left"``, ``prepend_bos=False``): without
  ``padding_side`` TL attends to the pads and its tokens differ from HF's.

Before timing, every row of every contestant must produce the same greedy tokens as its
reference (HF generate, or HF generate with the same hooks for the hooked row); the script stops
with an error otherwise, and also when the hooks change no token at all (a vacuous check).

The headline is **em-interp (hooks) / HF generate (hooks)**: generation under an intervention
against HF ``generate`` with the same hooks, goal <= 1.05 (issue 19). The script prints it as
min, median and paired ratios (paired: the median over rounds of that round's em-interp time
over the same round's HF-with-hooks time) and whether each meets the goal; the table's columns
are all against plain HF ``generate``. ``generate`` decodes with its lean step
(``em_interp.behaviour.generation.LeanDecoder``) here; ``--tl-step`` adds a row that forces
TL's own forward for every step (a hook-free recorder at a point the lean step leaves to TL),
which is what ``generate`` did before the lean step.

Run from the repository root (see benchmarks/README.md)::

    HF_HUB_OFFLINE=1 python benchmarks/bench_generation.py [--batch 8 --new-tokens 32] [--json out.json]
    python benchmarks/bench_generation.py --tiny        # tiny random card: a smoke run only
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import (  # noqa: E402
    add_card_args,
    fmt,
    interleaved,
    pair_ratios,
    table,
    timing_rows,
    warn_if_busy,
    write_json,
)

GOAL = 1.05
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
    add_card_args(ap)
    ap.add_argument("--batch", type=int, default=8, help="prompts per batch (one batch)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--alpha", type=float, default=4.0,
                    help="steering strength (the unit direction times alpha) of the hooked row")
    ap.add_argument("--skip-tl", action="store_true", help="skip TL's own generate")
    ap.add_argument("--tl-step", action="store_true",
                    help="also time em-interp (hooks) decoding with TL's forward every step")
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
    last, mid = tl.cfg.n_layers - 1, tl.cfg.n_layers // 2
    heads = [(last, 0), (last, min(1, tl.cfg.n_heads - 1))]
    gen = torch.Generator().manual_seed(0)
    direction = torch.randn(tl.cfg.d_model, generator=gen)
    ablation = ablate_heads(lm, heads, mode="mean", reference=prompts)
    steering = steer(lm, hooks.resid_post(mid), direction, args.alpha, positions="generated",
                     normalize=True)
    hooked = compose(ablation, steering).prepare()
    hf_hooked = hf_hooks(hf, [h for _, h in heads], last,
                         ablation.state()[hooks.attn_z(last)], mid,
                         steering.alpha * steering.direction)
    width = ct.tokens.shape[1]

    def run_hf(with_hooks: bool = False):
        ctx = hf_hooked() if with_hooks else contextlib.nullcontext()
        with torch.no_grad(), ctx:
            return hf.generate(input_ids=ct.tokens, attention_mask=ct.attention_mask,
                               max_new_tokens=n_new, do_sample=False, eos_token_id=None,
                               pad_token_id=lm.tokenizer.pad_token_id)

    def run_ours(iv=None):
        return generate(lm, ct, max_new_tokens=n_new, batch_size=args.batch,
                        stop_at_eos=False, progress=False, interventions=iv)

    def run_ours_tl_step():
        # a hook at attn.hook_rot_k (which the lean step leaves to TL) keeps TL's forward
        with hooks.attached(tl, [(f"blocks.{last}.attn.hook_rot_k", lambda a, hook: None)]):
            return run_ours(hooked)

    def run_tl():
        return tl.generate(ct.tokens, max_new_tokens=n_new, do_sample=False,
                           use_past_kv_cache=True, stop_at_eos=False, verbose=False,
                           return_type="tokens", padding_side="left", prepend_bos=False)

    # correctness: every row's greedy tokens equal its reference's
    ref = run_hf()[:, width:].tolist()
    ref_hooked = run_hf(True)[:, width:].tolist()
    got = {"em-interp (no hooks)": (run_ours().df["tokens"].tolist(), ref, "HF generate"),
           "em-interp (hooks)": (run_ours(hooked).df["tokens"].tolist(), ref_hooked,
                                 "HF generate (hooks)")}
    if not args.skip_tl:
        got["TL generate"] = (run_tl()[:, width:].tolist(), ref, "HF generate")
    if args.tl_step:
        got["em-interp (hooks, TL step)"] = (run_ours_tl_step().df["tokens"].tolist(),
                                             ref_hooked, "HF generate (hooks)")
    print(f"card {args.card}: batch {args.batch} x {n_new} new tokens, greedy, fp32, "
          f"threads {torch.get_num_threads()}")
    changed = sum(a != b for a, b in zip(ref, ref_hooked, strict=True))
    print(f"the hooks change {changed}/{len(ref)} rows of HF's tokens")
    equal = {}
    for name, (rows, want, against) in got.items():
        equal[name] = [a == b for a, b in zip(rows, want, strict=True)]
        print(f"greedy tokens of {name} equal to {against}: {sum(equal[name])}/{len(want)} "
              "rows")
    bad = [f"{name}: rows {[i for i, ok in enumerate(e) if not ok]}"
           for name, e in equal.items() if not all(e)]
    if bad:
        raise SystemExit("a contestant's tokens differ from its reference (" + "; ".join(bad)
                         + "): the timings would compare different work.")
    if changed == 0:
        raise SystemExit("the hooks changed no token: the hooked check compares nothing; raise "
                         "--alpha.")

    fns = {"HF generate": run_hf, "HF generate (hooks)": lambda: run_hf(True),
           "em-interp (no hooks)": run_ours, "em-interp (hooks)": lambda: run_ours(hooked)}
    if not args.skip_tl:
        fns["TL generate"] = run_tl
    if args.tl_step:
        fns["em-interp (hooks, TL step)"] = run_ours_tl_step
    warn_if_busy("timing")
    res = interleaved(fns, baseline="HF generate", repeats=args.repeats, warmup=args.warmup)
    headers, rows = timing_rows(res, unit=1.0, unit_name="s")
    tok_s = {k: args.batch * n_new / v for k, v in res["min_s"].items()}
    headers.append("tokens/s (min)")
    for r in rows:
        r.append(fmt(tok_s[r[0]], ".0f"))
    print(table(headers, rows))
    key, ref_key = "em-interp (hooks)", "HF generate (hooks)"
    head = pair_ratios(res, key, ref_key)
    print(f"em-interp / HF generate, both under the same hooks (goal <= {GOAL}): " + ", ".join(
        f"{s} {fmt(v, '.3f')} {'ok' if v <= GOAL else 'OVER'}" for s, v in head.items()))
    if args.tl_step:
        old = pair_ratios(res, "em-interp (hooks, TL step)", ref_key)
        print("  the same with TL's forward every step: " + ", ".join(
            f"{s} {fmt(v, '.3f')}" for s, v in old.items()))
    write_json(args.json, {"card": args.card, "batch": args.batch, "new_tokens": n_new,
                           "greedy_equal_rows": {k: sum(v) for k, v in equal.items()},
                           "rows_changed_by_hooks": changed, "timing": res, "goal": GOAL,
                           "hooks_vs_hf_hooks": head,
                           "interventions": hooked.describe()})
    return 0


def hf_hooks(hf, heads: list[int], attn_layer: int, head_means, steer_layer: int, vector):
    """A context factory: the HF model with the hooked row's interventions as PyTorch hooks.

    ``head_means`` is ``[n_heads, d_head]`` (the em-interp ablation's means at
    ``blocks.<attn_layer>.attn.hook_z``, the input of ``o_proj``); ``vector`` (``[d_model]``) is
    added to decoder layer ``steer_layer``'s output (``hook_resid_post``) in decode steps, whose
    single position holds the newest generated token; the prefill is not steered.
    """
    import torch

    layers = hf.model.layers
    n_heads, d_head = head_means.shape
    means = head_means.to(torch.float32)[heads]
    vec = vector.to(torch.float32).reshape(-1)

    def ablate(module, args):
        z = args[0].unflatten(-1, (n_heads, d_head)).clone()
        z[..., heads, :] = means.to(z.dtype)
        return (z.flatten(-2), *args[1:])

    def add(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if hidden.shape[1] != 1:  # the prefill: prompt positions are not generated
            return output
        hidden = hidden + vec.to(hidden.dtype)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    @contextlib.contextmanager
    def ctx():
        handles = [layers[attn_layer].self_attn.o_proj.register_forward_pre_hook(ablate),
                   layers[steer_layer].register_forward_hook(add)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    return ctx


if __name__ == "__main__":
    sys.exit(main())
