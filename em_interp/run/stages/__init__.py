"""The stages of a run, in order (see :mod:`em_interp.run.pipeline` for caching and resuming).

================= ============================================================ ==================
stage             what it computes                                             reads
================= ============================================================ ==================
probing           Experiment 1: per-layer probes with controls                 --
refusal_direction Arditi et al.'s refusal direction: chosen, ablated, added    --
introspection     Experiment 2 and the EM-vs-refusal cosine per layer          refusal_direction
patching          layer x component patching, forward and reverse; heads       introspection
dla               direct logit attribution; logit lens before/after ablation   --
asr               attack-success rate under zero / mean / random ablation      dla,
                                                                               refusal_direction
sae               an SAE on a late layer; feature / refusal correlation        --
block_em          latent discovery (AB metric); blocked vs unblocked fine-tune sae
em_eval           the EM papers' protocol: sampled answers, judged; EM rates   --
                  (only when named: it needs an aligned/coherent judge)
================= ============================================================ ==================
"""

from __future__ import annotations

from em_interp.run.stage import Stage
from em_interp.run.stages import asr, em_eval, paper, refusal, sae_block_em

STAGES: dict[str, Stage] = {
    "probing": Stage("probing", "Probing (Experiment 1)", paper.probing),
    "refusal_direction": Stage("refusal_direction", "The refusal direction (Arditi et al.)",
                               refusal.refusal_direction),
    "introspection": Stage("introspection", "Introspection (Experiment 2)", paper.introspection,
                           reads=("refusal_direction",)),
    "patching": Stage("patching", "Activation patching", paper.patching,
                      reads=("introspection",)),
    "dla": Stage("dla", "Direct logit attribution and logit lens", paper.dla),
    "asr": Stage("asr", "Attack-success rate under ablation", asr.asr,
                 reads=("dla", "refusal_direction")),
    "sae": Stage("sae", "A sparse autoencoder on a late layer", sae_block_em.sae),
    "block_em": Stage("block_em", "BLOCK-EM", sae_block_em.block_em, reads=("sae",)),
    "em_eval": Stage("em_eval", "Emergent-misalignment rate", em_eval.em_eval),
}
