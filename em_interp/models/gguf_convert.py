"""GGUF file -> plain safetensors HF folder.

``transformers`` reads a GGUF file and dequantises it into ordinary float layers, but the model
it returns keeps ``config.quantization_config``; ``save_pretrained`` and TransformerLens both
refuse such a model. So the conversion builds a fresh model from the cleaned config, loads the
dequantised state dict into it, re-ties the embeddings where the config says so, and saves the
result as safetensors with the tokenizer (whose chat template comes from the GGUF metadata).
"""

from __future__ import annotations

from pathlib import Path

import torch


def gguf_to_hf_folder(gguf_file: Path, out_dir: Path) -> Path:
    """Dequantise ``gguf_file`` to fp32 and save it with its tokenizer into ``out_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                      dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.architectures = [type(gguf_model).__name__]
    config.dtype = torch.float32
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config)
    fresh.load_state_dict(gguf_model.state_dict(), strict=False, assign=True)
    del gguf_model
    if getattr(config, "tie_word_embeddings", False):
        fresh.tie_weights()
    missing = [n for n, p in fresh.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"GGUF conversion left parameters unset: {missing[:5]}")
    fresh.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
