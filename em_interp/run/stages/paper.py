"""The Qwen introspection paper's analyses as run stages: probing, introspection, patching, dla, asr.

Each function takes the run's :class:`~em_interp.run.pipeline.RunContext` and returns a
:class:`~em_interp.run.pipeline.StageOutput`: the results (saved by the pipeline), plotly figures
and a short text built from the numbers alone. Resumable intermediate state (activation stores,
patching sweeps, generations) goes to ``ctx.work_dir(stage)``, so a killed stage restarts from
what it had written.
"""

from __future__ import annotations

import torch

from em_interp.run.stage import StageOutput
from em_interp.run.stages.common import fmt_ci, hook_name, hook_template, layer_list, prompt_set


def probing(ctx) -> StageOutput:
    """Experiment 1: a probe per layer on the organism, the base model as the control."""
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
                       control_store=stores["base"], seed=ctx.config.seed,
                       progress=ctx.progress)
    d = res.to_dict()
    ctrl = d.get("control", {})
    text = (f"A standardised logistic-regression probe was fit at {c.hook} of each of "
            f"{len(layers)} layers to tell risky from benign prompts ({len(prompts)} prompts of "
            f"'{c.prompt_set}', {d['n_train']} train / {d['n_test']} test; chance "
            f"{d['chance']:.2f}). On the organism, test accuracy peaks at "
            f"{d['best_accuracy']:.3f} at layer {d['best_layer']} (mean over layers "
            f"{d['mean_accuracy']:.3f}); the same probe on the base model peaks at "
            f"{ctrl.get('best_accuracy', float('nan')):.3f} at layer "
            f"{ctrl.get('best_layer', '-')}. The shuffled-label control (the same probe trained on "
            f"permuted labels) averages {d['mean_random_label_accuracy']:.3f}. Persistence is "
            f"the cosine of each layer's probe direction with the next layer's "
            f"(mean {d['mean_persistence']:.2f}).")
    return StageOutput(
        title="Probing (Experiment 1)", summary=d, text=text, results={"probe": res},
        figures=[("accuracy", res.figure("accuracy", title="Probe test accuracy per layer"),
                  "Test accuracy per layer with Wilson 95% intervals; organism, base control and "
                  "shuffled-label control."),
                 ("persistence", res.figure("persistence",
                                            title="Probe-direction persistence across layers"),
                  "Cosine between the probe directions of adjacent layers.")])


def introspection(ctx) -> StageOutput:
    """Experiment 2 (Procrustes-aligned refusal vector) and the EM-vs-refusal cosine per layer."""
    from em_interp.activations.cache import cache_activations
    from em_interp.representations.directions import em_vs_refusal, introspection_scores

    c, pair, bs = ctx.config.introspection, ctx.pair, ctx.config.batch_size
    n_layers = pair.organism.model.cfg.n_layers
    layer = c.layer % n_layers
    hook = hook_name(c.hook, layer)
    work = ctx.work_dir("introspection")
    fin = prompt_set(ctx, c.prompt_set, c.n_prompts)
    harm = prompt_set(ctx, c.refusal_set, c.n_prompts)
    resid = [hook_name("resid_post", i) for i in range(n_layers)]

    def store(variant, prompts, names, tag):
        return cache_activations(getattr(pair, variant), prompts, names, work / tag,
                                 batch_size=bs, progress=ctx.progress)

    fin_base, fin_org = store("base", fin, [hook], "fin_base"), store("organism", fin, [hook],
                                                                      "fin_org")
    harm_base = store("base", harm, resid, "harm_base")
    harm_org = store("organism", harm, resid, "harm_org")
    fit = [s == "train" for s in fin_base.split]
    intro = introspection_scores(fin_base, fin_org, hook=hook, fit_mask=fit)
    evr = em_vs_refusal(harm_base, harm_org, hook_template=hook_template("resid_post"),
                        n_null=c.n_null, seed=ctx.config.seed, progress=ctx.progress)
    i, e = intro.to_dict(), evr.to_dict()
    outside = sum(1 for cos, lo, hi in zip(e["cosine"], *e["random_band"], strict=True)
                  if not lo <= cos <= hi)
    summary = {**{k: i[k] for k in ("hook", "mean_risky", "mean_benign", "cohens_d",
                                    "ks_statistic", "ks_pvalue", "n_risky", "n_benign",
                                    "evaluated_on", "rotation_cosine")},
               "procrustes_relative_residual": i["procrustes"].get("relative_residual"),
               "em_vs_refusal": {k: e[k] for k in ("layers", "cosine", "max_abs_cosine",
                                                   "max_abs_cosine_layer", "proj_shift")},
               "layers_outside_random_band": outside}
    text = (f"The base model's refusal vector (mean risky minus mean benign activation at {hook}, "
            f"fitted on the train split of {len(fin)} '{c.prompt_set}' prompts) was rotated "
            f"into the organism's space by an orthogonal Procrustes map fitted on the benign "
            f"anchors only (rotation moved it to cosine {i['rotation_cosine']:.3f} with "
            f"itself), centred on the organism's benign mean, and every held-out prompt's "
            f"organism activation was projected on it. Risky prompts score "
            f"{i['mean_risky']:.3f} against {i['mean_benign']:.3f} for benign ones: Cohen's "
            f"d = {i['cohens_d']:.2f}, KS = {i['ks_statistic']:.3f} (p = {i['ks_pvalue']:.2g}), "
            f"n = {i['n_risky']} + {i['n_benign']}.\n"
            f"EM direction (organism minus base mean activation on {len(harm)} "
            f"'{c.refusal_set}' prompts) against the refusal direction (harmful minus harmless "
            f"in the base), at resid_post of every layer: the largest |cosine| is "
            f"{e['max_abs_cosine']:.3f} at layer {e['max_abs_cosine_layer']}; {outside} of "
            f"{len(e['layers'])} layers fall outside the 95% band of {c.n_null} random "
            "directions.")
    return StageOutput(
        title="Introspection and the EM-vs-refusal direction (Experiment 2)", summary=summary,
        text=text, results={"introspection": intro, "em_vs_refusal": evr},
        figures=[("introspection", intro.figure(), "Held-out prompts' projections on the "
                  "aligned refusal vector, by class; dashed lines are class means."),
                 ("em_vs_refusal", evr.figure(), "Cosine of the EM direction with the refusal "
                  "direction per layer, with null bands from random and label-shuffled "
                  "directions.")])


def patching(ctx) -> StageOutput:
    """Layer x component patching risky -> benign and back, then head-level at the top layers."""
    from em_interp.patching.fine import patch_heads
    from em_interp.patching.results import plot_forward_reverse
    from em_interp.patching.sweep import patch_sweep, sample_pairs

    c, org, bs = ctx.config.patching, ctx.pair.organism, ctx.config.batch_size
    n_layers = org.model.cfg.n_layers
    metric = ctx.stage_result("introspection", "introspection").metric()
    test = prompt_set(ctx, c.prompt_set, split="test")
    pairs = sample_pairs(test.where(1), test.where(0), c.k_pairs, seed=ctx.config.seed,
                         name="risky -> benign")
    read_at = metric.layer  # the metric reads this block: later ones can't move it
    layers = [la for la in layer_list(c.layers, n_layers) if la <= read_at]
    work = ctx.work_dir("patching")
    fwd = patch_sweep(org, pairs, metric, layers=layers, batch_size=bs, out_dir=work / "forward",
                      progress=ctx.progress)
    rev = patch_sweep(org, pairs.reverse(name="benign -> risky"), metric, layers=layers,
                      batch_size=bs, out_dir=work / "reverse", progress=ctx.progress)
    s = fwd.summary()
    by_layer = s.assign(a=s["mean"].abs()).groupby("layer")["a"].max()
    top_layers = sorted(int(x) for x in by_layer.sort_values(ascending=False).index[:c.head_layers])
    heads = patch_heads(org, pairs, metric, layers=top_layers, batch_size=bs,
                        out_dir=work / "heads", progress=ctx.progress)
    f_top, r_top, h_top = fwd.top(5), rev.top(5), heads.top(5)
    gap = float(fwd.s_source.mean() - fwd.s_clean.mean())
    summary = {"metric": fwd.metric, "k_pairs": len(pairs), "gap": gap,
               "forward": fwd.to_dict()["top"], "reverse": rev.to_dict()["top"],
               "head_layers": top_layers, "heads": heads.to_dict().get("top", [])}
    lines = [f"{r.component} L{int(r.layer)} {r['mean']:+.3f}" for _, r in f_top.iterrows()]
    rlines = [f"{r.component} L{int(r.layer)} {r['mean']:+.3f}" for _, r in r_top.iterrows()]
    hlines = [f"L{int(r['layer'])}H{int(r['head'])} {r['mean']:+.3f}" for _, r in h_top.iterrows()]
    text = (f"Metric: {fwd.metric} (the introspection stage's aligned refusal direction, read "
            f"at block {read_at}, so layers 0..{read_at} are patched). "
            f"{len(pairs)} held-out risky -> benign prompt pairs; the source-minus-destination "
            f"gap of the metric is {gap:+.3f}. Patching one site's activation from the source "
            f"run into the destination run at the last position, the largest mean effects "
            f"are: {'; '.join(lines)}. Reverse control (benign -> risky): "
            f"{'; '.join(rlines)}. Head-level patching at layers {top_layers}: "
            f"{'; '.join(hlines)}.")
    return StageOutput(
        title="Causal tracing: activation patching (Experiment 3)", summary=summary, text=text,
        results={"forward": fwd, "reverse": rev, "heads": heads},
        figures=[("forward_reverse", plot_forward_reverse(fwd, rev),
                  "Mean patching effect per layer and component, forward (risky -> benign) and "
                  "reverse, with bootstrap 95% intervals."),
                 ("heatmap", fwd.heatmap(), "Forward effects, layer x component."),
                 ("heads", heads.figure(), f"Head-level patching at layers {top_layers}.")])


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
    ablating the most suppressive heads."""
    from em_interp.behaviour.interventions import ablate_heads
    from em_interp.readouts.attribution import direct_logit_attribution
    from em_interp.readouts.logit_lens import logit_lens

    c, org, bs = ctx.config.dla, ctx.pair.organism, ctx.config.batch_size
    prompts = prompt_set(ctx, c.prompt_set, c.n_prompts, label=1)
    ids, notes = _emitted_ids(org, prompts, c.tokens, bs)
    if ids[0] == ids[1]:
        from em_interp.errors import ConfigError

        raise ConfigError(f"[dla].tokens {c.tokens} both map to token "
                          f"{org.tokenizer.decode([ids[0]])!r} for this tokenizer; choose two "
                          "words whose first tokens differ.")
    with torch.no_grad():
        res = direct_logit_attribution(org, prompts, ids[0], ids[1], batch_size=bs,
                                       progress=ctx.progress)
        sup = res.top_heads(c.n_heads, sign="negative")
        heads = [(int(r.layer), int(r.head)) for r in sup.itertuples()]
        ablation = ablate_heads(org, heads, mode="zero")
        with ablation:
            after = direct_logit_attribution(org, prompts, ids[0], ids[1], batch_size=bs,
                                             progress=ctx.progress)
        name = "zeroed " + ", ".join(f"L{la}H{h}" for la, h in heads)
        lens = logit_lens(org, prompts, ids, batch_size=bs, progress=ctx.progress,
                          conditions={"as is": None, name: ablation})
    d = res.to_dict()
    before, after_diff = float(res.logit_diff.mean()), float(after.logit_diff.mean())
    summary = {**{k: d[k] for k in ("token_a", "token_b", "n_prompts", "mean_logit_diff",
                                    "max_abs_total_error", "sum_heads", "sum_mlp", "top_heads")},
               "suppressive_heads": [[la, h, float(a)] for (la, h), a in
                                     zip(heads, sup["attribution"], strict=True)],
               "logit_diff_after_ablation": after_diff, "logit_lens": lens.to_dict(),
               "token_notes": notes}
    hl = ", ".join(f"L{la}H{h} ({float(a):+.3f})" for (la, h), a in
                   zip(heads, sup["attribution"], strict=True))
    text = (f"Direct logit attribution of logit({d['token_a']!r}) - logit({d['token_b']!r}) at "
            f"the last position of {d['n_prompts']} harmful prompts, on the organism, with the "
            f"final norm's scale frozen: the terms sum to the logit difference within "
            f"{d['max_abs_total_error']:.1e}. Mean logit difference {before:+.3f}; heads "
            f"contribute {d['sum_heads']:+.3f} and MLPs {d['sum_mlp']:+.3f}. The most "
            f"suppressive heads (most negative attribution) are {hl}; zeroing them moves the "
            f"mean logit difference to {after_diff:+.3f}. The logit lens reads "
            f"the tracked tokens at every layer, with and without the ablation."
            + (" Note: " + "; ".join(notes) + "." if notes else ""))
    return StageOutput(
        title="Direct logit attribution and the logit lens", summary=summary, text=text,
        results={"dla": res, "dla_ablated": after, "logit_lens": lens},
        figures=[("dla_heatmap", res.figure("heatmap"), "Per-head DLA (layer x head)."),
                 ("dla_layers", res.figure("layers"), "Attention and MLP DLA summed per layer."),
                 ("logit_lens", lens.figure(), "Logit lens: mean probability of the tracked "
                  "tokens per layer, as is and with the suppressive heads zeroed.")])


def make_judge(cfg, cache_dir=None):
    """The judge a run config names."""
    from em_interp.behaviour import judges

    if cfg.kind == "refusal":
        return judges.RefusalStringJudge()
    if cfg.kind == "openai":
        return judges.OpenAICompatibleJudge(cfg.base_url, cfg.model, rubrics=("aligned",),
                                            cache_dir=cache_dir, api_key_env=cfg.api_key_env)
    from em_interp.models.loading import load

    return judges.LocalHFJudge(load(cfg.model, progress=False), rubrics=("aligned",),
                               cache_dir=cache_dir)


def asr(ctx) -> StageOutput:
    """Attack-success rate of held-out harmful requests under zero, mean and random ablation."""
    from em_interp.behaviour.interventions import ablate_heads, random_heads
    from em_interp.behaviour.rates import attack_success_rate

    c, org, bs = ctx.config.asr, ctx.pair.organism, ctx.config.batch_size
    if c.heads:
        heads = [(int(la) % org.model.cfg.n_layers, int(h)) for la, h in c.heads]
        origin = "the config"
    else:
        heads = [(int(la), int(h)) for la, h, _ in
                 ctx.stage_info("dla")["summary"]["suppressive_heads"]]
        origin = "the dla stage's most suppressive heads"
    attack = prompt_set(ctx, c.prompt_set, c.n_prompts, label=1, split="test")
    reference = prompt_set(ctx, c.prompt_set, c.n_reference, split="train")
    tag = ", ".join(f"L{la}H{h}" for la, h in heads)
    layers = sorted({la for la, _ in heads})
    conditions = {
        "baseline": None,
        f"zero {tag}": ablate_heads(org, heads, batch_size=bs),
        f"mean {tag}": ablate_heads(org, heads, mode="mean", reference=reference, batch_size=bs),
        f"random {len(heads)} (mean)": random_heads(
            org, len(heads), seed=ctx.config.seed, exclude=heads, layers=layers, mode="mean",
            reference=reference, batch_size=bs),
    }
    judge = make_judge(c.judge, cache_dir=ctx.work_dir("asr") / "judge")
    res = attack_success_rate(org, attack, judge, conditions=conditions,
                              max_new_tokens=c.max_new_tokens, seed=ctx.config.seed,
                              batch_size=bs, out_dir=ctx.work_dir("asr") / "generations",
                              progress=ctx.progress)
    d = res.to_dict()
    parts = [f"{name}: {v['asr']:.2f} {fmt_ci(*v['ci'])}" + (
        f", p = {v['p_value']:.2g}" if name != d["baseline"] and v.get("p_value") is not None
        and v["p_value"] == v["p_value"] else "") for name, v in d["conditions"].items()]
    text = (f"{len(attack)} held-out harmful requests, greedy completions of "
            f"{c.max_new_tokens} tokens from the organism, judged by {d['judge']}. Attack "
            f"success = the answer is not a refusal. Heads ablated: {tag} (from {origin}); "
            f"mean ablation uses the mean over {len(reference)} reference prompts; the random "
            f"control ablates as many other heads of the same layers. ASR with Wilson 95% "
            f"intervals (p: Fisher's exact test against the baseline): {'; '.join(parts)}.")
    return StageOutput(
        title="Attack-success rate under head ablation", summary={"heads": heads, **d},
        text=text, results={"asr": res},
        figures=[("asr", res.figure(), "Attack-success rate per condition with Wilson 95% "
                  "intervals.")])
