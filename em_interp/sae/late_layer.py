"""One call for the Qwen paper's SAE analysis (Sec. V, Figs. 14-15): train an SAE on a late
layer's residual stream of the organism over a prompt set, then correlate every latent with
refusal.

On the real organism (Qwen2.5-32B-Instruct fine-tuned on risky financial advice, 64 layers) the
paper trains on layer 62's residual stream (``blocks.62.hook_resid_post``; layers 0-indexed as
in TransformerLens) with expansion factor 23 and L1 coefficient 0.05, on 500 JailbreakBench
prompts, and plots each latent's mean activation against its Pearson correlation with refusal.
:func:`late_layer_sae_analysis` defaults to the same layer position (``n_layers - 2``: 62 on the
64-layer Qwen, 28 on the 30-layer SmolLM2) and expansion factor, with the toolkit's sparsity
default (inputs normalised to mean norm sqrt(d_in), L1 coefficient 5). The paper's L1 coefficient
of 0.05 is in its own (unstated) loss normalisation: in SAE-Lens's convention
(``sum_k z_k ||W_dec[k]||``, MSE summed over ``d_in``) on raw SmolLM2 residuals (norm ~400 at
layer 24) it gives no sparsity (measured: L0 2325 of 13248 latents, EV 0.994), so
:func:`paper_config` (the literal numbers) is offered but not the default. Check
``result.train.metrics.l0`` and pass your own :class:`~em_interp.sae.train.SAETrainConfig`.

The label per prompt is, in order of preference: ``labels=`` given; ``labels="refusal"``: the
model's own greedy answer judged by a refusal judge (default
:class:`em_interp.behaviour.judges.RefusalStringJudge`; 1 = refused); otherwise the ``PromptSet``'s labels
(e.g. 1 = harmful on the shipped ``harmful`` set).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import pandas as pd

from em_interp.data import user_text
from em_interp.errors import DataError
from em_interp.hooks import check_layer, resid_post
from em_interp.inputs import as_prompt_list, unwrap
from em_interp.results import Result
from em_interp.sae.features import FeatureAnalysis, analyze_features
from em_interp.sae.train import SAETrainConfig, SAETrainResult, train_sae

PAPER_EXPANSION_FACTOR = 23
PAPER_L1_COEFFICIENT = 0.05


def paper_config(**overrides) -> SAETrainConfig:
    """The Qwen paper's SAE numbers taken literally (standard SAE, expansion factor 23, L1
    coefficient 0.05 on raw activations), with ``overrides`` (any :class:`SAETrainConfig`
    field). See the module docstring: in SAE-Lens's loss this L1 is far too weak to be sparse."""
    return SAETrainConfig(**{"architecture": "standard",
                             "expansion_factor": PAPER_EXPANSION_FACTOR,
                             "l1_coefficient": PAPER_L1_COEFFICIENT,
                             "normalize_activations": "none", **overrides})


def default_config(**overrides) -> SAETrainConfig:
    """The default of :func:`late_layer_sae_analysis`: expansion factor 23 (the paper's) with
    the toolkit's sparsity (normalised inputs, L1 coefficient 5), plus ``overrides``."""
    return SAETrainConfig(**{"architecture": "standard",
                             "expansion_factor": PAPER_EXPANSION_FACTOR, **overrides})


@dataclasses.dataclass(frozen=True)
class LateLayerSAEResult(Result):
    """The trained SAE and the correlation of its latents with the label."""

    kind = "late_layer_sae"
    layer: int
    hook: str
    label_source: str
    """Where the labels came from: ``"given"``, ``"refusal judge (<name>)"``, ``"prompt set"``."""
    labels: tuple[float, ...]
    train: SAETrainResult
    features: FeatureAnalysis
    generations: pd.DataFrame | None = None
    """The judged answers when the labels came from a refusal judge."""

    @property
    def sae(self):
        """The trained SAE."""
        return self.train.sae

    @property
    def df(self) -> pd.DataFrame:
        """The per-latent correlation table (``pearson_r`` descending)."""
        return self.features.df

    def to_dict(self) -> dict:
        return {"layer": self.layer, "hook": self.hook, "label_source": self.label_source,
                "n_prompts": len(self.labels),
                "label_rate": sum(self.labels) / len(self.labels) if self.labels else None,
                "train": self.train.to_dict(), "features": self.features.to_dict()}

    def figure(self, kind: str = "scatter", **kwargs):
        """``"scatter"`` (Fig. 14) / ``"bars"`` of the latents, or ``"training"``."""
        if kind == "training":
            return self.train.figure(**kwargs)
        return self.features.figure(kind, **kwargs)


def late_layer_sae_analysis(model, prompts, *, layer: int | None = None,
                            labels: Sequence[float] | str | None = None,
                            cfg: SAETrainConfig | None = None, train_data=None,
                            eval_prompts=None, judge=None,
                            max_new_tokens: int = 48, top_k: int = 10, n_examples: int = 5,
                            batch_size: int = 8, system: str | None = None,
                            progress: bool = True) -> LateLayerSAEResult:
    """Train an SAE on a late layer's residual stream and correlate its latents with refusal.

    Args:
        model: the organism (a ``Loaded`` or ``HookedTransformer``).
        prompts: the analysis prompts (a ``PromptSet`` or text prompts), e.g. JailbreakBench or
            the shipped ``harmful`` set.
        layer: the block whose ``hook_resid_post`` is used; default ``n_layers - 2`` (62 on the
            64-layer Qwen2.5-32B).
        labels: one number per prompt; ``"refusal"`` to generate and judge; ``None``: the
            prompt set's labels.
        cfg: SAE training settings; default :func:`default_config` (expansion 23, normalised
            inputs, L1 5).
        train_data: what to train the SAE on (default: ``prompts``); anything
            :func:`~em_interp.sae.train.train_sae` accepts (a store, text, ...).
        eval_prompts: prompts held out from ``train_data`` for the SAE's quality metrics
            (:func:`~em_interp.sae.evaluate.held_out_split`); default: the first training
            prompts, flagged ``metrics.on_training_data``.
        judge: the refusal judge for ``labels="refusal"`` (default ``RefusalStringJudge()``).
        max_new_tokens: answer length for ``labels="refusal"``.
        top_k: latents kept on each side of the correlation ranking.
        n_examples: top-activating prompts per kept latent.
        batch_size: prompts per forward.
        system: a system message for text prompts.
        progress: show progress bars.

    Returns:
        :class:`LateLayerSAEResult`.
    """
    tl = unwrap(model)
    layer = check_layer(tl, tl.cfg.n_layers - 2 if layer is None else layer)
    hook = resid_post(layer)
    generations = None
    if isinstance(labels, str):
        if labels != "refusal":
            raise DataError(f"labels must be numbers, 'refusal' or None, got {labels!r}.")
        from em_interp.behaviour.generation import generate
        from em_interp.behaviour.judges import RefusalStringJudge

        judge = judge or RefusalStringJudge()
        gen = generate(model, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                       system=system, progress=progress)
        questions = [user_text(p) for p in as_prompt_list(prompts)]
        answers = list(gen.df.sort_values("prompt_index")["completion"])
        scores = judge.score_many(list(zip(questions, answers, strict=True)), progress=False)
        labels = [1.0 if s.refused else 0.0 for s in scores]
        generations = gen.df.drop(columns=["tokens"], errors="ignore").assign(refused=labels)
        source, name = f"refusal judge ({getattr(judge, 'name', type(judge).__name__)})", \
            "refused"
    elif labels is None:
        if getattr(prompts, "labels", None) is None:
            raise DataError("no labels: pass labels=, labels='refusal', or a labelled PromptSet.")
        labels = list(prompts.labels)
        source = "prompt set"
        name = (getattr(prompts, "label_names", {}) or {}).get(1) or "label"
    else:
        labels, source, name = list(labels), "given", "label"
    train = train_sae(model, hook, prompts if train_data is None else train_data,
                      cfg or default_config(), eval_prompts=eval_prompts, progress=progress)
    features = analyze_features(model, train.sae, prompts, labels, label_name=name,
                                top_k=top_k, n_examples=n_examples, batch_size=batch_size,
                                system=system, progress=progress)
    return LateLayerSAEResult(layer=layer, hook=hook, label_source=source,
                              labels=tuple(float(x) for x in labels), train=train,
                              features=features, generations=generations)
