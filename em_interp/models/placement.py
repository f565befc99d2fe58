"""Split a model's blocks across several CUDA devices (``n_devices``).

TL 3.9 places blocks by free memory (``get_best_available_device``) but moves the residual
stream between blocks by an index formula (``get_device_for_block_index``); the two can disagree
(TransformerLens issue 907), and then a block receives its input on the wrong device. The
toolkit computes the placement itself with :func:`block_devices` -- contiguous ranges, the same
formula TL uses to route the residual and to build KV caches, so all three agree -- loads the HF
weights straight onto those devices (:func:`hf_device_map`), and :func:`place_model` moves every
TL module there and adds a pre-hook that moves each block's inputs to the block's device.

Formula: block ``i`` of ``n_layers`` goes to device ``first + (i * n_devices) // n_layers``.
Embedding on the first device, final norm and unembedding on the last.
"""

from __future__ import annotations

import torch
from torch import nn

from em_interp.errors import DeviceError


def block_devices(n_layers: int, n_devices: int) -> list[int]:
    """Device index (0-based, relative) of each block: contiguous, sizes differ by at most one."""
    if n_layers < 1 or n_devices < 1:
        raise ValueError(f"need n_layers >= 1 and n_devices >= 1, got {n_layers}, {n_devices}")
    if n_devices > n_layers:
        raise DeviceError(
            f"n_devices={n_devices} is more than the model's {n_layers} blocks; use at most "
            f"{n_layers} devices."
        )
    return [(i * n_devices) // n_layers for i in range(n_layers)]


def hf_device_map(n_layers: int, n_devices: int, first: int = 0) -> dict[str, int]:
    """An HF ``device_map`` that puts each decoder layer where :func:`block_devices` says."""
    placement = block_devices(n_layers, n_devices)
    last = first + n_devices - 1
    dm = {"model.embed_tokens": first, "model.rotary_emb": first}
    dm.update({f"model.layers.{i}": first + d for i, d in enumerate(placement)})
    dm.update({"model.norm": last, "lm_head": last})
    return dm


def check_devices(device: str | torch.device, n_devices: int) -> list[torch.device]:
    """Validate a request for ``n_devices`` starting at ``device``; return the device list."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(
            f"device {str(device)!r} was asked for, but CUDA is not available here (torch "
            f"{torch.__version__}). Pass device='cpu', or install a CUDA build of torch."
        )
    if n_devices == 1:
        return [device]
    if device.type != "cuda":
        raise DeviceError(
            f"n_devices={n_devices} needs CUDA devices, but the device is {device.type!r}. "
            "Pass n_devices=1 on a CPU-only machine."
        )
    first = device.index or 0
    available = torch.cuda.device_count()
    if first + n_devices > available:
        raise DeviceError(
            f"n_devices={n_devices} starting at cuda:{first} needs {first + n_devices} CUDA "
            f"devices, but {available} are visible (CUDA_VISIBLE_DEVICES="
            f"{__import__('os').environ.get('CUDA_VISIBLE_DEVICES', 'unset')}). Pass a smaller "
            "n_devices, or make more GPUs visible."
        )
    return [torch.device("cuda", first + k) for k in range(n_devices)]


def _to_device_pre_hook(device: torch.device):
    def hook(module, args, kwargs):
        args = tuple(a.to(device) if torch.is_tensor(a) else a for a in args)
        kwargs = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in kwargs.items()}
        return args, kwargs

    return hook


def place_model(model: nn.Module, devices: list[torch.device]) -> None:
    """Move a ``HookedTransformer``'s modules to ``devices`` per :func:`block_devices`."""
    n_layers = len(model.blocks)
    placement = block_devices(n_layers, len(devices))
    model.embed.to(devices[0])
    model.hook_embed.to(devices[0])
    if hasattr(model, "pos_embed"):
        model.pos_embed.to(devices[0])
    for i, block in enumerate(model.blocks):
        dev = devices[placement[i]]
        block.to(dev)
        if len(devices) > 1:
            block.register_forward_pre_hook(_to_device_pre_hook(dev), with_kwargs=True)
    if hasattr(model, "ln_final"):
        model.ln_final.to(devices[-1])
    model.unembed.to(devices[-1])
    model.cfg.device = str(devices[0])
    model.cfg.n_devices = len(devices)
