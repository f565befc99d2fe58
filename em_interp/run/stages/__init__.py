"""The stages of a run, in order (see :mod:`em_interp.run.pipeline` for caching and resuming).

=============== ============================================================ ==============
stage           what it computes                                             reads
=============== ============================================================ ==============
probing         Experiment 1: per-layer probes with controls                 --
introspection   Experiment 2 and the EM-vs-refusal cosine per layer           --
patching        layer x component patching, forward and reverse; heads        introspection
dla             direct logit attribution; logit lens before/after ablation    --
asr             attack-success rate under zero / mean / random ablation       dla
sae             an SAE on a late layer; feature / refusal correlation         --
block_em        latent discovery (AB metric); blocked vs unblocked fine-tune  sae
=============== ============================================================ ==============
"""

from __future__ import annotations

from em_interp.run.stage import Stage
from em_interp.run.stages import paper, sae_block_em

STAGES: dict[str, Stage] = {
    "probing": Stage("probing", "Probing (Experiment 1)", paper.probing),
    "introspection": Stage("introspection", "Introspection (Experiment 2)", paper.introspection),
    "patching": Stage("patching", "Activation patching", paper.patching,
                      reads=("introspection",)),
    "dla": Stage("dla", "Direct logit attribution and logit lens", paper.dla),
    "asr": Stage("asr", "Attack-success rate under ablation", paper.asr, reads=("dla",)),
    "sae": Stage("sae", "A sparse autoencoder on a late layer", sae_block_em.sae),
    "block_em": Stage("block_em", "BLOCK-EM", sae_block_em.block_em, reads=("sae",)),
}
