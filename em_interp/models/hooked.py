"""HF causal LM -> TransformerLens ``HookedTransformer``, without the hub.

This is the one place that talks to TransformerLens's loading internals, so moving to
``TransformerBridge`` later touches this file only.

``HookedTransformer.from_pretrained`` fetches the config by name, rejects local paths, and
dispatches on substrings of the name ("llama", "gemma"), so a folder called
``.../Llama-3.1-8B-Instruct`` would take a hard-coded branch. Instead:

1. the HF config is copied into a temporary folder with a neutral name, and TL's
   ``get_pretrained_model_config`` reads it there, so its architecture switch is keyed on
   ``config.architectures`` alone;
2. TL's weight converter for that architecture turns the HF modules into a TL state dict;
3. with no weight processing (the default, so outputs match HF), the TL model's parameters are
   *assigned* those tensors -- views of the HF weights, so there is no second copy and the
   storage is already in HF's layout (see :mod:`em_interp.models.weight_layout`); with processing,
   TL's own ``load_and_process_state_dict`` runs and the result is re-stored in HF's layout.

Two settings differ from what a bare ``HookedTransformer(cfg)`` would pick:

* the TL tokenizer pads on the **right** (TL's stock default). With left padding, TL infers an
  attention mask for a token tensor passed without one by masking every *leading* pad-id token,
  and Qwen's pad id is also its BOS (SmolLM2's is ``<|im_end|>``): an unpadded prompt that starts
  with that token would lose it silently. With right padding TL builds no mask at all for a
  token tensor without ``attention_mask`` (and no KV cache), so an unpadded sequence is never
  masked; padded batches pass the mask :func:`~em_interp.models.chat.chat_tokens` builds;
* ``cfg.tokenizer_name`` names the folder the tokenizer was read from (not the temporary folder
  the config was read in), so ``HookedTransformer(model.cfg)`` and tools that rebuild a model or
  tokenizer from the config (SAE-Lens) find it.
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

import torch
from transformer_lens import HookedTransformer
from transformer_lens.loading_from_pretrained import get_pretrained_model_config

from em_interp.models.placement import place_model
from em_interp.models.weight_layout import relayout_to_hf, untie_shared_storage


def _converter(architecture: str):
    from transformer_lens.pretrained.weight_conversions import (
        convert_llama_weights,
        convert_qwen2_weights,
    )

    table = {"LlamaForCausalLM": convert_llama_weights, "Qwen2ForCausalLM": convert_qwen2_weights}
    if architecture not in table:
        raise NotImplementedError(
            f"architecture {architecture!r} has no converter here yet; supported: {sorted(table)}"
        )
    return table[architecture]


def tl_config(hf_config, *, dtype: torch.dtype, device: str, model_name: str, fold_ln: bool):
    """A ``HookedTransformerConfig`` for ``hf_config``, keyed on its architecture, not its name."""
    with tempfile.TemporaryDirectory(prefix="emi_cfg_") as tmp:
        folder = Path(tmp) / "model"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(hf_config.to_dict(), default=str))
        cfg = get_pretrained_model_config(
            str(folder), hf_cfg=hf_config.to_dict(), fold_ln=fold_ln, device=device,
            n_devices=1, dtype=dtype,
        )
    cfg.model_name = model_name
    return cfg


def hooked_from_hf(
    hf_model,
    tokenizer,
    *,
    model_name: str,
    devices: list[torch.device],
    tokenizer_name: str | None = None,
    fold_ln: bool = False,
    center_writing_weights: bool = False,
    center_unembed: bool = False,
    fold_value_biases: bool = False,
) -> HookedTransformer:
    """Build a ``HookedTransformer`` whose weights are ``hf_model``'s, placed on ``devices``.

    Without processing flags the TL parameters share memory with ``hf_model``'s weights
    (no copy); drop your reference to ``hf_model`` afterwards, or treat both as read-only.
    ``tokenizer_name`` (a local folder or hub id) is recorded as ``cfg.tokenizer_name``.
    """
    architecture = hf_model.config.architectures[0]
    dtype = next(hf_model.parameters()).dtype
    cfg = tl_config(hf_model.config, dtype=dtype, device=str(devices[0]),
                    model_name=model_name, fold_ln=fold_ln)
    cfg.tokenizer_name = tokenizer_name
    # detach(): fresh tensors over the same memory. The converters hand back some HF
    # nn.Parameter objects as they are; assigned directly they would be *one object* shared
    # by the HF model and every TL model built from it.
    state_dict = {k: v.detach() for k, v in _converter(architecture)(hf_model, cfg).items()}
    processing = fold_ln or center_writing_weights or center_unembed or fold_value_biases
    # Build the skeleton on CPU with uninitialised storage; it is replaced below.
    # TL edits the tokenizer it is given (padding side, BOS/EOS/pad tokens): give it a copy, so
    # the caller's HF tokenizer stays exactly as HF made it. Right padding: see the module
    # docstring (a token tensor passed without a mask is then never masked).
    model = HookedTransformer(cfg, copy.deepcopy(tokenizer), move_to_device=False,
                              default_padding_side="right")
    if processing:
        model.load_and_process_state_dict(
            state_dict,
            fold_ln=fold_ln,
            center_writing_weights=center_writing_weights,
            center_unembed=center_unembed,
            fold_value_biases=fold_value_biases,
        )
    else:
        state_dict = model.fill_missing_keys(state_dict)
        model.load_state_dict(state_dict, strict=True, assign=True)
    del state_dict
    untie_shared_storage(model)
    relayout_to_hf(model)
    place_model(model, devices)
    model.eval()
    return model
