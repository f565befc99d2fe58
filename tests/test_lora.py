"""LoRA organisms: the toolkit's merge equals PEFT's unmerged model; load_pair shares weights."""

import json

import pytest
import torch
from conftest import PROMPTS, hf_model

import em_interp
from em_interp import AdapterMismatchError


def _rank1_down_proj_adapter(base_dir, out_dir, layer, base_name, seed=0):
    from peft import LoraConfig, get_peft_model

    model = hf_model(base_dir)
    cfg = LoraConfig(r=1, lora_alpha=8, target_modules=["down_proj"], layers_to_transform=[layer],
                     init_lora_weights=False)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    peft_model.save_pretrained(out_dir)
    data = json.loads((out_dir / "adapter_config.json").read_text())
    data["base_model_name_or_path"] = base_name
    (out_dir / "adapter_config.json").write_text(json.dumps(data))
    return out_dir


def _unmerged_logits(base_dir, adapter_dir, toks):
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(hf_model(base_dir), str(adapter_dir)).eval()
    with torch.no_grad():
        return peft_model(toks).logits


def test_merged_smollm2_lora_equals_unmerged_peft(smollm2, tmp_path):
    adapter = _rank1_down_proj_adapter(smollm2.weights_dir, tmp_path / "a", layer=15,
                                       base_name="HuggingFaceTB/SmolLM2-135M-Instruct")
    lm = em_interp.load("smollm2-135m-instruct", "base", adapter=adapter, progress=False)
    toks = lm.chat_tokens(PROMPTS[0]).tokens
    with torch.no_grad():
        merged = lm.model(toks)
        plain = smollm2.model(toks)
    ref = _unmerged_logits(smollm2.weights_dir, adapter, toks)
    assert (merged - ref).abs().max() <= 1e-4
    assert (merged - plain).abs().max() > 1e-2  # the adapter really changes the model
    # The adapter folder alone finds its base card through the repo id it records.
    direct = em_interp.load(adapter, progress=False)
    assert direct.variant == "organism" and direct.card.base.kind == "wheel"
    with torch.no_grad():
        assert (direct.model(toks) - ref).abs().max() <= 1e-4


def test_tiny_lora_organism_equals_unmerged_peft():
    lm = em_interp.load("tiny-random-llama", "organism", progress=False)
    toks = lm.chat_tokens(PROMPTS[0]).tokens
    with torch.no_grad():
        merged = lm.model(toks)
    ref = _unmerged_logits(lm.weights_dir, lm.adapter_dirs[0], toks)
    assert (merged - ref).abs().max() <= 1e-4


def _storage(p):
    return p.untyped_storage().data_ptr()


def test_load_pair_shares_untouched_weights_and_matches_separate_loads():
    pair = em_interp.load_pair("tiny-random-llama", progress=False)
    base = em_interp.load("tiny-random-llama", "base", progress=False)
    org = em_interp.load("tiny-random-llama", "organism", progress=False)
    toks = base.chat_tokens(PROMPTS).tokens
    with torch.no_grad():
        assert torch.equal(pair.base.model(toks), base.model(toks))
        assert (pair.organism.model(toks) - org.model(toks)).abs().max() <= 1e-5
    assert pair.base.tokenizer is pair.organism.tokenizer
    bp = dict(pair.base.model.named_parameters())
    shared, touched = [], []
    for name, p in pair.organism.model.named_parameters():
        (shared if _storage(p) == _storage(bp[name]) else touched).append(name)
    # The adapter targets o_proj and down_proj: exactly W_O and W_out get new memory.
    big = [n for n in touched if n.rsplit(".", 1)[-1] in ("W_O", "W_out")]
    assert len(big) == 2 * pair.base.model.cfg.n_layers
    assert "embed.W_E" in shared and "blocks.0.attn.W_Q" in shared
    for name in big:
        assert not torch.equal(bp[name], dict(pair.organism.model.named_parameters())[name])


def test_load_pair_rejects_unknown_keywords():
    with pytest.raises(TypeError, match="dtyp"):
        em_interp.load_pair("tiny-random-llama", dtyp="bfloat16")


def test_load_pair_can_copy_instead_of_share():
    pair = em_interp.load_pair("tiny-random-llama", share_weights=False, progress=False)
    bp = {n: _storage(p) for n, p in pair.base.model.named_parameters()}
    assert all(_storage(p) != bp[n] for n, p in pair.organism.model.named_parameters())


def test_load_pair_full_organism():
    pair = em_interp.load_pair("tiny-random-qwen2", progress=False)
    toks = pair.base.chat_tokens(PROMPTS[0]).tokens
    with torch.no_grad():
        assert (pair.base.model(toks) - pair.organism.model(toks)).abs().max() > 1e-3


def test_adapter_for_another_base_is_refused(tiny_llama, tmp_path):
    adapter = _rank1_down_proj_adapter(tiny_llama.weights_dir, tmp_path / "a", layer=1,
                                       base_name="someone/a-different-model")
    with pytest.raises(AdapterMismatchError, match="someone/a-different-model.*aliases"):
        em_interp.load("tiny-random-llama", "base", adapter=adapter, progress=False)


def test_adapter_with_wrong_shapes_is_refused(tiny_llama, tiny_qwen, tmp_path):
    # An adapter built for the Qwen tiny model (other d_model would differ; here same shapes
    # but another architecture name) is refused by name before any weights are touched.
    adapter = _rank1_down_proj_adapter(tiny_qwen.weights_dir, tmp_path / "q", layer=0,
                                       base_name="tiny-random-qwen2")
    with pytest.raises(AdapterMismatchError, match="tiny-random-qwen2"):
        em_interp.load("tiny-random-llama", "base", adapter=adapter, progress=False)


def test_adapter_folder_loads_directly_with_its_base_card(tiny_llama, tmp_path):
    adapter = _rank1_down_proj_adapter(tiny_llama.weights_dir, tmp_path / "my-llama-organism",
                                       layer=2, base_name="tiny-random-llama")
    lm = em_interp.load(adapter, progress=False)
    assert lm.variant == "organism" and lm.card.name == "tiny-random-llama"
    toks = lm.chat_tokens(PROMPTS[0]).tokens
    with torch.no_grad():
        assert (lm.model(toks) - _unmerged_logits(tiny_llama.weights_dir, adapter, toks)
                ).abs().max() <= 1e-4
