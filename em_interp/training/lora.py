"""LoRA supervised fine-tuning of model organisms, with pluggable regularisers.

:func:`train_lora` fine-tunes a PEFT LoRA adapter on the **Hugging Face** model of a card (not
through TransformerLens: PEFT's layers are what gets saved and merged later), on chat data with
the loss on **assistant tokens only**::

    L_SFT = - 1/|T| sum_{t in T} log p_theta(x_t | x_<t),   T = the assistant tokens of the batch

Each adapted projection ``W`` becomes ``W + (alpha / r) B A`` (``alpha / sqrt(r)`` with rsLoRA),
``A`` random, ``B = 0`` at step 0, so training starts at the base model. The options are those
of the EM model organisms (rank, alpha, rsLoRA, target modules, the layers to adapt -- the
rank-1 ``down_proj`` organisms adapt one projection of one layer), of BLOCK-EM's appendix B.4
(r 16, alpha 32 on all seven projections, lr 7.5e-5, a linear schedule), and the usual ones
(warm-up, epochs or ``max_steps``, batch size, gradient accumulation, seed).

**Assistant-only mask.** Each conversation is rendered with the tokenizer's chat template
*once* and tokenized once (no second BOS). For every assistant message ``i`` the template is
also rendered for ``messages[:i]`` with the generation prompt and for ``messages[:i + 1]``; the
characters between the two are that message (its content and end-of-turn marker), and the
tokens starting there, found through the tokenizer's offsets, are the training targets.

**Regularisers** plug into the one loop (BLOCK-EM's blocking loss and the KL-to-base baseline in
:mod:`em_interp.block_em.train` are regularisers): ``setup`` once (e.g. freeze layers),
``before_forward`` per micro-batch (a reference forward without grad), a context manager around
the trained forward (to capture activations), and ``loss`` (a weighted term and numbers to
log)::

    L_total = L_SFT + sum_j L_j

The run folder holds ``cfg.json``, ``checkpoint-{step}/`` PEFT adapters (safetensors), the final
``adapter/`` and the per-step log (a :class:`LoRATrainResult`, ``log/``). Each adapter records the
card's name as ``base_model_name_or_path``, so ``em_interp.load(card, adapter=run / "adapter")``
loads it and the loader's base check accepts it.

**LoRA direction tracking** (the phase change of rank-1 organisms) is in
:mod:`em_interp.training.tracking`; :func:`lora_directions` is re-exported here.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import json
import logging
import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
from jaxtyping import Bool, Int
from tqdm.auto import tqdm

from em_interp.atomic import atomic_dir, atomic_write_bytes
from em_interp.errors import ConfigError, DataError, TokenizationError
from em_interp.models.cache import cache_dir
from em_interp.results import Result

log = logging.getLogger(__name__)

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SCHEDULES = ("linear", "constant", "cosine")
TRAINING_VERSION = 1
"""Bumped when the loop changes what it trains (part of the ``trained`` source's hash)."""

Conversation = list[dict[str, str]]


# ------------------------------------------------------------------ config


@dataclass(frozen=True)
class LoRATrainConfig:
    """How to fine-tune a LoRA adapter (see :func:`train_lora`); lists become tuples."""

    rank: int = 16
    """LoRA rank ``r`` (1 for the rank-1 organisms)."""
    alpha: float = 32.0
    """LoRA alpha; the update is scaled by ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA)."""
    use_rslora: bool = False
    """Rank-stabilised LoRA scaling ``alpha / sqrt(r)`` (the EM organisms use it)."""
    dropout: float = 0.0
    """LoRA dropout on the adapter's input."""
    target_modules: tuple[str, ...] = ALL_PROJECTIONS
    """Projections to adapt (HF module names, e.g. ``("down_proj",)``)."""
    layers: tuple[int, ...] | None = None
    """0-indexed layers to adapt (PEFT ``layers_to_transform``); ``None``: every layer."""
    lr: float = 7.5e-5
    """Peak learning rate of AdamW."""
    schedule: Literal["linear", "constant", "cosine"] = "linear"
    """After warm-up: linear decay to 0, constant, or cosine decay to 0."""
    warmup_steps: int = 0
    """Optimizer steps of linear warm-up from 0 to ``lr`` (as ``transformers``: the first step
    runs at lr 0)."""
    epochs: float = 1.0
    """Passes over the data (fractions allowed); ignored when ``max_steps`` is set."""
    max_steps: int | None = None
    """Optimizer steps to run (overrides ``epochs``)."""
    batch_size: int = 4
    """Conversations per forward (micro-batch)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (effective batch = ``batch_size * grad_accum``)."""
    max_length: int = 512
    """Tokens kept per conversation (longer ones are cut at the end)."""
    max_examples: int | None = None
    """Use only the first ``max_examples`` conversations of the dataset."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float | None = 1.0
    """Gradient-norm clipping; ``None`` turns it off."""
    seed: int = 0
    """Seed of the adapter initialisation and the data order."""
    save_every: int | None = None
    """Save ``checkpoint-{step}/`` every this many optimizer steps (``None``: never)."""
    save_each_epoch: bool = False
    """Also save a checkpoint at the end of every epoch (per-epoch evaluation, Fig. 8)."""
    ema_decay: float = 0.9
    """Decay of the logged SFT-loss EMA."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype of the frozen base weights (the adapter trains in float32)."""
    device: str | None = None
    """``None``: CUDA when available, else CPU."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (saves memory on large models)."""

    def __post_init__(self):
        for name in ("target_modules", "layers"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            if value is not None:
                object.__setattr__(self, name, tuple(value))
        ints = {"rank": 1, "batch_size": 1, "grad_accum": 1, "max_length": 8, "warmup_steps": 0}
        for name, low in ints.items():
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ConfigError(f"LoRATrainConfig.{name} must be an integer >= {low}, got {v!r}.")
        for name in ("max_steps", "max_examples", "save_every"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ConfigError(f"LoRATrainConfig.{name} must be None or an integer >= 1, "
                                  f"got {v!r}.")
        if not self.alpha > 0 or not self.lr > 0 or not self.epochs > 0:
            raise ConfigError("LoRATrainConfig: alpha, lr and epochs must be > 0, got "
                              f"alpha={self.alpha}, lr={self.lr}, epochs={self.epochs}.")
        if not 0 <= self.dropout < 1 or not 0 <= self.ema_decay < 1 or self.weight_decay < 0:
            raise ConfigError("LoRATrainConfig: dropout and ema_decay must be in [0, 1), "
                              "weight_decay >= 0.")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"LoRATrainConfig.schedule must be one of {list(SCHEDULES)}, got "
                              f"{self.schedule!r}.")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"LoRATrainConfig.dtype {self.dtype!r} is not float32, bfloat16 "
                              "or float16.")
        if not self.target_modules:
            raise ConfigError("LoRATrainConfig.target_modules is empty; name at least one "
                              f"projection, e.g. {list(ALL_PROJECTIONS)}.")
        if self.layers is not None and (not self.layers or any(
                not isinstance(i, int) or i < 0 for i in self.layers)):
            raise ConfigError(f"LoRATrainConfig.layers must be None or non-negative layer "
                              f"indices, got {self.layers!r}.")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError("LoRATrainConfig.max_grad_norm must be > 0 or None.")

    def to_dict(self) -> dict:
        """JSON-safe fields (tuples as lists)."""
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict) -> LoRATrainConfig:
        """Build from :meth:`to_dict` output; an unknown key raises :class:`ConfigError`."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            import difflib

            hints = [difflib.get_close_matches(k, sorted(names), n=1) for k in unknown]
            hint = "; ".join(f"{k!r} (did you mean {h[0]!r}?)" if h else repr(k)
                             for k, h in zip(unknown, hints, strict=True))
            raise ConfigError(f"unknown LoRATrainConfig field(s): {hint}. Fields: "
                              f"{', '.join(sorted(names))}.")
        return cls(**data)


# ------------------------------------------------------------------ data


def conversations_of(dataset) -> list[Conversation]:
    """Full chat conversations from a :class:`~em_interp.data.PromptSet` (``.conversations``),
    a shipped set's name, a JSONL chat file, or a list of conversations."""
    from em_interp.data import PromptSet, list_prompt_sets, load_prompt_set, read_chat_jsonl

    if isinstance(dataset, str | Path):
        if str(dataset) in list_prompt_sets():
            dataset = load_prompt_set(str(dataset))
        elif Path(dataset).is_file():
            dataset = read_chat_jsonl(dataset)
        else:
            raise DataError(f"dataset {str(dataset)!r} is neither a shipped prompt set "
                            f"({', '.join(list_prompt_sets())}) nor a JSONL chat file.")
    convs = dataset.conversations if isinstance(dataset, PromptSet) else list(dataset)
    if not convs:
        raise DataError("the SFT dataset is empty.")
    for i, c in enumerate(convs):
        if not isinstance(c, Sequence) or isinstance(c, str) or not all(
                isinstance(m, dict) and "role" in m and "content" in m for m in c):
            raise DataError(f"SFT item {i} is not a conversation (a list of {{'role', 'content'}}"
                            f" messages): {str(c)[:80]!r}.")
        if not any(m["role"] == "assistant" for m in c):
            raise DataError(f"SFT item {i} has no assistant message, so nothing to train on: "
                            f"{str(c)[:80]!r}. SFT data needs full chats (prompt + answer).")
    return [[{"role": m["role"], "content": m["content"]} for m in c] for c in convs]


def _render(tokenizer, conv: Conversation, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(conv, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def assistant_token_mask(tokenizer, conversation: Conversation, *,
                         max_length: int | None = None) -> tuple[list[int], list[bool]]:
    """Token ids of a chat-templated conversation and a mask of its assistant tokens.

    The template is applied once to the whole conversation and the text tokenized once
    (``add_special_tokens=False``; a BOS the template writes twice is kept once). A token is an
    assistant token when its first character lies in an assistant message's span: from the end
    of ``messages[:i]`` rendered with the generation prompt to the end of ``messages[:i + 1]``
    (the content and the end-of-turn marker).

    Raises:
        TokenizationError: the tokenizer has no chat template or no offsets, or the template does
            not render a conversation's prefixes as prefixes of its full text.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise TokenizationError(f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no "
                                "chat template; SFT on chats needs one.")
    text = _render(tokenizer, conversation, False)
    spans = []
    for i, m in enumerate(conversation):
        if m["role"] != "assistant":
            continue
        start = _render(tokenizer, conversation[:i], True) if i else ""
        end = _render(tokenizer, conversation[: i + 1], False)
        if not (text.startswith(start) and text.startswith(end) and len(end) >= len(start)):
            raise TokenizationError(
                "the chat template does not render the conversation's prefixes as prefixes of its "
                f"full text (assistant message {i}), so assistant tokens cannot be located; use "
                "a template that renders turns independently.")
        spans.append((len(start), len(end)))
    if not tokenizer.is_fast:
        raise TokenizationError("assistant masks need a fast tokenizer (token offsets).")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    bos = tokenizer.bos_token_id
    if bos is not None and len(ids) > 1 and ids[0] == bos and ids[1] == bos:
        ids, offsets = ids[1:], offsets[1:]
    mask = [any(a <= s < b for a, b in spans) and e > s for s, e in offsets]
    if max_length is not None:
        ids, mask = ids[:max_length], mask[:max_length]
    return ids, mask


@dataclass(frozen=True)
class SFTBatch:
    """One right-padded micro-batch of the SFT loop (what regularisers receive)."""

    input_ids: Int[torch.Tensor, "batch pos"]
    attention_mask: Int[torch.Tensor, "batch pos"]
    token_mask: Bool[torch.Tensor, "batch pos"]
    """True at assistant tokens (the completion tokens ``T_SFT`` of BLOCK-EM's eq. 11)."""

    @property
    def pred_mask(self) -> Bool[torch.Tensor, "batch pos"]:
        """True at positions whose *next* token is an assistant token (where the SFT loss and
        the KL baseline read the logits)."""
        out = torch.zeros_like(self.token_mask)
        out[:, :-1] = self.token_mask[:, 1:]
        return out

    def to(self, device) -> SFTBatch:
        return SFTBatch(self.input_ids.to(device), self.attention_mask.to(device),
                        self.token_mask.to(device))


def collate(examples: Sequence[tuple[list[int], list[bool]]], pad_id: int) -> SFTBatch:
    """Right-pad ``(ids, mask)`` examples into an :class:`SFTBatch`."""
    width = max(len(ids) for ids, _ in examples)
    n = len(examples)
    ids_t = torch.full((n, width), pad_id, dtype=torch.long)
    att = torch.zeros((n, width), dtype=torch.long)
    tm = torch.zeros((n, width), dtype=torch.bool)
    for i, (ids, mask) in enumerate(examples):
        ids_t[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        att[i, : len(ids)] = 1
        tm[i, : len(ids)] = torch.tensor(mask, dtype=torch.bool)
    return SFTBatch(ids_t, att, tm)


def tokenize_sft(tokenizer, conversations: Sequence[Conversation],
                 max_length: int) -> list[tuple[list[int], list[bool]]]:
    """:func:`assistant_token_mask` of each conversation; ones cut to no target are dropped."""
    out, dropped = [], 0
    for conv in conversations:
        ids, mask = assistant_token_mask(tokenizer, conv, max_length=max_length)
        if sum(mask[1:]) == 0:  # the first token is never a target
            dropped += 1
            continue
        out.append((ids, mask))
    if dropped:
        log.warning("%d of %d conversations have no assistant token within max_length=%d and "
                    "were dropped", dropped, len(conversations), max_length)
    if not out:
        raise DataError(f"no conversation has an assistant token within max_length={max_length};"
                        " raise max_length.")
    return out


# ------------------------------------------------------------------ regularisers


class Regularizer(abc.ABC):
    """A term added to the SFT loss; subclass and override what you need.

    Per micro-batch the loop calls :meth:`before_forward` (e.g. a reference forward without
    grad), runs the trained forward inside :meth:`trained_forward` (e.g. to capture an
    activation), then :meth:`loss`.
    """

    name: ClassVar[str] = "regularizer"

    def setup(self, model, n_layers: int) -> None:  # noqa: B027 (optional hook)
        """Called once on the PEFT model before the optimizer is built (freeze parameters)."""

    def before_forward(self, model, batch: SFTBatch) -> None:  # noqa: B027 (optional hook)
        """Called before the trained forward of each micro-batch."""

    def trained_forward(self, model) -> contextlib.AbstractContextManager:
        """A context manager active during the trained forward."""
        return contextlib.nullcontext()

    @abc.abstractmethod
    def loss(self, model, batch: SFTBatch,
             logits: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The weighted term to add and ``{name: value}`` to log. ``logits`` are the trained
        model's logits at ``batch.pred_mask`` positions, ``[n_positions, d_vocab]``."""

    def describe(self) -> dict:
        """JSON-safe settings, recorded in the run's ``cfg.json``."""
        return {"name": self.name}


# ------------------------------------------------------------------ model


def _decoder(hf):
    return getattr(hf, hf.base_model_prefix)


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder blocks of an HF causal LM, also inside a PEFT wrapper."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(_decoder(hf), "layers", None)
    if layers is None:
        raise ConfigError(f"{type(hf).__name__} has no .layers; only decoder-only models with "
                          "model.layers (Llama, Qwen2) are supported.")
    return layers


def load_base_hf(card_or_loaded, *, dtype: str = "float32", device: str | None = None,
                 progress: bool = False):
    """``(card, base_dir, hf_model, tokenizer)``: the card's base model as a plain HF model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from em_interp.models.loading import check_architecture, resolve_card
    from em_interp.models.sources import resolve_source

    if hasattr(card_or_loaded, "card") and hasattr(card_or_loaded, "weights_dir"):
        loaded = card_or_loaded
        if loaded.variant != "base" or loaded.adapter_dirs:
            raise ConfigError(
                f"train_lora trains on a base model, but this Loaded is {loaded.card.name!r} "
                f"variant {loaded.variant!r} with adapters {list(map(str, loaded.adapter_dirs))}. "
                "Pass the card name (its base is used) or load(card, 'base').")
        card, base_dir = loaded.card, Path(loaded.weights_dir)
    else:
        card = resolve_card(card_or_loaded)
        base_dir = resolve_source(card.base, card=card, role="base", progress=progress)
    check_architecture(card, base_dir)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    hf = AutoModelForCausalLM.from_pretrained(base_dir, dtype=getattr(torch, dtype),
                                              use_safetensors=True).to(dev)
    tok = AutoTokenizer.from_pretrained(base_dir)
    return card, base_dir, hf, tok


def wrap_in_lora(hf, cfg: LoRATrainConfig, n_layers: int):
    """``hf`` wrapped in a PEFT LoRA as ``cfg`` describes (rank, alpha, modules, layers)."""
    from peft import LoraConfig, get_peft_model

    from em_interp.models.lora_merge import quiet_peft

    if cfg.layers is not None and max(cfg.layers) >= n_layers:
        raise ConfigError(f"LoRATrainConfig.layers {list(cfg.layers)} exceed the model's "
                          f"{n_layers} layers (0-indexed).")
    lcfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, use_rslora=cfg.use_rslora,
                      lora_dropout=cfg.dropout, target_modules=list(cfg.target_modules),
                      layers_to_transform=list(cfg.layers) if cfg.layers is not None else None,
                      bias="none", task_type="CAUSAL_LM")
    torch.manual_seed(cfg.seed)
    try:
        with quiet_peft():
            return get_peft_model(hf, lcfg)
    except ValueError as e:
        raise ConfigError(f"PEFT could not place the adapter ({e}); check target_modules "
                          f"{list(cfg.target_modules)} against the model's projections.") from None


def save_adapter(model, out: Path, base_name: str) -> Path:
    """Save the PEFT adapter to ``out`` atomically (safetensors) with ``base_name`` recorded."""
    from em_interp.models.lora_merge import quiet_peft

    with atomic_dir(out) as tmp:
        with quiet_peft():
            model.save_pretrained(tmp, safe_serialization=True)
        path = tmp / "adapter_config.json"
        data = json.loads(path.read_text())
        data["base_model_name_or_path"] = base_name
        path.write_text(json.dumps(data, indent=2))
    return out


def _lr_lambda(cfg: LoRATrainConfig, total: int):
    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:  # as transformers' schedules
            return step / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        span = max(1, total - cfg.warmup_steps)
        frac = min(1.0, (step - cfg.warmup_steps) / span)
        return 1.0 - frac if cfg.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * frac))

    return f


def sft_logits(model, batch: SFTBatch) -> torch.Tensor:
    """The model's logits at ``batch.pred_mask`` positions, ``[n_positions, d_vocab]`` (the
    unembedding runs on those positions only)."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = _decoder(hf)(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                          use_cache=False).last_hidden_state
    return hf.get_output_embeddings()(hidden[batch.pred_mask]).float()


# ------------------------------------------------------------------ the loop


@dataclass(frozen=True)
class LoRATrainResult(Result):
    """What :func:`train_lora` returns: the per-step log, the checkpoints, the adapter."""

    kind: ClassVar[str] = "lora_train"

    card: str
    config: dict
    """The :class:`LoRATrainConfig` as a dict."""
    log: dict[str, np.ndarray]
    """Per optimizer step: ``step``, ``epoch``, ``loss`` (SFT), ``loss_ema``, ``lr``,
    ``grad_norm``, ``seconds`` and every regulariser's logged numbers."""
    checkpoints: list = field(default_factory=list)
    """``{"step", "epoch", "path"}`` of each saved checkpoint, in order; ``path`` is relative to
    the run folder (``checkpoint-<step>``)."""
    adapter_dir: str = "adapter"
    """The final adapter folder, relative to the run folder."""
    run_dir: str = ""
    """The run folder when the run was trained (it may have moved since: the trained source
    writes into a temporary folder renamed when done)."""
    n_examples: int = 0
    n_target_tokens: int = 0
    """Assistant tokens per epoch."""
    seconds: float = 0.0
    regularizers: list = field(default_factory=list)

    @property
    def df(self):
        import pandas as pd

        return pd.DataFrame({k: np.asarray(v) for k, v in self.log.items()})

    @property
    def adapter_path(self) -> Path:
        """The final adapter's folder (``run_dir / adapter_dir``)."""
        return Path(self.run_dir) / self.adapter_dir

    def figure(self, columns: Sequence[str] | None = None, **kwargs):
        """SFT loss (EMA) and any regulariser terms against the step."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        df = self.df
        extra = [c for c in (columns or df.columns) if c not in (
            "step", "epoch", "loss", "loss_ema", "lr", "grad_norm", "seconds")]
        fig = make_subplots(rows=1 + bool(extra), cols=1, shared_xaxes=True)
        fig.add_trace(go.Scatter(x=df.step, y=df.loss, name="SFT loss", mode="lines",
                                 opacity=0.4), row=1, col=1)
        fig.add_trace(go.Scatter(x=df.step, y=df.loss_ema, name="SFT loss (EMA)",
                                 mode="lines"), row=1, col=1)
        for c in extra:
            fig.add_trace(go.Scatter(x=df.step, y=df[c], name=c, mode="lines"), row=2, col=1)
        fig.update_layout(template="plotly_white", title=kwargs.get(
            "title", f"LoRA SFT on {self.card}"), height=300 + 200 * bool(extra))
        fig.update_xaxes(title_text="optimizer step", row=1 + bool(extra), col=1)
        fig.update_yaxes(title_text="loss (nats/token)", row=1, col=1)
        if extra:
            fig.update_yaxes(title_text="regulariser", row=2, col=1)
        return fig

    def to_dict(self) -> dict:
        last = {k: float(v[-1]) for k, v in self.log.items() if len(v)}
        return {"card": self.card, "steps": int(last.get("step", 0)),
                "run_dir": self.run_dir,
                "final_loss_ema": last.get("loss_ema"), "seconds": self.seconds,
                "n_examples": self.n_examples, "adapter_dir": self.adapter_dir,
                **{k: v for k, v in last.items() if k not in (
                    "step", "loss_ema", "seconds", "epoch")}}


def _batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def _run_hash(card: str, cfg: LoRATrainConfig, convs) -> str:
    import hashlib

    blob = json.dumps([card, cfg.to_dict(), convs], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def train_lora(card_or_loaded, dataset, cfg: LoRATrainConfig | None = None,
               out_dir: str | Path | None = None, *,
               regularizers: Sequence[Regularizer] = (), progress: bool = True,
               model=None) -> LoRATrainResult:
    """Fine-tune a LoRA adapter with PEFT on the card's HF base model (loss on assistant tokens).

    Args:
        card_or_loaded: a card name, card file, :class:`~em_interp.models.cards.Card`, or a
            base-variant ``Loaded`` (its card and weights folder are used; the HF model is read
            from that folder, the TL model is not touched).
        dataset: a :class:`~em_interp.data.PromptSet` whose ``.conversations`` are full chats,
            a shipped set's name, a JSONL chat file (``{"messages": [...]}`` per line), or a
            list of conversations. Each needs an assistant message.
        cfg: the :class:`LoRATrainConfig` (default: BLOCK-EM's r 16 / alpha 32 recipe).
        out_dir: the run folder (``cfg.json``, ``checkpoint-*/``, ``adapter/``, ``log/``);
            default ``cache_dir()/lora-runs/<card>-<hash>``.
        regularizers: terms added to the SFT loss (see :class:`Regularizer`).
        progress: show a progress bar.
        model: ``(card, base_dir, hf_model, tokenizer)`` from :func:`load_base_hf`, to reuse an
            HF model already in memory (it is wrapped by PEFT in place).

    Returns:
        A :class:`LoRATrainResult` (also saved to ``out_dir/log``).
    """
    cfg = cfg or LoRATrainConfig()
    card, base_dir, hf, tok = model or load_base_hf(card_or_loaded, dtype=cfg.dtype,
                                                    device=cfg.device, progress=progress)
    convs = conversations_of(dataset)
    if cfg.max_examples is not None:
        convs = convs[: cfg.max_examples]
    examples = tokenize_sft(tok, convs, cfg.max_length)
    run = Path(out_dir) if out_dir is not None else (
        cache_dir() / "lora-runs" / f"{card.name}-{_run_hash(card.name, cfg, convs)}")
    run.mkdir(parents=True, exist_ok=True)
    n_layers = hf.config.num_hidden_layers
    model = wrap_in_lora(hf, cfg, n_layers)
    if cfg.gradient_checkpointing:
        model.enable_input_require_grads()
        model.get_base_model().gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
    for r in regularizers:
        r.setup(model, n_layers)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("no trainable LoRA parameter is left (every adapted layer frozen?).")
    atomic_write_bytes(run / "cfg.json", json.dumps(
        {"card": card.name, "base_dir": str(base_dir), "lora": cfg.to_dict(),
         "n_examples": len(examples), "regularizers": [r.describe() for r in regularizers],
         "training_version": TRAINING_VERSION}, indent=2).encode())

    per_epoch = math.ceil(math.ceil(len(examples) / cfg.batch_size) / cfg.grad_accum)
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch))
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg, total))
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    device = next(model.parameters()).device

    def micro_batches() -> Iterator[tuple[int, int, list[int]]]:
        epoch = 0
        while True:
            for j, b in enumerate(_batches(len(examples), cfg.batch_size, cfg.seed, epoch)):
                yield epoch, j, b
            epoch += 1

    stream = micro_batches()
    n_per_epoch_batches = math.ceil(len(examples) / cfg.batch_size)
    logs: dict[str, list[float]] = {}
    ema, checkpoints, t0 = None, [], time.perf_counter()
    model.train()
    bar = tqdm(total=total, desc=f"LoRA SFT {card.name}", disable=not progress)
    for step in range(1, total + 1):
        micro = [next(stream) for _ in range(cfg.grad_accum)]
        batches = [collate([examples[i] for i in b], pad).to(device) for _, _, b in micro]
        n_tok = sum(int(b.pred_mask.sum()) for b in batches)
        sft_total, reg_logs = 0.0, {}
        for batch in batches:
            for r in regularizers:
                r.before_forward(model, batch)
            with contextlib.ExitStack() as stack:
                for r in regularizers:
                    stack.enter_context(r.trained_forward(model))
                logits = sft_logits(model, batch)
            targets = batch.input_ids[:, 1:][batch.pred_mask[:, :-1]]
            ce = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
            loss = ce / n_tok
            sft_total += float(ce.detach()) / n_tok
            for r in regularizers:
                term, numbers = r.loss(model, batch, logits)
                loss = loss + term / len(batches)
                for k, v in numbers.items():
                    reg_logs[k] = reg_logs.get(k, 0.0) + float(v) / len(batches)
            loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(
            params, cfg.max_grad_norm if cfg.max_grad_norm is not None else float("inf"))
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        ema = sft_total if ema is None else cfg.ema_decay * ema + (1 - cfg.ema_decay) * sft_total
        epoch_pos = micro[-1][0] + (micro[-1][1] + 1) / n_per_epoch_batches
        row = {"step": step, "epoch": epoch_pos, "loss": sft_total, "loss_ema": ema, "lr": lr,
               "grad_norm": float(grad_norm), "seconds": time.perf_counter() - t0, **reg_logs}
        for k, v in row.items():
            logs.setdefault(k, [math.nan] * (step - 1)).append(float(v))
        bar.set_postfix(loss=f"{ema:.3f}", **{k: f"{v:.3g}" for k, v in reg_logs.items()})
        bar.update(1)
        epoch_end = micro[-1][1] + 1 == n_per_epoch_batches
        if (cfg.save_every and step % cfg.save_every == 0) or (
                cfg.save_each_epoch and epoch_end) or (step == total and cfg.save_every):
            path = save_adapter(model, run / f"checkpoint-{step}", card.name)
            if not checkpoints or checkpoints[-1]["step"] != step:
                checkpoints.append({"step": step, "epoch": epoch_pos, "path": path.name})
    bar.close()
    model.eval()
    adapter = save_adapter(model, run / "adapter", card.name)
    result = LoRATrainResult(
        card=card.name, config=cfg.to_dict(),
        log={k: np.asarray(v, dtype=np.float64) for k, v in logs.items()},
        checkpoints=checkpoints, adapter_dir=adapter.name, run_dir=str(run),
        n_examples=len(examples), n_target_tokens=sum(sum(m[1:]) for _, m in examples),
        seconds=time.perf_counter() - t0, regularizers=[r.describe() for r in regularizers])
    result.save(run / "log")
    return result


from em_interp.training.tracking import LoRADirections, lora_directions  # noqa: E402

__all__ = [
    "ALL_PROJECTIONS",
    "LoRADirections",
    "LoRATrainConfig",
    "LoRATrainResult",
    "Regularizer",
    "SFTBatch",
    "assistant_token_mask",
    "collate",
    "conversations_of",
    "decoder_layers",
    "load_base_hf",
    "lora_directions",
    "save_adapter",
    "sft_logits",
    "train_lora",
]
