"""The SAE and BLOCK-EM stages: an SAE on a late layer with its feature/refusal correlation, then
BLOCK-EM's latent discovery and blocked against unblocked fine-tunes on the AB metric.

Which prompts each stage touches (recorded as the stage's ``held_out``; the pipeline refuses a
stage whose fit and evaluated prompts share one):

* ``sae`` -- fit: the SAE's training prompts, drawn from every shipped set *except* the
  correlation prompts, the quality-evaluation prompts and BLOCK-EM's held-out evaluation data
  (the test splits of ``ab_pairs`` and ``risky_financial_sft``). Evaluated: the
  quality-evaluation prompts (held out from the same mixture, at least ``[sae].eval_tokens``
  tokens) and the correlation prompts (nothing is selected on them).
* ``block_em`` -- fit: the em_questions of discovery stage 1, the AB train pairs of stages 2-3,
  the SFT conversations and the SAE's training prompts. Evaluated: the held-out AB pairs (core
  and in-domain groups of the test split) and the held-out SFT answers.
"""

from __future__ import annotations

from pathlib import Path

from em_interp.run.stage import HeldOut, StageOutput
from em_interp.run.stages.common import hook_name, prompt_set

SAE_SETS = ("financial", "harmful", "em_questions", "ab_pairs", "risky_financial_sft")
"""The shipped sets whose prompts make the SAE's training mixture."""
BLOCK_EM_HELD_OUT = ("ab_pairs", "risky_financial_sft")
"""Sets whose test split BLOCK-EM evaluates on: left out of the SAE's training mixture."""


def _limited(ctx, ps):
    limit = ctx.config.max_prompt_chars
    return ps.subset([i for i, t in enumerate(ps.texts) if len(t) <= limit]) if limit else ps


def _sae_mixture(ctx, exclude: set[str]):
    """Every shipped prompt (analysis prompts, questions, SFT chats) but BLOCK-EM's held-out
    test splits and the prompts whose content ids are in ``exclude``."""
    from em_interp.data import concat, load_prompt_set

    out = None
    for name in SAE_SETS:
        ps = load_prompt_set(name)
        if name in BLOCK_EM_HELD_OUT:
            ps = ps.train()
        ps = _limited(ctx, ps)
        keep = [i for i, k in enumerate(ps.ids) if k not in exclude]
        if keep:
            ps = ps.subset(keep)
            out = ps if out is None else concat(out, ps, name="sae-mixture")
    return out


def _quality_table(m, origin: str):
    import pandas as pd

    return pd.DataFrame([{
        "SAE": origin, "held-out prompts": m.n_prompts, "tokens": m.n_tokens,
        "in training set": ("unknown" if m.n_train_overlap is None
                            else f"{m.n_train_overlap} of {m.n_prompts}"),
        "explained variance": round(m.explained_variance, 3), "L0": round(m.l0, 1),
        "dead latents": f"{m.dead_fraction:.1%}",
        "CE loss recovered": None if m.ce_recovered is None else round(m.ce_recovered, 3),
        "CE clean / SAE / zero": "" if m.ce_loss_clean is None else
        f"{m.ce_loss_clean:.3f} / {m.ce_loss_sae:.3f} / {m.ce_loss_zero:.3f}"}])


def sae(ctx) -> StageOutput:
    """Train (or load) an SAE at a late layer of the organism, measure it on held-out prompts,
    and correlate its latents with the label against a permutation null."""
    from em_interp.activations.cache import cache_activations
    from em_interp.errors import DataError
    from em_interp.sae import analyze_features, evaluate_sae, load_sae, train_sae
    from em_interp.sae.evaluate import held_out_split
    from em_interp.sae.train import SAETrainConfig

    c, org, bs = ctx.config.sae, ctx.pair.organism, ctx.config.batch_size
    layer = c.layer % org.model.cfg.n_layers
    hook = hook_name(c.hook, layer)
    prompts = prompt_set(ctx, c.prompt_set, c.n_prompts)
    work = ctx.work_dir("sae")
    mixture = _sae_mixture(ctx, set(prompts.ids))
    if mixture is None or len(mixture) < 2:
        raise DataError("no shipped prompts are left for the SAE's training and evaluation once "
                        "the correlation prompts are set aside; lower [sae].n_prompts or raise "
                        "[run].max_prompt_chars.")
    split = held_out_split(org, mixture, c.eval_tokens, seed=ctx.config.seed)
    eval_ps = split.evaluation
    train = corpus = None
    if c.source == "train":
        corpus = split.rest
        if c.train_prompts and c.train_prompts < len(corpus):
            corpus = corpus.sample(c.train_prompts, seed=ctx.config.seed, stratify=False)
        store = cache_activations(org, corpus, [hook], work / "activations", reduce="none",
                                  batch_size=bs, progress=ctx.progress)
        cfg = SAETrainConfig(expansion_factor=c.expansion, training_tokens=c.training_tokens,
                             batch_size=min(1024, c.training_tokens), seed=ctx.config.seed,
                             out_dir=str(work / "sae"), eval_tokens=c.eval_tokens)
        train = train_sae(org, hook, store, cfg, eval_prompts=eval_ps, train_prompts=corpus,
                          progress=ctx.progress)
        sae_model, sae_dir, quality = train.sae, train.sae_dir, train.metrics
        origin = (f"trained with SAE-Lens on {train.n_tokens} activation rows of the organism's "
                  f"{hook} (every real token of {len(corpus)} shipped prompts, cycled; the "
                  "correlation prompts, the quality-evaluation prompts and BLOCK-EM's held-out "
                  f"test splits were left out), d_sae = {train.d_sae}")
    else:
        sae_model = load_sae(c.source, model=org)
        sae_dir = c.source
        quality = evaluate_sae(org, sae_model, eval_ps, max_tokens=c.eval_tokens,
                               batch_size=bs, progress=ctx.progress)
        origin = f"loaded from {c.source}"
    features = analyze_features(org, sae_model, prompts, batch_size=bs,
                                n_permutations=c.n_permutations, seed=ctx.config.seed,
                                progress=ctx.progress)
    f = features.to_dict()
    q = quality.to_dict()
    summary = {"hook": hook, "sae": sae_dir, "features": f, "quality": q}
    results = {"features": features, "quality": quality}
    if train is not None:
        summary["train"] = train.to_dict()
        results["train"] = train
    text = f"SAE at {hook}, {origin}. " + _quality_text(quality, split, c.eval_tokens)
    text += _correlation_text(f, c.prompt_set)
    figures = [("features", features.figure("scatter"), "Each latent's mean activation "
                "against its correlation with the label (the Qwen paper's Fig. 14)."),
               ("feature_bars", features.figure("bars"), "The latents most correlated with "
                "the label, both signs; dashed: the max |r| that 5% of label permutations "
                "reach.")]
    if train is not None:
        figures.append(("training", train.figure(), "SAE training curve: batch MSE and "
                        "explained variance per step."))
    tables = [(f"SAE quality on held-out prompts ({quality.n_tokens} tokens of "
               f"{quality.n_prompts} prompts the SAE never trained on" +
               ("" if train is not None else "; the SAE's own training data is unknown")
               + ").", _quality_table(quality, "trained here" if train is not None
                                      else "loaded")),
              (f"The latents most correlated with the label ({f['label']}) over "
               f"{f['n_prompts']} '{c.prompt_set}' prompts: Pearson r, raw p, Benjamini-"
               f"Hochberg p over {f['n_varying_latents']} varying latents, and the "
               f"family-wise p from {f['n_permutations']} label permutations (max |r| null).",
               features.correlations.table(5))]
    held = None
    if corpus is not None:
        held = HeldOut.of(corpus, [*eval_ps.ids, *prompts.ids],
                          f"the SAE's training prompts ({len(corpus)}, shipped sets without "
                          "the evaluated prompts and BLOCK-EM's test splits); nothing is "
                          "selected on the correlation prompts",
                          f"{len(eval_ps)} held-out quality-evaluation prompts "
                          f"({split.n_tokens} tokens) and {len(prompts)} correlation prompts")
    return StageOutput(title="A sparse autoencoder on a late layer", summary=summary, text=text,
                       results=results, figures=figures, tables=tables, held_out=held)


def _quality_text(m, split, wanted: int) -> str:
    overlap = ("" if m.n_train_overlap is None else
               "none of them in its training set" if m.n_train_overlap == 0 else
               f"{m.n_train_overlap} of them in its training set, so these numbers flatter it")
    capped = (f" (fewer than the {wanted} asked: the held-out share is capped at a quarter of "
              "the prompts)" if split.capped else "")
    return (f"Quality on {m.n_prompts} held-out prompts of the same mixture, {m.n_tokens} "
            f"tokens{capped}" + (f", {overlap}" if overlap else "") +
            f": explained variance {m.explained_variance:.3f}, L0 {m.l0:.1f} active latents "
            f"per token, {100 * m.dead_fraction:.0f}% of latents never fire"
            + (f", CE loss recovered {m.ce_recovered:.2f} over {m.n_ce_tokens} next-token "
               "positions" if m.ce_recovered is not None else "") + ". ")


def _correlation_text(f: dict, prompt_set_name: str) -> str:
    def names(side):
        return ", ".join(f"#{x['latent']} (r = {x['pearson_r']:+.2f})" for x in f[side][:3])

    text = (f"Each latent's mean activation over the real tokens of {f['n_prompts']} "
            f"'{prompt_set_name}' prompts was correlated (Pearson) with the prompt's label "
            f"({f['label']}); {f['n_varying_latents']} of {f['d_sae']} latents vary. Most "
            f"positive: {names('top')}; most negative: {names('bottom')}. ")
    if f["max_abs_r"] is None:
        return text + "No latent varies, so nothing can be correlated."
    text += f"The largest |r| is {f['max_abs_r']:.2f}"
    if f["n_permutations"]:
        p = f["p_max_abs_r"]
        text += (f"; under {f['n_permutations']} random permutations of the labels the largest "
                 f"|r| over all latents exceeds {f['null_max_abs_r_q95']:.2f} 5% of the time "
                 f"(permutation p = {p:.3f}), so the strongest latent "
                 + ("tracks the label beyond what chance gives with this many prompts and "
                    "latents" if p < 0.05 else
                    "is no stronger than chance gives with this many prompts and latents"))
    text += (f". {f['n_significant_fdr']} latent"
             f"{'' if f['n_significant_fdr'] == 1 else 's'} "
             f"{'is' if f['n_significant_fdr'] == 1 else 'are'} significant at FDR "
             f"{f['fdr_alpha']:.0%} (Benjamini-Hochberg over the varying latents).")
    return text


def sae_of(ctx):
    """The SAE the ``sae`` stage trained or loaded (for the stages that read it)."""
    from em_interp.sae import load_sae

    return load_sae(ctx.stage_info("sae")["summary"]["sae"], model=ctx.pair.organism)


def _eval_pairs(test, n: int, seed: int):
    """The core (general) and in-domain (finance) pairs of the AB test split; ``n > 0`` draws
    ``n`` in all, split evenly between the two groups."""
    groups = test.groups or ("general",) * len(test)
    out = []
    for j, g in enumerate(("general", "finance")):
        idx = [i for i, x in enumerate(groups) if x == g]
        if not idx:
            out.append(None)
            continue
        ps = test.subset(idx, f"ab_pairs[test, {g}]")
        take = (n + 1 - j) // 2 if n else 0
        out.append(ps.sample(take, seed=seed) if take and take < len(ps) else ps)
    return out


def block_em(ctx) -> StageOutput:
    """BLOCK-EM discovery on the sae stage's SAE with the AB metric, then a short fine-tune of
    the base on the SFT set per lambda and seed (lambda 0: unblocked), each scored on held-out
    AB pairs; the effect is the reduction of the shift from the base, over seeds."""
    from em_interp.block_em.discovery import DiscoveryConfig, discover_latents
    from em_interp.block_em.measures import ABBehaviour
    from em_interp.block_em.seeds import shift_reduction
    from em_interp.block_em.sweep import EvalConfig, evaluate_model
    from em_interp.block_em.train import BlockEMConfig, train_blocked
    from em_interp.data import load_prompt_set
    from em_interp.errors import DataError
    from em_interp.models.loading import load
    from em_interp.training.lora import LoRATrainConfig, load_base_hf

    c, pair, bs, seed = ctx.config.block_em, ctx.pair, ctx.config.batch_size, ctx.config.seed
    work = ctx.work_dir("block_em")
    sae_model = sae_of(ctx)
    ab = load_prompt_set("ab_pairs")
    limit = ctx.config.max_prompt_chars
    if limit:
        ab = ab.subset([i for i, (q, e) in enumerate(zip(ab.texts, ab.extra, strict=True))
                        if len(q) + max(len(e["aligned"]), len(e["misaligned"])) <= limit])
    train_pairs = ab.train()
    if c.n_ab_pairs and c.n_ab_pairs < len(train_pairs):
        train_pairs = train_pairs.sample(c.n_ab_pairs, seed=seed)
    core_eval, domain_eval = _eval_pairs(ab.test(), c.eval_pairs, seed)
    if core_eval is None:
        raise DataError("the AB test split holds no core (general) pairs"
                        + (" within [run].max_prompt_chars" if limit else "")
                        + "; BLOCK-EM's effect is measured on them. Raise max_prompt_chars.")
    sft_all = load_prompt_set("risky_financial_sft")
    sft = sft_all.train()
    sft_used = sft.subset(range(min(c.n_examples, len(sft)))) if c.n_examples else sft
    heldout = sft_all.test()
    if limit:
        keep = [i for i, conv in enumerate(heldout.conversations)
                if sum(len(m["content"]) for m in conv) <= limit]
        heldout = heldout.subset(keep) if keep else None
    if heldout is not None and c.n_heldout and c.n_heldout < len(heldout):
        heldout = heldout.sample(c.n_heldout, seed=seed)
    core = prompt_set(ctx, "em_questions", c.n_prompts)
    dcfg = DiscoveryConfig(n_candidates=c.n_candidates,
                           shortlist=max(c.k_latents, c.n_candidates // 2),
                           n_latents=c.k_latents, grid=tuple(sorted({0.0, *c.grid})),
                           batch_size=bs)
    found = discover_latents(pair.base, pair.organism, sae_model, core,
                             ABBehaviour(train_pairs, batch_size=bs), work / "discovery", dcfg,
                             sae_source=ctx.stage_info("sae")["summary"]["sae"],
                             progress=ctx.progress)
    latent_set = found.latents
    ecfg = EvalConfig(batch_size=bs, heldout_sft=None)
    sets = {"core": core_eval, "domain": domain_eval, "heldout": heldout}
    base_eval = evaluate_model(pair.base, ecfg, **sets)
    org_eval = evaluate_model(pair.organism, ecfg, base_eval, **sets)
    rows, results = [], {"discovery": found}
    for s in c.seeds:
        for lam in c.lambdas:
            lora = LoRATrainConfig(rank=16, alpha=32, lr=1e-3, max_steps=c.max_steps,
                                   batch_size=4, max_length=192, warmup_steps=0, seed=s,
                                   max_examples=c.n_examples or None)
            cfg = BlockEMConfig(method="block_em" if lam > 0 else "sft", lam=float(lam) or 1.0)
            run = train_blocked(pair.base.card, sft, lora, cfg, work / f"lambda-{lam:g}-seed{s}",
                                blocks=[(sae_model, latent_set)] if lam > 0 else (),
                                progress=ctx.progress,
                                model=load_base_hf(pair.base.card, progress=False))
            tuned = load(pair.base.card, "base", adapter=Path(run.run_dir) / run.adapter_dir,
                         progress=False)
            ev = evaluate_model(tuned, ecfg, base_eval, **sets)
            del tuned
            rows.append({"lam": float(lam), "seed": s, "margin": ev.mean_margin,
                         "domain_margin": ev.domain_margin, "incoherence": ev.incoherence,
                         "heldout_nll": ev.heldout_nll,
                         "final_loss": float(run.log["loss"][-1]) if "loss" in run.log
                         else None})
    effect = shift_reduction(rows, base_eval.mean_margin,
                             base_domain_margin=base_eval.domain_margin,
                             organism_margin=org_eval.mean_margin)
    results["effect"] = effect
    k_plus, k_minus = list(latent_set.k_plus), list(latent_set.k_minus)
    summary = {"latents_plus": k_plus, "latents_minus": k_minus,
               "ab_base": base_eval.mean_margin, "ab_organism": org_eval.mean_margin,
               "ab_domain_base": base_eval.domain_margin,
               "ab_domain_organism": org_eval.domain_margin,
               "runs": _runs_summary(effect), "steps": c.max_steps, "seeds": list(c.seeds),
               "n_core_pairs": len(core_eval),
               "n_domain_pairs": 0 if domain_eval is None else len(domain_eval),
               "any_significant_reduction": effect.any_significant,
               "recommended_lambda": effect.recommended()}
    text = _discovery_text(c, core, train_pairs, k_plus, k_minus) + _effect_text(
        effect, c, len(sft_used), len(core_eval), domain_eval, heldout)
    fit = [*core.ids, *train_pairs.ids, *sft_used.ids]
    sae_fit = (ctx.stage_info("sae").get("held_out") or {}).get("fit") or []
    evaluated = [*core_eval.ids, *(domain_eval.ids if domain_eval is not None else []),
                 *(heldout.ids if heldout is not None else [])]
    held = HeldOut.of([*fit, *sae_fit], evaluated,
                      f"discovery: {len(core)} em_questions (stage 1) and {len(train_pairs)} AB "
                      f"train pairs (stages 2-3); fine-tuning: {len(sft_used)} SFT "
                      "conversations" + (f"; the SAE's {len(sae_fit)} training prompts"
                                         if sae_fit else ""),
                      f"{len(core_eval)} core and "
                      f"{0 if domain_eval is None else len(domain_eval)} in-domain held-out AB "
                      f"pairs (test split), {0 if heldout is None else len(heldout)} held-out "
                      "SFT conversations")
    caption = (f"BLOCK-EM per lambda over {len(c.seeds)} seeds: the shift of the mean AB margin "
               f"(nats/token, {len(core_eval)} held-out core pairs) from the base, its "
               "reduction against the same seed's unblocked fine-tune (mean, 95% t interval "
               "over seeds, per seed), Holm-adjusted p, the smallest reduction detectable at "
               "80% power, and the cost: in-domain margin lost, incoherence, held-out SFT NLL, "
               "final SFT loss.")
    return StageOutput(title="BLOCK-EM: latent discovery and blocked fine-tuning",
                       summary=summary, text=text, results=results,
                       figures=[("ab_vs_lambda", effect.figure(), "AB margin of each fine-tune "
                                 "(grey: one seed) and the mean over seeds with its 95% t "
                                 "interval; dashed: the base, dotted: the organism."),
                                ("discovery", found.figure(), "Discovery: the latents' scores.")],
                       tables=[(caption, effect.table())], held_out=held)


def _runs_summary(effect) -> list[dict]:
    """One headline record per lambda (the report's table shows the full rows)."""
    out = []
    for r in effect.per_lambda.to_dict("records"):
        seeds = effect.runs[effect.runs["lam"] == r["lam"]].sort_values("seed")
        rec = {"lambda": r["lam"], "n_seeds": int(r["n_seeds"]),
               "mean_margin": float(seeds["margin"].mean()), "shift": r["shift"],
               "shift_ci": [r["shift_low"], r["shift_high"]],
               "per_seed_margin": [float(x) for x in seeds["margin"]]}
        if r["lam"] > 0:
            rec.update(reduction=r["reduction"],
                       reduction_ci=[r["reduction_low"], r["reduction_high"]],
                       per_seed_reduction=[float(x) for x in seeds["reduction"]],
                       p_holm=r["p_holm"], significant=bool(r["significant"]),
                       relative_reduction=r["relative"], mde=r["mde"],
                       domain_lost=r.get("domain_lost"))
        for k in ("incoherence", "heldout_nll", "final_loss"):
            rec[k] = r.get(k)
        out.append(rec)
    return out


def _discovery_text(c, core, train_pairs, k_plus, k_minus) -> str:
    def listed(ks):
        return ", ".join(f"#{k}" for k in ks) if ks else "none"

    return (f"Discovery (stages 1-3) on the SAE of the sae stage: {c.n_candidates} candidate "
            f"latents of each sign by activation shift on {len(core)} em_questions prompts, "
            f"screened and calibrated by steering with the AB metric on {len(train_pairs)} "
            f"ab_pairs (train split), gave K+ = {listed(k_plus)} and K- = {listed(k_minus)}. ")


def _ok(v) -> bool:
    return v is not None and v == v


def _effect_text(effect, c, n_sft: int, n_core: int, domain, heldout) -> str:
    from em_interp.block_em.seeds import fmt_interval, fmt_percent, fmt_signed

    n_seeds = len(c.seeds)
    z = effect.row(0.0)
    text = (f"Then the base was fine-tuned on {n_sft} risky-financial SFT conversations for "
            f"{c.max_steps} steps, once per seed ({', '.join(map(str, c.seeds))}) and lambda "
            f"({', '.join(f'{x:g}' for x in c.lambdas)}), with the one-sided blocking loss on K "
            f"(lambda 0: plain SFT). Each fine-tune was scored by the AB metric (mean per-token "
            f"log-probability margin of the misaligned answer over the aligned one) on "
            f"{n_core} held-out core pairs"
            + (f" and {len(domain)} held-out in-domain (finance) pairs" if domain is not None
               else "") + f". Base {effect.base_margin:+.3f}, the shipped organism "
            f"{effect.organism_margin:+.3f}. The unblocked fine-tunes moved the margin by "
            f"{fmt_interval(z['shift'], z['shift_low'], z['shift_high'])} from the base"
            + (f" (mean and 95% t interval over {n_seeds} seeds)" if n_seeds > 1 else
               " (one seed: no interval)") + ". ")
    if n_seeds > 1 and not (_ok(z["shift_low"]) and z["shift_low"] > 0):
        text += ("That interval is not above 0: at this size plain fine-tuning did not "
                 "measurably raise the margin, so there is little shift for blocking to reduce "
                 "and no relative reduction is given. ")
    for lam in [x for x in c.lambdas if x > 0]:
        r = effect.row(float(lam))
        seeds = effect.runs[effect.runs["lam"] == float(lam)].sort_values("seed")
        text += (f"At lambda {lam:g} the shift was reduced by "
                 f"{fmt_interval(r['reduction'], r['reduction_low'], r['reduction_high'])} "
                 f"nats/token (per seed: "
                 f"{', '.join(fmt_signed(v) for v in seeds['reduction'])}; negative: blocking "
                 "raised the margin")
        if _ok(r.get("p_holm")):
            text += f"; Holm-adjusted p = {r['p_holm']:.2g}"
        if _ok(r.get("relative")):
            text += f"; {fmt_percent(r['relative'])} of the unblocked shift"
        text += "). "
        if r["significant"] and _ok(r.get("relative")) and abs(r["relative"]) < 0.05:
            text += ("Significant but small: the seeds agree so closely that even a reduction "
                     "of a few percent of the shift or less is resolved. ")
        parts = []
        if _ok(r.get("domain_lost")):
            parts.append("in-domain (finance) margin lost " + fmt_interval(
                r["domain_lost"], r.get("domain_lost_low"), r.get("domain_lost_high")))
        if _ok(r.get("incoherence")) and _ok(z.get("incoherence")):
            parts.append(f"incoherent pairs {r['incoherence']:.0%} (unblocked "
                         f"{z['incoherence']:.0%})")
        if heldout is not None and _ok(r.get("heldout_nll")) and _ok(z.get("heldout_nll")):
            parts.append(f"held-out SFT answer NLL {r['heldout_nll']:.3f} (unblocked "
                         f"{z['heldout_nll']:.3f})")
        text += ("Cost: " + "; ".join(parts) + ". ") if parts else ""
    if n_seeds < 2:
        text += "With one seed there is no interval and no test: raise [block_em].seeds. "
    elif not effect.any_significant:
        mde = fmt_signed(max(effect.row(float(x))["mde"] for x in c.lambdas if x > 0))
        text += (f"No lambda reduced the shift significantly; with {n_seeds} seeds this run "
                 f"could only have detected a reduction of about {mde.lstrip('+')} nats/token "
                 "(80% power, 5% level, from the t interval's half-width). ")
    else:
        sig = [f"{x:g}" for x in c.lambdas if x > 0 and effect.row(float(x))["significant"]]
        text += (f"Lambda {', '.join(sig)} reduced the shift significantly (5% level, Holm "
                 "over the lambdas). ")
        rec = effect.recommended()
        text += (f"The run recommends lambda {rec:g}: the largest significant reduction whose "
                 "incoherence rate is at most 5 points above the unblocked fine-tune's. "
                 if rec is not None else "Every significant lambda raised incoherence by more "
                 "than 5 points over the unblocked fine-tune, so the run recommends none. ")
    return text + ("The intervals measure training randomness across seeds on these pairs, "
                   "not the sampling of questions.")
