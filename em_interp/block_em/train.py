"""BLOCK-EM fine-tuning and the KL baseline: regularisers plugged into the one LoRA SFT loop.

:func:`train_blocked` runs :func:`em_interp.training.lora.train_lora` with

* :class:`BlockingRegularizer` -- ``lambda * L_block`` (eq. 11, :func:`~.loss.block_loss`) at one
  or more blocking layers. Per micro-batch the base latents come from the same PEFT model with its
  adapter disabled, without grad, stopped after the deepest blocking layer
  (:func:`~.loss.reference_hidden`), or, with ``reference="second_model"``, from a second frozen
  copy of the base (the paper's way, for comparison). The trained forward's output of each
  blocking layer is captured by a forward hook and encoded with the SAE (only the blocked
  latents are computed for a ReLU SAE). ``freeze_after=True`` freezes every LoRA parameter above
  the deepest blocking layer (the paper's stronger variant, Sec. 4.2 / Fig. 12).
* :class:`KLRegularizer` -- ``lambda_KL * KL(p_theta || p_base)`` on the SFT positions, the base
  logits again from the disabled adapter.

Ablations (App. D.1, E.1) are :meth:`~.discovery.LatentSet.variant` of the latent set
(``plus_only``, ``minus_only``, ``shuffled_signs``, ``random``, ``top_delta``); several blocking
layers are several ``(sae, latent_set)`` blocks. Per-step logs (in the run's
:class:`~em_interp.training.lora.LoRATrainResult`): ``loss`` / ``loss_ema`` (SFT), ``block_loss``
(unweighted ``L_block`` summed over blocks), ``kl``.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch

from em_interp.block_em.discovery import LatentSet
from em_interp.block_em.loss import (
    FrozenModelReference,
    block_loss,
    capture_layers,
    hf_layer_of_hook,
    kl_to_base,
    reference_hidden,
    sae_latents,
)
from em_interp.errors import ConfigError
from em_interp.training.lora import (
    LoRATrainConfig,
    LoRATrainResult,
    Regularizer,
    SFTBatch,
    load_base_hf,
    sft_logits,
    train_lora,
)

log = logging.getLogger(__name__)

Reference = Literal["disabled_adapter", "second_model"]
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass
class Block:
    """One blocking layer: an SAE and the signed latents to block with it."""

    sae: object
    latent_set: LatentSet

    def __post_init__(self):
        self.latent_set.check(self.sae)


class BlockingRegularizer(Regularizer):
    """``lam * L_block`` at the blocks' layers (see the module docstring)."""

    name: ClassVar[str] = "block_em"

    def __init__(self, blocks: Sequence[Block], lam: float, *,
                 reference: Reference = "disabled_adapter", reference_model=None,
                 freeze_after: bool = False):
        if not blocks:
            raise ConfigError("BLOCK-EM needs at least one (sae, latent_set) block.")
        if lam < 0:
            raise ConfigError(f"the blocking strength lambda must be >= 0, got {lam}.")
        if reference not in ("disabled_adapter", "second_model"):
            raise ConfigError(f"reference must be 'disabled_adapter' or 'second_model', got "
                              f"{reference!r}.")
        if reference == "second_model" and reference_model is None:
            raise ConfigError("reference='second_model' needs reference_model= (a frozen HF "
                              "copy of the base; train_blocked loads one).")
        self.blocks = list(blocks)
        self.lam = float(lam)
        self.reference = reference
        self.frozen = FrozenModelReference(reference_model) if reference_model is not None \
            else None
        self.freeze_after = freeze_after
        self.layers: list[int] = []
        self._base: list[torch.Tensor] = []
        self._captured: dict[int, torch.Tensor] = {}

    def setup(self, model, n_layers: int) -> None:
        self.layers = [hf_layer_of_hook(b.latent_set.hook, n_layers) for b in self.blocks]
        self._idx = []
        for b in self.blocks:
            idx = list(b.latent_set.indices)
            self._idx.append((idx, [i for i, lat in enumerate(b.latent_set.latents)
                                    if lat.sign > 0],
                              [i for i, lat in enumerate(b.latent_set.latents) if lat.sign < 0]))
        if self.freeze_after:
            top = max(self.layers)
            frozen = 0
            for name, p in model.named_parameters():
                m = _LAYER.search(name)
                if "lora_" in name and m and int(m.group(1)) > top:
                    p.requires_grad_(False)
                    frozen += 1
            log.info("froze %d LoRA tensors above blocking layer %d", frozen, top)

    def _encode(self, hidden: Callable[[int], torch.Tensor]) -> list[torch.Tensor]:
        """SAE latents of each block, from ``hidden(layer)``, the output of that layer."""
        return [sae_latents(b.sae, hidden(layer), idx[0])
                for b, layer, idx in zip(self.blocks, self.layers, self._idx, strict=True)]

    def before_forward(self, model, batch: SFTBatch) -> None:
        with torch.no_grad():
            if self.frozen is not None:
                hidden = self.frozen.hidden(batch.input_ids, batch.attention_mask, self.layers)
            else:
                hidden = reference_hidden(model, batch.input_ids, batch.attention_mask,
                                          self.layers)
            self._base = [z.detach() for z in self._encode(hidden.at)]

    def trained_forward(self, model):
        @contextlib.contextmanager
        def ctx():
            with capture_layers(model, self.layers) as out:
                yield
            self._captured = dict(out)

        return ctx()

    def loss(self, model, batch: SFTBatch, logits: torch.Tensor):
        z_theta = self._encode(self._captured.__getitem__)
        total = 0.0
        logs = {}
        for j, (zt, zb, (_, kp, km)) in enumerate(zip(z_theta, self._base, self._idx,
                                                      strict=True)):
            term = block_loss(zt, zb.to(zt.device), kp, km, batch.token_mask.to(zt.device))
            total = total + term
            if len(self.blocks) > 1:
                logs[f"block_loss_{self.layers[j]}"] = float(term.detach())
        self._captured, self._base = {}, []
        logs["block_loss"] = float(total.detach()) if torch.is_tensor(total) else 0.0
        return self.lam * total, logs

    def describe(self) -> dict:
        return {"name": self.name, "lambda": self.lam, "reference": self.reference,
                "freeze_after": self.freeze_after,
                "blocks": [{"hook": b.latent_set.hook, "n_plus": len(b.latent_set.k_plus),
                            "n_minus": len(b.latent_set.k_minus),
                            "variant": b.latent_set.variant_name} for b in self.blocks]}


class KLRegularizer(Regularizer):
    """``lam * KL(p_theta || p_base)`` on the SFT positions, base from the disabled adapter."""

    name: ClassVar[str] = "kl"

    def __init__(self, lam: float):
        if lam < 0:
            raise ConfigError(f"lambda_KL must be >= 0, got {lam}.")
        self.lam = float(lam)
        self._base = None

    def before_forward(self, model, batch: SFTBatch) -> None:
        with torch.no_grad(), model.disable_adapter():
            self._base = sft_logits(model, batch)

    def loss(self, model, batch: SFTBatch, logits: torch.Tensor):
        kl = kl_to_base(logits, self._base)
        self._base = None
        return self.lam * kl, {"kl": float(kl.detach())}

    def describe(self) -> dict:
        return {"name": self.name, "lambda": self.lam}


@dataclass(frozen=True)
class BlockEMConfig:
    """What to add to the SFT loss (see :func:`train_blocked`)."""

    method: Literal["sft", "block_em", "kl"] = "block_em"
    """``sft`` (no regulariser), ``block_em`` (the blocking loss) or ``kl`` (the baseline)."""
    lam: float = 1e3
    """lambda of the blocking loss, or lambda_KL for ``kl``."""
    variant: str = "full"
    """Latent-set ablation: ``full``, ``plus_only``, ``minus_only``, ``shuffled_signs``,
    ``random``, ``top_delta`` (see :meth:`LatentSet.variant`)."""
    variant_seed: int = 0
    """Seed of the ``shuffled_signs`` / ``random`` variants."""
    freeze_after: bool = False
    """Freeze every LoRA parameter above the deepest blocking layer."""
    reference: Reference = "disabled_adapter"
    """Where the base activations come from: the same model with the adapter disabled, or a
    second frozen copy of the base."""

    def __post_init__(self):
        if self.method not in ("sft", "block_em", "kl"):
            raise ConfigError(f"BlockEMConfig.method must be 'sft', 'block_em' or 'kl', got "
                              f"{self.method!r}.")
        if self.lam < 0:
            raise ConfigError(f"BlockEMConfig.lam must be >= 0, got {self.lam}.")
        if self.reference not in ("disabled_adapter", "second_model"):
            raise ConfigError(f"BlockEMConfig.reference {self.reference!r} is not "
                              "'disabled_adapter' or 'second_model'.")
        from em_interp.block_em.discovery import VARIANTS

        if self.variant not in VARIANTS:
            raise ConfigError(f"BlockEMConfig.variant {self.variant!r} is not one of "
                              f"{list(VARIANTS)}.")

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


def make_blocks(blocks, cfg: BlockEMConfig, *, shifts=None) -> list[Block]:
    """``[Block]`` from ``(sae, latent_set)`` pairs, with ``cfg.variant`` applied."""
    out = []
    for item in blocks:
        sae, ls = item if isinstance(item, tuple) else (item.sae, item.latent_set)
        if isinstance(ls, str | Path):
            ls = LatentSet.load(ls)
        ls = ls.variant(cfg.variant, seed=cfg.variant_seed, shifts=shifts)
        out.append(Block(sae, ls))
    return out


def train_blocked(card_or_loaded, dataset, lora: LoRATrainConfig | None = None,
                  cfg: BlockEMConfig | None = None, out_dir: str | Path | None = None, *,
                  blocks: Sequence = (), shifts=None, progress: bool = True,
                  model=None) -> LoRATrainResult:
    """LoRA SFT with the BLOCK-EM loss, the KL baseline, or nothing added.

    Args:
        card_or_loaded: the base model's card (or base ``Loaded``), as for ``train_lora``.
        dataset: the SFT data (a ``PromptSet`` of chats, a shipped set's name, a JSONL file).
        lora: the LoRA recipe (:class:`~em_interp.training.lora.LoRATrainConfig`).
        cfg: the :class:`BlockEMConfig` (method, lambda, variant, freezing, reference).
        out_dir: the run folder (see ``train_lora``).
        blocks: ``(sae, latent_set)`` pairs (a latent set may be a path to its JSON file), one
            per blocking layer; needed for ``block_em``.
        shifts: stage-1 :class:`~.discovery.ActivationShifts` (for ``variant="top_delta"``).
        progress: show a progress bar.
        model: ``(card, base_dir, hf_model, tokenizer)`` from
            :func:`~em_interp.training.lora.load_base_hf`, to reuse a loaded HF model.

    Returns:
        The run's :class:`~em_interp.training.lora.LoRATrainResult` (``block_loss`` / ``kl`` logged).
    """
    lora = lora or LoRATrainConfig()
    cfg = cfg or BlockEMConfig()
    model = model or load_base_hf(card_or_loaded, dtype=lora.dtype, device=lora.device,
                                  progress=progress)
    regs: list[Regularizer] = []
    if cfg.method == "block_em":
        if not blocks:
            raise ConfigError("method 'block_em' needs blocks=[(sae, latent_set), ...].")
        ref_model = None
        if cfg.reference == "second_model":
            ref_model = load_base_hf(model[0], dtype=lora.dtype,
                                     device=str(next(model[2].parameters()).device))[2]
        regs.append(BlockingRegularizer(make_blocks(blocks, cfg, shifts=shifts), cfg.lam,
                                        reference=cfg.reference, reference_model=ref_model,
                                        freeze_after=cfg.freeze_after))
    elif cfg.method == "kl":
        regs.append(KLRegularizer(cfg.lam))
    return train_lora(card_or_loaded, dataset, lora, out_dir, regularizers=regs,
                      progress=progress, model=model)


__all__ = [
    "Block",
    "BlockEMConfig",
    "BlockingRegularizer",
    "KLRegularizer",
    "make_blocks",
    "train_blocked",
]
