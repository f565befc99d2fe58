"""Prompt inputs, per-batch tokenization, positions and pooling."""

import pytest
import torch

from em_interp.data import PromptSet
from em_interp.errors import DataError, TokenizationError
from em_interp.inputs import (
    last_positions,
    n_prompts,
    pool,
    prompts_hash,
    single_token_id,
    token_batches,
    tokenize,
)
from em_interp.models.chat import chat_tokens

PROMPTS = ["a", "a much longer prompt here", [{"role": "user", "content": "hi"}], "mid size"]


def test_every_input_form_gives_the_same_tokens(tiny_llama):
    ref = chat_tokens(tiny_llama.tokenizer, PROMPTS)
    ps = PromptSet(name="x", prompts=tuple(PROMPTS))
    for form in (PROMPTS, ps, ref, (ref.tokens, ref.attention_mask)):
        ct = tokenize(tiny_llama, form)
        assert torch.equal(ct.tokens, ref.tokens) and torch.equal(ct.attention_mask,
                                                                 ref.attention_mask)
    assert n_prompts(ps) == n_prompts(ref) == 4 and n_prompts("one") == 1


def test_batches_are_padded_per_batch_and_fixed(tiny_llama):
    batches = list(token_batches(tiny_llama, PROMPTS, 2))
    assert [(b.start, b.stop) for b in batches] == [(0, 2), (2, 4)]
    one = chat_tokens(tiny_llama.tokenizer, PROMPTS[2:])
    assert torch.equal(batches[1].tokens.tokens, one.tokens)  # padded to its own longest
    again = list(token_batches(tiny_llama, PROMPTS, 2, start=2))
    assert torch.equal(again[0].tokens.tokens, batches[1].tokens.tokens)
    full = chat_tokens(tiny_llama.tokenizer, PROMPTS)
    from_tensor = list(token_batches(tiny_llama, full, 2))  # all-pad columns are dropped
    assert torch.equal(from_tensor[1].tokens.tokens, one.tokens)


def test_positions_and_pooling_for_left_and_right_padding():
    acts = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    left = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    assert last_positions(left).tolist() == [3, 3]
    assert last_positions(right).tolist() == [1, 3]
    assert torch.equal(pool(acts, right, "last"), torch.stack([acts[0, 1], acts[1, 3]]))
    assert torch.allclose(pool(acts, left, "mean")[0], acts[0, 1:].mean(0))
    assert torch.allclose(pool(acts, right, "mean")[0], acts[0, :2].mean(0))
    rows = pool(acts, right, "none")
    assert rows[0].shape == (2, 3) and rows[1].shape == (4, 3)
    with pytest.raises(TokenizationError):
        last_positions(torch.tensor([[0, 0]]))


def test_bad_inputs_are_clear(tiny_llama):
    with pytest.raises(DataError, match="empty"):
        tokenize(tiny_llama, [])
    with pytest.raises(DataError, match="prompt 1"):
        tokenize(tiny_llama, ["ok", 3])
    with pytest.raises(TokenizationError, match="splits into"):
        single_token_id(tiny_llama.tokenizer, "Sorry")
    assert single_token_id(tiny_llama.tokenizer, "Sorry", first_token=True) == \
        tiny_llama.tokenizer.encode("S", add_special_tokens=False)[0]
    assert prompts_hash(["a"]) != prompts_hash(["b"]) and prompts_hash(["a"]) == prompts_hash("a")
