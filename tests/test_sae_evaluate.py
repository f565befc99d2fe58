"""SAE evaluation parts as typed results: activation_metrics against the formulas computed by
hand in float64, ce_metrics against cross-entropies computed from the model's own logits, and
evaluate_sae assembling both into SAEMetrics."""

import numpy as np
import pytest
import torch

from em_interp.errors import ConfigError, DataError
from em_interp.inputs import tokenize
from em_interp.sae.evaluate import (
    ActivationMetrics,
    CEMetrics,
    SAEMetrics,
    activation_metrics,
    ce_metrics,
    evaluate_sae,
)

HOOK = "blocks.1.hook_resid_post"  # tiny-random-llama: d_model 64
PROMPTS = ["What is a bond?", "Tell me a story about a dragon.", "hi"]


def random_sae(d_in=64, d_sae=96, seed=0):
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(seed)
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae,
                                        metadata=SAEMetadata(hook_name=HOOK)))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.2)
        sae.b_enc[:8] = -1e4  # eight latents that can never fire
        sae.b_dec.normal_(0, 0.1)
    return sae.eval()


def test_activation_metrics_equal_the_formulas():
    sae = random_sae()
    x = torch.randn(300, 64, generator=torch.Generator().manual_seed(1))
    got = activation_metrics(sae, x, batch_size=64)  # several batches
    assert isinstance(got, ActivationMetrics)
    xd = x.double()
    w_enc, b_enc = sae.W_enc.detach().double(), sae.b_enc.detach().double()
    w_dec, b_dec = sae.W_dec.detach().double(), sae.b_dec.detach().double()
    z = torch.relu((xd - b_dec) @ w_enc + b_enc)
    x_hat = z @ w_dec + b_dec
    err = (x_hat - xd).pow(2).sum(-1)
    ev = 1 - err.mean() / (xd - xd.mean(0)).pow(2).sum(-1).mean()
    assert got.explained_variance == pytest.approx(float(ev), abs=1e-5)
    assert got.mse == pytest.approx(float(err.mean()), rel=1e-5)
    assert got.l0 == pytest.approx(float((z > 0).sum(-1).double().mean()), abs=1e-9)
    density = (z > 0).double().mean(0).numpy()
    np.testing.assert_allclose(got.latent_density, density, atol=1e-12)
    assert got.dead_fraction == pytest.approx(float((density == 0).mean()))
    assert got.dead_fraction >= 8 / 96 and got.n_tokens == 300
    with pytest.raises(DataError, match="at least one activation row"):
        activation_metrics(sae, torch.zeros(0, 64))


def _ce(logits, tokens, mask):
    """Mean next-token CE over positions whose token and next token are both real."""
    lp = torch.log_softmax(logits[:, :-1].double(), -1)
    nll = -lp.gather(-1, tokens[:, 1:, None])[..., 0]
    keep = mask[:, :-1].bool() & mask[:, 1:].bool()
    return float(nll[keep].mean()), int(keep.sum())


def test_ce_metrics_equal_cross_entropies_from_the_logits(tiny_llama):
    sae = random_sae()
    tl = tiny_llama.model
    got = ce_metrics(tiny_llama, sae, PROMPTS, batch_size=8)
    assert isinstance(got, CEMetrics)
    ct = tokenize(tiny_llama, PROMPTS)
    with torch.no_grad():
        clean = tl(ct.tokens, attention_mask=ct.attention_mask)
        spliced = tl.run_with_hooks(
            ct.tokens, attention_mask=ct.attention_mask,
            fwd_hooks=[(HOOK, lambda act, hook: sae.decode(sae.encode(act)))])
        zero = tl.run_with_hooks(ct.tokens, attention_mask=ct.attention_mask,
                                 fwd_hooks=[(HOOK, lambda act, hook: torch.zeros_like(act))])
    want_clean, n = _ce(clean, ct.tokens, ct.attention_mask)
    want_sae, _ = _ce(spliced, ct.tokens, ct.attention_mask)
    want_zero, _ = _ce(zero, ct.tokens, ct.attention_mask)
    assert got.n_ce_tokens == n
    assert got.ce_loss_clean == pytest.approx(want_clean, abs=1e-4)
    assert got.ce_loss_sae == pytest.approx(want_sae, abs=1e-4)
    assert got.ce_loss_zero == pytest.approx(want_zero, abs=1e-4)
    assert got.ce_recovered == pytest.approx(
        (want_zero - want_sae) / (want_zero - want_clean), abs=1e-3)
    assert got.kl_div_sae > 0
    # evaluate_sae copies both parts into SAEMetrics, field by field
    full = evaluate_sae(tiny_llama, sae, PROMPTS)
    assert isinstance(full, SAEMetrics)
    assert full.ce_loss_clean == pytest.approx(got.ce_loss_clean, abs=1e-6)
    assert full.n_ce_tokens == got.n_ce_tokens and full.kl_div_sae == pytest.approx(
        got.kl_div_sae, abs=1e-6)
    no_ce = evaluate_sae(tiny_llama, sae, PROMPTS, ce_loss=False)
    assert no_ce.ce_loss_clean is None and no_ce.n_ce_tokens == 0
    assert no_ce.explained_variance == pytest.approx(full.explained_variance, abs=1e-9)
    with pytest.raises(ConfigError, match="needs prompts"):
        evaluate_sae(tiny_llama, sae)


# ------------------------------------------------------------------ held-out evaluation

MIXTURE = [f"Question {i}: " + "how should I think about money and risk? " * (1 + i % 4)
           for i in range(40)]


def _tokens(model, prompts):
    """Real tokens of each prompt, tokenized one at a time (an independent count)."""
    return [int(tokenize(model, [p]).attention_mask.sum()) for p in prompts]


def test_held_out_split_reaches_the_tokens_and_is_disjoint(tiny_llama):
    from em_interp.data import PromptSet
    from em_interp.sae.evaluate import held_out_split

    ps = PromptSet(name="mix", prompts=tuple(MIXTURE))
    per = dict(zip(MIXTURE, _tokens(tiny_llama, MIXTURE), strict=True))
    sp = held_out_split(tiny_llama, ps, 200, seed=1)
    ev, rest = list(sp.evaluation.prompts), list(sp.rest.prompts)
    assert not set(ev) & set(rest) and sorted(ev + rest) == sorted(MIXTURE)
    assert sp.n_tokens == sum(per[p] for p in ev) >= 200 and not sp.capped
    # minimal: without its last-drawn prompt it would be short of 200 tokens, so without its
    # longest one too
    assert sp.n_tokens - max(per[p] for p in ev) < 200
    again = held_out_split(tiny_llama, ps, 200, seed=1)
    assert list(again.evaluation.prompts) == ev
    assert list(held_out_split(tiny_llama, ps, 200, seed=2).evaluation.prompts) != ev
    # more tokens than a quarter of the prompts hold: capped, and said so
    big = held_out_split(tiny_llama, MIXTURE, 10**6, max_fraction=0.25)
    assert len(big.evaluation) == 10 and big.capped and len(big.rest) == 30
    assert big.n_tokens == sum(per[p] for p in big.evaluation)
    with pytest.raises(DataError, match="at least two prompts"):
        held_out_split(tiny_llama, MIXTURE[:1], 10)
    with pytest.raises(ConfigError, match="n_tokens"):
        held_out_split(tiny_llama, MIXTURE, 0)


def test_on_training_data_is_set_by_content_id(tiny_llama):
    sae = random_sae()
    train = MIXTURE[:30]
    held = evaluate_sae(tiny_llama, sae, MIXTURE[30:], train_prompts=train, ce_loss=False)
    assert held.on_training_data is False and held.n_train_overlap == 0
    assert held.n_prompts == 10
    leak = evaluate_sae(tiny_llama, sae, MIXTURE[28:32], train_prompts=train, ce_loss=False)
    assert leak.on_training_data is True and leak.n_train_overlap == 2
    unknown = evaluate_sae(tiny_llama, sae, MIXTURE[30:], ce_loss=False)
    assert unknown.on_training_data is None and unknown.n_train_overlap is None
    assert held.to_dict()["n_train_overlap"] == 0


def test_train_sae_flags_evaluation_prompts_it_trained_on(tiny_llama, tmp_path):
    from em_interp.sae import SAETrainConfig, train_sae

    cfg = SAETrainConfig(expansion_factor=2, batch_size=64, training_tokens=64 * 4,
                         out_dir=str(tmp_path / "a"), eval_tokens=256)
    train, held = MIXTURE[:30], MIXTURE[30:]
    res = train_sae(tiny_llama, HOOK, train, cfg, eval_prompts=held, progress=False)
    m = res.metrics
    assert m.on_training_data is False and m.n_train_overlap == 0 and m.n_prompts == 10
    assert m.n_tokens == min(256, sum(_tokens(tiny_llama, held)))
    assert res.to_dict()["n_eval_prompts"] == 10
    # cached SAE, other evaluation prompts (half of them trained on): re-evaluated, flagged
    again = train_sae(tiny_llama, HOOK, train, cfg, eval_prompts=MIXTURE[25:35],
                      progress=False)
    assert again.train_seconds == res.train_seconds  # not retrained
    assert again.metrics.on_training_data is True and again.metrics.n_train_overlap == 5
    # a store with the prompts it was computed from: checked the same way
    from em_interp.activations.cache import cache_activations

    store = cache_activations(tiny_llama, train, [HOOK], tmp_path / "store", reduce="none",
                              progress=False)
    cfg_b = SAETrainConfig(**{**cfg.to_dict(), "out_dir": str(tmp_path / "b")})
    leak = train_sae(tiny_llama, HOOK, store, cfg_b, eval_prompts=MIXTURE[29:31],
                     train_prompts=train, progress=False)
    assert leak.metrics.on_training_data is True and leak.metrics.n_train_overlap == 1
    cfg_c = SAETrainConfig(**{**cfg.to_dict(), "out_dir": str(tmp_path / "c")})
    blind = train_sae(tiny_llama, HOOK, store, cfg_c, eval_prompts=held, progress=False)
    assert blind.metrics.on_training_data is None  # a store alone cannot say
    # no evaluation prompts: the first training prompts, flagged as training data
    cfg_d = SAETrainConfig(**{**cfg.to_dict(), "out_dir": str(tmp_path / "d")})
    own = train_sae(tiny_llama, HOOK, train, cfg_d, progress=False)
    assert own.metrics.on_training_data is True
