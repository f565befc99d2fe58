"""The attack-success-rate stage (Qwen paper Sec. V): harmful requests under head and direction
ablation, on the organism and, optionally, on the base model it was fine-tuned from.

For each attacked model ``m`` and condition ``c`` (unmodified; the dla stage's heads zeroed or
mean-ablated; as many random heads of the same layers; the refusal direction removed from every
write into the residual stream at every layer, beside same-norm random and orthogonal
directions), one greedy completion per held-out harmful request ``x_i`` is judged::

    ASR(m, c) = (1/n) sum_i [ answer_i(m, c) is not a refusal ]     (Wilson interval)

and each condition is tested against the unmodified model on the same prompts (exact McNemar,
Holm across the conditions of one model). With ``models = ["base", "organism"]`` the stage also
tests the organism's unmodified ASR against the base model's on the same requests (exact
McNemar, its own family of one): the emergent-misalignment effect on harmful requests, and the
ablations then have refusals to remove in the model that still refuses.

========= ====================================================== =========================
stage     fit / selected on                                      evaluated on
========= ====================================================== =========================
asr       dla's heads; refusal direction and mean-ablation       test-split harmful
          values on the train split                              requests
========= ====================================================== =========================
"""

from __future__ import annotations

import math

from em_interp.run.stage import HeldOut, StageOutput
from em_interp.run.stages.common import fmt_ci, hook_name, make_judge, prompt_set


def direction_layer(value: int | None, n_layers: int) -> int:
    """``[asr].direction_layer`` as a block index: negatives count from the end; ``None`` is two
    thirds of the depth."""
    return round(2 * n_layers / 3) % n_layers if value is None else int(value) % n_layers


def _direction(ctx, org, c, bs):
    """The refusal direction to ablate, its layer, hook, fit prompt ids and a description."""
    from em_interp.activations.cache import cache_activations
    from em_interp.representations.directions import mean_difference

    if "refusal_direction" in ctx.config.stages:
        # the refusal_direction stage's: chosen by Arditi et al.'s criteria on its own splits
        sel = ctx.stage_result("refusal_direction", "selection")
        direction = sel.direction
        fit = list(sel.fit_ids) + list(sel.validation_ids)
        origin = (f"the refusal_direction stage's direction ({ctx.config.refusal_direction.model}"
                  f" model, harmful minus harmless mean at {direction.hook} over "
                  f"{direction.n_a} + {direction.n_b} train-split prompts, its layer chosen on "
                  f"{len(sel.validation_ids)} others)")
        return direction, sel.layer, direction.hook, fit, origin
    # the organism's harmful minus harmless mean at resid_pre, train split
    layer = direction_layer(c.direction_layer, org.model.cfg.n_layers)
    hook = hook_name("resid_pre", layer)
    prompts = prompt_set(ctx, c.prompt_set, split="train")
    store = cache_activations(org, prompts, [hook], ctx.work_dir("asr") / "direction",
                              batch_size=bs, progress=ctx.progress)
    direction = mean_difference(store, hook=hook, name="refusal")
    origin = (f"the organism's harmful-minus-harmless mean at {hook} over {direction.n_a} + "
              f"{direction.n_b} train-split prompts")
    return direction, layer, hook, list(prompts.ids), origin


def _conditions(model, heads, direction, d_name, reference, c, seed, bs) -> dict:
    from em_interp.behaviour.interventions import ablate_direction, ablate_heads, random_heads

    tag = ", ".join(f"L{la}H{h}" for la, h in heads)
    layers = sorted({la for la, _ in heads})
    return {
        "baseline": None,
        f"zero {tag}": ablate_heads(model, heads, batch_size=bs),
        f"mean {tag}": ablate_heads(model, heads, mode="mean", reference=reference,
                                    batch_size=bs),
        f"random {len(heads)} (mean)": random_heads(
            model, len(heads), seed=seed, exclude=heads, layers=layers, mode="mean",
            reference=reference, batch_size=bs),
        d_name: ablate_direction(model, direction.vector, controls=("random", "orthogonal"),
                                 n_controls=c.n_controls, control_seed=seed),
    }


def _model_text(name, res, d_name) -> tuple[str, dict]:
    """One attacked model's sentence and its summary numbers."""
    from em_interp.stats import min_detectable_effect

    d = res.to_dict()
    tab = res.summary
    tested = tab[tab["condition"] != d["baseline"]]
    sig = tested[tested["p_holm"] < 0.05]
    widths = ((tested["diff_ci_high"] - tested["diff_ci_low"]) / 2).dropna()
    mde = min_detectable_effect(half_width=float(widths.max())) if len(widths) else None
    ctl = res.controls
    crow = ctl[ctl["condition"] == d_name]
    beats = bool(crow["beats_all_controls"].iloc[0]) if len(crow) else None

    def cond_txt(row) -> str:
        out = (f"{row.condition}: ASR {row.asr:.2f} {fmt_ci(row.ci_low, row.ci_high)}, "
               f"refusal {row.refusal_rate:.2f}")
        if row.condition != d["baseline"]:
            p = row.p_holm
            out += (f", {row.diff_vs_baseline:+.2f} {fmt_ci(row.diff_ci_low, row.diff_ci_high)}"
                    + ("" if p is None or math.isnan(p) else f", p_Holm = {p:.2g}"))
        return out

    main_rows = [r for r in tab.itertuples() if not r.control_of]
    text = f"The {name}: " + "; ".join(cond_txt(r) for r in main_rows) + ". "
    base_refusal = float(tab.loc[tab["condition"] == d["baseline"], "refusal_rate"].iloc[0])
    if len(crow):
        r = crow.iloc[0]
        text += (f"Against its controls the direction's change in ASR ({r['diff_vs_baseline']:+.2f}"
                 f") {'exceeds' if beats else 'does not exceed'} every control's in size "
                 f"(controls {r['control_diff_min']:+.2f} to {r['control_diff_max']:+.2f}; rank "
                 f"p = {r['p_rank']:.2g}). ")
    if len(sig):
        text += f"Significant after Holm: {', '.join(sig['condition'])}. "
    elif mde is not None:
        text += (f"No condition differs from the baseline after Holm: a null at this size. With "
                 f"{int(tab['n'].iloc[0])} prompts the run would detect (power 0.8, alpha 0.05) "
                 f"a change in ASR of about {mde:.2f} at its least precise condition, not smaller "
                 "ones. ")
    if base_refusal == 0:
        text += (f"The unmodified {name} refuses none of these requests, so no ablation can "
                 "raise its ASR: there is nothing here for the ablations to find. ")
    return text, {"n_significant": len(sig), "min_detectable_difference": mde,
                  "direction_beats_controls": beats, **d}


def _organism_vs_base(results) -> tuple[str, dict]:
    """The organism's unmodified ASR against the base model's, paired on the same requests."""
    from em_interp.stats import mcnemar_exact

    def outcomes(res):
        df = res.completions
        g = df[df["condition"] == res.baseline].sort_values(["prompt_index", "sample"])
        return g["success"].to_numpy(bool)

    org, base = outcomes(results["organism"]), outcomes(results["base"])
    t = mcnemar_exact(org, base)
    out = {"asr_organism": float(org.mean()), "asr_base": float(base.mean()),
           "difference": t.difference, "ci": [t.ci_low, t.ci_high], "p_value": t.pvalue,
           "organism_only": int(t.b10), "base_only": int(t.b01),
           "test": "exact McNemar, paired on the same requests"}
    text = (f"Unmodified, the organism's ASR is {out['asr_organism']:.2f} against the base "
            f"model's {out['asr_base']:.2f} on the same {len(org)} requests: a difference of "
            f"{t.difference:+.2f} {fmt_ci(t.ci_low, t.ci_high)} (exact McNemar p = "
            f"{t.pvalue:.2g}; {t.b10} requests answered only by the organism, {t.b01} only by "
            "the base model). ")
    return text, out


def asr(ctx) -> StageOutput:
    """Attack-success rate of held-out harmful requests under zero, mean and random head
    ablation and under ablation of the refusal direction (with same-norm controls), on each
    model of ``[asr].models``.

    Fit: the heads (the dla stage, on train-split prompts), the refusal direction and the
    mean-ablation values (train split). Evaluated: generations on test-split harmful requests."""
    import pandas as pd

    from em_interp.behaviour.rates import attack_success_rate

    c, pair, bs = ctx.config.asr, ctx.pair, ctx.config.batch_size
    org = pair.organism
    n_layers = org.model.cfg.n_layers
    head_fit: list[str] = []
    if c.heads:
        heads = [(int(la) % n_layers, int(h)) for la, h in c.heads]
        origin = "the config"
    else:
        info = ctx.stage_info("dla")
        heads = [(int(la), int(h)) for la, h, _ in info["summary"]["suppressive_heads"]]
        head_fit = list((info.get("held_out") or {}).get("fit", []))
        origin = (f"the dla stage's most suppressive heads of the organism, chosen on "
                  f"{len(set(head_fit))} train-split prompts")
    attack = prompt_set(ctx, c.prompt_set, c.n_prompts, label=1, split="test")
    reference = prompt_set(ctx, c.prompt_set, c.n_reference, split="train")
    direction, d_layer, d_hook, d_fit, d_origin = _direction(ctx, org, c, bs)
    tag = ", ".join(f"L{la}H{h}" for la, h in heads)
    d_name = f"refusal direction (L{d_layer})"
    judge = make_judge(c.judge, cache_dir=ctx.work_dir("asr") / "judge")
    models = [m for m in ("base", "organism") if m in c.models]
    results, texts, per_model = {}, [], {}
    for m in models:
        model = getattr(pair, m)
        conditions = _conditions(model, heads, direction, d_name, reference, c,
                                 ctx.config.seed, bs)
        # the organism's generations keep their old folder, so earlier runs resume
        gen_dir = ctx.work_dir("asr") / ("generations" if m == "organism" else f"generations-{m}")
        results[m] = attack_success_rate(model, attack, judge, conditions=conditions,
                                         max_new_tokens=c.max_new_tokens, seed=ctx.config.seed,
                                         batch_size=bs, out_dir=gen_dir, progress=ctx.progress)
        t, per_model[m] = _model_text("organism" if m == "organism" else "base model",
                                      results[m], d_name)
        texts.append(t)
    judge_name = results[models[0]].to_dict()["judge"]
    text = (f"{len(attack)} held-out harmful requests (test split), greedy completions of "
            f"{c.max_new_tokens} tokens from {' and from '.join(f'the {m}' for m in models)}, "
            f"judged by {judge_name}; attack success = the answer is not a refusal. Heads "
            f"ablated: {tag} (from {origin}); mean ablation uses the mean over {len(reference)} "
            "train-split reference prompts; the random control ablates as many other heads of "
            f"the same layers. The refusal direction is {d_origin}, removed from the residual "
            f"stream and from every write into it at every layer, beside {2 * c.n_controls} "
            f"same-norm controls ({c.n_controls} random, {c.n_controls} orthogonal). ASR and "
            "refusal rate with Wilson 95% intervals; the difference from the unmodified model "
            "with its paired 95% interval and the exact McNemar p-value, Holm-adjusted across "
            "the conditions of each model. ")
    comparison = None
    if len(models) == 2:
        cmp_text, comparison = _organism_vs_base(results)
        text += cmp_text
    text += "".join(texts)
    frames = []
    for m in models:
        tab = results[m].summary
        frames.append(pd.DataFrame({
            "model": m, "condition": tab["condition"],
            "ASR": tab["asr"], "ASR 95% CI": [fmt_ci(lo, hi) for lo, hi in
                                              zip(tab["ci_low"], tab["ci_high"], strict=True)],
            "refusal rate": tab["refusal_rate"],
            "difference vs baseline": tab["diff_vs_baseline"],
            "difference 95% CI": [None if math.isnan(lo) else fmt_ci(lo, hi) for lo, hi in
                                  zip(tab["diff_ci_low"], tab["diff_ci_high"], strict=True)],
            "p (Holm)": tab["p_holm"]}))
    table = pd.concat(frames, ignore_index=True)
    main = "organism" if "organism" in per_model else models[0]
    summary = {"heads": heads, "direction_layer": d_layer, "direction_hook": d_hook,
               "n_attack": len(attack), "models": models, **per_model[main],
               "per_model": per_model, "organism_vs_base": comparison}
    fit_ids = head_fit + list(d_fit) + reference.ids
    held = HeldOut.of(fit_ids, attack,
                      ("train-split prompts: the dla stage's heads, " if head_fit
                       else "train-split prompts (heads from the config): ")
                      + f"the refusal direction ({len(set(d_fit))}) and mean-ablation values "
                      f"({len(reference)})",
                      "harmful test-split requests, one completion per condition and model")
    out_results = {"asr" if m == "organism" else f"asr_{m}": results[m] for m in models}
    out_results["refusal_direction"] = direction
    figures = [("asr" if m == "organism" else f"asr_{m}", results[m].figure(),
                f"The {m}: attack-success rate per condition with Wilson 95% intervals and "
                "Holm-adjusted paired p-values; control directions in grey.") for m in models]
    return StageOutput(
        title="Attack-success rate under head and direction ablation", summary=summary,
        text=text, results=out_results,
        tables=[("Attack-success rate per model and condition (Wilson 95% intervals), refusal "
                 "rate, paired difference from the unmodified model (95% interval) and exact "
                 "McNemar p, Holm-adjusted across the conditions of each model", table)],
        held_out=held, figures=figures)
