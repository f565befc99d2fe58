"""BLOCK-EM benchmark: one blocked LoRA training step against one plain LoRA SFT step.

One run, one process, CPU fp32 by default, the card's HF model (default the real
``smollm2-135m-instruct``; ``--tiny`` for ``tiny-random-llama``, a smoke run only: its ~10 ms steps
measure Python overhead, not the regulariser, and give about 1.5x where SmolLM2 gives 1.2x).
Every variant runs the same optimizer step
as :func:`em_interp.training.lora.train_lora` (regulariser hooks, forward, SFT loss on the assistant
tokens, backward, clipping, AdamW) on the **same batch** of ``risky_financial_sft`` chats, on the
same PEFT model (LoRA r 16 / alpha 32 on all 7 projections, the paper's recipe):

* *plain SFT* -- no regulariser: the baseline;
* *BLOCK-EM* -- ``lambda * L_block`` (eq. 11) at a middle layer with ``|K| = 20`` latents of a
  random ReLU SAE (expansion ``--expansion``), the base reference from the **same** PEFT model
  with its adapter disabled, under ``no_grad``, stopped after the blocking layer;
* *BLOCK-EM, 2nd model* -- the same, the reference from a second frozen copy of the base (the
  paper's way);
* *KL baseline* -- ``lambda_KL * KL(p_theta || p_base)``, the base logits from the disabled
  adapter.

The LoRA ``B`` matrices start from small random values (not 0), so the trained model differs
from the base and the blocking loss and its gradient are not trivially zero. Timings are
interleaved round-robin (``_timing.interleaved``); the ratios are against *plain SFT* in the same
run. **Goals: BLOCK-EM at most 1.3x the plain step; peak RSS at most 1.1x plain SFT.**

Peak RSS: by default the peak during each variant's own steps in this process
(``measure_peak_rss``; the second model is loaded only for its own, last phase). With
``--fresh-rss`` each variant instead runs in a fresh subprocess and reports its lifetime peak
(slower: one interpreter start per variant).

Run from the repository root (see benchmarks/README.md)::

    HF_HUB_OFFLINE=1 python benchmarks/bench_block_em.py [--tiny] [--threads 0] [--fresh-rss]
        [--json out.json]

``--threads`` defaults to 1: on a shared CPU, torch's thread pool waiting for busy cores can
make a step 50x slower and the ratios meaningless.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import (  # noqa: E402
    add_card_args,
    fmt,
    interleaved,
    measure_peak_rss,
    peak_rss_mib,
    ratio,
    table,
    timing_rows,
    warn_if_busy,
    write_json,
)

GOAL_TIME = 1.3
GOAL_RSS = 1.1
VARIANTS = {"plain": "plain SFT", "block": "BLOCK-EM", "block2": "BLOCK-EM, 2nd model",
            "kl": "KL baseline"}


def build(args):
    """The PEFT model, the batch, the SAE and latent set, and one step function per variant."""
    import torch
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    from em_interp.block_em import LatentSet
    from em_interp.block_em.train import Block, BlockingRegularizer, KLRegularizer
    from em_interp.data import load_prompt_set
    from em_interp.training.lora import (
        LoRATrainConfig,
        collate,
        load_base_hf,
        sft_logits,
        tokenize_sft,
        wrap_in_lora,
    )

    cfg = LoRATrainConfig(rank=16, alpha=32, lr=1e-5, batch_size=args.batch,
                          max_length=args.max_length, device=args.device)
    card, _, hf, tok = load_base_hf(args.card, dtype=cfg.dtype, device=args.device,
                                    progress=False)
    n_layers = hf.config.num_hidden_layers
    layer = args.layer if args.layer is not None else max(0, min(n_layers // 2, n_layers - 2))
    hook = f"blocks.{layer}.hook_resid_post"
    model = wrap_in_lora(hf, cfg, n_layers)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1e-3)
    device = next(model.parameters()).device

    convs = [c for c in load_prompt_set("risky_financial_sft").train().conversations
             if len(c[0]["content"]) <= 150]
    examples = tokenize_sft(tok, convs[: 4 * args.batch], cfg.max_length)[: args.batch]
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    batch = collate(examples, pad).to(device)

    d = hf.config.hidden_size
    sae = StandardSAE(StandardSAEConfig(d_in=d, d_sae=args.expansion * d,
                                        metadata=SAEMetadata(hook_name=hook))).to(device).eval()
    g = torch.Generator().manual_seed(0)
    ks = torch.randperm(args.expansion * d, generator=g)[:20].tolist()
    latent_set = LatentSet.planted(sae, k_plus=ks[:10], k_minus=ks[10:])

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    n_tok = int(batch.pred_mask.sum())
    targets = batch.input_ids[:, 1:][batch.pred_mask[:, :-1]]

    def step_fn(regs):
        import contextlib

        def step():
            for r in regs:
                r.before_forward(model, batch)
            with contextlib.ExitStack() as stack:
                for r in regs:
                    stack.enter_context(r.trained_forward(model))
                logits = sft_logits(model, batch)
            loss = torch.nn.functional.cross_entropy(logits, targets, reduction="sum") / n_tok
            for r in regs:
                term, _ = r.loss(model, batch, logits)
                loss = loss + term
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    def blocking(reference_model=None):
        reg = BlockingRegularizer(
            [Block(sae, latent_set)], args.lam,
            reference="second_model" if reference_model is not None else "disabled_adapter",
            reference_model=reference_model)
        reg.setup(model, n_layers)
        return reg

    makers = {
        "plain": lambda: step_fn([]),
        "block": lambda: step_fn([blocking()]),
        "block2": lambda: step_fn([blocking(load_base_hf(card, dtype=cfg.dtype,
                                                         device=args.device,
                                                         progress=False)[2])]),
        "kl": lambda: step_fn([KLRegularizer(args.kl_lambda)]),
    }
    info = {"card": card.name, "hook": hook, "batch": list(batch.input_ids.shape),
            "n_target_tokens": n_tok, "d_sae": args.expansion * d, "n_latents": 20,
            "device": str(device), "lora_params": sum(p.numel() for p in params)}
    return makers, info


def child(args) -> int:
    """``--child VARIANT``: build, run a few steps of one variant, print its peak RSS as JSON."""
    makers, _ = build(args)
    step = makers[args.child]()
    for _ in range(args.rss_steps):
        step()
    print(json.dumps({"variant": args.child, "peak_rss_mib": peak_rss_mib()}))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_card_args(ap)
    ap.add_argument("--layer", type=int, default=None, help="blocking layer (default: middle)")
    ap.add_argument("--batch", type=int, default=2, help="chats per step")
    ap.add_argument("--max-length", type=int, default=96)
    ap.add_argument("--expansion", type=int, default=8, help="SAE expansion factor")
    ap.add_argument("--lam", type=float, default=100.0, help="BLOCK-EM lambda")
    ap.add_argument("--kl-lambda", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rss-steps", type=int, default=2, help="steps per variant for peak RSS")
    ap.add_argument("--variants", default="plain,block,block2,kl",
                    help=f"comma-separated subset of {list(VARIANTS)} (plain is always run)")
    ap.add_argument("--fresh-rss", action="store_true",
                    help="peak RSS of each variant in a fresh subprocess")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (0: torch's default); 1 keeps timings stable on a "
                         "shared machine")
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return child(args)
    wanted = set(args.variants.split(","))
    names = [v for v in ("plain", "block", "kl", "block2") if v == "plain" or v in wanted]

    makers, info = build(args)
    print(f"{info['card']}: batch {info['batch']} ({info['n_target_tokens']} target tokens), "
          f"blocking at {info['hook']}, SAE d_sae {info['d_sae']}, |K| = 20, "
          f"{info['lora_params']:,} LoRA parameters, device {info['device']}, "
          f"threads {torch.get_num_threads()}")

    # peak RSS per variant
    rss = {}
    if args.fresh_rss:
        print("\n== peak RSS (fresh subprocess each) ==")
        flags = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--fresh-rss"]
        for v in names:
            out = subprocess.run([sys.executable, __file__, *flags, "--child", v],
                                 capture_output=True, text=True, check=True)
            rss[v] = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mib"]
    else:
        print("\n== peak RSS (this process, during each variant's steps; a later phase also "
              "holds what earlier ones allocated: use --fresh-rss for per-variant peaks) ==")
    steps = {}
    for v in names:  # block2 last: its second model stays loaded from then on
        steps[v] = makers[v]()
        _, peak = measure_peak_rss(lambda s=steps[v]: [s() for _ in range(args.rss_steps)])
        rss.setdefault(v, peak)
    rows = [[VARIANTS[v], fmt(rss[v], ".0f"), fmt(ratio(rss[v], rss["plain"]), ".3f")]
            for v in names]
    print(table(["variant", "peak RSS MiB", "/plain SFT"], rows))

    # step time, interleaved
    print("\n== step time ==")
    warn_if_busy("timing")
    res = interleaved({VARIANTS[v]: steps[v] for v in names}, baseline="plain SFT",
                      repeats=args.repeats, warmup=1)
    print(table(*timing_rows(res)))

    block = VARIANTS["block"]
    if "block" in names:
        t = res["ratio_paired"][block]
        r = ratio(rss["block"], rss["plain"])
        print(f"\nBLOCK-EM step / plain step = {t:.2f} (paired), {res['ratio_min'][block]:.2f} "
              f"(min)  (goal <= {GOAL_TIME}: {'met' if t <= GOAL_TIME else 'NOT met'})")
        print(f"BLOCK-EM peak RSS / plain = {r:.3f}  (goal <= {GOAL_RSS}: "
              f"{'met' if r <= GOAL_RSS else 'NOT met'})")
    write_json(args.json, {"benchmark": "block_em", "args": vars(args), "info": info,
                           "timing": res, "peak_rss_mib": rss, "fresh_rss": args.fresh_rss})
    return 0


if __name__ == "__main__":
    sys.exit(main())
