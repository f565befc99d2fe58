"""em-interp: mechanistic interpretability of emergent misalignment.

Load a model organism and its base into TransformerLens, then analyse them with native hook
points. Importing this package has no side effects (no patching, no downloads).

    >>> import em_interp
    >>> em_interp.list_cards()                                  # doctest: +SKIP
    >>> lm = em_interp.load("smollm2-135m-instruct")            # doctest: +SKIP
    >>> toks = lm.chat_tokens("What is a bond?")                # doctest: +SKIP
"""

from em_interp.errors import (
    AdapterMismatchError,
    CardError,
    ChecksumError,
    ConfigError,
    DataError,
    DeviceError,
    EMInterpError,
    HookNameError,
    JudgeError,
    MetricError,
    SAEMismatchError,
    ServerError,
    StoreMismatchError,
    TokenizationError,
    UnknownCardError,
    VariantError,
    WeightsUnavailableError,
)
from em_interp.models.cards import Card, get_card, list_cards, read_card

__version__ = "0.1.0"

# One entry point per technique, imported on first use: torch and TransformerLens take seconds to
# import, so card look-ups and their errors stay instant. No name here is also a submodule of
# em_interp (the technique modules live in family packages), so a name means the same thing
# whatever has been imported before it (tests/test_public_api.py holds this).
_LAZY: dict[str, str] = {
    # loading
    "Loaded": "models.loading", "Pair": "models.loading", "load": "models.loading",
    "load_pair": "models.loading", "ChatTokens": "models.chat", "chat_tokens": "models.chat",
    # prompt sets
    "PromptSet": "data", "load_prompt_set": "data", "list_prompt_sets": "data",
    # activations
    "ActivationStore": "activations.store", "cache_activations": "activations.cache",
    # representations (Qwen paper Exp. 1-2; EM direction)
    "probe_layers": "representations.probing", "mean_difference": "representations.directions",
    "introspection_scores": "representations.directions",
    "em_vs_refusal": "representations.em_refusal",
    "select_refusal_direction": "representations.refusal_direction",
    "procrustes_align": "representations.procrustes",
    # patching (Exp. 3-4; BLOCK-EM prefix/decode patching)
    "sample_pairs": "patching.pairs", "patch_sweep": "patching.sweep",
    "plan_sweep": "patching.sweep", "patch_heads": "patching.fine",
    "patch_neurons": "patching.fine", "select_neurons": "patching.fine",
    "prefix_patch": "patching.generation", "decode_patch": "patching.generation",
    # readouts
    "logit_lens": "readouts.logit_lens", "direct_logit_attribution": "readouts.attribution",
    # behaviour
    "ablate_heads": "behaviour.interventions", "ablate_neurons": "behaviour.interventions",
    "ablate_direction": "behaviour.interventions", "steer": "behaviour.interventions",
    "generate": "behaviour.generation", "attack_success_rate": "behaviour.rates",
    "misalignment_rate": "behaviour.rates", "ab_metric": "behaviour.ab_metric",
    "ServedGenerator": "behaviour.served", "evaluate_em": "behaviour.em_eval",
    "load_questions": "behaviour.em_eval", "calibrate_judges": "behaviour.calibration",
    # training
    "train_lora": "training.lora", "lora_directions": "training.tracking",
    # SAEs
    "train_sae": "sae.train", "load_sae": "sae.load", "splice_sae": "sae.splice",
    "analyze_features": "sae.features", "latent_trajectories": "sae.trajectories",
    # BLOCK-EM
    "discover_latents": "block_em.discovery", "train_blocked": "block_em.train",
    # runs
    "RunConfig": "run.config", "run_pipeline": "run.pipeline",
}

# The family packages, listed by dir() so that ``em_interp.<TAB>`` shows them too.
_SUBPACKAGES = ("activations", "behaviour", "block_em", "data", "errors", "hooks", "inputs",
                "metrics", "models", "patching", "readouts", "representations", "results",
                "run", "sae", "stats", "training")


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f"em_interp.{_LAZY[name]}")
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'em_interp' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*__all__, *_SUBPACKAGES, "__version__"})


__all__ = [
    "ActivationStore",
    "AdapterMismatchError",
    "Card",
    "CardError",
    "ChatTokens",
    "ChecksumError",
    "ConfigError",
    "DataError",
    "DeviceError",
    "EMInterpError",
    "HookNameError",
    "JudgeError",
    "MetricError",
    "Loaded",
    "Pair",
    "PromptSet",
    "RunConfig",
    "SAEMismatchError",
    "ServedGenerator",
    "ServerError",
    "StoreMismatchError",
    "TokenizationError",
    "UnknownCardError",
    "VariantError",
    "WeightsUnavailableError",
    "ab_metric",
    "ablate_direction",
    "ablate_heads",
    "ablate_neurons",
    "analyze_features",
    "attack_success_rate",
    "cache_activations",
    "calibrate_judges",
    "chat_tokens",
    "decode_patch",
    "direct_logit_attribution",
    "discover_latents",
    "em_vs_refusal",
    "evaluate_em",
    "generate",
    "get_card",
    "introspection_scores",
    "latent_trajectories",
    "list_cards",
    "list_prompt_sets",
    "load",
    "load_pair",
    "load_prompt_set",
    "load_questions",
    "load_sae",
    "logit_lens",
    "lora_directions",
    "mean_difference",
    "misalignment_rate",
    "patch_heads",
    "patch_neurons",
    "patch_sweep",
    "plan_sweep",
    "prefix_patch",
    "probe_layers",
    "procrustes_align",
    "read_card",
    "run_pipeline",
    "sample_pairs",
    "select_neurons",
    "select_refusal_direction",
    "splice_sae",
    "steer",
    "train_blocked",
    "train_lora",
    "train_sae",
]
