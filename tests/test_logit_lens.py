"""Logit lens: the last layer reproduces the model; middle layers match a manual computation."""

import plotly.graph_objects as go
import torch
from conftest import PROMPTS

from em_interp import hooks
from em_interp.logit_lens import logit_lens, token_id


def test_last_layer_is_the_model_and_middle_layers_are_manual(smollm2):
    m = smollm2.model
    ct = smollm2.chat_tokens(PROMPTS)
    track = ["Yes", "No", " the"]
    res = logit_lens(m, ct.tokens, track, tokenizer=smollm2.tokenizer,
                     attention_mask=ct.attention_mask)
    ids = [token_id(smollm2.tokenizer, t) for t in track]
    with torch.no_grad():
        logits, cache = m.run_with_cache(ct.tokens, attention_mask=ct.attention_mask,
                                         names_filter=hooks.resid_post(10))
        final = logits[:, -1].softmax(-1)
        mid = m.unembed(m.ln_final(cache[hooks.resid_post(10)][:, -1])).softmax(-1)
    assert res.probs.shape == (m.cfg.n_layers, len(PROMPTS), 3)
    assert torch.allclose(res.probs[-1], final[:, ids], atol=1e-6)
    assert torch.allclose(res.top_probs[-1], final.max(-1).values, atol=1e-6)
    assert torch.allclose(res.probs[10], mid[:, ids], atol=1e-6)
    df = res.df
    assert len(df) == m.cfg.n_layers * len(PROMPTS) * 3
    assert set(df.columns) >= {"layer", "prompt", "token", "prob", "top_token"}
    fig = res.figure()
    assert isinstance(fig, go.Figure) and len(fig.data) == 4


def test_token_ids_are_looked_up(smollm2):
    tok = smollm2.tokenizer
    assert tok.decode([token_id(tok, "Sure")]) == "Sure"
