"""The Qwen introspection paper's analyses as run stages: probing, introspection, patching, dla.

(The attack-success-rate stage is :mod:`em_interp.run.stages.asr`.)

Each function takes the run's :class:`~em_interp.run.pipeline.RunContext` and returns a
:class:`~em_interp.run.pipeline.StageOutput`: the results (saved by the pipeline), plotly figures
and a short text built from the numbers alone. Resumable intermediate state (activation stores,
patching sweeps, generations) goes to ``ctx.work_dir(stage)``, so a killed stage restarts from
what it had written.

Every stage that selects something (a layer, head layers, heads, a direction) selects on one set
of prompts and reports on another, and says which in its :class:`~em_interp.run.stage.HeldOut`
(the pipeline refuses a stage whose two sets share a prompt):

============= ====================================================== =========================
stage         fit / selected on                                      evaluated on
============= ====================================================== =========================
probing       the probes' training rows (layer chosen by grouped CV)  held-out rows (groups)
introspection refusal vector + Procrustes on the train split;         the test split
              EM / refusal directions on the harmful set
patching      layer sweeps on the fit half of the test split's       the held-out half
              prompts (choose the head layers)
dla           heads ranked on train-split harmful prompts            test-split harmful prompts
============= ====================================================== =========================
"""

from __future__ import annotations

import torch

from em_interp.run.stage import HeldOut, StageOutput
from em_interp.run.stages.common import (
    fmt_ci,
    hook_name,
    hook_template,
    layer_list,
    prompt_set,
)


def probing(ctx) -> StageOutput:
    """Experiment 1: a probe per layer on the organism, the base model as the control.

    Fit: the probes' training rows (the layer is chosen by cross-validation inside them).
    Evaluated: the held-out test rows (whole minimal-pair groups), at the chosen layer."""
    import pandas as pd

    from em_interp.activations.cache import cache_activations
    from em_interp.representations.probing import probe_layers

    c, pair = ctx.config.probing, ctx.pair
    n_layers = pair.organism.model.cfg.n_layers
    layers = layer_list(c.layers, n_layers)
    prompts = prompt_set(ctx, c.prompt_set, c.n_prompts)
    names = [hook_name(c.hook, layer) for layer in layers]
    stores = {v: cache_activations(getattr(pair, v), prompts, names, ctx.work_dir("probing") / v,
                                   batch_size=ctx.config.batch_size, progress=ctx.progress)
              for v in ("organism", "base")}
    res = probe_layers(stores["organism"], hook_template=hook_template(c.hook), layers=layers,
                       groups=None if prompts.groups is None else list(prompts.groups),
                       control_store=stores["base"], seed=ctx.config.seed,
                       progress=ctx.progress)
    d = res.to_dict()
    ctrl = d.get("control", {})
    vs = ctrl.get("vs_organism", {})
    fit_ps, test_ps = prompts.subset(res.train_index), prompts.subset(res.test_index)
    n_groups = len(set(prompts.groups)) if prompts.groups is not None else None
    grouped = str(d.get("split", "")).startswith("grouped")
    split = (f"{d['n_train']} training / {d['n_test']} held-out prompts, "
             + (f"whole groups held out (the {len(prompts)} prompts fall in {n_groups} "
                "minimal-pair groups)" if grouped else "a stratified random split"))
    p, p_any = d.get("p_value"), d.get("p_max")
    sig = p is not None and p < 0.05
    ptxt = "not computed" if p is None else f"{p:.2g}"
    text = (f"A standardised logistic-regression probe was fit at {c.hook} of each of "
            f"{len(layers)} layers to tell risky from benign prompts ({len(prompts)} prompts of "
            f"'{c.prompt_set}': {split}; chance {d['chance']:.2f}). "
            + (f"The layer was chosen by {d['selection']} (CV accuracy "
               f"{d['cv_accuracy']:.3f}): layer {d['chosen_layer']}. " if len(layers) > 1
               else f"Only layer {d['chosen_layer']} was probed. ")
            + f"Held-out test accuracy there is {d['accuracy']:.3f} "
            f"{fmt_ci(d['ci_low'], d['ci_high'])} (Wilson 95%); against {d['n_permutations']} "
            f"label permutations (groups kept together) the p-value, max statistic over the "
            f"{len(layers)} layers, is {ptxt}"
            + ("" if p_any is None else f" (the smallest over layers, a test of signal at any "
                                          f"layer: {p_any:.2g})") + ". ")
    if not sig:
        text += (f"This is a null at this size: the test set resolves gains of "
                 f"{d['min_detectable_effect']:.2f} accuracy above chance (alpha 0.05, power "
                 f"0.8), not smaller ones. ")
    if ctrl:
        text += (f"The same probe on the base model chooses layer {ctrl['chosen_layer']}, "
                 f"held-out accuracy {ctrl['accuracy']:.3f} "
                 f"{fmt_ci(ctrl['ci_low'], ctrl['ci_high'])}"
                 + ("" if ctrl.get("p_value") is None else f", p = {ctrl['p_value']:.2g}")
                 + ". ")
        if vs:
            text += (f"Organism minus base on the same held-out prompts at layer {vs['layer']}: "
                     f"{vs['difference']:+.3f} {fmt_ci(vs['ci_low'], vs['ci_high'])} (exact "
                     f"McNemar, {vs['b10']} prompts right only for the organism, {vs['b01']} "
                     f"only for the base; p = {vs['p_value']:.2g}). ")
    text += (f"Mean over layers of the random-label accuracy: "
             f"{d['mean_random_label_accuracy']:.3f}. Persistence (cosine of adjacent probed "
             f"layers' directions) averages {d['mean_persistence']:.2f}.")
    org, base = res.curve("organism"), res.curve("control")
    table = pd.DataFrame({
        "layer": org.index.astype(int), "chosen": org["chosen"].astype(bool),
        "CV accuracy": org["cv_accuracy"], "test accuracy": org["accuracy"],
        "95% CI": [fmt_ci(lo, hi) for lo, hi in zip(org["ci_low"], org["ci_high"],
                                                      strict=True)],
        "random-label mean": org["random_label_accuracy"], "p": org["p_value"],
        "p (max over layers)": org["p_value_max"]})
    if not base.empty:
        table["base test accuracy"] = base.loc[org.index, "accuracy"].to_numpy()
    if len(table) > 12:  # the chosen layer and the next best by CV; the figure has every layer
        keep = table.sort_values("CV accuracy", ascending=False).index[:8]
        table = table.loc[sorted(keep)]
    caption = ("Probe per layer: CV accuracy in the training rows (chooses the layer), held-out "
               "test accuracy with Wilson 95% interval, random-label null mean, permutation "
               "p-values (per layer and max-statistic over layers)"
               + (f"; the 8 layers of highest CV accuracy of {len(org)}" if len(org) > 12
                  else ""))
    held = HeldOut.of(fit_ps, test_ps,
                      f"probe training rows; layer chosen by {d['selection']}",
                      "held-out test rows" + (" (whole groups)" if grouped else ""))
    return StageOutput(
        title="Probing (Experiment 1)", summary=d, text=text, results={"probe": res},
        tables=[(caption, table.reset_index(drop=True))], held_out=held,
        figures=[("accuracy", res.figure("accuracy", title="Probe test accuracy per layer"),
                  "Held-out test accuracy per layer with Wilson 95% intervals; the star marks "
                  "the layer chosen by cross-validation in the training rows; organism, base "
                  "control and random-label null."),
                 ("persistence", res.figure("persistence",
                                            title="Probe-direction persistence across layers"),
                  "Cosine between the probe directions of adjacent layers.")])


def introspection(ctx) -> StageOutput:
    """Experiment 2 (Procrustes-aligned refusal vector) and the EM-vs-refusal cosine per layer.

    Fit: the refusal vector, the Procrustes map and the zero point on the financial train split;
    the EM and refusal directions on the harmful/harmless prompts. Evaluated: the financial test
    split's projections."""
    import pandas as pd

    from em_interp.activations.cache import cache_activations
    from em_interp.representations.directions import introspection_scores
    from em_interp.representations.em_refusal import em_vs_refusal

    c, pair, bs = ctx.config.introspection, ctx.pair, ctx.config.batch_size
    n_layers = pair.organism.model.cfg.n_layers
    layer = c.layer % n_layers
    hook = hook_name(c.hook, layer)
    work = ctx.work_dir("introspection")
    fin = prompt_set(ctx, c.prompt_set, c.n_prompts)
    harm = prompt_set(ctx, c.refusal_set, c.n_prompts)
    # With the refusal_direction stage in the run, its direction (Arditi et al.'s recipe, at
    # resid_pre of the chosen layer) is the refusal vector of both readouts.
    sel = (ctx.stage_result("refusal_direction", "selection")
           if "refusal_direction" in ctx.config.stages else None)
    kind = "resid_post" if sel is None else "resid_pre"
    # resid_pre(0) is the last prompt token's embedding, the same token for every chat prompt
    resid = [hook_name(kind, i) for i in range(0 if sel is None else 1, n_layers)]

    def store(variant, prompts, names, tag):
        return cache_activations(getattr(pair, variant), prompts, names, work / tag,
                                 batch_size=bs, progress=ctx.progress)

    fin_hooks = [hook] if sel is None else list(dict.fromkeys([hook, sel.direction.hook]))
    fin_base = store("base", fin, fin_hooks, "fin_base")
    fin_org = store("organism", fin, fin_hooks, "fin_org")
    harm_base = store("base", harm, resid, "harm_base")
    harm_org = store("organism", harm, resid, "harm_org")
    fit = [s == "train" for s in fin_base.split]
    intro = introspection_scores(fin_base, fin_org, hook=hook, fit_mask=fit)
    results = {"introspection": intro}
    refusal_fit, refusal_base = [], None
    if sel is not None:
        from em_interp.run.stages.refusal import refusal_splits

        rfit = refusal_splits(ctx.config)[0]
        refusal_fit = list(rfit.ids)
        refusal_base = store(ctx.config.refusal_direction.model, rfit, resid, "refusal_fit")
        results["introspection_refusal"] = introspection_scores(
            fin_base, fin_org, hook=sel.direction.hook, fit_mask=fit,
            vector=sel.direction.vector)
    evr = em_vs_refusal(harm_base, harm_org, refusal_base=refusal_base,
                        hook_template=hook_template(kind), n_null=c.n_null,
                        seed=ctx.config.seed, progress=ctx.progress)
    results["em_vs_refusal"] = evr
    i, e = intro.to_dict(), evr.to_dict()
    sig = e["significant_layers"]
    n_fit = sum(fit)
    summary = {**{k: i[k] for k in ("hook", "mean_risky", "mean_benign", "cohens_d",
                                    "ks_statistic", "ks_pvalue", "n_risky", "n_benign",
                                    "evaluated_on", "rotation_cosine")},
               "n_fit": n_fit,
               "procrustes_relative_residual": i["procrustes"].get("relative_residual"),
               "em_vs_refusal": {"significant_layers": sig, "n_significant": len(sig),
                                 "n_layers": len(e["layers"]),
                                 **{k: e[k] for k in ("max_abs_cosine", "max_abs_cosine_layer",
                                                      "n_outside_random_band", "n_null",
                                                      "n_undefined", "layers", "cosine", "p_shuffled_fwer",
                                                      "proj_shift")}},
               "layers_outside_random_band": e["n_outside_random_band"]}
    sel_txt = ""
    if sel is not None:
        ir = results["introspection_refusal"].to_dict()
        row = evr.df[evr.df["layer"] == sel.layer].iloc[0]
        match = evr.direction(sel.layer, "refusal").cosine(sel.direction)
        summary["refusal_direction"] = {
            "layer": sel.layer, "hook": sel.direction.hook,
            "em_cosine": float(row["cosine"]), "em_cosine_p_shuffled": float(row["p_shuffled"]),
            "em_cosine_shuffled_band": [float(row["shuffled_lo"]), float(row["shuffled_hi"])],
            "same_direction_cosine": match,
            "introspection": {k: ir[k] for k in ("mean_risky", "mean_benign", "cohens_d",
                                                 "ks_statistic", "ks_pvalue", "n_risky",
                                                 "n_benign", "rotation_cosine")}}
        sig_r = row["p_shuffled"] < 0.05
        sel_txt = (
            f"\nWith the refusal_direction stage's direction (layer {sel.layer}, chosen on its "
            f"validation prompts, so this one layer is a pre-specified test): "
            f"cos(EM direction, refusal direction) = {row['cosine']:.3f}, against the "
            f"label-shuffled 95% band {fmt_ci(row['shuffled_lo'], row['shuffled_hi'])}, p = "
            f"{row['p_shuffled']:.2g} ({'outside' if sig_r else 'inside'} the null). Projected on "
            f"it after the Procrustes map (Experiment 2 with this vector), the organism's "
            f"held-out risky prompts score {ir['mean_risky']:.3f} against {ir['mean_benign']:.3f} "
            f"for benign ones: Cohen's d = {ir['cohens_d']:.2f}, KS p = {ir['ks_pvalue']:.2g}, "
            f"n = {ir['n_risky']} + {ir['n_benign']}. (The refusal direction recomputed here "
            f"from the stage's fit prompts has cosine {match:.4f} with the stage's.)")
    sig_txt = (f"{len(sig)} of {len(e['layers'])} layers ({_layers_txt(sig)})" if sig
               else f"none of the {len(e['layers'])} layers")
    text = (f"The base model's refusal vector (mean risky minus mean benign activation at {hook}) "
            f"was fitted on the {n_fit} train-split prompts of the {len(fin)} '{c.prompt_set}' "
            f"prompts, rotated into the organism's space by an orthogonal Procrustes map fitted "
            f"on the train-split benign anchors only (the rotation moved it to cosine "
            f"{i['rotation_cosine']:.3f} with itself) and centred on the organism's train-split "
            f"benign mean. On the {i['n_risky'] + i['n_benign']} held-out test-split prompts the "
            f"organism's projections are {i['mean_risky']:.3f} (risky) against "
            f"{i['mean_benign']:.3f} (benign): Cohen's d = {i['cohens_d']:.2f}, KS = "
            f"{i['ks_statistic']:.3f} (p = {i['ks_pvalue']:.2g}), n = {i['n_risky']} + "
            f"{i['n_benign']}.\n"
            f"EM direction (organism minus base mean activation on {len(harm)} "
            f"'{c.refusal_set}' prompts) against the refusal direction (harmful minus harmless "
            f"in the base), at {kind} of layers {resid[0].split('.')[1]}-{n_layers - 1}: the "
            f"cosine lies outside the "
            f"label-shuffled null ({c.n_null} shuffles, max statistic over layers, p < 0.05) at "
            f"{sig_txt}; "
            + ("no layer has a defined cosine" if e["max_abs_cosine"] is None else
               f"the largest |cosine| is {e['max_abs_cosine']:.3f} at layer "
               f"{e['max_abs_cosine_layer']}")
            + (f" ({e['n_undefined']} layers the fine-tune left unchanged have a zero EM "
               "direction and no cosine)" if e.get("n_undefined") else "")
            + f". Secondary, weaker null: {e['n_outside_random_band']} "
            f"layers fall outside the 95% band of {c.n_null} random Gaussian directions (any "
            f"two activation-derived directions tend to, activation space being anisotropic)."
            + sel_txt)
    df = evr.df
    top = set(df.loc[df["cosine"].abs().sort_values(ascending=False).index[:5], "layer"])
    rows = df[df["layer"].isin(set(sig) | top)] if len(df) > 12 else df
    table = pd.DataFrame({
        "layer": rows["layer"].astype(int), "cosine": rows["cosine"],
        "shuffled-label 95% band": [fmt_ci(lo, hi) for lo, hi in
                                    zip(rows["shuffled_lo"], rows["shuffled_hi"], strict=True)],
        "p (shuffled, FWER)": rows["p_shuffled_fwer"],
        "significant": rows["p_shuffled_fwer"] < 0.05,
        "random-direction 95% band": [fmt_ci(lo, hi) for lo, hi in
                                      zip(rows["random_lo"], rows["random_hi"], strict=True)]})
    caption = ("cos(EM direction, refusal direction) per layer against the label-shuffled null "
               "(p corrected across layers by the max statistic) and the random-direction band"
               + ("; the significant layers and the 5 of largest |cosine|" if len(df) > 12
                  else ""))
    test_ps = fin.subset([k for k, f in enumerate(fit) if not f])
    held = HeldOut.of(list(fin.subset([k for k, f in enumerate(fit) if f]).ids)
                      + list(harm.ids) + refusal_fit, test_ps,
                      f"refusal vector, Procrustes map and zero point on the '{c.prompt_set}' "
                      f"train split; EM and refusal directions on the '{c.refusal_set}' prompts",
                      f"'{c.prompt_set}' test split (held-out projections)")
    return StageOutput(
        title="Introspection and the EM-vs-refusal direction (Experiment 2)", summary=summary,
        text=text, results=results,
        tables=[(caption, table.reset_index(drop=True))], held_out=held,
        figures=[("introspection", intro.figure(), "Held-out prompts' projections on the "
                  "aligned refusal vector, by class; dashed lines are class means."),
                 ("em_vs_refusal", evr.figure(), "Cosine of the EM direction with the refusal "
                  "direction per layer, with null bands from random and label-shuffled "
                  "directions.")])


def _layers_txt(layers) -> str:
    """``[3, 4, 5, 9]`` -> ``"3-5, 9"``."""
    out, run = [], []
    for la in sorted(layers):
        if run and la == run[-1] + 1:
            run.append(la)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [la]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ", ".join(out)


def _site_rows(summary, n: int | None = None):
    """A patching summary's sites as a paper table (largest |mean| first): the site, mean
    effect, its 95% interval, significant."""
    import pandas as pd

    s = summary.loc[summary["mean"].abs().sort_values(ascending=False).index]
    if n is not None:
        s = s.head(n)
    site = (s["component"] if "component" in s.columns else
            [f"H{int(h)}" for h in s["head"]])
    return pd.DataFrame({"layer": s["layer"].astype(int).to_numpy(), "site": list(site),
                         "mean effect": s["mean"].to_numpy(),
                         "95% interval": [fmt_ci(lo, hi) for lo, hi in
                                          zip(s["ci_low"], s["ci_high"], strict=True)],
                         "excludes 0": s["significant"].astype(bool).to_numpy()})


def _site_txt(row) -> str:
    where = (f"{row['component']} L{int(row['layer'])}" if "component" in row.index
             else f"L{int(row['layer'])}H{int(row['head'])}")
    return f"{where} {row['mean']:+.3f} {fmt_ci(row['ci_low'], row['ci_high'])}"


def patching(ctx) -> StageOutput:
    """Layer x component patching risky -> benign and back on the fit half of the prompts (which
    chooses the head layers), then the chosen layers' sites and heads on the held-out half."""
    from em_interp.patching.fine import patch_heads
    from em_interp.patching.pairs import sample_split_pairs
    from em_interp.patching.results import plot_forward_reverse
    from em_interp.patching.sweep import patch_sweep

    c, org, bs = ctx.config.patching, ctx.pair.organism, ctx.config.batch_size
    n_layers = org.model.cfg.n_layers
    metric = ctx.stage_result("introspection", "introspection").metric()
    test = prompt_set(ctx, c.prompt_set, split="test")
    risky, benign = test.where(1), test.where(0)
    split = sample_split_pairs(risky, benign, c.k_pairs, c.k_pairs, seed=ctx.config.seed,
                               name="risky -> benign")
    pairs, held = split
    read_at = metric.layer  # the metric reads this block: later ones can't move it
    layers = [la for la in layer_list(c.layers, n_layers) if la <= read_at]
    work = ctx.work_dir("patching")
    fwd = patch_sweep(org, pairs, metric, layers=layers, batch_size=bs, out_dir=work / "forward",
                      progress=ctx.progress)
    rev = patch_sweep(org, pairs.reverse(name="benign -> risky (fit)"), metric, layers=layers,
                      batch_size=bs, out_dir=work / "reverse", progress=ctx.progress)
    s = fwd.summary()
    by_layer = s.assign(a=s["mean"].abs()).groupby("layer")["a"].max()
    top_layers = sorted(int(x) for x in by_layer.sort_values(ascending=False).index[:c.head_layers])
    # measured on prompts the choice never saw
    confirm = patch_sweep(org, held, metric, layers=top_layers, batch_size=bs,
                          out_dir=work / "held_out", progress=ctx.progress)
    heads = patch_heads(org, held, metric, layers=top_layers, batch_size=bs,
                        out_dir=work / "heads", progress=ctx.progress)
    rs, cs, hs = rev.summary(), confirm.summary(), heads.summary()
    fd, rd, cd, hd = fwd.to_dict(), rev.to_dict(), confirm.to_dict(), heads.to_dict()
    f_top = fwd.top(5, summary=s)
    best = f_top.iloc[0]
    same = cs[(cs["layer"] == best["layer"]) & (cs["component"] == best["component"])]
    gap = float(fwd.s_source.mean() - fwd.s_clean.mean())
    gap_held = float(confirm.s_source.mean() - confirm.s_clean.mean())
    sd = split.to_dict()
    summary = {"metric": fwd.metric, "k_pairs": len(pairs), "k_pairs_held_out": len(held),
               "split": {k: sd[k] for k in ("n_fit", "n_eval", "fraction", "seed", "dropped")}
               | {"fit_sources": len(sd["fit_prompts"]["sources"]),
                  "fit_dests": len(sd["fit_prompts"]["dests"]),
                  "eval_sources": len(sd["eval_prompts"]["sources"]),
                  "eval_dests": len(sd["eval_prompts"]["dests"])},
               "interval": fd["interval"], "gap": gap, "gap_held_out": gap_held,
               "head_layers": top_layers,
               "top_site": {"layer": int(best["layer"]), "component": best["component"],
                            "mean_fit": float(best["mean"]),
                            "mean_held_out": float(same["mean"].iloc[0]) if len(same) else None,
                            "ci_held_out": ([float(same["ci_low"].iloc[0]),
                                             float(same["ci_high"].iloc[0])] if len(same)
                                            else None)},
               **{f"{k}_conclusion": v["conclusion"] for k, v in
                  (("forward", fd), ("reverse", rd), ("held_out", cd), ("heads", hd))},
               **{f"{k}_min_detectable_effect": v["min_detectable_effect"]["smallest"] for k, v in
                  (("forward", fd), ("reverse", rd), ("held_out", cd), ("heads", hd))},
               "forward": fd["top"], "reverse": rd["top"], "forward_significant":
               fd["significant"], "held_out": cd["top"], "heads": hd.get("top", []),
               "heads_significant": hd.get("significant", [])}
    ci_note = "95% intervals from a two-way bootstrap over source and destination prompts"

    n_sig = int(cs["significant"].sum())

    h_top = heads.top(3, summary=hs)
    text = (f"Metric: {fwd.metric} (the introspection stage's aligned refusal direction, fitted "
            f"on the train split, read at block {read_at}, so layers 0..{read_at} are patched). "
            f"The risky and benign prompts of the '{c.prompt_set}' test split were each cut in "
            f"two disjoint halves; {len(pairs)} risky -> benign pairs were drawn inside the fit "
            f"half and {len(held)} inside the held-out half (no prompt in both). Patching one "
            f"site's activation from the source run into the destination run at the last "
            f"position ({ci_note}, per site, not corrected across sites):\n"
            f"Fit half (source-minus-destination gap {gap:+.3f}): largest forward effects "
            f"{'; '.join(_site_txt(r) for _, r in f_top.head(3).iterrows())}. "
            f"{fd['conclusion']} Reverse control (benign -> risky): "
            f"{'; '.join(_site_txt(r) for _, r in rev.top(3, summary=rs).iterrows())}. "
            f"Layers chosen for head patching by the largest forward |effect|: {top_layers}.\n"
            f"Held-out half (gap {gap_held:+.3f}): the top fit site "
            f"{best['component']} L{int(best['layer'])} measures "
            + (f"{same['mean'].iloc[0]:+.3f} "
               f"{fmt_ci(same['ci_low'].iloc[0], same['ci_high'].iloc[0])}" if len(same)
               else "n/a")
            + f" (fit {best['mean']:+.3f}); {n_sig} of {len(cs)} sites of the chosen layers "
            f"{'has' if n_sig == 1 else 'have'} an interval excluding 0. Heads of layers "
            f"{top_layers}, largest first: "
            f"{'; '.join(_site_txt(r) for _, r in h_top.iterrows())}. {hd['conclusion']}")
    fwd_table = _site_rows(s, 8)
    rev_at = rs.set_index(["layer", "component"])["mean"]
    fwd_table["reverse effect (same site)"] = [
        float(rev_at.get((la, comp), float("nan"))) for la, comp in
        zip(fwd_table["layer"], fwd_table["site"], strict=True)]
    held_table = _site_rows(cs)
    held_table.insert(3, "fit effect", [
        float(s.set_index(["layer", "component"])["mean"].get((la, comp), float("nan")))
        for la, comp in zip(held_table["layer"], held_table["site"], strict=True)])
    fit_ids, eval_ids = pairs.prompt_ids(), held.prompt_ids()
    fit_prompts = (list(risky.subset(fit_ids.sources).prompts)
                   + list(benign.subset(fit_ids.dests).prompts))
    eval_prompts = (list(risky.subset(eval_ids.sources).prompts)
                    + list(benign.subset(eval_ids.dests).prompts))
    held_out = HeldOut.of(fit_prompts, eval_prompts,
                          f"fit half of the '{c.prompt_set}' test split: {len(pairs)} pairs, the "
                          "layer sweeps that choose the head layers",
                          f"held-out half: {len(held)} pairs, the chosen layers' sites and heads")
    return StageOutput(
        title="Causal tracing: activation patching (Experiment 3)", summary=summary, text=text,
        results={"forward": fwd, "reverse": rev, "held_out": confirm, "heads": heads},
        tables=[(f"Fit half, forward (risky -> benign): the 8 sites of largest |mean effect|, "
                 f"with the reverse effect at the same site; {ci_note}.", fwd_table),
                (f"Held-out half: every site of the chosen layers {top_layers}, with its effect "
                 f"on the fit half; {ci_note}.", held_table),
                (f"Held-out half: heads of layers {top_layers}, largest |mean effect| first; "
                 f"{ci_note}.", _site_rows(hs, 10))],
        held_out=held_out,
        figures=[("forward_reverse", plot_forward_reverse(fwd, rev),
                  "Fit half: mean patching effect per layer and component, forward (risky -> "
                  f"benign) and reverse; {ci_note}."),
                 ("heatmap", fwd.heatmap(), "Fit half: forward effects, layer x component."),
                 ("heads", heads.figure(), f"Held-out half: head-level patching at layers "
                  f"{top_layers}; {ci_note}.")])


def _emitted_ids(lm, prompts, words, batch_size: int) -> tuple[list[int], list[str]]:
    """For each word, the single token the model would emit (``word`` or ``' word'``, the more
    probable at the last prompt position); a word that is no single token falls back to its
    first token, and the note says so."""
    from em_interp.errors import TokenizationError
    from em_interp.inputs import single_token_id, token_batches

    tok = lm.tokenizer
    candidates = []
    for w in words:
        ids = []
        for v in dict.fromkeys((w, " " + w.strip(), w.strip())):
            try:
                ids.append(single_token_id(tok, v))
            except TokenizationError:
                pass
        candidates.append(ids)
    notes, chosen = [], []
    flat = sorted({i for ids in candidates for i in ids})
    logp = torch.zeros(len(flat))
    if flat:
        with torch.no_grad():
            for batch in token_batches(lm, prompts, batch_size):
                toks = batch.tokens
                out = lm.model(toks.tokens, attention_mask=toks.attention_mask)[:, -1]
                logp += out.float().log_softmax(-1)[:, flat].sum(0).cpu()
    for w, ids in zip(words, candidates, strict=True):
        if ids:
            best = max(ids, key=lambda i: float(logp[flat.index(i)]))
            chosen.append(best)
        else:
            first = single_token_id(tok, w, first_token=True)
            chosen.append(first)
            notes.append(f"{w!r} is not one token for this tokenizer; its first token "
                         f"{tok.decode([first])!r} is tracked")
    return chosen, notes


def dla(ctx) -> StageOutput:
    """Direct logit attribution of refusal vs compliance, and the logit lens before/after
    ablating the most suppressive heads.

    Fit: the heads (and which spelling of each tracked word) are chosen on harmful prompts of
    the train split. Evaluated: the logit difference with and without them, the held-out DLA and
    the logit lens, on harmful prompts of the test split."""
    import numpy as np
    import pandas as pd

    from em_interp.behaviour.interventions import ablate_heads
    from em_interp.readouts.attribution import direct_logit_attribution
    from em_interp.readouts.logit_lens import logit_lens
    from em_interp.stats import cluster_bootstrap_ci

    c, org, bs = ctx.config.dla, ctx.pair.organism, ctx.config.batch_size
    fit_ps = prompt_set(ctx, c.prompt_set, c.n_prompts, label=1, split="train")
    eval_ps = prompt_set(ctx, c.prompt_set, c.n_prompts, label=1, split="test")
    ids, notes = _emitted_ids(org, fit_ps, c.tokens, bs)
    if ids[0] == ids[1]:
        from em_interp.errors import ConfigError

        raise ConfigError(f"[dla].tokens {c.tokens} both map to token "
                          f"{org.tokenizer.decode([ids[0]])!r} for this tokenizer; choose two "
                          "words whose first tokens differ.")
    with torch.no_grad():
        res = direct_logit_attribution(org, fit_ps, ids[0], ids[1], batch_size=bs,
                                       progress=ctx.progress)
        sup = res.top_heads(c.n_heads, sign="negative")
        heads = [(int(r.layer), int(r.head)) for r in sup.itertuples()]
        before = direct_logit_attribution(org, eval_ps, ids[0], ids[1], batch_size=bs,
                                          progress=ctx.progress)
        ablation = ablate_heads(org, heads, mode="zero")
        with ablation:
            after = direct_logit_attribution(org, eval_ps, ids[0], ids[1], batch_size=bs,
                                             progress=ctx.progress)
        name = "zeroed " + ", ".join(f"L{la}H{h}" for la, h in heads)
        lens = logit_lens(org, eval_ps, ids, batch_size=bs, progress=ctx.progress,
                          conditions={"as is": None, name: ablation})
    d, dh = res.to_dict(), before.to_dict()
    ld_before = before.logit_diff.double().numpy()
    change = after.logit_diff.double().numpy() - ld_before
    ci = cluster_bootstrap_ci(change, np.arange(len(change)), seed=ctx.config.seed)
    held_attr = before.mean_heads
    summary = {**{k: d[k] for k in ("token_a", "token_b")},
               "n_prompts_fit": d["n_prompts"], "n_prompts_held_out": dh["n_prompts"],
               "mean_logit_diff_fit": d["mean_logit_diff"],
               "mean_logit_diff": dh["mean_logit_diff"],
               "logit_diff_after_ablation": float(after.logit_diff.mean()),
               "ablation_change": ci.estimate, "ablation_change_ci": [ci.low, ci.high],
               "max_abs_total_error": max(d["max_abs_total_error"], dh["max_abs_total_error"]),
               "sum_heads": dh["sum_heads"], "sum_mlp": dh["sum_mlp"],
               "suppressive_heads": [[la, h, float(a)] for (la, h), a in
                                     zip(heads, sup["attribution"], strict=True)],
               "suppressive_heads_held_out": [[la, h, float(held_attr[la, h])]
                                              for la, h in heads],
               "top_heads": d["top_heads"], "logit_lens": lens.to_dict(),
               "token_notes": notes}
    hl = ", ".join(f"L{la}H{h} ({float(a):+.3f}; held out {float(held_attr[la, h]):+.3f})"
                   for (la, h), a in zip(heads, sup["attribution"], strict=True))
    excl = not ci.low <= 0 <= ci.high
    text = (f"Direct logit attribution of logit({d['token_a']!r}) - logit({d['token_b']!r}) at "
            f"the last position of harmful prompts, on the organism, with the final norm's "
            f"scale frozen (the terms sum to the logit difference within "
            f"{summary['max_abs_total_error']:.1e}). Heads were chosen on {d['n_prompts']} "
            f"train-split prompts (mean logit difference {d['mean_logit_diff']:+.3f}): the "
            f"{len(heads)} most suppressive (most negative mean attribution) are {hl}. On "
            f"{dh['n_prompts']} held-out test-split prompts the mean logit difference is "
            f"{dh['mean_logit_diff']:+.3f} (heads contribute {dh['sum_heads']:+.3f}, MLPs "
            f"{dh['sum_mlp']:+.3f}); zeroing the chosen heads moves it to "
            f"{summary['logit_diff_after_ablation']:+.3f}, a change of {ci.estimate:+.3f} "
            f"{fmt_ci(ci.low, ci.high)} (95% bootstrap over prompts"
            + ("" if excl else "; the interval includes 0") + "). The logit lens reads "
            "the tracked tokens at every layer of the held-out prompts, with and without the "
            "ablation."
            + (" Note: " + "; ".join(notes) + "." if notes else ""))
    table = pd.DataFrame({
        "head": [f"L{la}H{h}" for la, h in heads],
        "attribution (fit)": [float(a) for a in sup["attribution"]],
        "attribution (held out)": [float(held_attr[la, h]) for la, h in heads]})
    diff = pd.DataFrame({
        "condition": ["as is", name, "change"],
        "mean logit difference": [dh["mean_logit_diff"], summary["logit_diff_after_ablation"],
                                  ci.estimate],
        "95% interval": [None, None, fmt_ci(ci.low, ci.high)]})
    held = HeldOut.of(fit_ps, eval_ps,
                      "harmful train-split prompts: heads ranked by mean DLA",
                      "harmful test-split prompts: logit difference before and after zeroing, "
                      "logit lens")
    return StageOutput(
        title="Direct logit attribution and the logit lens", summary=summary, text=text,
        results={"dla": res, "dla_held_out": before, "dla_ablated": after, "logit_lens": lens},
        tables=[("The most suppressive heads: mean attribution to the logit difference on the "
                 "train-split prompts that chose them and on the held-out prompts", table),
                (f"Held-out prompts: mean logit({d['token_a']!r}) - logit({d['token_b']!r}) as "
                 "is and with the chosen heads zeroed; the change with a 95% bootstrap interval "
                 "over prompts", diff)],
        held_out=held,
        figures=[("dla_heatmap", res.figure("heatmap"), "Per-head DLA (layer x head) on the "
                  "train-split prompts that choose the heads."),
                 ("dla_layers", before.figure("layers"), "Held-out prompts: attention and MLP "
                  "DLA summed per layer."),
                 ("logit_lens", lens.figure(), "Held-out prompts, logit lens: mean probability "
                  "of the tracked tokens per layer, as is and with the suppressive heads "
                  "zeroed.")])
