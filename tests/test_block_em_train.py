"""BLOCK-EM fine-tuning on SmolLM2 with a small SAE and a planted latent set: lambda > 0 keeps
the blocked latents' shifts near zero while lambda = 0 lets them grow; the KL baseline logs
its KL; and the per-step log has the blocking loss."""

import pytest
import torch

from em_interp.block_em import BlockEMConfig, LatentSet, train_blocked
from em_interp.block_em.loss import capture_layers
from em_interp.training.lora import LoRATrainConfig, collate, load_base_hf, tokenize_sft

LAYER = 8
HOOK = f"blocks.{LAYER}.hook_resid_post"
CARD = "smollm2-135m-instruct"
LORA = LoRATrainConfig(rank=8, alpha=16, lr=3e-3, max_steps=4, batch_size=4, max_length=96,
                       seed=0, max_grad_norm=1.0)


def random_sae(d_in, d_sae, seed=0):
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(seed)
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae,
                                        metadata=SAEMetadata(hook_name=HOOK)))
    with torch.no_grad():
        sae.W_enc.mul_(0.2)
    return sae.eval()


@pytest.fixture(scope="module")
def data():
    from em_interp.data import load_prompt_set

    return load_prompt_set("risky_financial_sft").train().conversations[:8]


@pytest.fixture(scope="module")
def sae():
    return random_sae(576, 128)


@torch.no_grad()
def latents(hf, sae, batch):
    with capture_layers(hf, [LAYER], stop=False) as out:
        hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    return sae.encode(out[LAYER])[batch.token_mask]  # [completion tokens, d_sae]


def run(data, sae, tmp_path, cfg, k_set=None):
    """Train; return the mean shift (trained - base) of every latent on the completion tokens."""
    model = load_base_hf(CARD, device="cpu")
    tok, hf = model[3], model[2]
    batch = collate(tokenize_sft(tok, data, LORA.max_length), tok.pad_token_id)
    before = latents(hf, sae, batch)
    res = train_blocked(CARD, data, LORA, cfg, tmp_path, progress=False, model=model,
                        blocks=[(sae, k_set)] if k_set is not None else ())
    after = latents(hf, sae, batch)  # hf now carries the trained adapter (PEFT wraps in place)
    return (after - before).mean(0), res


def test_blocking_keeps_planted_latents_still(data, sae, tmp_path):
    free, res0 = run(data, sae, tmp_path / "sft", BlockEMConfig(method="sft"))
    assert res0.log["loss"][-1] < res0.log["loss"][0]
    k_plus = torch.topk(free, 5).indices.tolist()
    k_minus = torch.topk(-free, 5).indices.tolist()
    planted = LatentSet.planted(sae, k_plus=k_plus, k_minus=k_minus)
    blocked, res = run(data, sae, tmp_path / "blocked",
                       BlockEMConfig(method="block_em", lam=10.0), planted)
    # the blocking loss starts at exactly 0 (B = 0) and is logged every step
    assert res.log["block_loss"][0] == 0.0 and len(res.log["block_loss"]) == LORA.max_steps
    up_free, down_free = free[k_plus].mean(), free[k_minus].mean()
    up, down = blocked[k_plus].mean(), blocked[k_minus].mean()
    print(f"\nK+ mean shift: lambda=0 {up_free:.4f}, lambda=10 {up:.4f}; "
          f"K- mean shift: lambda=0 {down_free:.4f}, lambda=10 {down:.4f}; "
          f"all latents mean |shift| lambda=0 {free.abs().mean():.4f}")
    assert up_free > 0 and down_free < 0
    assert up < 0.25 * up_free  # blocked increases stay near zero (or go down: allowed)
    assert down > 0.25 * down_free
    # SFT still trains under the blocking loss
    assert res.log["loss"][-1] < res.log["loss"][0]


def test_kl_baseline_logs_kl(data, tmp_path):
    model = load_base_hf(CARD, device="cpu")
    cfg = LoRATrainConfig(rank=4, alpha=8, lr=3e-3, max_steps=2, batch_size=2, max_length=64)
    res = train_blocked(CARD, data[:2], cfg, BlockEMConfig(method="kl", lam=0.5), tmp_path,
                        progress=False, model=model)
    assert res.log["kl"][0] == pytest.approx(0.0, abs=1e-6)  # adapter at init = base
    assert res.log["kl"][-1] > 0
    assert res.regularizers == [{"name": "kl", "lambda": 0.5}]
