"""BLOCK-EM: find SAE latents that control emergent misalignment, then block them in fine-tuning.

Ustaomeroglu & Qu, "BLOCK-EM: Preventing Emergent Misalignment by Blocking Causal Features":

* :mod:`~em_interp.block_em.discovery` -- stages 1-3 (activation shifts, induce-and-repair
  screen, calibrated selection) and the versioned latent-set file (:class:`LatentSet`);
* :mod:`~em_interp.block_em.measures` -- behaviour measures for the screens and evaluations
  (the judge-free AB metric, or judges on generations);
* :mod:`~em_interp.block_em.loss` -- the one-sided blocking loss (eq. 11), the base reference
  from the disabled adapter, the KL baseline;
* :mod:`~em_interp.block_em.train` -- blocked / KL fine-tuning on the one LoRA SFT loop of
  :mod:`em_interp.training.lora`;
* :mod:`~em_interp.block_em.seeds` -- the effect as the paper states it: the reduction of the
  fine-tune's misalignment shift from the base per lambda, with t intervals over seeds;
* :mod:`~em_interp.block_em.sweep` -- lambda sweeps as resumable on-disk jobs, their evaluation
  and the paper's trade-off (Fig. 7) and per-epoch (Fig. 8) figures.

Importing this package imports torch (the submodules need it).
"""

from em_interp.block_em.discovery import (
    ActivationShifts,
    DiscoveryConfig,
    DiscoveryResult,
    Latent,
    LatentSet,
    activation_shifts,
    discover_latents,
    steer_scale,
)
from em_interp.block_em.loss import (
    ReferenceHidden,
    block_loss,
    kl_to_base,
    reference_hidden,
    sae_latents,
)
from em_interp.block_em.measures import ABBehaviour, Behaviour, BehaviourMeasure, JudgeBehaviour
from em_interp.block_em.seeds import ShiftReduction, shift_reduction
from em_interp.block_em.train import (
    Block,
    BlockEMConfig,
    BlockingRegularizer,
    KLRegularizer,
    train_blocked,
)

__all__ = [
    "ABBehaviour",
    "ActivationShifts",
    "Behaviour",
    "BehaviourMeasure",
    "Block",
    "BlockEMConfig",
    "BlockingRegularizer",
    "DiscoveryConfig",
    "DiscoveryResult",
    "JudgeBehaviour",
    "KLRegularizer",
    "Latent",
    "LatentSet",
    "ReferenceHidden",
    "ShiftReduction",
    "activation_shifts",
    "block_loss",
    "discover_latents",
    "kl_to_base",
    "reference_hidden",
    "sae_latents",
    "shift_reduction",
    "steer_scale",
    "train_blocked",
]
