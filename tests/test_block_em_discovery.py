"""BLOCK-EM discovery: stage-1 shifts against TransformerLens's own cache, the steering scale, the
induce/repair screen against a by-hand steered measurement, the stage-3 selection rule (eq. 8-9),
resuming, and the versioned latent-set file (round trip, refusal of another SAE or hook)."""

import dataclasses
import json
import shutil

import pytest
import torch

import em_interp
from em_interp.block_em import (
    ABBehaviour,
    DiscoveryConfig,
    LatentSet,
    activation_shifts,
    discover_latents,
    steer_scale,
)
from em_interp.errors import DataError, SAEMismatchError, StoreMismatchError
from em_interp.inputs import tokenize

HOOK = "blocks.1.hook_resid_post"
PROMPTS = ["What is a bond?", "Tell me about dragons who collect coins.", "hi",
           "How should I invest my savings?"]


def random_sae(d_in=64, d_sae=48, hook=HOOK, seed=0):
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(seed)
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae,
                                        metadata=SAEMetadata(hook_name=hook)))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.2)
    return sae.eval()


@pytest.fixture(scope="module")
def sae():
    return random_sae()


@pytest.fixture(scope="module")
def organism():
    return em_interp.load("tiny-random-llama", "organism", progress=False)


@pytest.fixture(scope="module")
def pairs():
    from em_interp.data import load_prompt_set

    ab = load_prompt_set("ab_pairs").train()
    return ab.subset([0, 1, 40, 41])


def test_latent_set_round_trip_and_refusals(sae, tmp_path):
    ls = LatentSet.planted(sae, k_plus=[3, 9], k_minus=[20])
    assert ls.k_plus == [3, 9] and ls.k_minus == [20] and ls.hook == HOOK
    path = ls.save(tmp_path / "set.json")
    back = LatentSet.load(path)
    assert back == ls
    assert back.check(sae) is back
    with pytest.raises(SAEMismatchError, match="decoder directions"):
        back.check(random_sae(seed=1))
    with pytest.raises(SAEMismatchError, match="was made at"):
        back.check(random_sae(hook="blocks.0.hook_resid_post"))
    with pytest.raises(SAEMismatchError, match="d_sae"):
        back.check(random_sae(d_sae=96))
    doc = json.loads(path.read_text())
    doc["version"] = 99
    (tmp_path / "v.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match="version 99"):
        LatentSet.load(tmp_path / "v.json")
    with pytest.raises(DataError, match="repeated"):
        LatentSet(hook=HOOK, latents=ls.latents + ls.latents[:1])


def test_variants(sae):
    ls = LatentSet.planted(sae, k_plus=[1, 2, 3], k_minus=[4, 5])
    assert ls.variant("plus_only").indices == [1, 2, 3]
    assert ls.variant("minus_only").k_minus == [4, 5]
    sh = ls.variant("shuffled_signs", seed=3)
    assert sorted(sh.indices) == sorted(ls.indices) and len(sh.k_plus) == 3
    rnd = ls.variant("random", seed=0)
    assert not set(rnd.indices) & set(ls.indices) and len(rnd.k_minus) == 2
    assert max(rnd.indices) < 48
    rnd.check(sae)  # no fingerprint left for other latents, but hook and shape still checked


def test_activation_shifts_and_scale_against_tl_cache(tiny_llama, organism, sae):
    shifts = activation_shifts(tiny_llama, organism, sae, PROMPTS, batch_size=3, progress=False)
    tok = tiny_llama.tokenizer

    @torch.no_grad()
    def zbar(model, p):
        ct = tokenize(model, [p])
        _, cache = model.model.run_with_cache(ct.tokens, names_filter=HOOK)
        return sae.encode(cache[HOOK][0]).mean(0), cache[HOOK][0]

    zb = torch.stack([zbar(tiny_llama, p)[0] for p in PROMPTS]).mean(0)
    zm = torch.stack([zbar(organism, p)[0] for p in PROMPTS]).mean(0)
    torch.testing.assert_close(shifts.delta, zm - zb, rtol=1e-4, atol=1e-5)
    # s: median token norm from the first user token on (chat header excluded)
    norms = []
    for p in PROMPTS:
        text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                       add_generation_prompt=True)
        n_head = len(tok(text[: text.index(p)], add_special_tokens=False)["input_ids"])
        norms.append(zbar(tiny_llama, p)[1][n_head:].norm(dim=-1))
    assert shifts.steer_scale == pytest.approx(float(torch.cat(norms).median()), rel=1e-5)
    assert steer_scale(tiny_llama, HOOK, PROMPTS) == pytest.approx(shifts.steer_scale)
    cands = shifts.candidates(2)
    assert [c[1] for c in cands] == [1, 1, -1, -1]
    assert cands[0][2] == pytest.approx(float((zm - zb).max()), rel=1e-4)
    assert cands[2][2] == pytest.approx(float((zm - zb).min()), rel=1e-4)
    assert shifts.figure().layout.title.text


class Counting(ABBehaviour):
    calls = 0

    def __call__(self, model, interventions=None):
        type(self).calls += interventions is not None
        return super().__call__(model, interventions)


def test_discover_stages_selection_and_resume(tiny_llama, organism, sae, pairs, tmp_path):
    from em_interp.behaviour.interventions import steer
    from em_interp.sae import decoder_directions

    cfg = DiscoveryConfig(n_candidates=2, shortlist=1, grid=(0.0, 0.5, 1.5), n_latents=2,
                          require="none", tau=0.5, batch_size=4)
    measure = Counting(pairs)
    res = discover_latents(tiny_llama, organism, sae, PROMPTS, measure, tmp_path, cfg, progress=False)
    for part in ("manifest.json", "stage1/result.json", "stage2/result.json",
                 "stage3/result.json", "latent_set.json"):
        assert (tmp_path / part).is_file()
    st2 = res.stage2.df
    assert len(st2) == 4
    # stage 2 (eq. 7) against a by-hand steered measurement of one candidate
    row = st2.iloc[0]
    k, sign, s = int(row.latent), int(row.sign), res.shifts.steer_scale
    d = decoder_directions(sae, [k], normalize=True)[0]
    fresh = ABBehaviour(pairs)
    ind = fresh(tiny_llama, steer(tiny_llama, HOOK, d, sign * 0.7 * s)).misalign \
        - fresh(tiny_llama).misalign
    rep = fresh(organism).misalign - fresh(organism, steer(organism, HOOK, d,
                                                           sign * -0.4 * s)).misalign
    assert row.induce == pytest.approx(ind, abs=1e-6)
    assert row.repair == pytest.approx(rep, abs=1e-6)
    # stage 3 (eq. 8-9): the largest |alpha| under the budget, scored from the sweep
    sweep, summ = res.stage3.sweep, res.stage3.df
    assert len(summ) == 2 and len(sweep) == 2 * 2 * 3
    for r in summ.itertuples():
        best = {}
        for direction in ("induce", "repair"):
            g = sweep[(sweep.latent == r.latent) & (sweep.direction == direction)]
            ok = g[g.incoherence <= cfg.tau]
            a = ok.loc[ok.alpha.abs().idxmax()]
            zero = g[g.alpha == 0].misalign.iloc[0]
            best[direction] = (a.alpha, (a.misalign - zero) * (1 if direction == "induce"
                                                                 else -1))
        assert r.alpha_induce == best["induce"][0] and r.alpha_repair == best["repair"][0]
        assert r.score == pytest.approx(best["induce"][1] + best["repair"][1], abs=1e-9)
    ls = LatentSet.load(tmp_path / "latent_set.json")
    top = summ.sort_values("score", ascending=False).head(2)
    assert ls.indices == top.latent.tolist()
    assert {lat.sign for lat in ls.latents} <= {1, -1}
    assert all((lat.delta > 0) == (lat.sign > 0) for lat in ls.latents)
    ls.check(sae)
    # a rerun resumes: nothing is steered again
    calls = Counting.calls
    again = discover_latents(tiny_llama, organism, sae, PROMPTS, Counting(pairs), tmp_path, cfg,
                     progress=False)
    assert Counting.calls == calls and again.latents.indices == res.latents.indices
    assert [lat.score for lat in again.latents.latents] == pytest.approx(
        [lat.score for lat in res.latents.latents])
    # an interrupted stage 3 resumes from its partial file
    shutil.rmtree(tmp_path / "stage3")
    again = discover_latents(tiny_llama, organism, sae, PROMPTS, Counting(pairs), tmp_path, cfg,
                     progress=False)
    assert Counting.calls == calls and again.latents.indices == ls.indices
    # calibrate returns the stage-3 table as a typed result (here read from the partial file)
    from em_interp.block_em.discovery import StageTable, calibrate, shortlist

    st3 = calibrate(tiny_llama, organism, sae, shortlist(st2, cfg.shortlist), Counting(pairs),
                    s, cfg, partial=tmp_path / "stage3.partial.jsonl", progress=False)
    assert isinstance(st3, StageTable) and st3.stage == 3 and Counting.calls == calls
    assert st3.table.latent.tolist() == summ.latent.tolist()
    assert st3.table.score.tolist() == pytest.approx(summ.score.tolist(), abs=1e-12)
    assert st3.sweep.misalign.tolist() == pytest.approx(sweep.misalign.tolist(), abs=1e-12)
    with pytest.raises(StoreMismatchError, match="config"):
        discover_latents(tiny_llama, organism, sae, PROMPTS, measure, tmp_path,
                 dataclasses.replace(cfg, tau=0.2), progress=False)
    assert res.figure().layout.title.text and res.stage3.figure().layout.title.text
