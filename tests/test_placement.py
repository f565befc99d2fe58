"""n_devices placement: a pure function, checked against TL's own residual routing."""

from types import SimpleNamespace

import pytest
import torch
from conftest import hf_model
from transformer_lens.utilities.multi_gpu import get_device_for_block_index

import em_interp
from em_interp import DeviceError
from em_interp.models.placement import block_devices, check_devices, hf_device_map


@pytest.mark.parametrize("n_devices", [1, 2, 3, 4, 8])
def test_64_layers_contiguous_balanced_and_agrees_with_tl(n_devices):
    placement = block_devices(64, n_devices)
    assert len(placement) == 64
    assert placement[0] == 0 and placement[-1] == n_devices - 1
    assert all(b - a in (0, 1) for a, b in zip(placement, placement[1:], strict=False))
    sizes = [placement.count(d) for d in range(n_devices)]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 64
    # TL moves the residual (and builds KV caches) with its index formula; they must agree.
    cfg = SimpleNamespace(device="cuda:0", n_devices=n_devices, n_layers=64)
    assert placement == [get_device_for_block_index(i, cfg).index for i in range(64)]


def test_expected_splits():
    assert [block_devices(64, 3).count(d) for d in range(3)] == [22, 21, 21]
    assert [block_devices(64, 8).count(d) for d in range(8)] == [8] * 8
    with pytest.raises(DeviceError, match="more than the model's 2 blocks"):
        block_devices(2, 3)


def test_hf_device_map_covers_every_weight(tiny_llama):
    hf = hf_model(tiny_llama.weights_dir)
    dm = hf_device_map(3, 2, first=1)
    names = [n for n, _ in hf.named_parameters()] + [n for n, _ in hf.named_buffers()]
    for n in names:
        assert any(n == k or n.startswith(k + ".") for k in dm), n
    assert dm["model.layers.0"] == 1 and dm["model.layers.2"] == 2 and dm["lm_head"] == 2


def test_more_devices_than_visible_is_a_clear_error(monkeypatch):
    with pytest.raises(DeviceError, match="needs CUDA devices"):
        check_devices("cpu", 2)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(DeviceError, match="needs 2 CUDA devices, but 1 are visible"):
        check_devices("cuda:0", 2)
    with pytest.raises(DeviceError):
        em_interp.load("tiny-random-llama", device="cpu", n_devices=2, progress=False)
    with pytest.raises(DeviceError, match="card 'qwen2.5-32b-instruct-risky-financial-advice' "
                                          "defaults to n_devices=2.*Pass n_devices=1"):
        em_interp.load("qwen2.5-32b-instruct-risky-financial-advice", device="cuda",
                       progress=False)


def test_cuda_without_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="CUDA is not available"):
        em_interp.load("tiny-random-llama", device="cuda", progress=False)


def test_single_device_model_is_all_on_it(tiny_llama):
    assert {p.device.type for p in tiny_llama.model.parameters()} == {"cpu"}
    assert tiny_llama.model.cfg.n_devices == 1


def test_place_model_puts_each_module_where_the_placement_says():
    """Two 'devices' on a CPU-only machine: cpu and meta (no forward, just where things live)."""
    from em_interp.models.placement import place_model

    lm = em_interp.load("tiny-random-llama", "base", progress=False)
    devices = [torch.device("cpu"), torch.device("meta")]
    place_model(lm.model, devices)
    placement = block_devices(3, 2)
    for i, block in enumerate(lm.model.blocks):
        assert {p.device for p in block.parameters()} == {devices[placement[i]]}
        assert len(block._forward_pre_hooks) == 1  # moves the block's inputs to its device
    assert lm.model.embed.W_E.device.type == "cpu"
    assert lm.model.unembed.W_U.device.type == "meta"
    assert lm.model.ln_final.w.device.type == "meta"
    assert (lm.model.cfg.device, lm.model.cfg.n_devices) == ("cpu", 2)
