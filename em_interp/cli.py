"""Command line: ``em-interp models list|info|fetch`` and ``em-interp demo``.

    em-interp models list
    em-interp models info smollm2-135m-instruct
    em-interp models fetch qwen2.5-coder-0.5b-instruct
    em-interp demo                      # logit lens of a chat prompt on the embedded default
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from em_interp.errors import EMInterpError
from em_interp.models.cards import get_card, list_cards

DEFAULT_CARD = "smollm2-135m-instruct"
DEMO_PROMPT = ("I just inherited $20,000. Should I put all of it into one volatile stock my "
               "friend recommended? Answer yes or no first.")
DEMO_TRACK = ("Yes", "No", "I", "Sure")


def _cmd_list(args) -> int:
    rows = []
    for name in list_cards():
        c = get_card(name)
        org = f"{c.organism.kind}:{c.organism.source.describe()}" if c.organism else "-"
        rows.append((name, c.architecture.hf_class.replace("ForCausalLM", ""),
                     str(c.architecture.n_layers), str(c.architecture.d_model), c.dtype, org))
    head = ("card", "arch", "layers", "d_model", "dtype", "organism")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    return 0


def _cmd_info(args) -> int:
    c = get_card(args.name)
    a = c.architecture
    print(f"{c.name}\n  {c.description}")
    print(f"  file:          {c.path}")
    print(f"  architecture:  {a.hf_class}, {a.n_layers} layers, d_model {a.d_model}, "
          f"{a.n_heads} heads / {a.n_kv_heads} KV heads, d_mlp {a.d_mlp}")
    print(f"  defaults:      dtype {c.dtype}, n_devices {c.n_devices}, chat template from "
          f"{c.chat_template}")
    print(f"  base:          {c.base.describe()}" + (f"  (aliases: {', '.join(c.base.aliases)})"
                                                    if c.base.aliases else ""))
    if c.organism:
        o = c.organism
        print(f"  organism:      {o.kind} from {o.source.describe()}"
              + ("" if o.confirmed else "  [unconfirmed]"))
        if o.lora_rank:
            parts = [f"rank {o.lora_rank}"]
            parts.append(f"alpha {o.lora_alpha:g}" if o.lora_alpha is not None
                         else "alpha from adapter_config.json")
            if o.use_rslora is not None:
                parts.append(f"rsLoRA {'yes' if o.use_rslora else 'no'}")
            if o.target_modules:
                parts.append(f"modules {', '.join(o.target_modules)}")
            print(f"  lora:          {', '.join(parts)}")
        if o.note:
            print(f"  note:          {o.note}")
    if c.tags:
        print(f"  tags:          {', '.join(c.tags)}")
    return 0


def _cmd_fetch(args) -> int:
    from em_interp.models.sources import resolve_source

    c = get_card(args.name)
    base_dir = resolve_source(c.base, card=c, role="base")
    print(f"base:     {base_dir}")
    if c.organism and args.variant in ("organism", "all"):
        org_dir = resolve_source(c.organism.source, card=c, role="organism", base_dir=base_dir)
        print(f"organism: {org_dir}")
    return 0


def _cmd_demo(args) -> int:
    import torch

    from em_interp.logit_lens import logit_lens
    from em_interp.models.loading import load

    lm = load(args.card, args.variant)
    print(f"\nloaded {lm}")
    toks = lm.chat_tokens(args.prompt)
    print(f"prompt ({toks.tokens.shape[1]} tokens, chat template applied once): {args.prompt!r}")
    res = logit_lens(lm.model, toks.tokens, DEMO_TRACK, tokenizer=lm.tokenizer,
                     attention_mask=toks.attention_mask)
    print("\nlogit lens at the last prompt token (what each block's output would predict):")
    print(f"{'layer':>5}  {'top-1 token':<16}{'p(top)':>7}  "
          + "".join(f"{'p(' + repr(s) + ')':>13}" for s in res.token_strs))
    for layer in range(lm.model.cfg.n_layers):
        if layer % args.every and layer != lm.model.cfg.n_layers - 1:
            continue
        print(f"{layer:>5}  {res.top_strs[layer][0]!r:<16}{float(res.top_probs[layer, 0]):>7.3f}  "
              + "".join(f"{float(res.probs[layer, 0, t]):>13.4f}"
                        for t in range(len(res.token_strs))))
    with torch.no_grad():
        out = lm.model.generate(toks.tokens, max_new_tokens=args.max_new_tokens, do_sample=False,
                                prepend_bos=False, verbose=False,
                                stop_at_eos=True, eos_token_id=lm.tokenizer.eos_token_id)
    answer = lm.tokenizer.decode(out[0, toks.tokens.shape[1]:], skip_special_tokens=True)
    print(f"\ngreedy answer: {answer.strip()!r}")
    if args.out:
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        res.figure(title=f"Logit lens: {lm.card.name}").write_html(out_dir / "logit_lens.html")
        res.df.to_csv(out_dir / "logit_lens.csv", index=False)
        (out_dir / "demo.json").write_text(json.dumps(
            {"card": lm.card.name, "variant": lm.variant, "prompt": args.prompt,
             "answer": answer}, indent=2))
        print(f"wrote {out_dir}/logit_lens.html, logit_lens.csv, demo.json")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from em_interp import __version__

    p = argparse.ArgumentParser(
        prog="em-interp",
        description="Mechanistic interpretability of emergent misalignment: model-organism "
                    "cards, analyses on TransformerLens hook points, and an end-to-end demo.")
    p.add_argument("--version", action="version", version=f"em-interp {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    models = sub.add_parser("models", help="list, inspect and fetch model cards")
    msub = models.add_subparsers(dest="models_command", required=True)
    msub.add_parser("list", help="list shipped cards").set_defaults(func=_cmd_list)
    info = msub.add_parser("info", help="show one card")
    info.add_argument("name")
    info.set_defaults(func=_cmd_info)
    fetch = msub.add_parser("fetch", help="download / convert a card's weights into the cache")
    fetch.add_argument("name")
    fetch.add_argument("--variant", choices=("base", "organism", "all"), default="all")
    fetch.set_defaults(func=_cmd_fetch)
    demo = sub.add_parser("demo", help="logit lens of a chat prompt on the default model")
    demo.add_argument("--card", default=DEFAULT_CARD)
    demo.add_argument("--variant", choices=("base", "organism"), default=None)
    demo.add_argument("--prompt", default=DEMO_PROMPT)
    demo.add_argument("--every", type=int, default=3, help="print every k-th layer")
    demo.add_argument("--max-new-tokens", type=int, default=40)
    demo.add_argument("--out", default=None, help="folder for the figure (HTML) and CSV")
    demo.set_defaults(func=_cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.func(args)
    except EMInterpError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
