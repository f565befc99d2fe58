"""Logit lens: the last layer is the model, middle layers are a manual computation, prompt sets
are averaged with a Student-t band, and conditions run under interventions."""

import contextlib

import numpy as np
import plotly.graph_objects as go
import pytest
import torch
from conftest import PROMPTS
from scipy import stats

from em_interp import hooks
from em_interp.errors import ConfigError, TokenizationError
from em_interp.inputs import single_token_id, tokenize
from em_interp.readouts.logit_lens import LogitLensResult, logit_lens, read_positions, token_id


def test_last_layer_is_the_model_and_middle_layers_are_manual(smollm2):
    m = smollm2.model
    track = ["Yes", "No", " the"]
    # text prompts in batches of 2: the 3 prompts are padded differently than in one batch
    res = logit_lens(smollm2, PROMPTS, track, batch_size=2, progress=False)
    ids = [single_token_id(smollm2.tokenizer, t) for t in track]
    ct = smollm2.chat_tokens(PROMPTS)
    with torch.no_grad():
        logits, cache = m.run_with_cache(ct.tokens, attention_mask=ct.attention_mask,
                                         names_filter=hooks.resid_post(10))
        final = logits[:, -1].softmax(-1)
        mid_logits = m.unembed(m.ln_final(cache[hooks.resid_post(10)][:, -1]))
        mid = mid_logits.softmax(-1)
    assert res.probs.shape == (m.cfg.n_layers, len(PROMPTS), 3)
    assert torch.allclose(res.probs[-1], final[:, ids], atol=1e-5)
    assert torch.allclose(res.top_probs[-1], final.max(-1).values, atol=1e-5)
    assert torch.equal(res.top_ids[-1], final.argmax(-1))
    assert torch.allclose(res.probs[10], mid[:, ids], atol=1e-5)
    assert torch.allclose(res.logits[10], mid_logits[:, ids], atol=1e-3)
    df = res.df
    assert len(df) == m.cfg.n_layers * len(PROMPTS) * 3
    assert set(df.columns) >= {"condition", "layer", "prompt", "token", "prob", "top_token"}
    fig = res.figure(prompt=0)
    assert isinstance(fig, go.Figure) and len(fig.data) == 4  # 3 tokens + top-1 markers


def test_token_lookup_errors_show_the_split(smollm2, tiny_llama):
    tok = smollm2.tokenizer
    assert tok.decode([token_id(tok, "Sure")]) == "Sure"
    with pytest.raises(TokenizationError, match=r"splits into .*first_token=True"):
        logit_lens(smollm2, ["hi"], ["Sorry", " Sorry"], progress=False)
    # tiny-random-llama has a byte tokenizer: every word splits
    with pytest.raises(TokenizationError, match="first_token=True"):
        logit_lens(tiny_llama, ["hi"], ["Sure"], progress=False)
    res = logit_lens(tiny_llama, ["hi"], ["Sure", 7], first_token=True, progress=False)
    assert res.token_ids == [tiny_llama.tokenizer.encode("Sure", add_special_tokens=False)[0], 7]


def test_prompt_set_mean_has_a_student_t_band(tiny_llama):
    prompts = ["hi", "hello there", "what is a bond?", "tell me a joke", "a b c d e f"]
    res = logit_lens(tiny_llama, prompts, [ord("a"), ord("e")], batch_size=2, progress=False)
    summ = res.summary(ci=0.9)
    row = summ[(summ.token_id == ord("e")) & (summ.layer == 1)].iloc[0]
    x = res.probs[1, :, 1].double().numpy()
    lo, hi = stats.t.interval(0.9, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
    assert row["mean"] == pytest.approx(x.mean(), rel=1e-6)
    assert row["ci_lo"] == pytest.approx(lo, rel=1e-6) and row["ci_hi"] == pytest.approx(hi,
                                                                                       rel=1e-6)
    fig = res.figure()  # mean with a band: 2 tokens x (band + line)
    assert len(fig.data) == 4 and fig.data[0].fill == "toself"


class AddToResid:
    """A small reusable class-based intervention: add a vector to one block's output."""

    def __init__(self, model, layer, vec):
        self.model, self.layer, self.vec = model, layer, vec
        self._cm = None

    def __enter__(self):
        self._cm = hooks.attached(self.model, [(hooks.resid_post(self.layer),
                                                lambda act, hook: act + self.vec)])
        return self._cm.__enter__()

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


def test_conditions_give_one_result_per_condition(tiny_llama):
    m = tiny_llama.model
    prompts = ["hi", "hello there", "what is a bond?"]
    vec = torch.randn(m.cfg.d_model, generator=torch.Generator().manual_seed(0)) * 3
    track = [ord("a"), ord("b"), ord("c")]

    def zero_head(z, hook):
        z = z.clone()
        z[:, :, 1] = 0
        return z

    conditions = {
        "clean": None,
        "add@0": AddToResid(m, 0, vec),
        "add@0 again": AddToResid(m, 0, vec),
        "zero L1H1": lambda: hooks.attached(m, [(hooks.attn_z(1), zero_head)]),
    }
    res = logit_lens(tiny_llama, prompts, track, conditions=conditions, batch_size=2,
                     progress=False)
    assert res.conditions == list(conditions)
    assert res.probs_by_condition.shape == (4, m.cfg.n_layers, 3, 3)
    ct = tokenize(tiny_llama, prompts)
    with torch.no_grad():
        clean = m(ct.tokens, attention_mask=ct.attention_mask)[:, -1].softmax(-1)
        added = m.run_with_hooks(ct.tokens, attention_mask=ct.attention_mask, fwd_hooks=[
            (hooks.resid_post(0), lambda act, hook: act + vec)])[:, -1].softmax(-1)
        zeroed = m.run_with_hooks(ct.tokens, attention_mask=ct.attention_mask, fwd_hooks=[
            (hooks.attn_z(1), zero_head)])[:, -1].softmax(-1)
    by = {c: res.condition(c) for c in conditions}
    assert torch.allclose(by["clean"].probs[-1], clean[:, track], atol=1e-6)
    assert torch.allclose(by["add@0"].probs[-1], added[:, track], atol=1e-6)
    assert torch.equal(by["add@0"].probs, by["add@0 again"].probs)  # re-entered: same numbers
    assert torch.allclose(by["zero L1H1"].probs[-1], zeroed[:, track], atol=1e-6)
    # the toolkit's own intervention gives the same numbers as the hand-written hook
    from em_interp.behaviour.interventions import ablate_heads

    via_iv = logit_lens(tiny_llama, prompts, track, batch_size=2, progress=False,
                        conditions={"iv": ablate_heads(tiny_llama, [(1, 1)], mode="zero")})
    assert torch.allclose(via_iv.probs, by["zero L1H1"].probs, atol=1e-6)
    assert not torch.allclose(by["clean"].probs[-1], by["add@0"].probs[-1])
    # the condition only touches layers from its hook on: block 0's lens is unchanged by L1H1
    assert torch.equal(by["clean"].probs[0], by["zero L1H1"].probs[0])
    # a multi-condition result has no single-condition view
    with pytest.raises(Exception, match="conditions"):
        _ = res.probs
    assert len(res.figure().data) == 2 * 3 * 4  # band + line per token per condition
    assert set(res.df["condition"]) == set(conditions)
    # hooks already active around the call apply too
    with hooks.attached(m, [(hooks.resid_post(0), lambda act, hook: act + vec)]):
        active = logit_lens(tiny_llama, prompts, track, batch_size=2, progress=False)
    assert torch.equal(active.probs, by["add@0"].probs)
    with pytest.raises(ConfigError, match="context manager"):
        logit_lens(tiny_llama, prompts, track, conditions={"bad": 3}, progress=False)


def test_read_position_left_and_right_padding(tiny_llama):
    m = tiny_llama.model
    left = tokenize(tiny_llama, ["hi", "hello there friend"])
    res_left = logit_lens(m, left.tokens, [5, 6], attention_mask=left.attention_mask,
                          position=-2, progress=False)
    # the same prompts right-padded
    rows = [t[mk.bool()] for t, mk in zip(left.tokens, left.attention_mask, strict=True)]
    width = max(len(r) for r in rows)
    tok = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, r in enumerate(rows):
        tok[i, :len(r)] = r
        mask[i, :len(r)] = 1
    res_right = logit_lens(m, tok, [5, 6], attention_mask=mask, position=-2, progress=False)
    assert torch.allclose(res_left.probs, res_right.probs, atol=1e-5)
    # text prompts (tokenized per batch) give what the token tensor + mask gives
    res_text = logit_lens(tiny_llama, ["hi", "hello there friend"], [5, 6], position=-2,
                          batch_size=1, progress=False)
    assert torch.allclose(res_text.probs, res_left.probs, atol=1e-5)
    assert read_positions(mask, -1).tolist() == [len(r) - 1 for r in rows]
    assert read_positions(left.attention_mask, 0).tolist() == [width - len(r) for r in rows]
    with pytest.raises(TokenizationError, match="does not exist"):
        read_positions(mask, -(width + 1))
    # manual: the unpadded single prompt, second-to-last token
    with torch.no_grad():
        lg = m(rows[0][None])[0, -2].softmax(-1)
    assert torch.allclose(res_left.probs[-1, 0], lg[[5, 6]], atol=1e-5)


def test_result_round_trips(tmp_path, tiny_llama):
    res = logit_lens(tiny_llama, ["hi", "hello"], [ord("a")],
                     conditions={"a": None, "b": contextlib.nullcontext()}, progress=False)
    res.save(tmp_path / "ll")
    back = LogitLensResult.load(tmp_path / "ll")
    assert torch.equal(back.probs_by_condition, res.probs_by_condition)
    assert back.top_strs_by_condition == res.top_strs_by_condition
    assert back.conditions == ["a", "b"] and back.to_dict() == res.to_dict()
    assert np.isclose(res.to_dict()["by_condition"]["a"][res.token_strs[0]]["final_prob"],
                      float(res.probs_by_condition[0, -1, :, 0].mean()))
