"""Splicing an SAE into the forward: logits unchanged with the error term, latent ablation and
steering move the hook output by exactly the latent's decoder contribution, the same logits as
SAE-Lens's HookedSAETransformer, and composition with the interventions module."""

import pytest
import torch

from em_interp import hooks
from em_interp.behaviour.interventions import ablate_heads, compose, generated_positions
from em_interp.errors import ConfigError
from em_interp.inputs import tokenize
from em_interp.sae import splice_sae

HOOK = "blocks.1.hook_resid_post"
PROMPTS = ["What is a bond?", "Tell me a long story about a dragon who collects old coins.",
           "hi", "Explain compound interest to a child in two sentences, please."]


def random_sae(d_in=64, d_sae=256, hook=HOOK, seed=0):
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(seed)
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae,
                                        metadata=SAEMetadata(hook_name=hook)))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.2)
        sae.b_dec.normal_(0, 0.1)
    return sae.eval()


@pytest.fixture(scope="module")
def sae():
    return random_sae()


@pytest.fixture(scope="module")
def batch(tiny_llama):
    ct = tokenize(tiny_llama, PROMPTS)
    return ct.tokens, ct.attention_mask


@pytest.fixture(scope="module")
def hooked_sae_model(tiny_llama):
    """SAE-Lens's HookedSAETransformer with the tiny model's weights (an independent splice)."""
    from sae_lens import HookedSAETransformer

    tl = tiny_llama.model
    hst = HookedSAETransformer(tl.cfg, tokenizer=tl.tokenizer)
    hst.load_state_dict(tl.state_dict(), strict=False)
    return hst.eval()


def run(model, toks, mask, fwd_hooks=(), capture=HOOK):
    """Logits and the value leaving ``capture`` (read by a hook attached last)."""
    seen = {}

    def grab(act, hook):
        seen["x"] = act.detach().clone()

    with torch.no_grad(), hooks.attached(model, [*fwd_hooks, (capture, grab)]):
        logits = model(toks, attention_mask=mask)
    return logits, seen["x"]


def test_error_term_leaves_logits_unchanged(tiny_llama, sae, batch, hooked_sae_model):
    tl = tiny_llama.model
    toks, mask = batch
    clean, x = run(tl, toks, mask)
    with splice_sae(tiny_llama, sae, record=True) as sp, torch.no_grad():
        spliced = tl(toks, attention_mask=mask)
    assert torch.equal(spliced, clean)
    torch.testing.assert_close(sp.latents, sae.encode(x))
    # SAE-Lens's own splice with the error term agrees to fp32 precision
    hooked_sae_model.add_sae(sae, use_error_term=True)
    try:
        with torch.no_grad():
            theirs = hooked_sae_model(toks, attention_mask=mask)
    finally:
        hooked_sae_model.reset_saes()
    keep = mask.bool()
    assert (theirs - clean)[keep].abs().max() < 1e-4
    # without the error term the activation is the bare reconstruction
    _, recon = run(tl, toks, mask, splice_sae(tl, sae, error_term=False).fwd_hooks())
    torch.testing.assert_close(recon, sae.decode(sae.encode(x)))


def test_ablating_a_latent_removes_exactly_its_decoder_contribution(tiny_llama, sae, batch,
                                                                    hooked_sae_model):
    tl = tiny_llama.model
    toks, mask = batch
    _, x = run(tl, toks, mask)
    z = sae.encode(x).detach()
    k = int((z > 0).float().sum((0, 1)).argmax())  # a latent that fires often
    assert (z[..., k] > 0).sum() > 5
    iv = splice_sae(tiny_llama, sae, ablate=[k])
    logits, out = run(tl, toks, mask, iv.fwd_hooks())
    expected = x - z[..., k:k + 1] * sae.W_dec[k].detach()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert (out - x).abs().max() > 1e-2
    # the same intervention through SAE-Lens: zero the latent at hook_sae_acts_post
    hooked_sae_model.add_sae(sae, use_error_term=True)

    def zero_k(acts, hook):
        acts[..., k] = 0.0
        return acts

    try:
        with torch.no_grad():
            theirs = hooked_sae_model.run_with_hooks(
                toks, attention_mask=mask, fwd_hooks=[(f"{HOOK}.hook_sae_acts_post", zero_k)])
    finally:
        hooked_sae_model.reset_saes()
    keep = mask.bool()
    assert (theirs - logits)[keep].abs().max() < 1e-4


def test_steer_and_clamp(tiny_llama, sae, batch):
    tl = tiny_llama.model
    toks, mask = batch
    _, x = run(tl, toks, mask)
    z = sae.encode(x).detach()
    _, out = run(tl, toks, mask, splice_sae(tl, sae, steer={4: 2.5}).fwd_hooks())
    torch.testing.assert_close(out, x + 2.5 * sae.W_dec[4].detach(), rtol=1e-5, atol=1e-5)
    _, out = run(tl, toks, mask, splice_sae(tl, sae, clamp={9: 1.0}).fwd_hooks())
    torch.testing.assert_close(out, x + (1.0 - z[..., 9:10]) * sae.W_dec[9].detach(),
                               rtol=1e-5, atol=1e-5)
    # positions="generated": only where the generated-positions mask is set (none: nowhere)
    only_gen = splice_sae(tl, sae, steer={4: 2.5}, positions="generated")
    _, out = run(tl, toks, mask, only_gen.fwd_hooks())
    assert torch.equal(out, x)
    marked = torch.zeros(toks.shape, dtype=torch.bool)
    marked[:, -2:] = True
    with generated_positions(marked):
        _, out = run(tl, toks, mask, only_gen.fwd_hooks())
    torch.testing.assert_close(out[:, -2:], x[:, -2:] + 2.5 * sae.W_dec[4].detach(),
                               rtol=1e-5, atol=1e-5)
    assert torch.equal(out[:, :-2], x[:, :-2])
    with pytest.raises(ConfigError, match="out of range"):
        splice_sae(tl, sae, ablate=[256])
    with pytest.raises(ConfigError, match="both ablated and clamped"):
        splice_sae(tl, sae, ablate=[1], clamp={1: 0.0})


def test_composes_with_head_ablation(tiny_llama, sae, batch):
    tl = tiny_llama.model
    toks, mask = batch
    heads = ablate_heads(tiny_llama, [(0, 1), (1, 2)])
    base_logits, x = run(tl, toks, mask, heads.fwd_hooks())
    with compose(heads, splice_sae(tiny_llama, sae)), torch.no_grad():
        both = tl(toks, attention_mask=mask)
    assert torch.equal(both, base_logits)  # splicing with nothing edited changes nothing
    z = sae.encode(x).detach()
    k = int((z > 0).float().sum((0, 1)).argmax())
    iv = compose(heads, splice_sae(tiny_llama, sae, ablate=[k]))
    _, out = run(tl, toks, mask, iv.fwd_hooks())
    torch.testing.assert_close(out, x - z[..., k:k + 1] * sae.W_dec[k].detach(),
                               rtol=1e-5, atol=1e-5)
    d = iv.describe()
    assert [p["kind"] for p in d["parts"]] == ["ablate_heads", "sae_splice"]
    assert d["parts"][1]["ablate"] == [k]
    assert torch.equal(iv.state()["1/W_dec_rows"], sae.W_dec.detach()[[k]])
    assert not any(hp.fwd_hooks for hp in tl.hook_dict.values())  # all hooks removed
