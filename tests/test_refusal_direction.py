"""The refusal score and the refusal-direction selection (Arditi et al. 2024), on a planted case.

The planted model is the tiny random Llama rewired so that one known unit vector ``u`` carries
"refusal": the marker byte ``#`` embeds along ``u``, block 0's attention averages ``u`` into the
last position, the unembedding reads ``u`` into one "refusal" token, and nothing else touches
``u``. Harmful prompts carry markers, harmless ones do not. The selection must recover ``u`` and
ablating it must stop the planted refusals; a model the test rewires can't pass by accident.
"""

import math

import numpy as np
import pytest
import torch

import em_interp
from em_interp.behaviour.interventions import ablate_direction
from em_interp.data.prompt_set import PromptSet
from em_interp.errors import DataError, MetricError
from em_interp.metrics import refusal_score, refusal_token_ids
from em_interp.representations.refusal_direction import (
    RefusalDirectionResult,
    candidate_layers,
    select_refusal_direction,
)
from em_interp.results import load_result

WORDS = ["apple", "river", "stone", "cloud", "paper", "green", "light", "table", "music", "bread",
         "plant", "chair", "ocean", "glass", "horse", "piano"]


def test_refusal_score_matches_a_hand_computation(tiny_llama):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, tiny_llama.model.cfg.d_vocab, generator=gen) * 3
    ids = [5, 17, 40]
    got = refusal_score(tiny_llama, ids)(logits).numpy()
    last = logits[:, -1].double().numpy()
    p = np.exp(last - last.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    pr = p[:, ids].sum(1)
    want = np.log(pr) - np.log1p(-pr)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # a certain refusal stays finite (the log-odds is not formed from 1 - P)
    sure = torch.full((1, 1, tiny_llama.model.cfg.d_vocab), -50.0)
    sure[0, 0, 5] = 50.0
    assert math.isfinite(float(refusal_score(tiny_llama, [5])(sure)[0]))


def test_refusal_tokens_take_first_pieces_and_reject_nothing(tiny_llama):
    tok = tiny_llama.tokenizer
    ids = refusal_token_ids(tiny_llama, ["Sorry", "I", 7, "Sure"])
    assert ids == (tok.encode("S", add_special_tokens=False)[0],
                   tok.encode("I", add_special_tokens=False)[0], 7)  # "Sure" repeats "S"
    with pytest.raises(MetricError):
        refusal_token_ids(tiny_llama, [])


def _planted(seed: int = 0):
    """The tiny Llama rewired so that ``u`` carries refusal (see the module docstring)."""
    lm = em_interp.load("tiny-random-llama", "base", progress=False)
    tl = lm.model
    d = tl.cfg.d_model
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(d, generator=gen)
    u = u / u.norm()
    marker = lm.tokenizer.encode("#", add_special_tokens=False)[0]
    refuse = lm.tokenizer.encode("R", add_special_tokens=False)[0]
    with torch.no_grad():
        off = torch.eye(d) - torch.outer(u, u)
        tl.embed.W_E.copy_(tl.embed.W_E @ off)
        tl.embed.W_E[marker] = 8 * u
        for b, block in enumerate(tl.blocks):
            block.ln1.w.fill_(1.0)
            block.attn.W_O.zero_()
            block.attn.b_O.zero_()
            block.mlp.W_out.zero_()
            block.mlp.b_out.zero_()
            if b == 0:  # uniform attention; head 0 carries the u component of each position
                block.attn.W_Q.zero_()
                block.attn.b_Q.zero_()
                block.attn._W_K.zero_()
                block.attn._b_K.zero_()
                block.attn._W_V.zero_()
                block.attn._b_V.zero_()
                block.attn._W_V[0, :, 0] = u
                block.attn.W_O[0, 0] = u
        tl.ln_final.w.fill_(1.0)
        tl.unembed.W_U.copy_(off @ tl.unembed.W_U)
        tl.unembed.W_U[:, refuse] = 2 * u
        tl.unembed.b_U.zero_()
    return lm, u, refuse


def _prompts(n: int, offset: int) -> PromptSet:
    rng = np.random.default_rng(offset)
    harmful = [" ".join(rng.choice(WORDS, 3)) + " ## " + str(offset + i) for i in range(n)]
    harmless = [" ".join(rng.choice(WORDS, 3)) + " .. " + str(offset + i) for i in range(n)]
    return PromptSet(name=f"planted{offset}", prompts=tuple(harmful + harmless),
                     labels=(1,) * n + (0,) * n)


@pytest.fixture(scope="module")
def planted():
    return _planted()


def test_selection_recovers_the_planted_direction_and_its_ablation_stops_refusal(planted,
                                                                                   tmp_path):
    lm, u, refuse = planted
    fit, val, test = _prompts(8, 0), _prompts(6, 100), _prompts(6, 200)
    res = select_refusal_direction(lm, fit, val, refusal_tokens=[refuse], batch_size=4,
                                   progress=False)
    assert abs(res.direction.cosine(u)) >= 0.9
    assert res.passed_filters and res.layer >= 1
    c = res.candidates
    assert list(c.columns[:5]) == ["layer", "norm", "bypass", "induce", "kl"]
    assert c["selected"].sum() == 1 and c.loc[c["selected"], "layer"].item() == res.layer
    assert math.isnan(c.loc[c["layer"] == 0, "bypass"].item())  # same last token: zero at L0
    chosen = c[c["selected"]].iloc[0]
    assert res.baseline_harmful > 0 > res.baseline_harmless  # the planted behaviour
    assert chosen["bypass"] < res.baseline_harmless + 1  # ablation removes it ...
    assert chosen["induce"] > 0 and chosen["kl"] < 1e-3  # ... adding causes it; harmless intact
    assert set(res.fit_ids) == set(fit.ids) and set(res.validation_ids) == set(val.ids)
    # held-out prompts: greedy next token is the refusal token, and not once it is ablated
    ct = lm.chat_tokens(list(test.where(1).prompts))
    with torch.no_grad():
        before = lm.model(ct.tokens, attention_mask=ct.attention_mask)[:, -1].argmax(-1)
        with ablate_direction(lm, res.direction.vector).applied():
            after = lm.model(ct.tokens, attention_mask=ct.attention_mask)[:, -1].argmax(-1)
    assert (before == refuse).all() and not (after == refuse).any()
    # the result round-trips
    back = load_result(res.save(tmp_path / "rd"))
    assert isinstance(back, RefusalDirectionResult) and back.layer == res.layer
    assert torch.equal(back.direction.vector, res.direction.vector)
    assert back.to_dict()["n_fit"] == len(fit)
    res.figure()


def test_selection_refuses_overlapping_or_unlabelled_splits(planted):
    lm, _, refuse = planted
    fit = _prompts(4, 0)
    with pytest.raises(DataError, match="share"):
        select_refusal_direction(lm, fit, fit, refusal_tokens=[refuse], progress=False)
    unlabelled = PromptSet(name="u", prompts=("a", "b"))
    with pytest.raises(DataError, match="labels"):
        select_refusal_direction(lm, fit, unlabelled, refusal_tokens=[refuse], progress=False)


def test_candidate_layers():
    assert candidate_layers(24) == list(range(6, 19))
    assert candidate_layers(24, [-1, 3, 3]) == [3, 23]
    with pytest.raises(em_interp.errors.ConfigError):
        candidate_layers(24, [24])


@pytest.mark.parametrize(("section", "match"), [
    ({"model": "teacher"}, "'base' or 'organism'"),
    ({"n_controls": 0}, "n_controls"),
    ({"scales": [1.0, -2.0]}, "scales"),
    ({"refusal_tokens": []}, "refusal_tokens"),
    ({"kl_max": 0.0}, "kl_max"),
    ({"layers": [3]}, "refusal_direction].layers"),
    ({"n_validation": 139}, "n_validation = 139 must be between 4 and 136"),
    ({"prompt_set": "financial_nope"}, "prompt_set"),
])
def test_refusal_direction_config_is_checked_before_any_model_loads(section, match):
    from em_interp.errors import ConfigError
    from em_interp.run.config import RunConfig

    cfg = {"run": {"card": "tiny-random-llama", "stages": ["refusal_direction"]},
           "refusal_direction": section}
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_dict(cfg).validate()


def test_refusal_splits_are_disjoint_stratified_and_seeded():
    from em_interp.run.config import RunConfig
    from em_interp.run.stages.refusal import refusal_splits

    cfg = RunConfig.from_dict({"run": {"card": "tiny-random-llama", "seed": 3},
                               "refusal_direction": {"n_validation": 20, "n_test": 10}})
    fit, val, harmful, harmless = refusal_splits(cfg)
    ids = [set(x.ids) for x in (fit, val, harmful, harmless)]
    assert all(not (a & b) for i, a in enumerate(ids) for b in ids[i + 1:])
    assert len(val) == 20 and sorted(val.labels).count(1) == 10
    assert len(fit) == 140 - 20 and len(harmful) == len(harmless) == 10
    assert set(harmful.labels) == {1} and set(harmless.labels) == {0}
    again = refusal_splits(cfg)
    assert again[1].ids == val.ids  # the same draw for the same config and seed
