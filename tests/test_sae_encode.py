"""encode(): token-averaged SAE latents over real tokens only (BLOCK-EM's z-bar), batched with
left padding, against per-prompt forwards; the differentiable form for BLOCK-EM."""

import pytest
import torch

from em_interp.inputs import tokenize
from em_interp.sae import decoder_directions, encode, encode_activations

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


def by_hand(model, sae, prompt):
    """One prompt, no padding: latents of every token from TL's own cache."""
    ct = tokenize(model, [prompt])
    _, cache = model.model.run_with_cache(ct.tokens, names_filter=HOOK)
    return sae.encode(cache[HOOK][0])


def test_mean_last_none_equal_unbatched(tiny_llama, sae):
    mean = encode(tiny_llama, sae, PROMPTS, "mean", batch_size=3, progress=False)
    last = encode(tiny_llama, sae, PROMPTS, "last", batch_size=3, progress=False)
    none = encode(tiny_llama, sae, PROMPTS, "none", batch_size=3, progress=False)
    assert mean.shape == last.shape == (len(PROMPTS), 256)
    lengths = tokenize(tiny_llama, PROMPTS).lengths
    assert len(set(lengths)) > 2  # the batches really are padded
    for i, p in enumerate(PROMPTS):
        z = by_hand(tiny_llama, sae, p)
        assert none[i].shape == z.shape == (lengths[i], 256)
        torch.testing.assert_close(none[i], z, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(mean[i], z.mean(0), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(last[i], z[-1], rtol=1e-4, atol=1e-5)
    one_by_one = encode(tiny_llama, sae, PROMPTS, "mean", batch_size=1, progress=False)
    torch.testing.assert_close(mean, one_by_one, rtol=1e-4, atol=1e-5)


def test_encode_activations_is_differentiable_and_ignores_padding(sae):
    g = torch.Generator().manual_seed(3)
    acts = (torch.randn(2, 5, 64, generator=g) * 2).requires_grad_(True)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    zbar = encode_activations(sae, acts, mask, "mean")
    expected = torch.stack([sae.encode(acts[0, 2:]).mean(0), sae.encode(acts[1]).mean(0)])
    torch.testing.assert_close(zbar, expected)
    zbar[:, 5].sum().backward()
    assert torch.all(acts.grad[0, :2] == 0)  # padding gets no gradient
    # d zbar_k / d x_t = 1/T * W_enc[:, k] where latent k is active at t, else 0
    pre = (acts.detach() - sae.b_dec * sae.cfg.apply_b_dec_to_input) @ sae.W_enc + sae.b_enc
    active = (pre[..., 5] > 0).float() * mask
    want = active[..., None] * sae.W_enc[:, 5].detach() / mask.sum(1)[:, None, None]
    torch.testing.assert_close(acts.grad, want)
    assert active.sum() > 0
    per_token = encode_activations(sae, acts.detach())
    assert per_token.shape == (2, 5, 256)


def test_decoder_directions(sae):
    rows = decoder_directions(sae, [3, 7])
    assert torch.equal(rows, sae.W_dec.detach()[[3, 7]])
    unit = decoder_directions(sae, 3, normalize=True)
    torch.testing.assert_close(unit.norm(dim=-1), torch.ones(1))
    assert decoder_directions(sae).shape == (256, 64)
