"""Mean activations over a reference prompt set, the fill values of mean ablation.

``reference_means(model, prompts, hook_names)`` averages each hook's activation over the real
(non-pad) tokens of a reference prompt set (or over each prompt's last token)::

    mean_h = sum_{b, p : mask[b, p] = 1} act_h[b, p] / sum_{b, p} mask[b, p]

batched through :func:`em_interp.inputs.token_batches` (left-padded, chat template once),
accumulated in float64, with the forward stopped after the deepest hooked block. Mean ablation
(:func:`em_interp.behaviour.interventions.ablate_heads` with ``mode="mean"``) replaces a head's output by
this mean, as the Qwen introspection paper does for L62H12 and L62H28 (Sec. V, Fig. 11), with
the mean taken over its jailbreak and benign prompts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from tqdm.auto import tqdm

from em_interp import hooks as H
from em_interp.errors import ConfigError
from em_interp.inputs import n_prompts, prompts_hash, token_batches, unwrap


@torch.no_grad()
def reference_means(model, prompts, hook_names: Sequence[str], *, batch_size: int = 8,
                    over: Literal["tokens", "last"] = "tokens", system: str | None = None,
                    progress: bool = False) -> dict[str, torch.Tensor]:
    """Mean activation of each hook over a reference prompt set, for mean ablation.

    Args:
        model: a ``Loaded`` or ``HookedTransformer`` (text prompts need a tokenizer).
        prompts: anything :func:`em_interp.inputs.token_batches` accepts (a ``PromptSet``, strings,
            conversations, ``ChatTokens``).
        hook_names: hook points to average, e.g. ``["blocks.62.attn.hook_z"]``.
        batch_size: prompts per forward.
        over: ``"tokens"`` averages over every real (non-pad) token of every prompt;
            ``"last"`` over each prompt's last token only.
        system: system prompt for text prompts.
        progress: show a progress bar.

    Returns:
        ``{hook_name: mean}`` with the activation's trailing shape (``[n_heads, d_head]`` for
        ``attn.hook_z``), in the model's dtype, accumulated in float64. The forward stops after
        the deepest hooked block.
    """
    tl = unwrap(model)
    names = list(dict.fromkeys(hook_names))
    for name in names:
        H.check_hook(tl, name)
    if over not in ("tokens", "last"):
        raise ConfigError(f"over must be 'tokens' or 'last', got {over!r}.")
    blocks = [H.layer_of(n) for n in names]
    stop = None if any(b is None for b in blocks) else max(blocks) + 1
    sums: dict[str, torch.Tensor] = {}
    count = 0
    mask_box: dict[str, torch.Tensor] = {}

    def grab(act, hook):
        mask = mask_box["mask"].to(act.device).bool()
        if over == "tokens":
            w = mask.reshape(*mask.shape, *([1] * (act.ndim - 2))).to(torch.float64)
            total = (act.to(torch.float64) * w).sum((0, 1))
        else:
            pos = torch.arange(mask.shape[1], device=mask.device)
            last = (mask * pos).argmax(-1)
            total = act[torch.arange(act.shape[0], device=act.device), last].to(
                torch.float64).sum(0)
        total = total.cpu()
        sums[hook.name] = sums[hook.name] + total if hook.name in sums else total

    n = n_prompts(prompts)
    bar = tqdm(total=n, desc="reference means", disable=not progress, leave=False)
    with H.attached(tl, [(name, grab) for name in names]):
        for batch in token_batches(model, prompts, batch_size, system=system):
            mask_box["mask"] = batch.tokens.attention_mask
            tl(batch.tokens.tokens, attention_mask=batch.tokens.attention_mask,
               return_type=None, stop_at_layer=stop)
            count += (int(batch.tokens.attention_mask.sum()) if over == "tokens"
                      else len(batch.tokens))
            bar.update(len(batch.tokens))
    bar.close()
    return {name: (sums[name] / count).to(tl.cfg.dtype) for name in names}


def describe_reference(reference) -> dict | None:
    """JSON-safe description of a ``reference=`` argument: the prompts' count and hash, or the
    names and hash of given means."""
    if reference is None:
        return None
    if isinstance(reference, Mapping):
        h = hashlib.sha256()
        for k in sorted(reference):
            h.update(k.encode())
            h.update(reference[k].detach().float().cpu().numpy().tobytes())
        return {"given_means": sorted(reference), "hash": h.hexdigest()[:16]}
    if hasattr(reference, "describe") and hasattr(reference, "prompts"):
        return reference.describe()
    return {"n": n_prompts(reference), "hash": prompts_hash(reference)}
