"""What every analysis accepts as a model and as prompts, turned into one form.

Analyses take ``model`` as a :class:`~em_interp.models.loading.Loaded` (what ``em_interp.load``
returns) or a bare ``HookedTransformer``, and ``prompts`` as any of:

* a user message (``str``) or a list of them;
* a conversation (list of ``{"role", "content"}`` dicts) or a list of them;
* a :class:`~em_interp.data.PromptSet`;
* a :class:`~em_interp.models.chat.ChatTokens` (already tokenized, left-padded, with its mask);
* a token tensor ``[batch, pos]`` (every token real) or a ``(tokens, attention_mask)`` pair.

Text goes through the HF chat template once (:func:`~em_interp.models.chat.chat_tokens`: one
BOS, left padding, a mask). With ``chat=False`` text is tokenized as plain text
(``add_special_tokens=True``: the tokenizer's own BOS, once) and left-padded the same way.

:func:`token_batches` tokenizes and pads **one batch at a time**, so a 12,000-prompt set is
never padded to its longest prompt as one tensor, and batches are the same whatever the run
(resumable stores depend on it). :func:`last_positions` and :func:`pool` read the last real
token / the mean over real tokens of left- *or* right-padded batches.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float, Int

from em_interp.errors import DataError, TokenizationError
from em_interp.models.chat import ChatTokens, chat_tokens, left_pad, pad_id

Reduce = Literal["last", "mean", "none"]


# ------------------------------------------------------------------ models


def unwrap(model):
    """The ``HookedTransformer`` inside a ``Loaded`` (or the model itself)."""
    return getattr(model, "model", model) if hasattr(model, "card") else model


def tokenizer_of(model):
    """The HF tokenizer of a ``Loaded`` (as HF made it), else the TL model's own."""
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise TokenizationError("this model has no tokenizer; pass token ids instead of text.")
    return tok


def describe_model(model) -> dict:
    """JSON-safe identity of a model for manifests: card, variant, TL model name, shape."""
    tl = unwrap(model)
    info = {"model_name": getattr(tl.cfg, "model_name", None), "n_layers": tl.cfg.n_layers,
            "d_model": tl.cfg.d_model, "d_mlp": tl.cfg.d_mlp, "n_heads": tl.cfg.n_heads,
            "dtype": str(tl.cfg.dtype).replace("torch.", "")}
    card = getattr(model, "card", None)
    if card is not None:
        info.update(card=card.name, variant=model.variant,
                    adapters=[str(a) for a in getattr(model, "adapter_dirs", ())])
    return info


def model_device(model) -> torch.device:
    """The device of the model's first block (where token ids must go)."""
    return torch.device(unwrap(model).cfg.device)


# ------------------------------------------------------------------ prompts


def _is_conversation(x) -> bool:
    return isinstance(x, Sequence) and not isinstance(x, str) and len(x) > 0 and all(
        isinstance(m, dict) and "role" in m for m in x)


def as_prompt_list(prompts) -> list:
    """A flat list of prompts (strings or conversations) from any accepted text input."""
    if hasattr(prompts, "prompts") and hasattr(prompts, "meta"):  # a PromptSet
        prompts = prompts.prompts
    if isinstance(prompts, str) or _is_conversation(prompts):
        return [prompts]
    if not isinstance(prompts, Sequence) or isinstance(prompts, bytes):
        raise DataError(f"prompts must be a string, a conversation, a PromptSet or a list of "
                        f"them; got {type(prompts).__name__}.")
    out = list(prompts)
    if not out:
        raise DataError("the prompt list is empty; pass at least one prompt.")
    for i, p in enumerate(out):
        if not (isinstance(p, str) or _is_conversation(p)):
            raise DataError(f"prompt {i} is a {type(p).__name__} ({str(p)[:60]!r}); each prompt "
                            "must be a string or a list of {'role', 'content'} messages.")
    return out


def _plain_tokens(tokenizer, texts: list[str]) -> ChatTokens:
    rows = [tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]
    if any(len(r) == 0 for r in rows):
        raise DataError("a prompt tokenized to no tokens; remove empty prompts.")
    return left_pad(rows, pad_id(tokenizer), texts=texts)




def _from_tensors(tokens: torch.Tensor, mask: torch.Tensor | None) -> ChatTokens:
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2 or tokens.dtype not in (torch.long, torch.int, torch.int32):
        raise DataError(f"token ids must be an integer tensor [batch, pos], got "
                        f"{tuple(tokens.shape)} {tokens.dtype}.")
    if mask is None:
        mask = torch.ones_like(tokens)
    if mask.ndim == 1:
        mask = mask[None]
    if mask.shape != tokens.shape:
        raise DataError(f"attention_mask {tuple(mask.shape)} does not match tokens "
                        f"{tuple(tokens.shape)}.")
    return ChatTokens(tokens=tokens.long(), attention_mask=mask.long(),
                      texts=[""] * tokens.shape[0])


def tokenize(model, prompts, *, chat: bool = True, system: str | None = None,
             device: str | torch.device | None = None) -> ChatTokens:
    """All of ``prompts`` as one left-padded :class:`ChatTokens` (see the module docstring)."""
    if isinstance(prompts, ChatTokens):
        ct = prompts
    elif torch.is_tensor(prompts):
        ct = _from_tensors(prompts, None)
    elif isinstance(prompts, tuple) and len(prompts) == 2 and torch.is_tensor(prompts[0]):
        ct = _from_tensors(prompts[0], prompts[1])
    else:
        items = as_prompt_list(prompts)
        tok = tokenizer_of(model)
        if chat:
            ct = chat_tokens(tok, items, system=system)
        else:
            if not all(isinstance(p, str) for p in items):
                raise DataError("chat=False takes plain strings, not conversations.")
            ct = _plain_tokens(tok, items)
    if device is not None:
        ct = ChatTokens(ct.tokens.to(device), ct.attention_mask.to(device), ct.texts)
    return ct


def n_prompts(prompts) -> int:
    """How many prompts ``prompts`` holds (without tokenizing text)."""
    if isinstance(prompts, ChatTokens):
        return len(prompts)
    if torch.is_tensor(prompts):
        return 1 if prompts.ndim == 1 else prompts.shape[0]
    if isinstance(prompts, tuple) and len(prompts) == 2 and torch.is_tensor(prompts[0]):
        return n_prompts(prompts[0])
    return len(as_prompt_list(prompts))


@dataclass(frozen=True)
class Batch:
    """One batch of :func:`token_batches`: prompts ``start .. start + len(tokens) - 1``."""

    start: int
    tokens: ChatTokens

    @property
    def stop(self) -> int:
        return self.start + len(self.tokens)


def token_batches(model, prompts, batch_size: int, *, chat: bool = True,
                  system: str | None = None, start: int = 0,
                  stop: int | None = None) -> Iterator[Batch]:
    """Tokenize and left-pad ``prompts[start:stop]`` batch by batch, on the model's device.

    Batch ``k`` always holds prompts ``start + k * batch_size ...``, so two runs over the same
    prompts see identical batches (and identical padding).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = model_device(model)
    if isinstance(prompts, ChatTokens) or torch.is_tensor(prompts) or (
            isinstance(prompts, tuple) and len(prompts) == 2 and torch.is_tensor(prompts[0])):
        full = tokenize(model, prompts)
        stop = len(full) if stop is None else stop
        for s in range(start, stop, batch_size):
            e = min(s + batch_size, stop)
            tok, mask = full.tokens[s:e], full.attention_mask[s:e]
            keep = mask.any(0).nonzero()  # drop columns that are padding in every row
            lo, hi = int(keep.min()), int(keep.max()) + 1
            yield Batch(s, ChatTokens(tok[:, lo:hi].to(device), mask[:, lo:hi].to(device),
                                      full.texts[s:e]))
        return
    items = as_prompt_list(prompts)
    stop = len(items) if stop is None else stop
    for s in range(start, stop, batch_size):
        e = min(s + batch_size, stop)
        yield Batch(s, tokenize(model, items[s:e], chat=chat, system=system, device=device))


def batch_list(model, prompts, attention_mask, batch_size: int, chat: bool = True,
               system: str | None = None) -> list[Batch]:
    """:func:`token_batches` as a list, accepting a separate ``attention_mask`` for a token tensor."""
    if torch.is_tensor(prompts) and attention_mask is not None:
        prompts = (prompts, attention_mask)
    elif attention_mask is not None:
        raise DataError("attention_mask goes with a token tensor; text prompts and ChatTokens "
                        "carry their own mask.")
    return list(token_batches(model, prompts, batch_size, chat=chat, system=system))


def left_align(ct: ChatTokens) -> ChatTokens:
    """Move right- or mixed-padded rows to the left, so ``[:, -1]`` is the last real token."""
    mask = ct.attention_mask.bool()
    if bool(mask[:, -1].all()):
        return ct
    width = mask.shape[1]
    last = (mask * torch.arange(width, device=mask.device)).argmax(-1)
    shift = width - 1 - last
    idx = (torch.arange(width, device=mask.device)[None] - shift[:, None]) % width
    return ChatTokens(ct.tokens.gather(1, idx), ct.attention_mask.gather(1, idx), ct.texts)


def prompts_hash(prompts, *, chat: bool = True, system: str | None = None) -> str:
    """A stable hash of a prompt input (text and settings, or token ids), for manifests."""
    h = hashlib.sha256()
    if isinstance(prompts, ChatTokens) or torch.is_tensor(prompts) or (
            isinstance(prompts, tuple) and torch.is_tensor(prompts[0])):
        ct = tokenize(None, prompts)
        h.update(ct.tokens.cpu().numpy().tobytes())
        h.update(ct.attention_mask.cpu().numpy().tobytes())
    else:
        h.update(json.dumps([as_prompt_list(prompts), chat, system], sort_keys=True).encode())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------ positions and pooling


def last_positions(attention_mask: Int[torch.Tensor, "batch pos"]) -> Int[torch.Tensor, " batch"]:
    """Index of each row's last real token, for left- or right-padded batches."""
    if not bool(attention_mask.bool().any(-1).all()):
        raise TokenizationError("a row of the attention mask has no real token.")
    pos = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (attention_mask.bool() * pos).argmax(-1)


def first_positions(attention_mask: Int[torch.Tensor, "batch pos"]) -> Int[torch.Tensor, " batch"]:
    """Index of each row's first real token."""
    return attention_mask.bool().long().argmax(-1)


def pool(acts: Float[torch.Tensor, "batch pos ..."], attention_mask: Int[torch.Tensor, "batch pos"],
         reduce: Reduce) -> torch.Tensor | list[torch.Tensor]:
    """Reduce activations over positions using real tokens only.

    ``"last"`` -> ``[batch, ...]`` at each row's last real token; ``"mean"`` -> ``[batch, ...]``
    averaged over real tokens (accumulated in fp32, returned in ``acts``' dtype); ``"none"`` ->
    a list of ``[n_real_tokens, ...]`` tensors, one per row.
    """
    mask = attention_mask.to(acts.device).bool()
    if reduce == "last":
        idx = last_positions(mask)
        return acts[torch.arange(acts.shape[0], device=acts.device), idx]
    if reduce == "mean":
        w = mask.to(torch.float32).reshape(*mask.shape, *([1] * (acts.ndim - 2)))
        total = (acts.float() * w).sum(1)
        return (total / w.sum(1).clamp_min(1)).to(acts.dtype)
    if reduce == "none":
        return [acts[i][mask[i]] for i in range(acts.shape[0])]
    raise ValueError(f"reduce must be 'last', 'mean' or 'none', got {reduce!r}")


# ------------------------------------------------------------------ single tokens


def single_token_id(tokenizer, word: str | int, *, first_token: bool = False) -> int:
    """The id of ``word`` when it is exactly one token (ids pass through), looked up, never typed.

    A word that splits raises :class:`~em_interp.errors.TokenizationError` showing the pieces;
    ``first_token=True`` takes the first piece instead (what the model would emit first).
    """
    if isinstance(word, int) and not isinstance(word, bool):
        return word
    ids = tokenizer.encode(word, add_special_tokens=False)
    if not ids:
        raise TokenizationError(f"{word!r} encodes to no tokens.")
    if len(ids) > 1 and not first_token:
        pieces = [tokenizer.decode([i]) for i in ids]
        raise TokenizationError(
            f"{word!r} is not one token: it splits into {pieces} (ids {ids}). Pass "
            f"first_token=True to use its first piece {pieces[0]!r}, pick a single-token "
            "spelling (often with a leading space, e.g. ' Sure'), or pass the token id.")
    return ids[0]
