"""The refusal_direction stage: Arditi et al.'s (2024) refusal direction, chosen and tested.

Three disjoint sets of the harmful/harmless prompt set (each with both labels):

============== =================================================================
fit            the train split less the validation prompts: the candidate
               ``r_l = mean(harmful) - mean(harmless)`` at ``resid_pre(l)``, last
               prompt token, for every candidate layer
validation     ``n_validation`` train-split prompts: the layer, by bypass / induce /
               KL (:mod:`em_interp.representations.refusal_direction`)
test           the test split: greedy completions, judged for refusal
============== =================================================================

On the test split: harmful requests with the direction ablated from every write into the
residual stream (the paper's ablation) and harmless ones with it added at the chosen layer at a
few scales, each beside same-norm random and orthogonal controls; refusal rates with Wilson
intervals, exact McNemar tests against the unmodified model (Holm within each family) and sample
completions. The introspection and asr stages read the chosen direction
(``ctx.stage_result("refusal_direction", "selection").direction``).
"""

from __future__ import annotations

import math

from em_interp.errors import ConfigError
from em_interp.run.stage import HeldOut, StageOutput
from em_interp.run.stages.common import fmt_ci, make_judge, select_prompts


def refusal_splits(config):
    """``(fit, validation, harmful_test, harmless_test)`` of ``[refusal_direction]`` (the same
    draw for the same config and seed); :class:`ConfigError` if a part lacks a label."""
    from em_interp.errors import DataError

    c, seed = config.refusal_direction, config.seed
    ps = select_prompts(config, c.prompt_set)
    where = f"[refusal_direction].prompt_set = {c.prompt_set!r}"
    if ps.labels is None:
        raise ConfigError(f"{where} has no labels; use a set of harmful (1) and harmless (0) "
                          "prompts such as 'harmful'.")
    try:
        train, test = ps.train(), ps.test()
    except DataError:
        raise ConfigError(f"{where} needs a train and a test split.") from None
    counts = {y: list(train.labels).count(y) for y in (0, 1)}
    if min(counts.values()) < 4:
        raise ConfigError(f"{where}: its train split has {counts[1]} harmful and {counts[0]} "
                          "harmless prompts; fitting and choosing the direction needs at least "
                          "4 of each (2 to fit, 2 to validate).")
    n_val = c.n_validation
    if not 4 <= n_val <= len(train) - 4:
        raise ConfigError(f"[refusal_direction].n_validation = {n_val} must be between 4 and "
                          f"{len(train) - 4} (the train split of {c.prompt_set!r} has "
                          f"{len(train)} prompts; at least 4 must remain to fit on).")
    val = train.sample(n_val, seed=seed)
    held = set(val.ids)
    fit = train.subset([i for i, pid in enumerate(train.ids) if pid not in held],
                       f"{train.name}[fit]")
    if c.n_fit and c.n_fit < len(fit):
        fit = fit.sample(c.n_fit, seed=seed)
    for name, part in (("fit", fit), ("validation", val)):
        n1 = sum(int(y) == 1 for y in part.labels)
        if n1 < 2 or len(part) - n1 < 2:
            raise ConfigError(f"[refusal_direction]: the {name} prompts hold {n1} harmful and "
                              f"{len(part) - n1} harmless prompts; each needs at least 2. Raise "
                              "n_validation / n_fit, or use a larger prompt set.")
    try:
        harmful, harmless = test.where(1), test.where(0)
    except DataError:
        raise ConfigError(f"{where}: its test split needs harmful (1) and harmless (0) "
                          "prompts; the stage evaluates on both.") from None
    if c.n_test:
        harmful, harmless = harmful.sample(c.n_test, seed=seed), harmless.sample(c.n_test,
                                                                                seed=seed)
    return fit, val, harmful, harmless


def _neg(x: float) -> float:
    """``-x`` without a negative zero (a change in refusal rate is minus the change in ASR)."""
    return 0.0 - float(x)


def _rate_rows(res, family: str) -> list[dict]:
    rows = []
    for r in res.summary.itertuples():
        rows.append({"prompts": family, "condition": r.condition,
                     "refusal rate": r.refusal_rate,
                     "95% CI": fmt_ci(r.refusal_ci_low, r.refusal_ci_high),
                     "difference vs unmodified": (None if math.isnan(r.diff_vs_baseline)
                                                  else _neg(r.diff_vs_baseline)),
                     "difference 95% CI": (None if math.isnan(r.diff_ci_low)
                                           else fmt_ci(_neg(r.diff_ci_high),
                                                       _neg(r.diff_ci_low))),
                     "p (Holm)": None if math.isnan(r.p_holm) else r.p_holm})
    return rows


def _samples(res, conditions: list[str], k: int = 2) -> list[dict]:
    c = res.completions
    out = []
    for cond in conditions:
        for r in c[c["condition"] == cond].head(k).itertuples():
            out.append({"condition": cond, "prompt": str(r.prompt)[:90],
                        "completion": " ".join(str(r.completion).split())[:140],
                        "refused": bool(r.refused)})
    return out


def _row(res, cond: str):
    s = res.summary
    return s[s["condition"] == cond].iloc[0]


def _vs_controls(res, cond: str) -> str:
    ctl = res.controls
    row = ctl[ctl["condition"] == cond]
    if row.empty:
        return ""
    r = row.iloc[0]
    return (f"its controls' changes run {_neg(r['control_diff_max']):+.2f} to "
            f"{_neg(r['control_diff_min']):+.2f} ({'beaten by' if r['beats_all_controls'] else 'not all beaten by'}"
            f" the direction; rank p = {r['p_rank']:.2g})")


def refusal_direction(ctx) -> StageOutput:
    """Candidates on the fit split, the layer on the validation split, ablation and addition
    on the test split (see the module docstring)."""
    import pandas as pd

    from em_interp.behaviour.interventions import ablate_direction, steer
    from em_interp.behaviour.rates import attack_success_rate
    from em_interp.representations.refusal_direction import select_refusal_direction

    c, bs, seed = ctx.config.refusal_direction, ctx.config.batch_size, ctx.config.seed
    model = getattr(ctx.pair, c.model)
    work = ctx.work_dir("refusal_direction")
    fit, val, harmful, harmless = refusal_splits(ctx.config)
    sel = select_refusal_direction(model, fit, val, layers=c.layers,
                                   refusal_tokens=c.refusal_tokens, kl_max=c.kl_max,
                                   max_layer_fraction=c.max_layer_fraction, batch_size=bs,
                                   progress=ctx.progress)
    r = sel.direction
    judge = make_judge(c.judge, cache_dir=work / "judge")
    gen = {"max_new_tokens": c.max_new_tokens, "seed": seed, "batch_size": bs,
           "progress": ctx.progress}
    controls = {"controls": ("random", "orthogonal"), "n_controls": c.n_controls,
                "control_seed": seed}
    abl_name = "direction ablated"
    ablation = attack_success_rate(
        model, harmful, judge, conditions={"unmodified": None, abl_name: ablate_direction(
            model, r.vector, **controls)}, out_dir=work / "ablation", **gen)
    add_names = {s: f"direction added x{s:g}" for s in c.scales}
    addition = attack_success_rate(
        model, harmless, judge, conditions={"unmodified": None, **{
            name: steer(model, r.hook, r.vector, float(s), **controls)
            for s, name in add_names.items()}}, out_dir=work / "addition", **gen)

    d = sel.to_dict()
    a0, a1 = _row(ablation, "unmodified"), _row(ablation, abl_name)
    h0 = _row(addition, "unmodified")
    adds = [(s, _row(addition, name)) for s, name in add_names.items()]
    sig_abl = bool(a1["p_holm"] < 0.05)
    n_cand = d["n_candidates"]
    filt = ("it passed every filter" if sel.passed_filters else
            "no candidate passed every filter, so the lowest bypass score of allowed depth was "
            "taken; read the direction with that caveat")
    add_txt = "; ".join(
        f"x{s:g}: {row['refusal_rate']:.2f} {fmt_ci(row['refusal_ci_low'], row['refusal_ci_high'])}"
        f" (p_Holm = {row['p_holm']:.2g})" for s, row in adds)
    text = (
        f"Candidate refusal directions (harmful minus harmless mean of the {c.model} model at "
        f"resid_pre, last prompt token) were fitted at {n_cand} layers on {len(fit)} train-split "
        f"prompts of '{c.prompt_set}'. On {len(val)} other train-split prompts, layer "
        f"{sel.layer} was chosen: ablating it moves the refusal score (log-odds of the opening "
        f"tokens {', '.join(repr(t) for t in sel.refusal_token_text)}) of harmful prompts from "
        f"{sel.baseline_harmful:+.2f} to {d['bypass']:+.2f}, adding it moves harmless prompts "
        f"from {sel.baseline_harmless:+.2f} to {d['induce']:+.2f}, and ablating it costs a KL "
        f"of {d['kl']:.3f} nats on harmless prompts; {filt}.\n"
        f"On the held-out test split ({len(harmful)} harmful, {len(harmless)} harmless prompts; "
        f"greedy completions of {c.max_new_tokens} tokens judged by {ablation.judge}): the "
        f"model refuses {a0['refusal_rate']:.2f} "
        f"{fmt_ci(a0['refusal_ci_low'], a0['refusal_ci_high'])} of harmful requests, and "
        f"{a1['refusal_rate']:.2f} {fmt_ci(a1['refusal_ci_low'], a1['refusal_ci_high'])} with "
        f"the direction ablated at every layer (paired difference "
        f"{_neg(a1['diff_vs_baseline']):+.2f}, exact McNemar p_Holm = {a1['p_holm']:.2g}; "
        f"{_vs_controls(ablation, abl_name)}). It refuses {h0['refusal_rate']:.2f} "
        f"{fmt_ci(h0['refusal_ci_low'], h0['refusal_ci_high'])} of harmless requests, and with "
        f"the direction added at layer {sel.layer}: {add_txt}.")
    if not sig_abl:
        half = (a1["diff_ci_high"] - a1["diff_ci_low"]) / 2
        from em_interp.stats import min_detectable_effect

        text += (f" The ablation's change is not significant after Holm: a null at this size; "
                 f"the run would detect a change in refusal rate of about "
                 f"{min_detectable_effect(half_width=float(half)):.2f}.")
    rates = pd.DataFrame(_rate_rows(ablation, "harmful (test)")
                         + _rate_rows(addition, "harmless (test)"))
    cand = sel.candidates
    selection = pd.DataFrame({
        "layer": cand["layer"], "norm": cand["norm"], "bypass (harmful, ablated)": cand["bypass"],
        "induce (harmless, added)": cand["induce"], "KL (harmless, ablated)": cand["kl"],
        "passes filters": cand["passes"], "chosen": cand["selected"]})
    samples = pd.DataFrame(_samples(ablation, ["unmodified", abl_name])
                           + _samples(addition, ["unmodified", add_names[max(c.scales)]]))
    summary = {**{k: d[k] for k in ("layer", "hook", "norm", "bypass", "induce", "kl",
                                    "baseline_harmful", "baseline_harmless", "passed_filters",
                                    "n_candidates", "n_passing", "refusal_tokens")},
               "model": c.model, "n_fit": len(fit), "n_validation": len(val),
               "n_test_harmful": len(harmful), "n_test_harmless": len(harmless),
               "refusal_harmful": float(a0["refusal_rate"]),
               "refusal_harmful_ablated": float(a1["refusal_rate"]),
               "refusal_harmful_ablated_p_holm": float(a1["p_holm"]),
               "refusal_harmless": float(h0["refusal_rate"]),
               "refusal_harmless_added": {f"{s:g}": float(row["refusal_rate"]) for s, row in adds},
               "ablation": ablation.to_dict(), "addition": addition.to_dict()}
    held = HeldOut.of(list(fit.ids) + list(val.ids), list(harmful.ids) + list(harmless.ids),
                      f"train split of '{c.prompt_set}': candidates on {len(fit)} prompts, the "
                      f"layer on {len(val)} others",
                      f"test split: {len(harmful)} harmful and {len(harmless)} harmless prompts")
    return StageOutput(
        title="The refusal direction (Arditi et al. 2024)", summary=summary, text=text,
        results={"selection": sel, "ablation": ablation, "addition": addition},
        tables=[("Refusal rate on held-out prompts per condition (Wilson 95% intervals), the "
                 "paired change from the unmodified model (95% interval) and exact McNemar p, "
                 "Holm-adjusted within each prompt family; controls are same-norm random and "
                 "orthogonal directions", rates),
                (f"Candidate directions on the {len(val)} validation prompts: mean refusal score "
                 "with the candidate ablated (harmful) or added (harmless), and the KL its "
                 "ablation causes on harmless prompts", selection),
                ("Sample held-out completions", samples)],
        held_out=held,
        figures=[("selection", sel.figure(), "Validation scores of every candidate layer; the "
                  "dashed line marks the chosen layer."),
                 ("ablation", ablation.figure(title="Harmful test prompts: attack success "
                                                    "(not refused) per condition"),
                  "Attack success on held-out harmful requests with the direction and its "
                  "controls ablated."),
                 ("addition", addition.figure(title="Harmless test prompts: not refused per "
                                                    "condition"),
                  "Held-out harmless requests that are not refused, with the direction and its "
                  "controls added.")])
