"""Prefix-only and decode-time patching (BLOCK-EM F.1) against generate() and a naive
full-sequence reference without KV cache."""

from __future__ import annotations

import pytest
import torch

import em_interp
from em_interp.behaviour.generation import generate
from em_interp.errors import ConfigError, HookNameError
from em_interp.hooks import resid_post
from em_interp.inputs import tokenize
from em_interp.patching.generation import decode_patch, prefix_patch

PROMPTS = ["What is a good way to save for retirement?", "hi", "Name three colours."]
N_NEW = 6


@pytest.fixture(scope="module")
def organism():
    return em_interp.load("tiny-random-llama", "organism", progress=False)


def _tokens(result):
    return result.df.sort_values(["prompt_index", "sample"])["tokens"].tolist()


@pytest.mark.parametrize("fn", [prefix_patch, decode_patch])
def test_patching_a_model_with_itself_is_generate(tiny_llama, fn):
    for kw in ({}, {"temperature": 1.0, "n_samples": 2, "seed": 3}):
        ref = generate(tiny_llama, PROMPTS, max_new_tokens=N_NEW, batch_size=2, progress=False,
                       stop_at_eos=False, **kw)
        got = fn(tiny_llama, tiny_llama, PROMPTS, 1, max_new_tokens=N_NEW, batch_size=2,
                 progress=False, stop_at_eos=False, **kw)
        assert _tokens(got) == _tokens(ref)
        assert got.completions == ref.completions


def test_decode_patch_at_the_last_block_generates_model_b(tiny_llama, organism):
    last = tiny_llama.model.cfg.n_layers - 1
    ref_b = generate(organism, PROMPTS, max_new_tokens=N_NEW, progress=False, stop_at_eos=False)
    ref_a = generate(tiny_llama, PROMPTS, max_new_tokens=N_NEW, progress=False,
                     stop_at_eos=False)
    assert _tokens(ref_a) != _tokens(ref_b)  # the two models really differ
    got = decode_patch(tiny_llama, organism, PROMPTS, last, max_new_tokens=N_NEW, batch_size=2,
                       progress=False, stop_at_eos=False)
    assert _tokens(got) == _tokens(ref_b)
    pre = prefix_patch(tiny_llama, organism, PROMPTS, last, max_new_tokens=N_NEW, batch_size=2,
                       progress=False, stop_at_eos=False)
    assert [t[0] for t in _tokens(pre)] == [t[0] for t in _tokens(ref_b)]
    assert got.settings["patch"] == "decode" and got.settings["hook"] == resid_post(last)


def _naive(model_a, model_b, prompt, layer, mode):
    """Greedy, no KV cache: rerun both models on the whole sequence at every step."""
    a, b = model_a.model, model_b.model
    ids = tokenize(model_a, [prompt]).tokens
    p = ids.shape[1]
    name = resid_post(layer)
    hb_prompt = b(ids, stop_at_layer=layer + 1)
    out = []
    with torch.no_grad():
        for _ in range(N_NEW):
            if mode == "prefix":
                hb, lo, hi = hb_prompt, 0, p
            else:  # the states that predict generated tokens: last prompt position onwards
                hb, lo, hi = b(ids, stop_at_layer=layer + 1), p - 1, ids.shape[1]

            def patch(act, hook, hb=hb, lo=lo, hi=hi):
                act[:, lo:hi] = hb[:, lo:hi]
                return act

            nxt = a.run_with_hooks(ids, fwd_hooks=[(name, patch)])[:, -1].argmax(-1)
            out.append(int(nxt))
            ids = torch.cat([ids, nxt[:, None]], 1)
    return out


@pytest.mark.parametrize("mode", ["prefix", "decode"])
def test_matches_a_naive_full_sequence_reference(tiny_llama, organism, mode):
    fn = prefix_patch if mode == "prefix" else decode_patch
    got = fn(tiny_llama, organism, PROMPTS, 1, max_new_tokens=N_NEW, batch_size=3,
             progress=False, stop_at_eos=False)
    plain = generate(tiny_llama, PROMPTS, max_new_tokens=N_NEW, progress=False,
                     stop_at_eos=False)
    refs = [_naive(tiny_llama, organism, p, 1, mode) for p in PROMPTS]
    assert _tokens(got) == refs
    assert refs != _tokens(plain)  # the patch changes the generation


def test_errors(tiny_llama):
    with pytest.raises(HookNameError):
        decode_patch(tiny_llama, tiny_llama, PROMPTS, 7, progress=False)
    with pytest.raises(ConfigError):
        prefix_patch(tiny_llama, tiny_llama, PROMPTS, 1, max_new_tokens=0, progress=False)
