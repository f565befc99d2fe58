"""Load and forward benchmark: em-interp's HookedTransformer against plain ``transformers``.

Prints, for one card (default ``smollm2-135m-instruct``), numbers measured in this run only
(ratios are against baselines of the same run; nothing asserts on speed):

1. **Load** -- wall time and peak RSS of ``em_interp.load(card)`` against
   ``AutoModelForCausalLM.from_pretrained(weights_dir, dtype=torch.float32)`` of the same folder.
   Each load runs in a fresh subprocess, alternating em-interp / HF, ``--load-repeats`` times
   each; minima are reported. Imports (including the model's ``modeling_*`` module, which
   ``from_pretrained`` would otherwise import lazily inside the timed call) are timed apart,
   and the RSS after them is reported, so the import overhead can be read separately. Peak RSS
   is taken right after the load and again after one small forward, because ``transformers``
   memory-maps safetensors and only pages weights in when they are first read.
2. **Forward** -- one fp32 forward under ``torch.no_grad()`` on ``--batch`` x ``--seq`` random
   (non-special) token ids on CPU, for HF, TL with em-interp's weight layout, and TL with TL's
   stock layout (every weight em-interp re-lays out re-stored row-major in TL's shape, so TL
   copies ``W.T.contiguous()`` on every call). Runs are interleaved after a warm-up; min,
   median and the median of per-round (paired) ratios.
3. **Correctness** -- the max abs difference of both TL layouts' logits from HF's on that batch,
   against ``--tol``, and each model's distance from an fp64 HF forward (the fp32 noise floor).

Run from the repository root (see benchmarks/README.md):

    HF_HUB_OFFLINE=1 python benchmarks/bench_load.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

GOAL_TL_OVER_HF = 1.1
DIFF_TOL = 1e-4


# The shared helpers (timing tables, RSS, busy-CPU warning) live in benchmarks/_timing.py.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import (  # noqa: E402
    add_card_args,
    fmt,
    peak_rss_mib,
    ratio,
    table,
    versions,
    warn_if_busy,
)

# ------------------------------------------------------------------ child: one load, one process


def _import_model_class(weights_dir: str | None) -> None:
    """Import the HF model class of ``weights_dir`` now, so neither load pays for it.

    ``from_pretrained`` imports ``modeling_<arch>`` lazily (seconds, several times the actual
    weight load of a small model); TransformerLens's import pulls it in eagerly. Importing it
    in both children's import phase keeps the load times comparable.
    """
    if not weights_dir:
        return
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(weights_dir))]


def _time_stages(module, names: list[str], stages: dict[str, float]) -> None:
    """Wrap ``module.<name>`` (in this child process only) to add its wall time to ``stages``."""
    for name in names:
        fn = getattr(module, name, None)
        if fn is None:
            continue

        def timed(*a, _fn=fn, _name=name, **kw):
            t = time.perf_counter()
            try:
                return _fn(*a, **kw)
            finally:
                stages[_name] = stages.get(_name, 0.0) + time.perf_counter() - t

        setattr(module, name, timed)


def child(kind: str, card: str, variant: str | None, weights_dir: str | None,
          threads: int | None) -> None:
    """Run one load in this (fresh) process and print its numbers as one JSON line."""
    # Linux carries ru_maxrss over execve from the parent, so the parent must stay lean (it
    # imports no torch before the load phase); start_rss_mib shows what was inherited.
    start_rss = peak_rss_mib()
    t0 = time.perf_counter()
    import torch
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM

    if kind == "em":
        import transformer_lens  # noqa: F401

        import em_interp.models.loading
    _import_model_class(weights_dir)
    if threads:
        torch.set_num_threads(threads)
    import_s = time.perf_counter() - t0
    import_rss = peak_rss_mib()

    out: dict = {"kind": kind, "start_rss_mib": start_rss, "import_s": import_s,
                 "import_rss_mib": import_rss}
    ids = torch.arange(100, 116).reshape(1, 16)  # ordinary (non-special) token ids
    if kind == "em":
        import em_interp

        stages: dict[str, float] = {}
        _time_stages(em_interp.models.loading, ["_plan", "_load_hf", "merge_adapter", "_merge_adapter",
                                         "_tokenizer", "hooked_from_hf"],
                     stages)
        t1 = time.perf_counter()
        lm = em_interp.load(card, variant, dtype="float32", device="cpu", progress=False)
        out["load_s"] = time.perf_counter() - t1
        out["peak_rss_mib"] = peak_rss_mib()
        out["stages_s"] = stages
        out["weights_dir"] = str(lm.weights_dir)
        out["adapters"] = [str(a) for a in lm.adapter_dirs]
        out["n_params"] = sum(p.numel() for p in lm.model.parameters())
        t2 = time.perf_counter()
        with torch.no_grad():
            lm.model(ids)
        out["first_forward_s"] = time.perf_counter() - t2
        out["peak_rss_after_forward_mib"] = peak_rss_mib()
    else:
        t1 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(weights_dir, dtype=torch.float32)
        out["load_s"] = time.perf_counter() - t1
        out["peak_rss_mib"] = peak_rss_mib()
        out["n_params"] = sum(p.numel() for p in model.parameters())
        t2 = time.perf_counter()
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
        out["first_forward_s"] = time.perf_counter() - t2
        out["peak_rss_after_forward_mib"] = peak_rss_mib()
        # informational: em-interp's load also reads the tokenizer, this does not.
        from transformers import AutoTokenizer

        t2 = time.perf_counter()
        AutoTokenizer.from_pretrained(weights_dir)
        out["tokenizer_s"] = time.perf_counter() - t2
    print("BENCH_JSON " + json.dumps(out), flush=True)


def guess_weights_dir(card_arg: str, variant: str | None) -> str | None:
    """The full-weights folder ``em_interp.load(card_arg)`` will read, without loading a model.

    Run in a child process: resolving some sources imports torch, and this process must stay
    lean for the load children (see :func:`child`). Mirrors ``em_interp.models.loading``'s choice (the organism's folder for a full fine-tune, else the
    base's); the em-interp child reports the folder it really used, and that one wins.
    """
    from em_interp.models.cards import get_card
    from em_interp.models.sources import resolve_source

    p = Path(card_arg).expanduser()
    if p.is_dir():
        return str(p.resolve()) if (p / "config.json").is_file() else None
    try:
        card = get_card(card_arg)
        base = resolve_source(card.base, card=card, role="base", progress=False)
        if (card.organism is not None and card.organism.kind != "lora"
                and variant != "base"):
            return str(resolve_source(card.organism.source, card=card, role="organism",
                                      base_dir=base, progress=False))
        return str(base)
    except Exception as e:  # the em-interp child will raise the real error
        print(f"  (could not resolve the weights folder up front: {type(e).__name__}: {e})")
        return None


def run_child(kind: str, args, weights_dir: str | None) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--_child", kind, "--card", args.card]
    if args.variant:
        cmd += ["--variant", args.variant]
    if weights_dir:
        cmd += ["--_weights-dir", weights_dir]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            return json.loads(line[len("BENCH_JSON "):])
    sys.exit(f"the {kind} load subprocess failed (exit {proc.returncode}):\n"
             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def bench_load(args) -> dict:
    em_runs: list[dict] = []
    hf_runs: list[dict] = []
    weights_dir = run_child("resolve", args, None)["weights_dir"]
    for i in range(args.load_repeats):
        em_runs.append(run_child("em", args, weights_dir))
        if em_runs[-1]["weights_dir"] != weights_dir:
            print(f"  note: em-interp read {em_runs[-1]['weights_dir']}, not {weights_dir}; "
                  "using its folder from here on")
            weights_dir = em_runs[-1]["weights_dir"]
            em_runs.pop()
            em_runs.append(run_child("em", args, weights_dir))
        hf_runs.append(run_child("hf", args, weights_dir))
        print(f"  round {i + 1}/{args.load_repeats}: em-interp {em_runs[-1]['load_s']:.2f} s, "
              f"HF {hf_runs[-1]['load_s']:.2f} s", flush=True)

    def summary(runs):
        s: dict = {"n_params": runs[0]["n_params"]}
        for key in ("load_s", "first_forward_s", "import_s", "start_rss_mib", "import_rss_mib",
                    "peak_rss_mib", "peak_rss_after_forward_mib", "tokenizer_s"):
            if key in runs[0]:
                s[f"{key}_all"] = [r[key] for r in runs]
                s[f"{key}_min"] = min(r[key] for r in runs)
        if "stages_s" in runs[0]:
            s["stages_s_min"] = {k: min(r["stages_s"].get(k, float("nan")) for r in runs)
                                 for k in runs[0]["stages_s"]}
        s["peak_minus_import_mib"] = s["peak_rss_mib_min"] - s["import_rss_mib_min"]
        s["peak_after_forward_minus_import_mib"] = (s["peak_rss_after_forward_mib_min"]
                                                    - s["import_rss_mib_min"])
        return s

    em, hf = summary(em_runs), summary(hf_runs)
    inherited = max(em["start_rss_mib_all"] + hf["start_rss_mib_all"])
    return {
        "weights_dir": em_runs[0]["weights_dir"],
        "adapters": em_runs[0]["adapters"],
        "em_interp": em,
        "hf": hf,
        "max_inherited_rss_mib": inherited,
        "ratio_time": ratio(em["load_s_min"], hf["load_s_min"]),
        "ratio_time_to_first_logits": ratio(em["load_s_min"] + em["first_forward_s_min"],
                                            hf["load_s_min"] + hf["first_forward_s_min"]),
        "ratio_peak_rss": ratio(em["peak_rss_mib_min"], hf["peak_rss_mib_min"]),
        "ratio_peak_rss_after_forward": ratio(em["peak_rss_after_forward_mib_min"],
                                              hf["peak_rss_after_forward_mib_min"]),
        "ratio_peak_minus_import": ratio(em["peak_minus_import_mib"], hf["peak_minus_import_mib"]),
        "ratio_peak_after_forward_minus_import": ratio(
            em["peak_after_forward_minus_import_mib"], hf["peak_after_forward_minus_import_mib"]),
    }


def print_load(res: dict) -> None:
    em, hf = res["em_interp"], res["hf"]

    def row(name, s):
        return [name, fmt(s["load_s_min"], ".2f"), fmt(s["first_forward_s_min"], ".2f"),
                fmt(s["import_s_min"], ".1f"), fmt(s["import_rss_mib_min"], ".0f"),
                fmt(s["peak_rss_mib_min"], ".0f"), fmt(s["peak_rss_after_forward_mib_min"], ".0f"),
                fmt(s["peak_after_forward_minus_import_mib"], ".0f")]

    rows = [row("em_interp.load", em), row("HF from_pretrained", hf),
            ["ratio em/HF", fmt(res["ratio_time"], ".2f"), "", "", "",
             fmt(res["ratio_peak_rss"], ".2f"), fmt(res["ratio_peak_rss_after_forward"], ".2f"),
             fmt(res["ratio_peak_after_forward_minus_import"], ".2f")]]
    print(table(["load (fresh process, min)", "load s", "1st fwd s", "import s", "RSS imports",
                 "peak RSS", "peak +1st fwd", "(+1st fwd) - imports"], rows))
    print("  RSS in MiB (ru_maxrss). 'peak RSS' is right after the load; '+1st fwd' after one "
          "1x16 forward,\n  which pages in weights a lazy (mmap) load has not read yet.")
    names = {"_plan": "resolve weights", "_load_hf": "HF from_pretrained",
             "merge_adapter": "LoRA merge", "_merge_adapter": "LoRA merge",
             "_tokenizer": "tokenizer", "hooked_from_hf": "convert to TL"}
    stages = em.get("stages_s_min") or {}
    if stages:
        print("  em_interp.load stages (min): " + ", ".join(
            f"{names.get(k, k)} {v:.2f} s" for k, v in stages.items()))
    print(f"  time to first logits (load + 1st fwd): em/HF = "
          f"{fmt(res['ratio_time_to_first_logits'], '.2f')}. Imports: em-interp = torch + "
          "transformers + transformer_lens + em_interp,\n  HF = torch + transformers; both "
          "include the model's modeling_* module. HF tokenizer "
          f"load, not in its time (em-interp's includes one): {hf['tokenizer_s_min']:.2f} s.")
    print(f"  parameters: TL {em['n_params']:,} ({em['n_params'] * 4 / 2**20:.0f} MiB fp32), "
          f"HF {hf['n_params']:,} ({hf['n_params'] * 4 / 2**20:.0f} MiB fp32; tied tensors "
          "counted once).")
    if res["max_inherited_rss_mib"] > 100:
        print(f"  WARNING: a child started with ru_maxrss {res['max_inherited_rss_mib']:.0f} MiB "
              "inherited from its parent; peaks are overstated.")
    if res["adapters"]:
        print(f"  note: em-interp merged adapters {res['adapters']}; the HF baseline did not.")


# ------------------------------------------------------------------ forward


def bench_forward(args, weights_dir: str) -> dict:
    import copy
    import gc

    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    import em_interp
    from em_interp.models.weight_layout import _STORAGE_ORDER, in_hf_layout

    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers/peft deprecations
    lm = em_interp.load(args.card, args.variant, dtype="float32", device="cpu",
                        progress=False)
    tl = lm.model
    if lm.adapter_dirs:
        print(f"  note: the TL model has adapters {[str(a) for a in lm.adapter_dirs]} merged, the HF "
              "model has not; expect a logit difference.")

    g = torch.Generator().manual_seed(args.seed)
    special = set(lm.tokenizer.all_special_ids or []) | {lm.tokenizer.pad_token_id}
    # No special ids: a plain batch of ordinary tokens, the same for every model.
    allowed = torch.tensor([i for i in range(tl.cfg.d_vocab) if i not in special])
    ids = allowed[torch.randint(len(allowed), (args.batch, args.seq), generator=g)]

    ref = None
    if not args.no_fp64_ref:
        # fp64 HF (eager attention) tells how far any fp32 forward is from exact on this batch.
        hf64 = AutoModelForCausalLM.from_pretrained(weights_dir, dtype=torch.float64,
                                                    attn_implementation="eager").eval()
        with torch.no_grad():
            ref = hf64(input_ids=ids, use_cache=False).logits
        del hf64
        gc.collect()

    hf = AutoModelForCausalLM.from_pretrained(weights_dir, dtype=torch.float32).eval()
    # Stock TL: the same weights, every re-laid-out parameter re-stored row-major in TL's shape.
    stock = copy.deepcopy(tl)
    n_restored = 0
    for name, p in stock.named_parameters():
        if name.rsplit(".", 1)[-1] in _STORAGE_ORDER and not p.data.is_contiguous():
            p.data = p.data.contiguous()
            n_restored += 1
    n_hf_layout = sum(in_hf_layout(p.data, n.rsplit(".", 1)[-1]) and not p.data.is_contiguous()
                      for n, p in tl.named_parameters()
                      if n.rsplit(".", 1)[-1] in _STORAGE_ORDER)

    fns = {
        "HF": lambda: hf(input_ids=ids, use_cache=False).logits,
        "TL (em-interp layout)": lambda: tl(ids),
        "TL (stock layout)": lambda: stock(ids),
    }
    with torch.no_grad():
        logits = {k: f() for k, f in fns.items()}
        diffs = {k: (logits[k] - logits["HF"]).abs().max().item() for k in fns if k != "HF"}
        err64 = ({k: (v.double() - ref).abs().max().item() for k, v in logits.items()}
                 if ref is not None else None)
        logit_absmax = logits["HF"].abs().max().item()
        del logits, ref
        gc.collect()
        busy = warn_if_busy("forward timing")
        for _ in range(args.warmup):
            for f in fns.values():
                f()
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(args.repeats):
            for k, f in fns.items():  # interleaved: HF, TL, stock, HF, TL, stock, ...
                t = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t)

    tl_key = "TL (em-interp layout)"
    res: dict = {
        "batch": args.batch, "seq": args.seq, "repeats": args.repeats, "warmup": args.warmup,
        "torch_threads": torch.get_num_threads(), "other_cpu_percent_before": busy,
        "hf_attn_implementation": getattr(hf.config, "_attn_implementation", None),
        "tl_params_in_hf_layout": int(n_hf_layout), "stock_params_restored": n_restored,
        "tol": args.tol, "logit_absmax": logit_absmax,
        "max_abs_diff_vs_hf": diffs,
        "within_tol": all(d <= args.tol for d in diffs.values()),
        "max_abs_err_vs_fp64": err64,
        "times_s": times,
        "min_s": {k: min(v) for k, v in times.items()},
        "median_s": {k: statistics.median(v) for k, v in times.items()},
    }
    if err64 is not None:
        # TL no further from exact than HF's own fp32 forward (1.5x slack for rounding luck).
        res["as_accurate_as_hf"] = all(err64[k] <= 1.5 * err64["HF"] for k in diffs)
    res["correct"] = res["within_tol"] or res.get("as_accurate_as_hf", False)
    # Paired: each round's ratio to the HF run just before it, so slow drifts in machine load
    # cancel; the median over rounds is the most robust of the three estimates.
    res["ratio_paired_median"] = {k: statistics.median(t / h for t, h in
                                                       zip(v, times["HF"], strict=True))
                                  for k, v in times.items()}
    for stat in ("min", "median"):
        res[f"ratio_{stat}"] = {k: ratio(res[f"{stat}_s"][k], res[f"{stat}_s"]["HF"])
                                for k in fns}
    res["goal"] = GOAL_TL_OVER_HF
    res["goal_met_min"] = res["ratio_min"][tl_key] <= GOAL_TL_OVER_HF
    res["goal_met_median"] = res["ratio_median"][tl_key] <= GOAL_TL_OVER_HF
    res["goal_met_paired"] = res["ratio_paired_median"][tl_key] <= GOAL_TL_OVER_HF
    return res


def print_forward(res: dict) -> None:
    err64 = res["max_abs_err_vs_fp64"] or {}
    rows = []
    for k in res["times_s"]:
        d = res["max_abs_diff_vs_hf"].get(k)
        rows.append([k, fmt(res["min_s"][k] * 1e3, ".0f"), fmt(res["median_s"][k] * 1e3, ".0f"),
                     fmt(res["ratio_min"][k], ".2f"), fmt(res["ratio_median"][k], ".2f"),
                     fmt(res["ratio_paired_median"][k], ".2f"),
                     "-" if d is None else f"{d:.1e}", fmt(err64.get(k), ".1e")])
    print(table([f"forward {res['batch']}x{res['seq']} fp32", "min ms", "median ms",
                 "/HF (min)", "/HF (med)", "/HF (paired)", "max|d logit| vs HF", "vs fp64 HF"],
                rows))
    print(f"  {res['repeats']} interleaved runs each after {res['warmup']} warm-up, "
          f"{res['torch_threads']} torch threads; HF: attn {res['hf_attn_implementation']}, "
          f"use_cache=False.\n  {res['tl_params_in_hf_layout']} TL weights stored in HF order; "
          f"{res['stock_params_restored']} re-stored row-major for the stock-layout copy.")
    worst = max(res["max_abs_diff_vs_hf"].values())
    verdict = "OK" if res["within_tol"] else "OVER"
    print(f"  logits: max |TL - HF| = {worst:.2e} (|logit| up to {res['logit_absmax']:.1f}); "
          f"tolerance {res['tol']:g}: {verdict}")
    if "as_accurate_as_hf" in res:
        acc = "yes" if res["as_accurate_as_hf"] else "NO"
        print(f"  fp32 noise floor: max |HF fp32 - HF fp64| = {err64['HF']:.2e}; TL as close to "
              f"fp64 as HF is (<= 1.5x): {acc}")
    print(f"  => TL forward correct: {'yes' if res['correct'] else 'NO'}"
          + ("" if res["within_tol"] or not res["correct"] else
             " (the strict tolerance is below fp32 rounding on this batch)"))
    yn = {True: "met", False: "NOT met"}
    tl_key = "TL (em-interp layout)"
    print(f"  goal TL/HF <= {res['goal']} (informational): {yn[res['goal_met_min']]} on min "
          f"({res['ratio_min'][tl_key]:.2f}), {yn[res['goal_met_median']]} on median "
          f"({res['ratio_median'][tl_key]:.2f}), {yn[res['goal_met_paired']]} on paired "
          f"({res['ratio_paired_median'][tl_key]:.2f})")


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_card_args(ap)
    ap.add_argument("--variant", choices=["base", "organism"], default=None,
                    help="passed to em_interp.load (default: the card's). The HF baseline loads "
                         "the same full-weights folder but merges no LoRA adapter, so compare "
                         "LoRA organisms with --variant base")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7,
                    help="timed forwards per model, interleaved (default %(default)s; use >= 5)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed forwards per model first")
    ap.add_argument("--load-repeats", type=int, default=3,
                    help="fresh-process loads per loader (default %(default)s)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads, here and in the load processes (default: torch's)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random token ids")
    ap.add_argument("--tol", type=float, default=DIFF_TOL,
                    help="max abs logit difference TL vs HF (default %(default)g)")
    ap.add_argument("--no-fp64-ref", action="store_true",
                    help="skip the fp64 HF reference forward (saves a load and ~2x weights of RAM)")
    ap.add_argument("--skip-load", action="store_true", help="only the forward benchmark")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    ap.add_argument("--_child", choices=["em", "hf", "resolve"], help=argparse.SUPPRESS)
    ap.add_argument("--_weights-dir", dest="weights_dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._child == "resolve":
        print("BENCH_JSON " + json.dumps({"weights_dir": guess_weights_dir(args.card, args.variant)}))
        return 0
    if args._child:
        child(args._child, args.card, args.variant, args.weights_dir, args.threads)
        return 0
    if args.repeats < 1 or args.load_repeats < 1 or args.warmup < 0:
        ap.error("--repeats and --load-repeats must be >= 1, --warmup >= 0")
    if args.repeats < 5:
        print(f"warning: --repeats {args.repeats} < 5; medians will be noisy", file=sys.stderr)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    # No torch import before the load phase: the children would inherit this process's RSS peak.
    env = {**versions("torch", "transformers", "transformer-lens", "em-interp"),
           "cpu_count": os.cpu_count(), "machine": platform.machine(),
           "system": platform.system(), "threads_arg": args.threads}
    print(f"em-interp load/forward benchmark: card {args.card} (variant "
          f"{args.variant or 'default'})\n  python {env['python']}, "
          f"torch {env['torch']}, transformers {env['transformers']}, transformer-lens "
          f"{env['transformer-lens']}, em-interp {env['em-interp']}; {env['cpu_count']} CPUs, "
          f"--threads {args.threads or 'default'}")
    out: dict = {"card": args.card, "variant": args.variant, "env": env}
    t_all = time.perf_counter()

    if args.skip_load:
        weights_dir = run_child("resolve", args, None)["weights_dir"]
        if weights_dir is None:
            sys.exit("--skip-load needs a card whose full-weights folder can be resolved")
    else:
        print(f"\n[1/2] load: {args.load_repeats} fresh processes per loader, alternating")
        out["load_other_cpu_percent_before"] = warn_if_busy("load")
        out["load"] = bench_load(args)
        weights_dir = out["load"]["weights_dir"]
        print(f"  weights_dir: {weights_dir}\n")
        print_load(out["load"])

    print(f"\n[2/2] forward: batch {args.batch} x seq {args.seq} random ids, fp32, CPU, no_grad")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    out["forward"] = bench_forward(args, weights_dir)
    print()
    print_forward(out["forward"])
    out["total_s"] = time.perf_counter() - t_all
    out["parent_peak_rss_mib"] = peak_rss_mib()
    print(f"\ntotal {out['total_s']:.0f} s; peak RSS of this process "
          f"{out['parent_peak_rss_mib'] / 1024:.1f} GiB")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
