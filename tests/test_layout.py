"""The forward-speed fix: HF-layout storage, same numbers as TL's default layout."""

import torch

import em_interp
from em_interp.models.weight_layout import _STORAGE_ORDER, in_hf_layout, relayout_to_hf


def test_loaded_weights_need_no_copy_in_tl_forward(smollm2):
    m = smollm2.model
    block = m.blocks[3]
    # What TL's forward does with each weight is now free: the transposes are contiguous.
    assert block.mlp.W_gate.T.is_contiguous() and block.mlp.W_out.T.is_contiguous()
    assert m.unembed.W_U.T.is_contiguous()
    for name, p in m.named_parameters():
        assert in_hf_layout(p, name.rsplit(".", 1)[-1]), name


def test_relayout_changes_storage_not_values(tiny_qwen):
    lm = em_interp.load("tiny-random-qwen2", "base", fold_ln=True, progress=False)
    toks = lm.chat_tokens("abc def").tokens
    with torch.no_grad():
        before = lm.model(toks)
        # Put every listed weight back into TL's row-major layout, then re-store it.
        for name, p in lm.model.named_parameters():
            if name.rsplit(".", 1)[-1] in _STORAGE_ORDER:
                p.data = p.data.contiguous()
        stock = lm.model(toks)
        values = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
        assert relayout_to_hf(lm.model) > 0
        after = lm.model(toks)
    assert relayout_to_hf(lm.model) == 0  # idempotent
    for n, p in lm.model.named_parameters():
        assert torch.equal(p, values[n])
    assert (after - stock).abs().max() <= 1e-5 and (after - before).abs().max() <= 1e-5


def test_tied_embeddings_get_separate_storage(smollm2):
    m = smollm2.model
    assert torch.equal(m.embed.W_E, m.unembed.W_U.T)  # SmolLM2 ties them
    assert m.embed.W_E.untyped_storage().data_ptr() != m.unembed.W_U.untyped_storage().data_ptr()
