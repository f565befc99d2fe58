"""Chat prompts -> token ids, with the chat template applied exactly once.

TL's ``to_tokens`` prepends BOS; a chat template usually writes BOS (or ``<|im_start|>``, which
is SmolLM2's BOS) itself, so ``model.to_tokens(tokenizer.apply_chat_template(..., tokenize=False))``
gives two of them, and SmolLM2 then answers with garbage. :func:`chat_tokens` renders the HF
chat template to text and tokenizes it with ``add_special_tokens=False``, so the ids are exactly
the template's. Batches are left-padded, so the last position of every row is the last prompt
token (what last-position analyses and generation want); pass ``attention_mask`` to the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Int

Conversation = list[dict[str, str]]
PromptLike = str | Conversation


@dataclass(frozen=True)
class ChatTokens:
    """A left-padded batch of chat-templated prompts."""

    tokens: Int[torch.Tensor, "batch pos"]
    """Token ids, left-padded with the tokenizer's pad id."""
    attention_mask: Int[torch.Tensor, "batch pos"]
    """1 for real tokens, 0 for padding."""
    texts: list[str]
    """The rendered chat-template text of each prompt."""

    @property
    def lengths(self) -> list[int]:
        """Number of real (non-pad) tokens of each prompt."""
        return self.attention_mask.sum(-1).tolist()

    def __len__(self) -> int:
        return self.tokens.shape[0]


def _as_conversations(prompts, system: str | None) -> list[Conversation]:
    if isinstance(prompts, str):
        prompts = [prompts]
    elif isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], dict):
        prompts = [prompts]
    if not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError("chat_tokens needs a prompt string, a conversation, or a non-empty list "
                         "of them")
    convs = []
    for p in prompts:
        if isinstance(p, str):
            conv = [{"role": "user", "content": p}]
        elif isinstance(p, Sequence) and all(isinstance(m, dict) and "role" in m for m in p):
            conv = list(p)
        else:
            raise ValueError(f"a prompt must be a string or a list of {{'role', 'content'}} "
                             f"messages, got {type(p).__name__}: {str(p)[:80]!r}")
        if system is not None and conv[0]["role"] != "system":
            conv = [{"role": "system", "content": system}, *conv]
        convs.append(conv)
    return convs


def chat_tokens(
    tokenizer,
    prompts: PromptLike | Sequence[PromptLike],
    *,
    system: str | None = None,
    add_generation_prompt: bool = True,
    device: str | torch.device | None = None,
) -> ChatTokens:
    """Apply ``tokenizer``'s chat template once to each prompt and left-pad the batch.

    ``prompts`` is a user message, a conversation (list of ``{"role", "content"}`` dicts), or a
    list of either. ``system`` is prepended as a system message where a conversation has none.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no chat template; "
            "use model.to_tokens for plain text."
        )
    texts, rows = [], []
    for conv in _as_conversations(prompts, system):
        text = tokenizer.apply_chat_template(conv, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        bos = tokenizer.bos_token_id
        if bos is not None and len(ids) > 1 and ids[0] == bos and ids[1] == bos:
            ids = ids[1:]  # a template that writes BOS on top of one already written
        texts.append(text)
        rows.append(ids)
    return left_pad(rows, pad_id(tokenizer), texts=texts, device=device)


def pad_id(tokenizer) -> int:
    """The id used for padding: the tokenizer's pad token, else its EOS, else 0 (never attended)."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0


def left_pad(rows: Sequence[Sequence[int]], pad: int, *, texts: Sequence[str] | None = None,
             device: str | torch.device | None = None) -> ChatTokens:
    """Token-id rows -> one left-padded batch with its mask, so ``[:, -1]`` is each last token.

    The one padding routine of the toolkit (re-exported as :func:`em_interp.inputs.left_pad`).
    An empty row is refused: it would be a prompt the model never sees.
    """
    if not rows:
        raise ValueError("no rows to pad.")
    if any(len(r) == 0 for r in rows):
        raise ValueError("a prompt tokenized to no tokens; remove empty prompts.")
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, width - len(r):] = torch.as_tensor(list(r), dtype=torch.long)
        mask[i, width - len(r):] = 1
    if device is not None:
        tokens, mask = tokens.to(device), mask.to(device)
    return ChatTokens(tokens=tokens, attention_mask=mask,
                      texts=list(texts) if texts is not None else [""] * len(rows))
