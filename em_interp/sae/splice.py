"""Splicing an SAE into a live forward, with the error term, and editing its latents there.

At the SAE's hook the activation ``x`` is replaced by the SAE's reconstruction of *edited*
latents plus the SAE's error on the *unedited* ones (SAE-Lens's ``use_error_term=True``):

    z  = E(x)                      latents of the clean activation
    z' = edit(z)                   ablate: z'_k = 0;  clamp: z'_k = c;  steer: z'_k = z_k + a
    x' = D(z') + (x - D(z))        = x + D(z') - D(z)

With nothing edited ``x' = x`` exactly (the logits are the model's own). For the linear decoders
of standard, TopK and JumpReLU SAEs (``D(z) = z W_dec + b_dec``), ablating latent ``k`` moves the
activation by exactly its decoder contribution, ``x' = x - z_k W_dec[k]``, and steering by ``a``
adds ``a W_dec[k]``: the latent interventions of the Qwen paper (Sec. V) and BLOCK-EM's steering
screens (Sec. 3.1, A.3), read in the SAE's basis. ``error_term=False`` instead replaces ``x`` by
the bare reconstruction ``D(z')`` (what "CE loss with the SAE" measures).

:class:`SAESplice` is an :class:`em_interp.behaviour.interventions.Intervention`: a reusable context
manager with ``.fwd_hooks()``, ``.describe()`` and ``.state()``, so it composes with head
ablation, steering and the rest (``compose(splice_sae(...), ablate_heads(...))``) and runs under
:func:`em_interp.behaviour.generation.generate`. ``positions="generated"`` edits only generated tokens
(the mask :func:`em_interp.behaviour.interventions.generated_positions` sets). With ``record=True`` it
keeps the latents of the last forward (``.latents``, ``[batch, pos, d_sae]`` before editing).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch

from em_interp.behaviour.interventions import Intervention, current_generated_positions
from em_interp.errors import ConfigError
from em_interp.sae.load import check_sae, describe_sae


class SAESplice(Intervention):
    """An SAE spliced in at its hook, optionally ablating, clamping or steering latents (see
    :func:`splice_sae`)."""

    kind = "sae_splice"

    def __init__(self, model, sae, *, hook_name: str | None = None,
                 ablate: Sequence[int] = (), clamp: Mapping[int, float] | None = None,
                 steer: Mapping[int, float] | None = None, error_term: bool = True,
                 positions: Literal["all", "generated"] = "all", record: bool = False):
        super().__init__(model)
        self.sae = sae
        self.hook = check_sae(self.model, sae, hook_name)
        if positions not in ("all", "generated"):
            raise ConfigError(f"positions must be 'all' or 'generated', got {positions!r}.")
        self.ablate = sorted({int(k) for k in ablate})
        self.clamp = {int(k): float(v) for k, v in (clamp or {}).items()}
        self.steer = {int(k): float(v) for k, v in (steer or {}).items()}
        d_sae = int(sae.cfg.d_sae)
        for k in (*self.ablate, *self.clamp, *self.steer):
            if not 0 <= k < d_sae:
                raise ConfigError(f"latent {k} is out of range: the SAE has d_sae={d_sae} "
                                  f"latents (0..{d_sae - 1}).")
        both = set(self.ablate) & set(self.clamp)
        if both:
            raise ConfigError(f"latents {sorted(both)} are both ablated and clamped; pick one.")
        self.error_term = bool(error_term)
        self.positions = positions
        self.record = bool(record)
        self.latents: torch.Tensor | None = None
        """The latents ``E(x)`` of the last forward (``record=True``), on the CPU."""

    @property
    def edits(self) -> bool:
        """True when the splice changes any latent."""
        return bool(self.ablate or self.clamp or self.steer)

    def _edit(self, z: torch.Tensor) -> torch.Tensor:
        z2 = z.clone()
        if self.ablate:
            z2[..., self.ablate] = 0.0
        for k, v in self.clamp.items():
            z2[..., k] = v
        for k, v in self.steer.items():
            z2[..., k] = z2[..., k] + v
        return z2

    def _hooks(self):
        sae = self.sae

        def hook(act, hook):
            x = act.to(sae.W_enc.device)
            z = sae.encode(x)
            if self.record:
                self.latents = z.detach().float().cpu()
            if not self.edits and self.error_term:
                return act  # x + D(z) - D(z): the activation itself, bit for bit
            z2 = self._edit(z)
            if self.positions == "generated":
                mask = current_generated_positions()
                if mask is None:
                    z2 = z
                else:
                    m = mask.to(z.device).reshape(*mask.shape, *([1] * (z.ndim - 2)))
                    z2 = torch.where(m, z2, z)
            new = sae.decode(z2)
            if self.error_term:
                new = x + (new - sae.decode(z)).to(x.dtype)
            return new.to(act.device, act.dtype)

        return [(self.hook, hook)]

    def describe(self) -> dict:
        return {"kind": self.kind, "hook": self.hook, "sae": describe_sae(self.sae),
                "ablate": self.ablate, "clamp": self.clamp, "steer": self.steer,
                "error_term": self.error_term, "positions": self.positions}

    def state(self) -> dict[str, torch.Tensor]:
        """The decoder rows of the edited latents (what the edit adds or removes)."""
        idx = sorted({*self.ablate, *self.clamp, *self.steer})
        if not idx:
            return {}
        return {"W_dec_rows": self.sae.W_dec.detach()[idx].float().cpu().clone(),
                "latents": torch.tensor(idx, dtype=torch.long)}


def splice_sae(model, sae, *, hook_name: str | None = None, ablate: Sequence[int] = (),
               clamp: Mapping[int, float] | None = None,
               steer: Mapping[int, float] | None = None, error_term: bool = True,
               positions: Literal["all", "generated"] = "all",
               record: bool = False) -> SAESplice:
    """Splice ``sae`` into ``model`` at its hook (module docstring), editing chosen latents.

    Args:
        model: a ``Loaded`` or ``HookedTransformer``.
        sae: an SAE-Lens SAE (checked against the model: hook and ``d_in``).
        hook_name: splice at this hook instead of the SAE's own.
        ablate: latents set to 0.
        clamp: ``{latent: value}`` latents set to a value.
        steer: ``{latent: alpha}`` added to latents (adds ``alpha * W_dec[k]`` to the stream).
        error_term: keep the SAE's error, so only the edit changes the activation (default);
            ``False`` replaces the activation by the bare reconstruction.
        positions: ``"all"`` positions, or only ``"generated"`` ones (see
            :func:`em_interp.behaviour.interventions.generated_positions`).
        record: keep the unedited latents of the last forward in ``.latents``.

    Returns:
        An :class:`SAESplice` (``with splice: ...``, or ``fwd_hooks()`` for ``run_with_hooks``).

    Raises:
        SAEMismatchError: the SAE does not fit the model.
        ConfigError: a latent index out of range, or ablated and clamped at once.
    """
    return SAESplice(model, sae, hook_name=hook_name, ablate=ablate, clamp=clamp, steer=steer,
                     error_term=error_term, positions=positions, record=record)
