"""SAE latents of prompts, token-averaged over real tokens (BLOCK-EM's z-bar).

For a prompt ``x`` with hidden states ``h_t`` at the SAE's hook, the SAE gives per-token latents
``z_t = E(h_t)`` (BLOCK-EM A.1 eq. 2) and the prompt's summary is their average over its real
tokens (A.2 eq. 3, ``T(x) = {1..T}``):

    z_bar_k(x) = 1/|T(x)| * sum_{t in T(x)} z_{t,k}(x)

:func:`encode` computes ``z_bar`` (``reduce="mean"``), the last real token's latents
(``reduce="last"``) or every real token's (``reduce="none"``) for any prompts, in batches that
are left-padded with a mask: padding never enters an average. Each forward stops right after the
SAE's block (``stop_at_layer``).

:func:`encode_activations` is the same map on an activation tensor you already have and keeps
gradients (BLOCK-EM's blocking loss differentiates ``z_bar`` of the fine-tuned model's hidden
states); :func:`decoder_directions` returns rows of ``W_dec`` (latent ``k``'s direction ``d_k``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from jaxtyping import Float, Int
from tqdm.auto import tqdm

from em_interp.hooks import layer_of
from em_interp.inputs import Reduce, n_prompts, pool, token_batches, unwrap
from em_interp.sae.load import check_sae


def encode_activations(sae, acts: Float[torch.Tensor, "... d_in"],
                       attention_mask: Int[torch.Tensor, "batch pos"] | None = None,
                       reduce: Reduce = "none") -> torch.Tensor | list[torch.Tensor]:
    """Latents of activations ``acts`` (differentiable: gradients flow to ``acts``).

    Args:
        sae: an SAE-Lens SAE.
        acts: ``[..., d_in]`` activations (``[batch, pos, d_in]`` when reducing over positions).
        attention_mask: ``[batch, pos]``, 1 for real tokens; ``None`` = every position is real.
        reduce: ``"none"`` -> ``sae.encode(acts)`` ``[..., d_sae]`` (with a mask: a list of
            ``[n_real, d_sae]`` per row); ``"mean"`` -> ``z_bar`` ``[batch, d_sae]`` over real
            tokens; ``"last"`` -> the last real token's latents ``[batch, d_sae]``.
    """
    z = sae.encode(acts.to(sae.W_enc.device))
    if attention_mask is None:
        if reduce == "none":
            return z
        if z.ndim < 3:
            raise ValueError(f"reduce={reduce!r} needs activations [batch, pos, d_in], got "
                             f"{tuple(acts.shape)}")
        attention_mask = torch.ones(z.shape[:2], dtype=torch.long, device=z.device)
    return pool(z, attention_mask.to(z.device), reduce)


def decoder_directions(sae, latents: int | Sequence[int] | torch.Tensor | None = None, *,
                       normalize: bool = False) -> Float[torch.Tensor, "n d_in"]:
    """Rows of ``W_dec`` (latent ``k``'s decoder direction ``d_k``), ``[len(latents), d_in]``.

    ``latents=None`` returns all of ``W_dec``; ``normalize=True`` divides each row by its norm.
    The rows are views of the SAE's parameter (detached): copy before editing them.
    """
    w = sae.W_dec.detach()
    if latents is not None:
        idx = torch.as_tensor([latents] if isinstance(latents, int) else latents,
                              dtype=torch.long, device=w.device)
        w = w[idx]
    return w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12) if normalize else w


def hook_activation_batches(model, hook: str, prompts, *, batch_size: int = 8,
                            chat: bool = True, system: str | None = None
                            ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield ``(start, tokens, attention_mask, acts)`` per left-padded batch of ``prompts``.

    ``acts`` is the activation at ``hook`` ``[batch, pos, ...]`` from a forward stopped right
    after the hook's block. Batches are those of :func:`em_interp.inputs.token_batches`.
    """
    tl = unwrap(model)
    layer = layer_of(hook)
    stop = None if layer is None else layer + 1
    grabbed: dict[str, torch.Tensor] = {}

    def grab(act, hook):
        grabbed["acts"] = act

    for batch in token_batches(model, prompts, batch_size, chat=chat, system=system):
        toks = batch.tokens
        tl.run_with_hooks(toks.tokens, attention_mask=toks.attention_mask, return_type=None,
                          stop_at_layer=stop, fwd_hooks=[(hook, grab)])
        yield batch.start, toks.tokens, toks.attention_mask, grabbed.pop("acts")


@torch.no_grad()
def encode(model, sae, prompts, reduce: Reduce = "mean", *, hook_name: str | None = None,
           batch_size: int = 8, chat: bool = True, system: str | None = None,
           progress: bool = True) -> Float[torch.Tensor, "batch d_sae"] | list[torch.Tensor]:
    """SAE latents of ``prompts`` (any input :func:`em_interp.inputs.tokenize` accepts).

    Args:
        model: a ``Loaded`` or ``HookedTransformer``.
        sae: an SAE-Lens SAE (checked against the model first).
        prompts: strings, conversations, a ``PromptSet``, ``ChatTokens`` or token ids.
        reduce: ``"mean"`` (z-bar over real tokens), ``"last"`` (last real token) or ``"none"``
            (a list of ``[n_real_tokens, d_sae]``, one per prompt).
        hook_name: read this hook instead of the SAE's own.
        batch_size: prompts per forward.
        chat: apply the chat template (once) to text prompts.
        system: a system message for text prompts.
        progress: show a progress bar.

    Returns:
        ``[n_prompts, d_sae]`` float32 on the CPU (``"mean"``/``"last"``), else a list.
    """
    hook = check_sae(model, sae, hook_name)
    out: list[torch.Tensor] = []
    n = n_prompts(prompts)
    bar = tqdm(total=n, desc="SAE encode", disable=not progress, leave=False)
    for _, _, mask, acts in hook_activation_batches(model, hook, prompts, batch_size=batch_size,
                                                     chat=chat, system=system):
        z = encode_activations(sae, acts, mask, reduce)
        if reduce == "none":
            out.extend(t.float().cpu() for t in z)
        else:
            out.append(z.float().cpu())
        bar.update(acts.shape[0])
    bar.close()
    return out if reduce == "none" else torch.cat(out)
