"""Seeded tiny random models, their byte-level tokenizer, and random LoRA adapters, for tests.

A ``random`` weight source builds, offline and in about a second, an HF folder that every
loader path treats like a real one: ``config.json`` + safetensors + a tokenizer with a chat
template. Two tokenizers are built in:

* ``bytes`` -- 256 byte tokens plus ChatML-style markers, no BOS (like Qwen2.5);
* ``bytes-bos`` -- the same with a BOS token that the chat template writes first (like Llama 3),
  so the double-BOS pitfall can be tested.

A random LoRA adapter (``organism.kind = "lora"``) draws both PEFT factors at random, so merging
it really changes the model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SPECIALS = ["<|pad|>", "<|bos|>", "<|im_start|>", "<|im_end|>", "<|eos|>"]
N_BYTES = 256

# Written for this project: a ChatML-style layout, with an optional leading BOS.
_TEMPLATE = (
    "{% if add_bos %}{{ bos_token }}{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_tokenizer(with_bos: bool):
    """A byte-level fast tokenizer (vocab 256 + specials) with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_map = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_map))}
    for s in SPECIALS:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    template = _TEMPLATE.replace("add_bos", "true" if with_bos else "false")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>" if with_bos else None,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
    )
    fast.chat_template = template
    return fast


def build_random_model(config_kwargs: dict, hf_class: str, seed: int, tokenizer: str,
                       out_dir: Path) -> Path:
    """Build a seeded random model of ``hf_class`` and save it (and its tokenizer) to ``out_dir``."""
    import transformers

    cls = getattr(transformers, hf_class)
    config_cls = cls.config_class
    tok = byte_tokenizer(with_bos=tokenizer == "bytes-bos")
    kwargs = dict(config_kwargs)
    kwargs.setdefault("vocab_size", len(tok))
    if kwargs["vocab_size"] < len(tok):
        raise ValueError(f"vocab_size {kwargs['vocab_size']} < tokenizer size {len(tok)}")
    kwargs.update(
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    config = config_cls(**kwargs)
    config.architectures = [hf_class]
    torch.manual_seed(seed)
    model = cls(config).eval()
    # HF inits norms to 1 and biases to 0; randomise them so tests see every term.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.05 * torch.randn_like(p))
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return out_dir


def build_random_lora(base_dir: Path, lora_kwargs: dict, seed: int, out_dir: Path,
                      base_name: str) -> Path:
    """Save a PEFT LoRA adapter with seeded random A and B factors for the model in ``base_dir``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from em_interp.models.lora_merge import quiet_peft

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    cfg = LoraConfig(init_lora_weights=False, **lora_kwargs)
    torch.manual_seed(seed)
    with quiet_peft():
        peft_model = get_peft_model(base, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn_like(p))
    peft_model.save_pretrained(out_dir, safe_serialization=True)
    # Record the base by its card name, as a hub adapter records its base repo id.
    cfg_path = out_dir / "adapter_config.json"
    data = json.loads(cfg_path.read_text())
    data["base_model_name_or_path"] = base_name
    cfg_path.write_text(json.dumps(data, indent=2))
    return out_dir
