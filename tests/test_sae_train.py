"""train_sae: SAE-Lens's trainer fed from tensors, an activation store, prompts and local text;
a planted direction is recovered as a latent correlated with the label; reconstruction improves
on SmolLM2; the saved folder names card, variant, hook and data; reruns reuse the SAE."""

import json

import numpy as np
import pytest
import torch

from em_interp.activations.cache import ActivationStore
from em_interp.errors import ConfigError, DataError, StoreMismatchError
from em_interp.sae import (
    SAETrainConfig,
    SAETrainResult,
    encode_activations,
    feature_correlations,
    load_sae,
    text_dataset,
    train_sae,
)
from em_interp.sae.train import trainer_config, training_sae_config

HOOK = "blocks.1.hook_resid_post"  # tiny-random-llama: d_model 64


def planted_tokens(n_prompts=160, n_tokens=8, d=64, seed=0):
    """Token activations: two of 24 background features per token, plus a planted direction on
    about 80% of the tokens of label-1 prompts only."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.nn.functional.normalize(torch.randn(24, d, generator=g), dim=-1)
    planted = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=-1)
    labels = torch.arange(n_prompts) % 2
    n = n_prompts * n_tokens
    idx = torch.rand(n, 24, generator=g).argsort(-1)[:, :2]
    coef = torch.rand(n, 2, 1, generator=g) * 2 + 0.5
    x = (coef * feats[idx]).sum(1)
    on = labels.repeat_interleave(n_tokens).bool() & (torch.rand(n, generator=g) < 0.8)
    x = x + 4.0 * on[:, None] * planted + 0.02 * torch.randn(n, d, generator=g)
    return x, labels, planted, n_tokens


def test_planted_direction_gives_a_latent_correlated_with_the_label(tiny_llama, tmp_path):
    acts, labels, planted, T = planted_tokens()
    store = ActivationStore.from_tensors(tmp_path / "store", {HOOK: acts}, reduce="none",
                                         lengths=[T] * len(labels), labels=labels.tolist())
    cfg = SAETrainConfig(expansion_factor=2, l1_coefficient=1.0, lr=3e-3, batch_size=128,
                         training_tokens=128 * 150, out_dir=str(tmp_path / "sae"))
    res = train_sae(tiny_llama, HOOK, store, cfg, progress=False)
    assert res.n_steps == 150 and res.data["kind"] == "store"
    sae = res.sae
    zbar = torch.stack([encode_activations(sae, acts[i * T:(i + 1) * T][None], reduce="mean")[0]
                        for i in range(len(labels))]).detach()
    corr = feature_correlations(zbar, labels.tolist())
    best = int(np.nanargmax(corr.pearson_r))
    assert corr.pearson_r[best] > 0.8
    cos = torch.nn.functional.cosine_similarity(sae.W_dec[best].detach(), planted, dim=0)
    assert cos > 0.9  # the latent's decoder direction is the planted one
    assert res.metrics.explained_variance > 0.8
    assert res.mse_curve[-20:].mean() < 0.5 * res.mse_curve[:5].mean()


def test_same_weights_as_sae_lens_trainer_on_the_same_data(tiny_llama, tmp_path):
    """Through the toolkit or straight through SAE-Lens's SAETrainer: identical SAEs."""
    from sae_lens import SAETrainer, TrainingSAE

    x = torch.randn(700, 64, generator=torch.Generator().manual_seed(5))
    cfg = SAETrainConfig(expansion_factor=2, batch_size=100, training_tokens=100 * 15,
                         out_dir=str(tmp_path / "a"), seed=3, ce_loss=False)
    ours = train_sae(tiny_llama, HOOK, x, cfg, progress=False).sae

    def provider():  # seed s, epoch e: a permutation drawn from Generator(s + e)
        epoch = 0
        while True:
            perm = torch.randperm(700, generator=torch.Generator().manual_seed(3 + epoch))
            for i in range(0, 700 - 99, 100):
                yield x[perm[i:i + 100]]
            epoch += 1

    torch.manual_seed(3)
    sae = TrainingSAE.from_dict(training_sae_config(cfg, 64, "cpu", HOOK).to_dict())
    SAETrainer(cfg=trainer_config(cfg, "cpu"), sae=sae, data_provider=provider(),
               evaluator=None).fit()
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        torch.testing.assert_close(getattr(ours, name), getattr(sae, name).detach())


def test_smollm2_reconstruction_improves(smollm2, tmp_path):
    from em_interp.data import load_prompt_set

    prompts = load_prompt_set("harmful").sample(20, seed=0)
    hook = "blocks.12.hook_resid_post"
    cfg = SAETrainConfig(expansion_factor=2, l1_coefficient=5.0, lr=1e-3, batch_size=64,
                         training_tokens=64 * 200, eval_prompts=4,
                         out_dir=str(tmp_path / "smol"))
    res = train_sae(smollm2, hook, prompts, cfg, progress=False)
    m = res.metrics
    print(f"\nSmolLM2 {hook}: EV {m.explained_variance:.3f}, L0 {m.l0:.1f} of {m.d_sae}, "
          f"dead {m.dead_fraction:.1%}, CE recovered {m.ce_recovered:.3f} "
          f"(clean {m.ce_loss_clean:.3f}, SAE {m.ce_loss_sae:.3f}, zero {m.ce_loss_zero:.3f})")
    assert res.n_steps == 200
    assert res.mse_curve[-25:].mean() < 0.5 * res.mse_curve[:5].mean()
    assert m.explained_variance > 0.7
    assert m.l0 < m.d_sae / 4
    assert m.ce_loss_clean < m.ce_loss_sae < m.ce_loss_zero and m.ce_recovered > 0.5
    meta = json.loads((tmp_path / "smol" / "cfg.json").read_text())["metadata"]
    assert meta["hook_name"] == hook
    em = meta["em_interp"]
    assert (em["card"], em["variant"], em["hook"]) == ("smollm2-135m-instruct", "base", hook)
    assert em["data"]["kind"] == "prompts" and em["data"]["n_prompts"] == 20
    assert em["train_config"]["l1_coefficient"] == 5.0


def test_text_runner_path_and_reuse(tiny_llama, tmp_path, monkeypatch):
    import wandb

    def no_wandb(*a, **k):
        raise AssertionError("wandb must not be contacted")

    monkeypatch.setattr(wandb, "init", no_wandb)
    texts = tmp_path / "corpus.txt"
    texts.write_text("\n".join(f"Document {i}: the market rose and fell again today."
                               for i in range(40)))
    cfg = SAETrainConfig(expansion_factor=2, batch_size=64, training_tokens=64 * 12,
                         context_size=16, eval_prompts=4, out_dir=str(tmp_path / "t"))
    res = train_sae(tiny_llama, HOOK, texts, cfg, progress=False)
    folder = tmp_path / "t"
    assert {"cfg.json", "sae_weights.safetensors", "runner_cfg.json", "result"} <= {
        p.name for p in folder.iterdir()}
    assert res.n_steps == 12 and len(res.ev_curve) == 12 and res.data["kind"] == "text"
    assert res.metrics.ce_loss_clean is not None and res.metrics.on_training_data
    again = train_sae(tiny_llama, HOOK, texts, cfg, progress=False)  # reused, not retrained
    assert again.train_seconds == res.train_seconds and isinstance(again, SAETrainResult)
    assert torch.equal(again.sae.W_enc, load_sae(folder).W_enc)
    with pytest.raises(StoreMismatchError, match="config differs"):
        train_sae(tiny_llama, HOOK, texts, SAETrainConfig(**{**cfg.to_dict(), "lr": 1e-3}),
                  progress=False)
    loaded = SAETrainResult.load(folder / "result")
    assert loaded.to_dict() == res.to_dict()
    assert text_dataset(["a", "b"])["text"] == ["a", "b"]


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu"])
def test_other_architectures(tiny_llama, tmp_path, arch):
    x = torch.randn(600, 64, generator=torch.Generator().manual_seed(1))
    cfg = SAETrainConfig(architecture=arch, expansion_factor=2, k=8, batch_size=100,
                         training_tokens=100 * 10, n_batches_for_norm_estimate=2,
                         out_dir=str(tmp_path / arch))
    res = train_sae(tiny_llama, HOOK, iter(x.split(50) * 2), cfg, progress=False) if \
        arch == "topk" else train_sae(tiny_llama, HOOK, x, cfg, progress=False)
    saved = {"topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu"}[arch]
    assert res.sae.cfg.architecture() == saved
    if arch == "topk":
        assert (res.sae.encode(x) > 0).sum(-1).max() <= 8
        assert res.data == {"kind": "iterator"}


def test_errors(tiny_llama, tmp_path):
    with pytest.raises(ConfigError, match="architecture"):
        SAETrainConfig(architecture="gated")
    with pytest.raises(ConfigError, match="less than one batch"):
        SAETrainConfig(training_tokens=10, batch_size=100)
    with pytest.raises(DataError, match="fewer than one batch"):
        train_sae(tiny_llama, HOOK, torch.randn(10, 64), SAETrainConfig(
            batch_size=100, training_tokens=1000, out_dir=str(tmp_path / "e")), progress=False)
    store = ActivationStore.from_tensors(tmp_path / "s", {"blocks.0.hook_resid_post":
                                                          torch.randn(4, 64)})
    with pytest.raises(DataError, match="has no 'blocks.1.hook_resid_post'"):
        train_sae(tiny_llama, HOOK, store, progress=False)
    with pytest.raises(DataError, match="ran out"):
        train_sae(tiny_llama, HOOK, iter(torch.randn(150, 64).split(50)), SAETrainConfig(
            batch_size=100, training_tokens=500, out_dir=str(tmp_path / "i")), progress=False)
