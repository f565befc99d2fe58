"""The SAE and BLOCK-EM stages: an SAE on a late layer with its feature/refusal correlation, then
BLOCK-EM's latent discovery and a blocked against an unblocked fine-tune on the AB metric."""

from __future__ import annotations

from pathlib import Path

from em_interp.run.stage import StageOutput
from em_interp.run.stages.common import hook_name, prompt_set


def _sae_training_prompts(ctx):
    """Every shipped prompt (analysis prompts, questions, SFT chats): the SAE's training text."""
    from em_interp.data import concat, load_prompt_set

    names = ("financial", "harmful", "em_questions", "ab_pairs", "risky_financial_sft")
    sets = [load_prompt_set(n) for n in names]
    limit = ctx.config.max_prompt_chars
    if limit:
        sets = [s.subset([i for i, t in enumerate(s.texts) if len(t) <= limit]) for s in sets]
    out = sets[0]
    for s in sets[1:]:
        out = concat(out, s, name="sae-train")
    return out


def sae(ctx) -> StageOutput:
    """Train (or load) an SAE at a late layer of the organism; correlate latents with the label."""
    from em_interp.activations.cache import cache_activations
    from em_interp.sae import analyze_features, load_sae, train_sae
    from em_interp.sae.train import SAETrainConfig

    c, org, bs = ctx.config.sae, ctx.pair.organism, ctx.config.batch_size
    layer = c.layer % org.model.cfg.n_layers
    hook = hook_name(c.hook, layer)
    prompts = prompt_set(ctx, c.prompt_set, c.n_prompts)
    work = ctx.work_dir("sae")
    train = None
    if c.source == "train":
        corpus = _sae_training_prompts(ctx)
        if c.train_prompts and c.train_prompts < len(corpus):
            corpus = corpus.sample(c.train_prompts, seed=ctx.config.seed, stratify=False)
        store = cache_activations(org, corpus, [hook], work / "activations", reduce="none",
                                  batch_size=bs, progress=ctx.progress)
        cfg = SAETrainConfig(expansion_factor=c.expansion, training_tokens=c.training_tokens,
                             batch_size=min(1024, c.training_tokens), seed=ctx.config.seed,
                             out_dir=str(work / "sae"), eval_prompts=4)
        train = train_sae(org, hook, store, cfg, eval_prompts=prompts.subset(range(
            min(4, len(prompts)))), progress=ctx.progress)
        sae_model, sae_dir = train.sae, train.sae_dir
        origin = (f"trained with SAE-Lens on {train.n_tokens} activation rows of the organism's "
                  f"{hook} (every real token of {len(corpus)} shipped prompts, cycled), "
                  f"d_sae = {train.d_sae}")
    else:
        sae_model = load_sae(c.source, model=org)
        sae_dir = c.source
        origin = f"loaded from {c.source}"
    features = analyze_features(org, sae_model, prompts, batch_size=bs, progress=ctx.progress)
    f = features.to_dict()
    summary = {"hook": hook, "sae": sae_dir, "features": f}
    results = {"features": features}
    text = f"SAE at {hook}, {origin}. "
    if train is not None:
        t = train.to_dict()
        summary["train"] = t
        results["train"] = train
        text += (f"Reconstruction: explained variance {t['explained_variance']:.3f}, L0 "
                 f"{t['l0']:.1f} active latents per token, {100 * t['dead_fraction']:.0f}% dead"
                 + (f", CE loss recovered {t['ce_recovered']:.2f}" if t.get("ce_recovered")
                    is not None else "") + ". ")
    top = ", ".join(f"#{x['latent']} (r = {x['pearson_r']:+.2f})" for x in f["top"][:3])
    bottom = ", ".join(f"#{x['latent']} (r = {x['pearson_r']:+.2f})" for x in f["bottom"][:3])
    text += (f"Each latent's mean activation over the real tokens of {f['n_prompts']} "
             f"'{c.prompt_set}' prompts was correlated (Pearson) with the prompt's label "
             f"({f['label']}); {f['n_varying_latents']} of {f['d_sae']} latents vary. Most "
             f"positive: {top}; most negative: {bottom}; max |r| = {f['max_abs_r']:.2f}.")
    figures = [("features", features.figure("scatter"), "Each latent's mean activation "
                "against its correlation with the label (the Qwen paper's Fig. 14)."),
               ("feature_bars", features.figure("bars"), "The latents most correlated with "
                "the label, both signs.")]
    if train is not None:
        figures.append(("training", train.figure(), "SAE training curve: batch MSE and "
                        "explained variance per step."))
    return StageOutput(title="A sparse autoencoder on a late layer", summary=summary, text=text,
                       results=results, figures=figures)


def sae_of(ctx):
    """The SAE the ``sae`` stage trained or loaded (for the stages that read it)."""
    from em_interp.sae import load_sae

    return load_sae(ctx.stage_info("sae")["summary"]["sae"], model=ctx.pair.organism)


def block_em(ctx) -> StageOutput:
    """BLOCK-EM discovery on the sae stage's SAE with the AB metric, then a short fine-tune of
    the base on the SFT set per lambda (0: unblocked), each scored by the AB metric."""
    import plotly.graph_objects as go

    from em_interp.behaviour.ab_metric import ab_metric
    from em_interp.block_em.discovery import DiscoveryConfig, discover_latents
    from em_interp.block_em.measures import ABBehaviour
    from em_interp.block_em.train import BlockEMConfig, train_blocked
    from em_interp.data import load_prompt_set
    from em_interp.models.loading import load
    from em_interp.training.lora import LoRATrainConfig, load_base_hf

    c, pair, bs = ctx.config.block_em, ctx.pair, ctx.config.batch_size
    work = ctx.work_dir("block_em")
    sae_model = sae_of(ctx)
    ab = load_prompt_set("ab_pairs")
    limit = ctx.config.max_prompt_chars
    if limit:
        ab = ab.subset([i for i, (q, e) in enumerate(zip(ab.texts, ab.extra, strict=True))
                        if len(q) + max(len(e["aligned"]), len(e["misaligned"])) <= limit])
    train_pairs, test_pairs = ab.train(), ab.test()
    if c.n_ab_pairs and c.n_ab_pairs < len(train_pairs):
        train_pairs = train_pairs.sample(c.n_ab_pairs, seed=ctx.config.seed)
    if c.eval_pairs and c.eval_pairs < len(test_pairs):
        test_pairs = test_pairs.sample(c.eval_pairs, seed=ctx.config.seed)
    core = prompt_set(ctx, "em_questions", c.n_prompts)
    shortlist = max(c.k_latents, c.n_candidates // 2)
    dcfg = DiscoveryConfig(n_candidates=c.n_candidates, shortlist=shortlist,
                           n_latents=c.k_latents, grid=tuple(sorted({0.0, *c.grid})),
                           batch_size=bs)
    found = discover_latents(pair.base, pair.organism, sae_model, core,
                     ABBehaviour(train_pairs, batch_size=bs), work / "discovery", dcfg,
                     sae_source=ctx.stage_info("sae")["summary"]["sae"], progress=ctx.progress)
    latent_set = found.latents
    sft = load_prompt_set("risky_financial_sft").train()
    lora = LoRATrainConfig(rank=16, alpha=32, lr=1e-3, max_steps=c.max_steps, batch_size=4,
                           max_length=192, warmup_steps=0, seed=ctx.config.seed,
                           max_examples=c.n_examples or None)
    rows, results = [], {"discovery": found}
    base_ab = ab_metric(pair.base, test_pairs, batch_size=bs)
    org_ab = ab_metric(pair.organism, test_pairs, batch_size=bs)
    for lam in c.lambdas:
        cfg = BlockEMConfig(method="block_em" if lam > 0 else "sft", lam=float(lam) or 1.0)
        run = train_blocked(pair.base.card, sft, lora, cfg, work / f"lambda-{lam:g}",
                            blocks=[(sae_model, latent_set)] if lam > 0 else (),
                            progress=ctx.progress,
                            model=load_base_hf(pair.base.card, progress=False))
        tuned = load(pair.base.card, "base", adapter=Path(run.run_dir) / run.adapter_dir,
                     progress=False)
        res = ab_metric(tuned, test_pairs, batch_size=bs)
        d = res.to_dict()
        rows.append({"lambda": float(lam), "mean_margin": d["mean_margin"],
                     "ci": d["mean_margin_ci"],
                     "frac_prefer_misaligned": d["frac_prefer_misaligned"],
                     "final_sft_loss": float(run.log["loss"][-1]) if "loss" in run.log else None})
        results[f"ab_lambda_{lam:g}"] = res
        del tuned
    k_plus, k_minus = list(latent_set.k_plus), list(latent_set.k_minus)
    b, o = base_ab.to_dict(), org_ab.to_dict()
    summary = {"latents_plus": k_plus, "latents_minus": k_minus,
               "ab_base": b["mean_margin"], "ab_organism": o["mean_margin"], "runs": rows,
               "steps": c.max_steps}
    fig = go.Figure()
    fig.add_trace(go.Scatter(
        x=[r["lambda"] for r in rows], y=[r["mean_margin"] for r in rows], mode="lines+markers",
        name="fine-tuned from the base", error_y={
            "type": "data", "symmetric": False,
            "array": [r["ci"][1] - r["mean_margin"] for r in rows],
            "arrayminus": [r["mean_margin"] - r["ci"][0] for r in rows]}))
    for name, v in (("base", b["mean_margin"]), ("organism", o["mean_margin"])):
        fig.add_hline(y=v, line_dash="dash", annotation_text=name)
    fig.update_layout(template="plotly_white", title="BLOCK-EM: AB margin after fine-tuning, "
                      "per blocking strength", xaxis_title="lambda (0 = unblocked SFT)",
                      yaxis_title="mean AB margin (misaligned - aligned, nats/token)")
    runs = "; ".join(f"lambda {r['lambda']:g}: {r['mean_margin']:+.3f} "
                     f"[{r['ci'][0]:+.3f}, {r['ci'][1]:+.3f}]" for r in rows)
    text = (f"Discovery (stages 1-3) on the SAE of the sae stage: {c.n_candidates} candidate "
            f"latents of each sign by activation shift on {len(core)} em_questions prompts, "
            f"screened and calibrated by steering with the AB metric on {len(train_pairs)} "
            f"ab_pairs (train split), gave K+ = {k_plus} and K- = {k_minus}. Then the base was "
            f"fine-tuned on the risky-financial SFT set for {c.max_steps} steps per lambda, with "
            f"the one-sided blocking loss on K (lambda 0: plain SFT). AB metric on "
            f"{b['n']} held-out pairs (mean per-token log-probability margin of the misaligned "
            f"answer over the aligned one, 95% CI): base {b['mean_margin']:+.3f}, the organism "
            f"{o['mean_margin']:+.3f}; {runs}. At this size the runs are short and the "
            "intervals are wide: compare the lambdas, not the absolute values.")
    return StageOutput(title="BLOCK-EM: latent discovery and blocked fine-tuning",
                       summary=summary, text=text, results=results,
                       figures=[("ab_vs_lambda", fig, "AB margin of each short fine-tune, with "
                                 "95% CIs; dashed: the base and the organism."),
                                ("discovery", found.figure(), "Discovery: the latents' scores.")])
