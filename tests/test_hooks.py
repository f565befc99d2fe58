"""Hook-name helpers, validation, and the always-removing context manager."""

import pytest
import torch

from em_interp import HookNameError, hooks


def test_name_builders_exist_in_the_model(tiny_llama):
    m = tiny_llama.model
    for fn in (hooks.resid_pre, hooks.resid_mid, hooks.resid_post, hooks.attn_out, hooks.mlp_out,
               hooks.attn_z, hooks.attn_pattern, hooks.mlp_pre, hooks.mlp_post):
        assert hooks.check_hook(m, fn(2)) == fn(2)
    assert hooks.mlp_post(62) == "blocks.62.mlp.hook_post"
    assert hooks.resid_post(19) == "blocks.19.hook_resid_post"


def test_layer_validation(tiny_llama):
    assert hooks.check_layer(tiny_llama.model, -1) == 2
    with pytest.raises(HookNameError, match=r"3 blocks, layers 0\.\.2"):
        hooks.check_layer(tiny_llama.model, 3)


def test_hook_name_validation_suggests(tiny_llama):
    with pytest.raises(HookNameError, match="blocks.1.mlp.hook_post") as e:
        hooks.check_hook(tiny_llama.model, "blocks.1.mlp.hook_pst")
    assert "hook_resid_post" in str(e.value)
    with pytest.raises(HookNameError):
        with hooks.attached(tiny_llama.model, [("blocks.9.hook_resid_post", lambda a, hook: a)]):
            pass


def test_attached_applies_and_always_removes(tiny_llama):
    m = tiny_llama.model
    toks = tiny_llama.chat_tokens("hello").tokens
    with torch.no_grad():
        clean = m(toks)
        keep_calls = []
        m.hook_dict[hooks.resid_pre(0)].add_hook(lambda a, hook: keep_calls.append(1))
        try:
            with hooks.attached(m, [(hooks.resid_post(2), lambda a, hook: torch.zeros_like(a))]):
                zeroed = m(toks)
            # RMSNorm of a zero residual is zero, so every logit is the (zero) unembed bias.
            assert zeroed.abs().max() == 0
            with pytest.raises(RuntimeError, match="boom"):
                with hooks.attached(m, [(hooks.resid_post(1), lambda a, hook: a * 2)]):
                    raise RuntimeError("boom")
            assert torch.equal(m(toks), clean)
            assert len(keep_calls) == 2  # the hook added outside the context survived both runs
        finally:
            m.reset_hooks()
