"""chat_tokens applies the chat template exactly once: one BOS, HF's ids, left padding."""

import pytest
import torch
from conftest import PROMPTS

from em_interp.models.chat import chat_tokens


def _hf_ids(tok, prompt):
    enc = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True,
                                  add_generation_prompt=True)
    ids = enc["input_ids"] if not isinstance(enc, list) else enc
    return list(ids)


@pytest.mark.parametrize("fixture", ["tiny_llama", "smollm2"])
def test_one_bos_and_hf_template_ids(fixture, request):
    lm = request.getfixturevalue(fixture)
    bos = lm.tokenizer.bos_token_id
    assert bos is not None
    for p in PROMPTS:
        ids = lm.chat_tokens(p).tokens[0].tolist()
        assert ids == _hf_ids(lm.tokenizer, p)
        assert ids[0] == bos and ids.count(bos) == ids[:1].count(bos) + ids[1:].count(bos)
        assert ids[1] != bos
    # The pitfall it avoids: TL's to_tokens on the template text prepends a second BOS.
    text = lm.chat_tokens(PROMPTS[0]).texts[0]
    naive = lm.model.to_tokens(text)[0].tolist()
    assert naive[:2] == [bos, bos]


def test_no_bos_tokenizer_gets_none(tiny_qwen):
    ids = tiny_qwen.chat_tokens("hello").tokens[0].tolist()
    assert ids == _hf_ids(tiny_qwen.tokenizer, "hello")
    assert tiny_qwen.tokenizer.bos_token_id is None


def test_left_padding_keeps_last_position_logits(smollm2):
    ct = smollm2.chat_tokens(PROMPTS)
    assert ct.lengths == [len(_hf_ids(smollm2.tokenizer, p)) for p in PROMPTS]
    assert (ct.attention_mask[:, -1] == 1).all()
    with torch.no_grad():
        batched = smollm2.model(ct.tokens, attention_mask=ct.attention_mask)[:, -1]
        for i, p in enumerate(PROMPTS):
            single = smollm2.model(smollm2.chat_tokens(p).tokens)[0, -1]
            assert (batched[i] - single).abs().max() <= 1e-4


def test_system_prompt_and_conversations(tiny_llama):
    conv = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}]
    ct = chat_tokens(tiny_llama.tokenizer, [conv, "d"], system="be brief")
    assert len(ct) == 2
    assert all(t.count("system") == 1 for t in ct.texts)
    assert "assistant\nb" in ct.texts[0]


def test_bad_prompts_are_rejected(tiny_llama):
    with pytest.raises(ValueError, match="non-empty"):
        chat_tokens(tiny_llama.tokenizer, [])
    with pytest.raises(ValueError, match="must be a string"):
        chat_tokens(tiny_llama.tokenizer, [42])
