"""The BLOCK-EM loss, its base-model reference, and the KL-to-base baseline.

**Blocking loss** (BLOCK-EM Sec. 3.2, App. A.5 eq. 11). With ``z^theta_{t,k}`` the SAE latents of
the model being fine-tuned and ``z^base_{t,k}`` those of the frozen base at the blocking layer,
on the completion tokens ``T_SFT(x)`` of each example::

    L_block(x) = 1/|T_SFT(x)| sum_{t in T_SFT(x)} [ sum_{k in K+} ReLU(z^theta_{t,k} - z^base_{t,k})^2
                                                  + sum_{k in K-} ReLU(z^base_{t,k} - z^theta_{t,k})^2 ]
    L_block    = 1/B sum_i L_block(x_i)              L_total = L_SFT + lambda * L_block

It is one-sided and sign-aware: a ``K+`` latent moving *down* or a ``K-`` latent moving *up*
costs nothing (no loss, no gradient); it is zero exactly when the model's latents equal the
base's, e.g. at step 0 of LoRA training (``B = 0``).

**The base reference without a second model.** The base activations come from the *same* PEFT
model with its adapter disabled (``disable_adapter()``) under ``no_grad``, and the forward stops
right after the blocking layer: a forward hook on that decoder layer stores its output and raises
a private exception that ends the forward. No second copy of the weights is held, and the layers
above the blocking layer are not run. :class:`FrozenModelReference` is the paper's way (a second,
frozen model), kept for comparison (``benchmarks/bench_block_em.py``).

**Which activation.** TransformerLens's ``blocks.L.hook_resid_post`` equals the output of HF
decoder layer ``L`` (``hidden_states[L + 1]``; for the last layer before the final norm), and
``blocks.L.hook_resid_pre`` the output of layer ``L - 1`` (the embeddings for ``L = 0``). An SAE
trained on either TL hook is applied to the matching HF output (:func:`hf_layer_of_hook`).

**KL baseline** (Sec. 4.2): ``L_SFT + lambda_KL * KL(p_theta || p_base)`` on the positions of the
SFT loss, with ``p_base`` again from the disabled adapter::

    KL = 1/|T| sum_{t in T} sum_v p_theta(v | x_<t) (log p_theta(v | x_<t) - log p_base(v | x_<t))
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float

from em_interp.errors import ConfigError, SAEMismatchError
from em_interp.training.lora import decoder_layers


class _StopForward(Exception):
    """Raised by the reference hook once the deepest blocking layer has run."""


# ------------------------------------------------------------------ the loss


def block_loss(z_theta: Float[torch.Tensor, "batch pos n_latents"],
               z_base: Float[torch.Tensor, "batch pos n_latents"],
               k_plus: Sequence[int] | torch.Tensor, k_minus: Sequence[int] | torch.Tensor,
               mask: Bool[torch.Tensor, "batch pos"] | None = None) -> Float[torch.Tensor, ""]:
    """The one-sided, sign-aware blocking loss of eq. 11, averaged over examples.

    Args:
        z_theta: latents of the model being trained (with gradient), last axis indexed by
            ``k_plus`` / ``k_minus`` (all ``d_sae`` latents, or just the selected ones).
        z_base: the base model's latents on the same tokens (no gradient needed).
        k_plus: indices (into the last axis) of latents whose *increase* is penalised.
        k_minus: indices of latents whose *decrease* is penalised.
        mask: the completion tokens ``T_SFT`` ``[batch, pos]``; ``None``: every position.
            Examples without a completion token are left out of the batch mean.

    Returns:
        A scalar: the mean over examples of the per-example mean over completion tokens.
    """
    if z_theta.shape != z_base.shape:
        raise ValueError(f"z_theta {tuple(z_theta.shape)} and z_base {tuple(z_base.shape)} "
                         "differ in shape.")
    dev = z_theta.device
    kp = torch.as_tensor(k_plus, dtype=torch.long, device=dev).reshape(-1)
    km = torch.as_tensor(k_minus, dtype=torch.long, device=dev).reshape(-1)
    z_base = z_base.detach().to(z_theta.dtype)
    per_token = z_theta.new_zeros(z_theta.shape[:-1])
    if kp.numel():
        per_token = per_token + torch.relu(z_theta[..., kp] - z_base[..., kp]).pow(2).sum(-1)
    if km.numel():
        per_token = per_token + torch.relu(z_base[..., km] - z_theta[..., km]).pow(2).sum(-1)
    if mask is None:
        mask = torch.ones(per_token.shape, dtype=torch.bool, device=dev)
    if per_token.ndim == 1:  # a single example [pos]
        per_token, mask = per_token[None], mask.reshape(1, -1)
    m = mask.to(dev, per_token.dtype)
    n = m.sum(-1)
    per_example = (per_token * m).sum(-1) / n.clamp_min(1)
    keep = n > 0
    if not bool(keep.any()):
        return per_token.sum() * 0.0
    return per_example[keep].mean()


def kl_to_base(logits: Float[torch.Tensor, "n d_vocab"],
               base_logits: Float[torch.Tensor, "n d_vocab"]) -> Float[torch.Tensor, ""]:
    """``KL(p_theta || p_base)`` per position, averaged over positions (float32)."""
    lp = torch.log_softmax(logits.float(), -1)
    lq = torch.log_softmax(base_logits.detach().float(), -1)
    return (lp.exp() * (lp - lq)).sum(-1).mean()


# ------------------------------------------------------------------ SAE latents


def hf_layer_of_hook(hook_name: str, n_layers: int) -> int:
    """The HF decoder layer whose output is TL's ``hook_name`` (``-1``: the embeddings).

    Only residual-stream hooks map onto a layer output: ``blocks.L.hook_resid_post`` is layer
    ``L``, ``blocks.L.hook_resid_pre`` layer ``L - 1``.
    """
    m = re.fullmatch(r"blocks\.(\d+)\.hook_resid_(post|pre)", hook_name or "")
    if m is None:
        raise SAEMismatchError(
            f"BLOCK-EM trains on the HF model and reads decoder-layer outputs, so the SAE must "
            f"read a residual-stream hook (blocks.L.hook_resid_post or hook_resid_pre), not "
            f"{hook_name!r}. Train or load an SAE on resid_post.")
    layer = int(m.group(1)) - (m.group(2) == "pre")
    if not -1 <= layer < n_layers:
        raise SAEMismatchError(f"the SAE reads {hook_name!r}, but the model has {n_layers} "
                               f"blocks (0..{n_layers - 1}).")
    return layer


def sae_latents(sae, acts: Float[torch.Tensor, "... d_in"],
                latents: Sequence[int] | torch.Tensor) -> Float[torch.Tensor, "... n_latents"]:
    """``sae.encode(acts)[..., latents]``, differentiable, computing only those latents when
    the SAE allows it (a ReLU ``StandardSAE``: ``relu(process_sae_in(x) @ W_enc[:, K] +
    b_enc[K])``); any other architecture encodes every latent and selects."""
    idx = torch.as_tensor(latents, dtype=torch.long, device=sae.W_enc.device).reshape(-1)
    x = acts.to(sae.W_enc.device)
    if type(sae).__name__ == "StandardSAE" and isinstance(sae.activation_fn, torch.nn.ReLU) \
            and not _has_hooks(sae):
        pre = sae.process_sae_in(x) @ sae.W_enc[:, idx] + sae.b_enc[idx]
        return torch.relu(pre)
    return sae.encode(x)[..., idx]


def _has_hooks(sae) -> bool:
    return any(getattr(m, "_forward_hooks", None) for m in (
        getattr(sae, "hook_sae_acts_pre", None), getattr(sae, "hook_sae_acts_post", None),
        getattr(sae, "hook_sae_input", None)) if m is not None)


# ------------------------------------------------------------------ capturing layer outputs


def _output_tensor(out):
    return out[0] if isinstance(out, tuple) else out


@contextlib.contextmanager
def capture_layers(model, layers: Sequence[int], *, stop: bool = False
                   ) -> Iterator[dict[int, torch.Tensor]]:
    """Store the outputs of decoder ``layers`` (``-1``: the embeddings) of the next forward.

    With ``stop=True`` the forward is ended right after the deepest of them (the caller runs it
    inside ``contextlib.suppress(StopForward)``, or uses :func:`reference_hidden`).
    """
    blocks = decoder_layers(model)
    out: dict[int, torch.Tensor] = {}
    deepest = max(layers)
    handles = []

    def make(i):
        def hook(module, args, output):
            out[i] = _output_tensor(output)
            if stop and i == deepest:
                raise _StopForward

        return hook

    try:
        for i in set(layers):
            if i == -1:
                hf = model.get_base_model() if hasattr(model, "get_base_model") else model
                handles.append(hf.get_input_embeddings().register_forward_hook(make(i)))
            else:
                handles.append(blocks[i].register_forward_hook(make(i)))
        yield out
    finally:
        for h in handles:
            h.remove()


@dataclass(frozen=True)
class ReferenceHidden:
    """What :func:`reference_hidden` returns: the base model's outputs of some decoder layers on
    one batch, without gradient."""

    layers: tuple[int, ...]
    """The decoder layers, sorted (``-1``: the embeddings)."""
    hidden: tuple[Float[torch.Tensor, "batch pos d_model"], ...]
    """``hidden[i]`` is the output of decoder layer ``layers[i]`` (detached)."""

    def at(self, layer: int) -> Float[torch.Tensor, "batch pos d_model"]:
        """The output of decoder ``layer``."""
        if layer not in self.layers:
            raise ConfigError(f"layer {layer} was not captured (the reference holds layers "
                              f"{list(self.layers)}); pass it in reference_hidden's layers.")
        return self.hidden[self.layers.index(layer)]


@torch.no_grad()
def reference_hidden(model, input_ids, attention_mask, layers: Sequence[int], *,
                     disable_adapter: bool = True) -> ReferenceHidden:
    """Outputs of decoder ``layers`` of the base model on a batch, without gradient.

    With ``disable_adapter`` (a PEFT model) the adapter is switched off for this forward, so the
    trained model itself is the base; the forward stops after the deepest layer.

    Returns:
        A :class:`ReferenceHidden` (``.at(layer)`` is ``[batch, pos, d_model]``).
    """
    ctx = model.disable_adapter() if disable_adapter else contextlib.nullcontext()
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = getattr(hf, hf.base_model_prefix)
    with ctx, capture_layers(model, layers, stop=True) as out, \
            contextlib.suppress(_StopForward):
        decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    missing = set(layers) - set(out)
    if missing:
        raise RuntimeError(f"the reference forward did not reach layers {sorted(missing)}.")
    order = tuple(sorted(set(int(i) for i in layers)))
    return ReferenceHidden(layers=order, hidden=tuple(out[i].detach() for i in order))


class FrozenModelReference:
    """The paper's reference: a second, frozen copy of the base (HF) model.

    Costs a second set of weights; :func:`reference_hidden` with ``disable_adapter=True`` gives
    the same activations from the trained model itself.
    """

    def __init__(self, hf_model):
        self.model = hf_model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def hidden(self, input_ids, attention_mask, layers: Sequence[int]) -> ReferenceHidden:
        return reference_hidden(self.model, input_ids, attention_mask, layers,
                                disable_adapter=False)


def check_layers(layers: Sequence[int], n_layers: int) -> list[int]:
    """Validated, sorted blocking layers."""
    out = sorted(set(int(i) for i in layers))
    if not out or out[0] < -1 or out[-1] >= n_layers:
        raise ConfigError(f"blocking layers {out} are outside the model's layers -1..{n_layers - 1}"
                          " (-1 = the embeddings).")
    return out


__all__ = [
    "FrozenModelReference",
    "ReferenceHidden",
    "block_loss",
    "capture_layers",
    "check_layers",
    "hf_layer_of_hook",
    "kl_to_base",
    "reference_hidden",
    "sae_latents",
]
