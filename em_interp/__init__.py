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
    SAEMismatchError,
    StoreMismatchError,
    TokenizationError,
    UnknownCardError,
    VariantError,
    WeightsUnavailableError,
)
from em_interp.models.cards import Card, get_card, list_cards, read_card

__version__ = "0.1.0"

_LAZY = {"Loaded": "models.loading", "Pair": "models.loading", "load": "models.loading",
         "load_pair": "models.loading", "ChatTokens": "models.chat", "chat_tokens": "models.chat",
         # one entry point per technique (the modules are named after what they compute)
         "load_prompt_set": "data", "ActivationStore": "activations",
         "cache_activations": "activations", "probe_layers": "probing",
         "mean_difference": "directions", "introspection_scores": "directions",
         "em_vs_refusal": "directions", "procrustes_align": "procrustes",
         "sample_pairs": "patching", "patch_sweep": "patching", "plan_sweep": "patching",
         "patch_heads": "patching_fine", "patch_neurons": "patching_fine",
         "select_neurons": "patching_fine", "prefix_patch": "generation_patching",
         "decode_patch": "generation_patching", "ablate_heads": "interventions",
         "ablate_neurons": "interventions", "ablate_direction": "interventions",
         "steer": "interventions", "generate": "generation",
         "attack_success_rate": "evaluation", "ab_metric": "ab_metric",
         "logit_lens": "logit_lens", "direct_logit_attribution": "attribution",
         "train_lora": "training", "RunConfig": "run_config", "run_pipeline": "pipeline"}


def __getattr__(name: str):
    # torch and TransformerLens take seconds to import; defer it until a model is actually loaded, so
    # card look-ups and their errors stay instant.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"em_interp.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'em_interp' has no attribute {name!r}")

__all__ = [
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
    "Loaded",
    "Pair",
    "SAEMismatchError",
    "StoreMismatchError",
    "TokenizationError",
    "UnknownCardError",
    "VariantError",
    "WeightsUnavailableError",
    "chat_tokens",
    "get_card",
    "list_cards",
    "load",
    "load_pair",
    "read_card",
]
