"""Store TransformerLens weights in HF's memory layout, so TL's forward stops copying them.

TL 3.9 keeps ``W_in``/``W_gate``/``W_out`` as ``[d_model, d_mlp]``-style matrices and, on every
forward, calls ``F.linear(x, W.T.contiguous())`` (gated MLP, unembed) or rearranges
``W_Q``/``W_O`` into HF's ``[out, in]`` shape. When the tensor is stored row-major in TL's shape,
each of those is a full copy of the weight per call -- on CPU the main reason TL's forward is
~1.5x slower than HF's.

The fix changes no values and no shapes: each parameter keeps its TL shape, but its storage is
the HF ``[out, in]`` matrix, so ``W.T`` *is* contiguous and ``.contiguous()`` returns it without
copying. It is applied to the model instances the toolkit builds (never to TL's classes), and the
equivalence tests check the logits against HF. Numerically it also matches HF's accumulation
order exactly, which matters in bf16.

When weights come straight from the HF model (no weight processing), TL's converters already
produce views with this layout, and :func:`relayout_to_hf` finds nothing to do.
"""

from __future__ import annotations

import torch
from torch import nn

# parameter leaf name -> the permutation that brings the TL shape to HF's storage order
_STORAGE_ORDER: dict[str, tuple[int, ...]] = {
    "W_Q": (0, 2, 1),  # [head, d_model, d_head] stored as [head, d_head, d_model]
    "W_K": (0, 2, 1),
    "W_V": (0, 2, 1),
    "_W_K": (0, 2, 1),
    "_W_V": (0, 2, 1),
    "W_O": (2, 0, 1),  # [head, d_head, d_model] stored as [d_model, head, d_head]
    "W_in": (1, 0),  # [d_model, d_mlp] stored as [d_mlp, d_model]
    "W_gate": (1, 0),
    "W_out": (1, 0),  # [d_mlp, d_model] stored as [d_model, d_mlp]
    "W_U": (1, 0),  # [d_model, d_vocab] stored as [d_vocab, d_model]
}


def _inverse(perm: tuple[int, ...]) -> tuple[int, ...]:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return tuple(inv)


def in_hf_layout(t: torch.Tensor, leaf: str) -> bool:
    """True when ``t`` (a TL weight named ``leaf``) is stored in HF's order."""
    order = _STORAGE_ORDER.get(leaf)
    return order is None or t.permute(order).is_contiguous()


def relayout_to_hf(model: nn.Module) -> int:
    """Re-store every linear weight of ``model`` in HF's layout, in place.

    Returns the number of parameters that were re-stored (0 when all already were).
    """
    changed = 0
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        order = _STORAGE_ORDER.get(leaf)
        if order is None or p.dim() != len(order) or in_hf_layout(p.data, leaf):
            continue
        p.data = p.data.permute(order).contiguous().permute(_inverse(order))
        changed += 1
    return changed


def untie_shared_storage(model: nn.Module) -> int:
    """Give every parameter its own storage (e.g. tied ``W_E``/``W_U`` of SmolLM2).

    TL's weight processing writes parameters in place one by one; two parameters sharing memory
    would then overwrite each other. Returns the number of parameters copied.
    """
    seen: set[int] = set()
    copied = 0
    for p in model.parameters():
        ptr = p.data.untyped_storage().data_ptr()
        if ptr in seen:
            p.data = p.data.clone(memory_format=torch.preserve_format)
            copied += 1
        else:
            seen.add(ptr)
    return copied
