"""Sparse autoencoders through SAE-Lens: train, load (incl. Goodfire ``.pth``), encode, splice,
feature analysis.

A thin layer over SAE-Lens: every SAE is an ``sae_lens.SAE`` (standard, TopK, BatchTopK saved as
JumpReLU, JumpReLU), trained by SAE-Lens's ``SAETrainer`` / ``LanguageModelSAETrainingRunner`` and
loaded by its loaders; em-interp feeds them the toolkit's models, prompts and activation stores,
checks that an SAE fits the model it is used with, and returns :class:`~em_interp.results.Result`
objects.

* :mod:`~em_interp.sae.load` -- :func:`load_sae` (release + id, SAE-Lens folder, Goodfire
  ``.pth``), :func:`save_sae`, :func:`check_sae` (:class:`~em_interp.errors.SAEMismatchError`);
* :mod:`~em_interp.sae.train` -- :func:`train_sae`, :class:`SAETrainConfig`,
  :class:`SAETrainResult`;
* :mod:`~em_interp.sae.evaluate` -- :func:`evaluate_sae` (explained variance, L0, dead latents,
  CE-loss recovered);
* :mod:`~em_interp.sae.encode` -- :func:`encode` (z-bar over real tokens, BLOCK-EM eq. 3),
  :func:`encode_activations` (differentiable), :func:`decoder_directions`;
* :mod:`~em_interp.sae.splice` -- :func:`splice_sae`: the SAE in the forward with its error term,
  latent ablation / clamping / steering, composable with :mod:`em_interp.behaviour.interventions`;
* :mod:`~em_interp.sae.features` -- :func:`analyze_features`, :func:`feature_correlations`
  (Figs. 14-15 of the Qwen paper);
* :mod:`~em_interp.sae.trajectories` -- :func:`latent_trajectories` over generation steps,
  under interventions;
* :mod:`~em_interp.sae.late_layer` -- :func:`late_layer_sae_analysis`, the paper's analysis in
  one call.

Layers are 0-indexed: BLOCK-EM's "layer 20" = Goodfire's ``layer_19`` =
``blocks.19.hook_resid_post``; the Qwen paper's L62 = ``blocks.62.hook_resid_post``.

SAE-Lens itself is imported only when a function needs it.
"""

from em_interp.sae.encode import decoder_directions, encode, encode_activations
from em_interp.sae.evaluate import SAEMetrics, evaluate_sae
from em_interp.sae.features import (
    FeatureAnalysis,
    FeatureCorrelations,
    analyze_features,
    feature_correlations,
)
from em_interp.sae.late_layer import LateLayerSAEResult, late_layer_sae_analysis, paper_config
from em_interp.sae.load import (
    check_sae,
    describe_sae,
    goodfire_pth_loader,
    load_sae,
    sae_hook_name,
    save_sae,
)
from em_interp.sae.splice import SAESplice, splice_sae
from em_interp.sae.train import SAETrainConfig, SAETrainResult, text_dataset, train_sae
from em_interp.sae.trajectories import TrajectoryResult, latent_trajectories

__all__ = [
    "FeatureAnalysis",
    "FeatureCorrelations",
    "LateLayerSAEResult",
    "SAEMetrics",
    "SAESplice",
    "SAETrainConfig",
    "SAETrainResult",
    "TrajectoryResult",
    "analyze_features",
    "check_sae",
    "decoder_directions",
    "describe_sae",
    "encode",
    "encode_activations",
    "evaluate_sae",
    "feature_correlations",
    "goodfire_pth_loader",
    "late_layer_sae_analysis",
    "latent_trajectories",
    "load_sae",
    "paper_config",
    "sae_hook_name",
    "save_sae",
    "splice_sae",
    "text_dataset",
    "train_sae",
]
