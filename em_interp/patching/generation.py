"""Generation-time activation patching between two models (BLOCK-EM appendix F.1).

Both functions generate from **model A** (e.g. the re-emerged or misaligned organism) while
replacing its block-output states ``h_L = blocks.L.hook_resid_post`` by **model B**'s (e.g. the
base model) on the same tokens, then return the completions for the judges
(:class:`~em_interp.behaviour.generation.GenerationResult`, the same table as
:func:`~em_interp.behaviour.generation.generate`):

* :func:`prefix_patch` (F.1, Experiment 1) -- on the prompt (prefix) tokens only:
  ``h^A_{L, 1:T_pref} <- h^B_{L, 1:T_pref}``; model B runs the prompt once, stopped after block
  ``L``; model A's prefill runs with the patch, and decoding continues normally (A's cached keys
  and values above ``L`` carry the patched prefix);
* :func:`decode_patch` (F.1, Experiment 2) -- on the last position at every step:
  ``h^A_{L, t} <- h^B_{L, t}`` for the position that predicts each generated token (the last
  prompt token, then every generated token). Model B runs in lockstep on the same full prefix,
  with its own KV cache, stopped after block ``L``.

Both run :func:`~em_interp.behaviour.generation.generate` itself (its batching, sampling, stop tokens and
progress) with a ``step_hook`` (:data:`~em_interp.behaviour.generation.StepHook`) that runs model B on the
tokens A is fed and returns the replacing hook for that forward; B's cache drops the rows that
finish, as A's does.

Layers are 0-indexed blocks: BLOCK-EM's "layer 20" (the output of the 20th block, its blocking
layer) is ``layer=19``. Sampling is seeded per (prompt, sample) exactly as in
:func:`~em_interp.behaviour.generation.generate`, so ``decode_patch(A, A, L)`` and ``prefix_patch(A, A,
L)`` reproduce ``generate(A)``, and ``decode_patch(A, B, n_layers - 1)`` reproduces
``generate(B)`` (the last block's output decides the next token).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

from em_interp.behaviour.generation import DecodeState, GenerationResult, generate, keep_rows
from em_interp.errors import ConfigError
from em_interp.hooks import check_layer, resid_post
from em_interp.inputs import describe_model, model_device, unwrap


def _check_pair(model_a, model_b, layer: int) -> int:
    a, b = unwrap(model_a).cfg, unwrap(model_b).cfg
    for key in ("d_model", "n_layers"):
        if getattr(a, key) != getattr(b, key):
            raise ConfigError(f"model_b has {key}={getattr(b, key)}, model_a {getattr(a, key)}: "
                              "generation-time patching needs the same architecture.")
    return check_layer(unwrap(model_a), layer)


def _replace(h: torch.Tensor, last_only: bool) -> Callable:
    def hook(act, hook):
        act = act.clone()
        if last_only:
            act[:, -1] = h.to(act.device, act.dtype)
        else:
            act[:] = h.to(act.device, act.dtype)
        return act
    return hook


@torch.no_grad()
def _b_forward(tl_b, tokens, mask, layer: int, cache=None) -> torch.Tensor:
    return tl_b(tokens, attention_mask=mask, past_kv_cache=cache, stop_at_layer=layer + 1)


class _Patch:
    """The step hook (:data:`em_interp.behaviour.generation.StepHook`) of both patches: model B runs the
    tokens model A is fed (stopped after block ``layer``) and its state replaces A's there."""

    def __init__(self, mode: str, model_b, layer: int):
        self.mode, self.layer = mode, layer
        self.tl_b, self.device_b = unwrap(model_b), model_device(model_b)
        self.hook = resid_post(layer)
        self.b_state: DecodeState | None = None

    def __call__(self, step: int, tokens, mask, rows):
        tokens, mask = tokens.to(self.device_b), mask.to(self.device_b)
        if self.mode == "prefix":  # the prompt only: all its positions, no B cache needed
            return ([(self.hook, _replace(_b_forward(self.tl_b, tokens, mask, self.layer),
                                          last_only=False))] if step == 0 else None)
        if step == 0:  # a new batch: B's own KV cache, in lockstep with A's
            cache = TransformerLensKeyValueCache.init_cache(self.tl_b.cfg, self.tl_b.cfg.device,
                                                            tokens.shape[0])
            self.b_state = DecodeState(cache=cache, rows=rows.clone(), n_prompt=tokens.shape[1])
        elif len(rows) < len(self.b_state):  # rows that finished leave B's batch too
            keep_rows(self.b_state, torch.searchsorted(self.b_state.rows, rows.cpu()))
        h = _b_forward(self.tl_b, tokens, mask, self.layer, self.b_state.cache)[:, -1]
        return [(self.hook, _replace(h, last_only=True))]


def _patched_generate(mode: str, model_a, model_b, prompts, layer: int, *, max_new_tokens: int,
                      temperature: float, top_p: float, n_samples: int, seed: int,
                      batch_size: int, system: str | None, stop_at_eos: bool,
                      progress: bool) -> GenerationResult:
    if max_new_tokens < 1 or n_samples < 1 or batch_size < 1:
        raise ConfigError("max_new_tokens, n_samples and batch_size must be >= 1.")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ConfigError(f"temperature must be >= 0 and top_p in (0, 1]; got {temperature}, "
                          f"{top_p}.")
    layer = _check_pair(model_a, model_b, layer)
    res = generate(model_a, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                   top_p=top_p, n_samples=n_samples, seed=seed, batch_size=batch_size,
                   stop_at_eos=stop_at_eos, progress=progress, system=system,
                   step_hook=_Patch(mode, model_b, layer))
    settings = {**{k: v for k, v in res.settings.items() if k != "step_hook"}, "patch": mode,
                "layer": layer, "hook": resid_post(layer), "model_b": describe_model(model_b)}
    return dataclasses.replace(res, settings=settings)


def prefix_patch(model_a, model_b, prompts, layer: int, *, max_new_tokens: int = 64,
                 temperature: float = 0.0, top_p: float = 1.0, n_samples: int = 1,
                 seed: int = 0, batch_size: int = 8, system: str | None = None,
                 stop_at_eos: bool = True, progress: bool = True) -> GenerationResult:
    """Generate from ``model_a`` with its prompt-token states at ``layer`` taken from ``model_b``.

    Args:
        model_a: The model that generates (``Loaded``, e.g. ``load_pair(...).organism``).
        model_b: The model whose block-output states replace A's (e.g. the base model).
        prompts: User messages, conversations, a ``PromptSet`` or ``ChatTokens``.
        layer: The block whose output ``blocks.layer.hook_resid_post`` is patched (0-indexed;
            BLOCK-EM's layer 20 is 19).
        max_new_tokens: Most tokens per completion.
        temperature: 0 for greedy; the EM evaluations sample at 1.
        top_p: Nucleus mass.
        n_samples: Completions per prompt.
        seed: Seed of the per-(prompt, sample) generators (as in ``generate``).
        batch_size: Completions generated together.
        system: System prompt for text prompts.
        stop_at_eos: Stop at the model's stop tokens.
        progress: Show a progress bar.

    Returns:
        A :class:`~em_interp.behaviour.generation.GenerationResult` (``settings["patch"] == "prefix"``).
    """
    return _patched_generate("prefix", model_a, model_b, prompts, layer,
                             max_new_tokens=max_new_tokens, temperature=temperature,
                             top_p=top_p, n_samples=n_samples, seed=seed, batch_size=batch_size,
                             system=system, stop_at_eos=stop_at_eos, progress=progress)


def decode_patch(model_a, model_b, prompts, layer: int, *, max_new_tokens: int = 64,
                 temperature: float = 0.0, top_p: float = 1.0, n_samples: int = 1,
                 seed: int = 0, batch_size: int = 8, system: str | None = None,
                 stop_at_eos: bool = True, progress: bool = True) -> GenerationResult:
    """Generate from ``model_a`` with its last-position state at ``layer`` taken from ``model_b``
    at every step (model B runs the same growing prefix in lockstep).

    Args:
        model_a: The model that generates.
        model_b: The model whose state at ``layer`` replaces A's at the last position.
        prompts: User messages, conversations, a ``PromptSet`` or ``ChatTokens``.
        layer: The block whose output ``blocks.layer.hook_resid_post`` is patched (0-indexed).
        max_new_tokens: Most tokens per completion.
        temperature: 0 for greedy; the EM evaluations sample at 1.
        top_p: Nucleus mass.
        n_samples: Completions per prompt.
        seed: Seed of the per-(prompt, sample) generators (as in ``generate``).
        batch_size: Completions generated together.
        system: System prompt for text prompts.
        stop_at_eos: Stop at the model's stop tokens.
        progress: Show a progress bar.

    Returns:
        A :class:`~em_interp.behaviour.generation.GenerationResult` (``settings["patch"] == "decode"``).
    """
    return _patched_generate("decode", model_a, model_b, prompts, layer,
                             max_new_tokens=max_new_tokens, temperature=temperature,
                             top_p=top_p, n_samples=n_samples, seed=seed, batch_size=batch_size,
                             system=system, stop_at_eos=stop_at_eos, progress=progress)
