"""Loading SAEs: Goodfire .pth files mapped exactly as SAE-Lens maps them, SAE-Lens folders,
and the checks that an SAE fits the model it is used with."""

import json

import pytest
import torch

from em_interp.errors import DataError, SAEMismatchError, WeightsUnavailableError
from em_interp.hooks import width as hook_width
from em_interp.sae import check_sae, load_sae, save_sae
from em_interp.sae.load import goodfire_pth_loader

D_IN, D_SAE = 64, 256  # tiny-random-llama has d_model 64


def goodfire_state(d_in=D_IN, d_sae=D_SAE, seed=0):
    """A random SAE in Goodfire's key layout (nn.Linear weights: [out, in])."""
    g = torch.Generator().manual_seed(seed)
    return {"encoder_linear.weight": torch.randn(d_sae, d_in, generator=g) / d_in ** 0.5,
            "encoder_linear.bias": torch.randn(d_sae, generator=g) * 0.1,
            "decoder_linear.weight": torch.randn(d_in, d_sae, generator=g) / d_sae ** 0.5,
            "decoder_linear.bias": torch.randn(d_in, generator=g) * 0.1}


class Payload:
    """Anything but tensors and plain containers needs full pickle: refused."""


@pytest.fixture
def goodfire_file(tmp_path):
    sd = goodfire_state()
    path = tmp_path / "Tiny-Instruct-SAE-l1.pth"
    torch.save(sd, path)
    return path, sd


def test_goodfire_encode_decode_match_the_formulas(goodfire_file):
    path, sd = goodfire_file
    sae = load_sae(path)
    assert type(sae).__name__ == "StandardSAE"
    assert sae.cfg.metadata.hook_name == "blocks.1.hook_resid_post"  # from "-l1" in the name
    assert (sae.cfg.d_in, sae.cfg.d_sae) == (D_IN, D_SAE)
    assert sae.cfg.apply_b_dec_to_input is False  # Goodfire: b_dec is not subtracted first
    x = torch.randn(7, 5, D_IN, generator=torch.Generator().manual_seed(1)) * 3
    z = sae.encode(x)
    by_hand = torch.relu(x @ sd["encoder_linear.weight"].T + sd["encoder_linear.bias"])
    torch.testing.assert_close(z, by_hand, rtol=1e-5, atol=1e-5)
    assert 0 < (z > 0).float().mean() < 1  # the test exercises both sides of the ReLU
    recon = z @ sd["decoder_linear.weight"].T + sd["decoder_linear.bias"]
    torch.testing.assert_close(sae.decode(z), recon, rtol=1e-5, atol=1e-5)


def test_goodfire_mapping_equals_sae_lens_own_loader(goodfire_file, monkeypatch):
    """SAE-Lens's hub loader, fed the same file, yields the same state dict."""
    from sae_lens.loading import pretrained_sae_loaders as L

    path, _ = goodfire_file
    monkeypatch.setattr(L, "hf_hub_download", lambda **kw: str(path))
    _, theirs, _ = L.get_goodfire_huggingface_loader(
        "Goodfire/Llama-3.1-8B-Instruct-SAE-l19", "Llama-3.1-8B-Instruct-SAE-l19.pth")
    _, ours = goodfire_pth_loader(path)
    assert set(theirs) == set(ours) == {"W_enc", "W_dec", "b_enc", "b_dec"}
    for k in theirs:
        assert torch.equal(theirs[k], ours[k]), k


def test_goodfire_release_name_gets_sae_lens_config(tmp_path):
    """A file named like SAE-Lens's Goodfire release gets that release's config, so a file of
    another shape under that name is refused."""
    from sae_lens.loading.pretrained_sae_loaders import get_goodfire_config_from_hf

    cfg = get_goodfire_config_from_hf("Goodfire/Llama-3.1-8B-Instruct-SAE-l19",
                                      "Llama-3.1-8B-Instruct-SAE-l19.pth", "cpu")
    assert cfg["hook_name"] == "blocks.19.hook_resid_post"  # BLOCK-EM's "layer 20"
    path = tmp_path / "Llama-3.1-8B-Instruct-SAE-l19.pth"
    torch.save(goodfire_state(), path)
    with pytest.raises(DataError, match="d_in=4096"):
        load_sae(path)


def test_goodfire_bad_files(tmp_path):
    bad = tmp_path / "not_goodfire.pth"
    torch.save({"W_enc": torch.zeros(2, 2)}, bad)
    with pytest.raises(DataError, match="encoder_linear"):
        load_sae(bad)

    unsafe = tmp_path / "unsafe.pth"
    torch.save({**goodfire_state(), "extra": Payload()}, unsafe)
    with pytest.raises(DataError, match="weights_only"):
        load_sae(unsafe)
    with pytest.raises(DataError, match="does not exist"):
        load_sae(str(tmp_path / "missing.pth"))
    with pytest.raises(DataError, match="not an SAE"):
        load_sae(tmp_path)


def test_save_load_round_trip_keeps_meta(goodfire_file, tmp_path):
    path, _ = goodfire_file
    sae = load_sae(path)
    folder = save_sae(sae, tmp_path / "saved", meta={"card": "tiny-random-llama", "data": "x"})
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["metadata"]["em_interp"] == {"card": "tiny-random-llama", "data": "x"}
    again = load_sae(folder)
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert torch.equal(getattr(sae, name), getattr(again, name))
    assert again.cfg.metadata.hook_name == "blocks.1.hook_resid_post"
    assert again.cfg.apply_b_dec_to_input is False


def test_check_sae_mismatches(tiny_llama, goodfire_file, tmp_path):
    path, _ = goodfire_file
    assert check_sae(tiny_llama, load_sae(path)) == "blocks.1.hook_resid_post"
    assert hook_width(tiny_llama.model, "blocks.0.mlp.hook_post") == 128
    assert hook_width(tiny_llama.model, "blocks.0.attn.hook_z") == 64
    assert hook_width(tiny_llama.model, "blocks.0.attn.hook_q") == 64  # measured by a forward

    narrow = tmp_path / "Narrow-SAE-l1.pth"
    torch.save(goodfire_state(d_in=32), narrow)
    with pytest.raises(SAEMismatchError, match="d_in=32.*width 64"):
        load_sae(narrow, model=tiny_llama)
    with pytest.raises(SAEMismatchError, match="not a hook point"):
        load_sae(path, hook_name="blocks.7.hook_resid_post", model=tiny_llama)
    with pytest.raises(SAEMismatchError, match="d_in=64.*width 128"):
        check_sae(tiny_llama, load_sae(path), "blocks.0.mlp.hook_post")
    anonymous = tmp_path / "anonymous.pth"
    torch.save(goodfire_state(), anonymous)
    with pytest.raises(SAEMismatchError, match="hook_name="):
        check_sae(tiny_llama, load_sae(anonymous))
    assert check_sae(tiny_llama, load_sae(anonymous, hook_name="blocks.2.hook_resid_pre")) == \
        "blocks.2.hook_resid_pre"


def test_release_offline_is_a_clear_error():
    with pytest.raises(WeightsUnavailableError, match="local path"):
        load_sae("goodfire-llama-3.1-8b-instruct", "layer_19")
    with pytest.raises(DataError, match="no SAE"):
        load_sae("goodfire-llama-3.1-8b-instruct", "layer_7")
