"""Feature analysis: Pearson correlations against scipy, top-activating prompts and tokens
against encode(reduce="none"), trajectories against full forwards of the generated sequences,
and the one-call late-layer analysis."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import stats

from em_interp.behaviour.interventions import ablate_heads
from em_interp.data import PromptSet
from em_interp.errors import DataError
from em_interp.inputs import tokenize
from em_interp.results import load_result
from em_interp.sae import (
    FeatureAnalysis,
    SAETrainConfig,
    TrajectoryResult,
    analyze_features,
    encode,
    feature_correlations,
    late_layer_sae_analysis,
    latent_trajectories,
)

HOOK = "blocks.1.hook_resid_post"
TEXTS = ["What is a bond?", "Tell me a long story about a dragon who collects old coins.",
         "hi", "Explain compound interest to a child in two sentences, please.",
         "How do I bake bread?", "List three prime numbers.", "Why is the sky blue?",
         "Write a haiku about rain."]


def random_sae(d_in=64, d_sae=256, hook=HOOK, seed=0):
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(seed)
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae,
                                        metadata=SAEMetadata(hook_name=hook)))
    with torch.no_grad():
        sae.b_enc.normal_(-0.3, 0.2)
    return sae.eval()


@pytest.fixture(scope="module")
def sae():
    return random_sae()


def test_pearson_matches_scipy():
    g = np.random.default_rng(0)
    labels = np.array([0, 1] * 15)
    x = np.maximum(g.normal(size=(30, 6)) + labels[:, None] * np.arange(6) * 0.3, 0)
    x[:, 5] = 0.0  # a dead latent: no correlation
    res = feature_correlations(torch.tensor(x, dtype=torch.float32), labels, label_name="refused")
    for k in range(5):
        r, p = stats.pearsonr(x[:, k], labels)
        assert res.pearson_r[k] == pytest.approx(r, abs=1e-6)
        assert res.p_value[k] == pytest.approx(p, rel=1e-4, abs=1e-12)
    assert np.isnan(res.pearson_r[5])
    np.testing.assert_allclose(res.mean_activation, x.mean(0), rtol=1e-6)
    np.testing.assert_allclose(res.mean_by_label["1"], x[labels == 1].mean(0), rtol=1e-6)
    order = res.df["latent"].tolist()
    assert order[-1] == 5  # NaN ranked last
    assert res.top(1)["latent"][0] == int(np.nanargmax(res.pearson_r))
    assert res.bottom(1)["latent"][0] == int(np.nanargmin(res.pearson_r))
    for kind in ("scatter", "bars"):
        assert res.figure(kind, n=2).layout.title.text
    with pytest.raises(DataError, match="both classes"):
        feature_correlations(torch.ones(4, 3), [1, 1, 1, 1])


def test_analyze_features_examples_match_per_token_latents(tiny_llama, sae, tmp_path):
    ps = PromptSet(name="toy", prompts=tuple(TEXTS), labels=(1, 0) * 4,
                   label_names={0: "harmless", 1: "harmful"})
    fa = analyze_features(tiny_llama, sae, ps, top_k=3, n_examples=2, batch_size=3,
                          progress=False)
    assert fa.correlations.label_name == "harmful" and fa.correlations.n_prompts == 8
    # the null of max |r| and BH over latents come with every analysis
    d = fa.to_dict()
    assert d["n_permutations"] == 200 and 0 < d["p_max_abs_r"] <= 1
    assert d["null_max_abs_r_q95"] > 0 and d["n_significant_fdr"] >= 0
    assert all("p_bh" in x for x in d["top"])
    zbar = encode(tiny_llama, sae, ps, "mean", progress=False)
    torch.testing.assert_close(fa.latents, zbar, rtol=1e-4, atol=1e-5)
    per_token = encode(tiny_llama, sae, ps, "none", progress=False)
    tok = tiny_llama.tokenizer
    ids = [tokenize(tiny_llama, [p]).tokens[0].tolist() for p in TEXTS]
    assert len(fa.examples) > 0
    special = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id} - {None}
    for row in fa.examples.itertuples():
        z = per_token[row.prompt_index][:, row.latent]
        plain = torch.tensor([t not in special for t in ids[row.prompt_index]])
        skip_special = bool((z[plain] > 0).any())  # else the peak may be on BOS & co.
        if skip_special:
            z = z.masked_fill(~plain, float("-inf"))
            assert ids[row.prompt_index][int(z.argmax())] not in special
        assert row.max_activation == pytest.approx(float(z.max()), rel=1e-4, abs=1e-5)
        assert row.position == int(z.argmax())
        assert row.token == tok.decode([ids[row.prompt_index][row.position]])
        assert f"[[{row.token}]]" in row.context
        # prompts are ranked by z-bar
        assert row.z_bar == pytest.approx(float(zbar[row.prompt_index, row.latent]), rel=1e-4)
        assert row.prompt_index == int(zbar[:, row.latent].argsort(descending=True,
                                                                   stable=True)[row.rank])
    top = fa.correlations.top(3)["latent"].tolist()
    assert set(fa.examples[fa.examples["side"] == "top"]["latent"]) <= set(top)
    fa.save(tmp_path / "fa")
    back = load_result(tmp_path / "fa")
    assert isinstance(back, FeatureAnalysis)
    assert back.to_dict() == fa.to_dict()
    assert torch.equal(back.latents, fa.latents)


def test_trajectories_match_full_forwards(tiny_llama, sae):
    tl = tiny_llama.model
    prompts = TEXTS[:3]
    heads = ablate_heads(tiny_llama, [(0, 0), (0, 3), (1, 1)])
    fires = torch.cat(encode(tiny_llama, sae, prompts, "none", progress=False)).gt(0).sum(0)
    busy = [int(k) for k in fires.argsort(descending=True)[:2]]
    assert fires[busy].min() > 3
    res = latent_trajectories(tiny_llama, sae, prompts, busy, max_new_tokens=5,
                              conditions={"baseline": None, "heads": heads}, batch_size=2,
                              stop_at_eos=False, progress=False)
    assert isinstance(res, TrajectoryResult)
    t = res.df
    assert set(t["condition"]) == {"baseline", "heads"}
    for cond, iv in (("baseline", None), ("heads", heads)):
        for i, p in enumerate(prompts):
            comp = res.completions[(res.completions["condition"] == cond)
                                   & (res.completions["prompt_index"] == i)].iloc[0]
            assert comp["n_tokens"] == 5 and comp["stop_reason"] == "max_new_tokens"
            prompt_ids = tokenize(tiny_llama, [p]).tokens[0]
            rows = t[(t["condition"] == cond) & (t["prompt_index"] == i) & (t["latent"] == busy[1])]
            gen_ids = torch.tensor(rows[rows["phase"] == "generated"]["token_id"].tolist())
            assert len(gen_ids) == 4  # 5 tokens chosen, the first 4 were fed back
            full = torch.cat([prompt_ids, gen_ids])[None]
            hooks_ = [] if iv is None else iv.fwd_hooks()
            grabbed = {}

            def grab(act, hook, grabbed=grabbed):
                grabbed["x"] = act

            with torch.no_grad():
                tl.run_with_hooks(full, fwd_hooks=[*hooks_, (HOOK, grab)])
            z = sae.encode(grabbed["x"][0])[:, busy[1]]
            n = len(prompt_ids)
            assert rows["step"].tolist() == list(range(-(n - 1), 5))
            torch.testing.assert_close(torch.tensor(rows["activation"].tolist()), z,
                                       rtol=1e-4, atol=1e-4)
    assert (t["activation"] > 0).mean() > 0.2  # the compared latents do fire
    assert res.mean()["count"].max() == 3
    assert res.figure().layout.title.text
    d = res.to_dict()
    assert d["conditions"]["heads"][str(busy[1])]["mean_first_generated"] is not None
    base = t.query("condition == 'baseline'")["activation"].to_numpy()
    abl = t.query("condition == 'heads'")["activation"].to_numpy()
    assert not np.allclose(base[:len(abl)], abl[:len(base)])  # the ablation changed something


def test_late_layer_analysis_runs_end_to_end(tiny_llama, tmp_path):
    ps = PromptSet(name="toy", prompts=tuple(TEXTS * 3), labels=(1, 0) * 12,
                   label_names={0: "harmless", 1: "harmful"})
    cfg = SAETrainConfig(expansion_factor=2, batch_size=64, training_tokens=64 * 20,
                         n_batches_for_norm_estimate=2, eval_prompts=4,
                         out_dir=str(tmp_path / "sae"))
    res = late_layer_sae_analysis(tiny_llama, ps, cfg=cfg, top_k=2, n_examples=1,
                                  progress=False)
    assert res.layer == tiny_llama.model.cfg.n_layers - 2
    assert res.hook == f"blocks.{res.layer}.hook_resid_post" == res.train.hook
    assert res.label_source == "prompt set" and res.labels == (1.0, 0.0) * 12
    assert res.features.correlations.label_name == "harmful"
    assert res.train.sae_dir == str(tmp_path / "sae")
    res.save(tmp_path / "res")
    back = load_result(tmp_path / "res")
    assert back.to_dict() == res.to_dict()


class EveryOtherJudge:
    """A judge stand-in: 'refused' for the even-numbered questions (records what it saw)."""

    name = "every_other"

    def __init__(self):
        self.seen = []

    def score_many(self, pairs, progress=False):
        self.seen = list(pairs)
        return [SimpleNamespace(refused=i % 2 == 0) for i in range(len(self.seen))]


def test_late_layer_refusal_labels_come_from_the_judge(tiny_llama, tmp_path):
    judge = EveryOtherJudge()
    cfg = SAETrainConfig(expansion_factor=2, batch_size=64, training_tokens=64 * 10,
                         n_batches_for_norm_estimate=2, ce_loss=False,
                         out_dir=str(tmp_path / "sae"))
    res = late_layer_sae_analysis(tiny_llama, TEXTS, labels="refusal", judge=judge, cfg=cfg,
                                  layer=1, max_new_tokens=3, top_k=1, n_examples=1,
                                  progress=False)
    assert [q for q, _ in judge.seen] == TEXTS
    assert res.labels == (1.0, 0.0) * 4
    assert res.label_source == "refusal judge (every_other)"
    assert list(res.generations["refused"]) == [1.0, 0.0] * 4
    assert list(res.generations["completion"]) == [a for _, a in judge.seen]
