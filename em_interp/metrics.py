"""Metrics: what an intervention or a patch is scored by.

A :class:`Metric` maps one model output to **one number per prompt** (a ``[batch]`` tensor),
reading each prompt's **last position** (``[:, -1]``: batches are left-padded, so that is the
last real token). It reads either the logits (``hook=None``) or the activation of one hook point
(``hook="blocks.63.mlp.hook_post"``), in which case a forward can stop right after that block
(``stop_at_layer = metric.stop_layer``). Patching, steering screens, ablations and BLOCK-EM take
the same kind of callable, and any function ``output -> [batch]`` wrapped in :class:`Metric`
works as well. Every entry point that takes a metric passes it through :func:`as_metric` first,
so a plain function ``logits -> [batch]`` is accepted too (as a logit metric named after it).

Three metrics ship:

* :func:`refusal_score` -- the log-odds that the next token opens a refusal,
  ``log P(R) - log(1 - P(R))`` with ``P(R) = sum_{t in R} softmax(logits[:, -1])_t`` over a set
  ``R`` of refusal-opening token ids (Arditi et al. 2024, "Refusal in Language Models Is Mediated
  by a Single Direction", Sec. 2.4); positive means the model is more likely than not to start
  a refusal;
* :func:`logit_diff` -- ``logit[a] - logit[b]`` at the last position, e.g. a refusal token
  against a compliance token (``"Sorry"`` vs ``"Sure"``, looked up in the tokenizer);
* :func:`projection` -- ``(h[-1] - c) . v / |v|`` of a hook's activation on a direction ``v``
  with an optional zero point ``c``: Experiment 3 of the Qwen paper scores each patched run by
  the projection of the last layer's ``mlp.hook_post`` on the Procrustes-aligned refusal vector,
  with the organism's benign mean as the zero point (Sec. III.B-C).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float

from em_interp.errors import MetricError, TokenizationError
from em_interp.hooks import check_hook, layer_of
from em_interp.inputs import single_token_id, tokenizer_of, unwrap


@dataclass(frozen=True)
class Metric:
    """A named callable ``output -> [batch]`` that reads the logits or one hook's activation."""

    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    hook: str | None = None
    """``None``: the metric reads logits ``[batch, pos, vocab]``; else the activation of this
    hook point ``[batch, pos, ...]``."""
    logit_ids: tuple[int, ...] | None = None
    """For a logit metric that reads only these vocabulary columns (e.g. :func:`logit_diff`):
    callers may compute just these logits and pass zeros elsewhere (patching does, which skips
    most of the unembedding). ``None``: the metric may read any column."""

    def __call__(self, output: torch.Tensor) -> Float[torch.Tensor, " batch"]:
        out = self.fn(output)
        if out.ndim != 1:
            raise ValueError(f"metric {self.name!r} must return one value per prompt ([batch]),"
                             f" got shape {tuple(out.shape)}")
        return out

    @property
    def layer(self) -> int | None:
        """The block whose hook the metric reads (``None`` for logits)."""
        return None if self.hook is None else layer_of(self.hook)

    @property
    def stop_layer(self) -> int | None:
        """``stop_at_layer`` for a forward that only needs this metric (``None``: run it all)."""
        return None if self.layer is None else self.layer + 1

    def check(self, model) -> Metric:
        """Raise :class:`~em_interp.errors.HookNameError` if the model lacks the metric's hook."""
        if self.hook is not None:
            check_hook(unwrap(model), self.hook)
        return self


def as_metric(metric) -> Metric:
    """``metric`` as a :class:`Metric`: a ``Metric`` passes through; a plain callable
    ``logits [batch, pos, vocab] -> [batch]`` becomes a logit metric named after the function.

    Raises:
        MetricError: anything else (a ``TypeError``; the message says which wrapper to use).
    """
    if isinstance(metric, Metric):
        return metric
    if callable(metric) and not isinstance(metric, type):
        name = getattr(metric, "__name__", None) or type(metric).__name__
        return Metric(name=str(name), fn=metric)
    raise MetricError(f"a metric must be an em_interp.metrics.Metric or a function logits -> "
                    f"[batch]; got {type(metric).__name__} ({str(metric)[:60]!r}). Wrap it in "
                    "em_interp.metrics.Metric(name=..., fn=..., hook=...), or use logit_diff / "
                    "projection.")


def logit_diff(model, token_a: str | int, token_b: str | int, *,
               first_token: bool = False) -> Metric:
    """``logits[:, -1, a] - logits[:, -1, b]``; words must be single tokens (see
    :func:`~em_interp.inputs.single_token_id`), ids pass through."""
    tok = tokenizer_of(model)
    a = single_token_id(tok, token_a, first_token=first_token)
    b = single_token_id(tok, token_b, first_token=first_token)

    def fn(logits):
        last = logits[:, -1].float()
        return last[:, a] - last[:, b]

    return Metric(name=f"logit_diff({tok.decode([a])!r}-{tok.decode([b])!r})", fn=fn,
                  logit_ids=(a, b))


REFUSAL_OPENINGS = ("I", "Sorry", "As", "Unfortunately")
"""Words whose first token opens most refusals of chat models ("I'm sorry", "I cannot", "As an
AI", ...): the default set ``R`` of :func:`refusal_score`. "I" also opens some compliant answers,
so the score is a proxy to be read beside judged completions, as Arditi et al. use it."""


def refusal_token_ids(model, tokens: Sequence[str | int] = REFUSAL_OPENINGS) -> tuple[int, ...]:
    """The first token id of each word of ``tokens`` (ids pass through), de-duplicated."""
    if isinstance(tokens, str | int):
        tokens = [tokens]
    if not tokens:
        raise MetricError("refusal_score needs at least one refusal token (a word or an id).")
    tok = None
    out: list[int] = []
    for t in tokens:
        if isinstance(t, int) and not isinstance(t, bool):
            i = int(t)
        else:
            tok = tok or tokenizer_of(model)
            i = single_token_id(tok, str(t), first_token=True)
        if i not in out:
            out.append(i)
    return tuple(out)


def refusal_score(model, tokens: Sequence[str | int] = REFUSAL_OPENINGS) -> Metric:
    """``log P(R) - log(1 - P(R))`` at the last position, ``R`` the ids of ``tokens``.

    Computed as ``logsumexp(logits[R]) - logsumexp(logits[not R])``, which is the same log-odds
    without forming ``1 - P(R)`` (stable when ``P(R)`` is near 1). Words give their first token
    (``"I'm"`` -> ``"I"``); ids pass through. Reads every vocabulary column (``logit_ids=None``).
    """
    ids = refusal_token_ids(model, tokens)
    index = torch.tensor(ids)
    d_vocab = unwrap(model).cfg.d_vocab if hasattr(unwrap(model), "cfg") else None
    if d_vocab is not None and int(index.max()) >= d_vocab:
        raise MetricError(f"refusal token id {int(index.max())} is outside the vocabulary "
                          f"({d_vocab} tokens).")

    def fn(logits):
        last = logits[:, -1].float()
        idx = index.to(last.device)
        in_r = torch.logsumexp(last[:, idx], dim=-1)
        rest = last.index_fill(1, idx, float("-inf"))
        return in_r - torch.logsumexp(rest, dim=-1)

    try:
        tok = tokenizer_of(model)
        names = [tok.decode([i]) for i in ids]
    except TokenizationError:  # ids given for a model without a tokenizer
        names = [str(i) for i in ids]
    return Metric(name=f"refusal_score({'|'.join(names)})", fn=fn)


def projection(direction: Float[torch.Tensor, " d"], hook: str, *,
               center: Float[torch.Tensor, " d"] | None = None, normalize: bool = True) -> Metric:
    """``(act[:, -1] - center) . direction`` at ``hook`` (``direction`` unit-normalised first).

    For an attention hook with a head axis (``attn.hook_z``) the activation is flattened over
    heads first, so ``direction`` then has ``n_heads * d_head`` entries.
    """
    v = direction.detach().float().flatten()
    if normalize:
        v = v / v.norm().clamp_min(1e-12)
    c = None if center is None else center.detach().float().flatten()

    def fn(act):
        last = act[:, -1].float().flatten(1)
        if last.shape[1] != v.shape[0]:
            raise ValueError(f"projection at {hook}: the activation has {last.shape[1]} "
                             f"features, the direction {v.shape[0]}.")
        if c is not None:
            last = last - c.to(last.device)
        return last @ v.to(last.device)

    return Metric(name=f"projection@{hook}", fn=fn, hook=hook)


@torch.no_grad()
def evaluate(model, tokens: torch.Tensor, attention_mask: torch.Tensor | None,
             metric: Metric | Callable) -> Float[torch.Tensor, " batch"]:
    """Run one forward and score it with ``metric`` (stopping early for hook metrics); a plain
    function ``logits -> [batch]`` is accepted (see :func:`as_metric`)."""
    tl = unwrap(model)
    metric = as_metric(metric).check(tl)
    if metric.hook is None:
        return metric(tl(tokens, attention_mask=attention_mask))
    grabbed = {}

    def grab(act, hook):
        grabbed["x"] = act[:, -1:].detach()

    tl.run_with_hooks(tokens, attention_mask=attention_mask, return_type=None,
                      stop_at_layer=metric.stop_layer, fwd_hooks=[(metric.hook, grab)])
    return metric(grabbed["x"])
