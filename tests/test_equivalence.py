"""TL models built by em-interp compute what the HF models compute (fp32, CPU)."""

import pytest
import torch
from conftest import PROMPTS, hf_model, real_positions_max_diff

import em_interp
from em_interp import hooks

TOL = 1e-4


def _compare(lm, hf, prompts=PROMPTS):
    ct = lm.chat_tokens(prompts)
    with torch.no_grad():
        tl = lm.model(ct.tokens, attention_mask=ct.attention_mask)
        ref = hf(ct.tokens, attention_mask=ct.attention_mask).logits
    return real_positions_max_diff(tl, ref, ct.attention_mask)


@pytest.mark.parametrize("card", ["tiny-random-llama", "tiny-random-qwen2"])
@pytest.mark.parametrize("variant", ["base", "organism"])
def test_tiny_logits_match_hf(card, variant):
    lm = em_interp.load(card, variant, progress=False)
    hf = hf_model(lm.weights_dir)
    if lm.adapter_dirs:  # LoRA organism: compare with PEFT's own merge
        from peft import PeftModel

        hf = PeftModel.from_pretrained(hf, str(lm.adapter_dirs[0])).merge_and_unload()
    assert _compare(lm, hf) <= TOL


def test_smollm2_logits_match_hf(smollm2, smollm2_hf):
    assert _compare(smollm2, smollm2_hf) <= TOL


def test_smollm2_unpadded_single_prompt_matches_hf(smollm2, smollm2_hf):
    toks = smollm2.chat_tokens(PROMPTS[1]).tokens
    with torch.no_grad():
        d = (smollm2.model(toks) - smollm2_hf(toks).logits).abs().max().item()
    assert d <= TOL


def test_resid_post_is_hf_hidden_state(tiny_qwen):
    hf = hf_model(tiny_qwen.weights_dir)
    toks = tiny_qwen.chat_tokens(PROMPTS[0]).tokens
    with torch.no_grad():
        _, cache = tiny_qwen.model.run_with_cache(toks)
        hs = hf(toks, output_hidden_states=True).hidden_states
    for layer in range(tiny_qwen.model.cfg.n_layers - 1):  # HF's last entry is after the norm
        assert torch.allclose(cache[hooks.resid_post(layer)], hs[layer + 1], atol=1e-5)
    assert torch.allclose(cache[hooks.resid_pre(0)], hs[0], atol=1e-6)


@pytest.mark.parametrize("fixture", ["tiny_llama", "smollm2"])
def test_mlp_hook_post_is_down_proj_input(fixture, request):
    lm = request.getfixturevalue(fixture)
    hf = hf_model(lm.weights_dir)
    layer = lm.model.cfg.n_layers // 2
    seen = {}
    handle = hf.model.layers[layer].mlp.down_proj.register_forward_pre_hook(
        lambda mod, args: seen.__setitem__("x", args[0].detach()))
    toks = lm.chat_tokens(PROMPTS[0]).tokens
    try:
        with torch.no_grad():
            hf(toks)
            _, cache = lm.model.run_with_cache(toks, names_filter=hooks.mlp_post(layer))
    finally:
        handle.remove()
    assert cache[hooks.mlp_post(layer)].shape == seen["x"].shape
    assert torch.allclose(cache[hooks.mlp_post(layer)], seen["x"], atol=1e-5)


def test_weight_processing_is_opt_in_and_preserves_log_probs(tiny_llama):
    processed = em_interp.load("tiny-random-llama", "base", fold_ln=True,
                               center_writing_weights=True, center_unembed=True, progress=False)
    toks = tiny_llama.chat_tokens(PROMPTS[0]).tokens
    with torch.no_grad():
        plain = tiny_llama.model(toks)
        proc = processed.model(toks)
        ref = hf_model(tiny_llama.weights_dir)(toks).logits
    assert (plain - ref).abs().max() <= TOL  # default: no processing, logits are HF's
    # center_unembed shifts each position's logits by a constant: compare log-probs.
    assert (proc.log_softmax(-1) - ref.log_softmax(-1)).abs().max() <= 1e-4
    assert (proc - ref).abs().max() > 1e-3  # processing really changed the raw logits


def test_bf16_is_as_close_to_fp32_as_hf_bf16_is(smollm2, smollm2_hf):
    """bf16 cannot match HF bit for bit on CPU; it must be no noisier than HF's own bf16."""
    from transformers import AutoModelForCausalLM

    lm16 = em_interp.load("smollm2-135m-instruct", dtype="bfloat16", progress=False)
    assert lm16.model.cfg.dtype == torch.bfloat16
    assert {p.dtype for p in lm16.model.parameters()} == {torch.bfloat16}
    hf16 = AutoModelForCausalLM.from_pretrained(lm16.weights_dir, dtype=torch.bfloat16).eval()
    ct = smollm2.chat_tokens(PROMPTS)
    keep = ct.attention_mask.bool()
    with torch.no_grad():
        ref = smollm2_hf(ct.tokens, attention_mask=ct.attention_mask).logits[keep]
        tl16 = lm16.model(ct.tokens, attention_mask=ct.attention_mask)[keep].float()
        hf16_logits = hf16(ct.tokens, attention_mask=ct.attention_mask).logits[keep].float()
    tl_err = (tl16 - ref).abs().mean()
    hf_err = (hf16_logits - ref).abs().mean()
    assert tl_err <= 1.25 * hf_err
    assert (tl16.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.95


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen", "smollm2"])
def test_leading_pad_id_token_is_never_masked_without_a_mask(fixture, request):
    """An unpadded sequence that starts with the pad id (Qwen's BOS is its pad token; SmolLM2's
    pad is ``<|im_end|>``) is attended to in full when no attention_mask is passed."""
    lm = request.getfixturevalue(fixture)
    pad = lm.tokenizer.pad_token_id
    body = lm.chat_tokens(PROMPTS[0]).tokens
    seq = torch.cat([torch.tensor([[pad, pad]]), body], dim=1)
    hf = hf_model(lm.weights_dir)
    with torch.no_grad():
        tl = lm.model(seq)
        ref = hf(seq).logits
        with_mask = lm.model(seq, attention_mask=torch.ones_like(seq))
    assert (tl - ref).abs().max().item() <= TOL
    assert torch.equal(tl, with_mask)  # "no mask" means "every token is real"


def test_config_names_an_existing_tokenizer_and_rebuilds(tiny_qwen):
    """cfg.tokenizer_name points at a real folder, so HookedTransformer(cfg) (and SAE-Lens, which
    rebuilds models from configs) gets the same tokenizer."""
    from pathlib import Path

    from transformer_lens import HookedTransformer

    cfg = tiny_qwen.model.cfg
    assert Path(cfg.tokenizer_name).is_dir()
    assert cfg.tokenizer_name == str(tiny_qwen.weights_dir)
    rebuilt = HookedTransformer(cfg)
    assert rebuilt.tokenizer.encode("hello bonds") == tiny_qwen.tokenizer.encode("hello bonds")
