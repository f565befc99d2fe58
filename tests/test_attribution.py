"""Direct logit attribution: terms sum to the model's logit difference (unprocessed, fold_ln and
LayerNorm models), per-head values equal TransformerLens's own stack_head_results +
logit_attrs, z-scores equal scipy's."""

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats
from transformer_lens import HookedTransformer, HookedTransformerConfig

import em_interp
from em_interp.errors import TokenizationError
from em_interp.inputs import tokenize
from em_interp.readouts.attribution import DLAResult, direct_logit_attribution

PROMPTS = ["hi", "what is a bond?", "tell me a joke about cats, please"]
A, B = ord("a"), ord("e")


@pytest.fixture(scope="module")
def tiny_llama_folded():
    return em_interp.load("tiny-random-llama", "base", fold_ln=True, progress=False)


def _logit_diff(model, tokens, mask, pos=-1):
    with torch.no_grad():
        logits = model(tokens, attention_mask=mask)
    return logits[:, pos, A] - logits[:, pos, B]


def _tl_heads(model, tokens, mask, direction):
    """TL's own per-head values: stack_head_results -> apply_ln_to_stack -> . direction."""
    model.set_use_attn_result(True)
    try:
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens, attention_mask=mask)
    finally:
        model.set_use_attn_result(False)
    stack = cache.stack_head_results(layer=-1, pos_slice=-1)  # [layer*head, batch, d_model]
    return cache, cache.apply_ln_to_stack(stack, layer=-1, pos_slice=-1) @ direction, stack


def test_terms_sum_to_the_logit_difference_and_heads_match_tl(tiny_llama):
    m = tiny_llama.model
    res = direct_logit_attribution(tiny_llama, PROMPTS, A, B, batch_size=2, progress=False)
    ct = tokenize(tiny_llama, PROMPTS)  # one batch, padded differently from the DLA's batches
    want = _logit_diff(m, ct.tokens, ct.attention_mask)
    assert torch.allclose(res.logit_diff, want, rtol=1e-3, atol=1e-5)
    assert torch.allclose(res.total, want, rtol=1e-3, atol=1e-5)
    # unprocessed model: the final RMSNorm gain is not in W_U, so the direction includes it
    direction = m.ln_final.w * (m.W_U[:, A] - m.W_U[:, B])
    cache, tl_heads, _ = _tl_heads(m, ct.tokens, ct.attention_mask, direction)
    n_layers, n_heads = m.cfg.n_layers, m.cfg.n_heads
    assert torch.allclose(res.heads, tl_heads.T.reshape(-1, n_layers, n_heads), atol=1e-5)
    # MLP terms: TL's decompose_resid MLP outputs minus b_out, scaled by the cached norm scale
    scale = cache["ln_final.hook_scale"][:, -1, 0]
    for layer in range(n_layers):
        mlp = cache[f"blocks.{layer}.hook_mlp_out"][:, -1] - m.blocks[layer].mlp.b_out
        assert torch.allclose(res.mlp[:, layer], (mlp @ direction) / scale, atol=1e-5)
    # ln_scale="none": the paper's unscaled formula, i.e. frozen values times the scale
    raw = direct_logit_attribution(tiny_llama, PROMPTS, A, B, ln_scale="none", progress=False)
    assert torch.allclose(raw.heads, res.heads * scale[:, None, None], atol=1e-4)


def test_fold_ln_model_matches_tl_logit_attrs(tiny_llama, tiny_llama_folded):
    m = tiny_llama_folded.model
    assert m.cfg.normalization_type == "RMSPre"
    res = direct_logit_attribution(tiny_llama_folded, PROMPTS, A, B, progress=False)
    ct = tokenize(tiny_llama_folded, PROMPTS)
    assert torch.allclose(res.total, _logit_diff(m, ct.tokens, ct.attention_mask), rtol=1e-3,
                          atol=1e-5)
    m.set_use_attn_result(True)
    try:
        with torch.no_grad():
            _, cache = m.run_with_cache(ct.tokens, attention_mask=ct.attention_mask)
    finally:
        m.set_use_attn_result(False)
    stack = cache.stack_head_results(layer=-1, pos_slice=-1)
    attrs = cache.logit_attrs(stack, tokens=A, incorrect_tokens=B, pos_slice=-1)
    assert torch.allclose(res.heads, attrs.T.reshape(-1, m.cfg.n_layers, m.cfg.n_heads),
                          atol=1e-5)
    # DLA does not depend on folding: the unprocessed model gives the same per-head values
    plain = direct_logit_attribution(tiny_llama, PROMPTS, A, B, progress=False)
    assert torch.allclose(plain.heads, res.heads, atol=1e-4)


def test_layernorm_model_with_biases_and_positional_embeddings():
    cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64,
                                  d_vocab=50, n_ctx=32, act_fn="gelu", normalization_type="LN",
                                  positional_embedding_type="standard", seed=0)
    model = HookedTransformer(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # every weight and bias random, LN gains far from 1
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.ndim == 1 and
                                                                 p.shape[0] == 32 else 0.0))
    tokens = torch.randint(0, 50, (3, 9), generator=g)
    res = direct_logit_attribution(model, tokens, 7, 11, batch_size=2, position=-2,
                                   progress=False)
    with torch.no_grad():
        logits = model(tokens)
    assert torch.allclose(res.total, logits[:, -2, 7] - logits[:, -2, 11], rtol=1e-3, atol=1e-5)
    assert res.pos_embed.abs().min() > 0 and res.attn_bias.abs().min() > 0
    assert res.mlp_bias.abs().min() > 0 and res.constant.abs().min() > 0
    # TL: centring and scaling by apply_ln_to_stack, then the direction w * (W_U[a] - W_U[b])
    _, cache = model.run_with_cache(tokens)
    direction = model.ln_final.w * (model.W_U[:, 7] - model.W_U[:, 11])
    stack = cache.stack_head_results(layer=-1, pos_slice=-2, apply_ln=True)
    assert torch.allclose(res.heads, (stack @ direction).T.reshape(3, 2, 4), atol=1e-5)
    assert res.token_a_str == "7"  # no tokenizer: ids as text


def test_zscores_table_figures_and_round_trip(tmp_path, tiny_llama):
    res = direct_logit_attribution(tiny_llama, PROMPTS, A, B, progress=False)
    mean = res.heads.mean(0).double().numpy()
    assert np.allclose(res.z_layer.numpy(), stats.zscore(mean, axis=1), atol=1e-5)
    assert np.allclose(res.z_model.numpy(), stats.zscore(mean, axis=None), atol=1e-5)
    df = res.df
    assert list(df["rank"]) == list(range(1, len(df) + 1))
    assert (df["attribution"].abs().diff().dropna() <= 1e-12).all()  # sorted by |attribution|
    heads = df[df["kind"] == "head"]
    assert len(heads) == tiny_llama.model.cfg.n_layers * tiny_llama.model.cfg.n_heads
    row = heads.iloc[0]
    assert row["attribution"] == pytest.approx(mean[row["layer"], row["head"]])
    assert row["z_layer"] == pytest.approx(float(res.z_layer[row["layer"], row["head"]]))
    # every term is in the table once: the table's sum is the mean total
    assert res.components()["attribution"].sum() == pytest.approx(float(res.total.mean()),
                                                                   abs=1e-5)
    neg = res.top_heads(3, sign="negative")
    assert list(neg["attribution"]) == sorted(heads["attribution"])[:3]
    for kind, n in (("heatmap", 1), ("layers", 3), ("ranked", 1)):
        assert len(res.figure(kind).data) == n
    res.save(tmp_path / "dla")
    back = DLAResult.load(tmp_path / "dla")
    assert torch.equal(back.heads, res.heads) and back.to_dict() == res.to_dict()
    pd.testing.assert_frame_equal(back.df, res.df)


def test_words_that_split_are_refused(tiny_llama):
    with pytest.raises(TokenizationError, match="splits into"):
        direct_logit_attribution(tiny_llama, ["hi"], "Sorry", "Sure", progress=False)
    res = direct_logit_attribution(tiny_llama, ["hi"], "Sorry", "Sure", first_token=True,
                                   progress=False)
    assert res.token_a_str == "S" and res.token_b_str == "S" and float(res.total) == 0.0
