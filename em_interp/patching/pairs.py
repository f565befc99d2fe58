"""Prompt pairs for activation patching: which source prompt is patched into which destination.

A patching run (:mod:`em_interp.patching.sweep`, :mod:`em_interp.patching.fine`) takes K
(source, destination) pairs. :class:`PromptPairs` holds them as indices into two prompt
collections, so the Qwen paper's K = 2500 random risky -> benign pairs (Sec. III.C) are drawn
from two prompt sets without copying prompts (:func:`sample_pairs`), and the reverse control is
the same pairs with the roles swapped (:meth:`PromptPairs.reverse`). :func:`as_prompt_pairs`
accepts the shorter forms every patching function takes: a tuple ``(sources, dests)`` paired row
by row, or a list of ``(source, dest)`` tuples whose prompts are text, conversations or token ids.

**Disjoint halves.** A site, a layer or a set of neurons chosen on some pairs and then measured on
the same pairs has its effect overstated (the choice picked up the noise of those pairs). The
choice and the measurement must use different *prompts*, not only different pairs: two pairs
that share a source prompt share that prompt's contribution to the effect.
:meth:`PromptPairs.split` partitions the source prompts and the destination prompts into a fit
and an eval part (``fraction`` of each way in the fit part) and keeps each pair whose source and
destination fall in the same part; the pairs that cross the parts are dropped, so about
``fraction**2`` of the pairs survive in the fit half and ``(1 - fraction)**2`` in the eval half
(a quarter each at 0.5). :func:`sample_split_pairs` partitions the prompt sets first and then
draws ``k`` pairs inside each part, so nothing is dropped. Prompts are compared by content (the
text or conversation, or the real token ids), so a prompt that occurs twice in a set, or in both
sets, lands in one part only. :meth:`PromptPairs.prompt_ids` lists the prompts a set of pairs
uses (indices into its sets plus content keys), for a run to record what it fit on and what it
evaluated on, and :meth:`PromptPairs.shared_prompts` checks two sets of pairs for overlap.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from em_interp.errors import ConfigError, DataError
from em_interp.inputs import as_prompt_list, left_pad, n_prompts, prompts_hash, tokenize
from em_interp.models.chat import ChatTokens


def _take(prompts, idx: Sequence[int]):
    """The prompts at ``idx`` of any input :func:`em_interp.inputs.tokenize` accepts."""
    idx = list(idx)
    if isinstance(prompts, ChatTokens):
        return ChatTokens(prompts.tokens[idx], prompts.attention_mask[idx],
                          [prompts.texts[i] for i in idx])
    if torch.is_tensor(prompts):
        return (prompts[None] if prompts.ndim == 1 else prompts)[idx]
    if isinstance(prompts, tuple) and len(prompts) == 2 and torch.is_tensor(prompts[0]):
        return prompts[0][idx], prompts[1][idx]
    if hasattr(prompts, "subset") and hasattr(prompts, "meta"):  # a PromptSet
        return prompts.subset(idx)
    if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts
                                    and isinstance(prompts[0], dict)):
        prompts = [prompts]
    return [prompts[i] for i in idx]


def _is_token_input(prompts) -> bool:
    return (isinstance(prompts, ChatTokens) or torch.is_tensor(prompts)
            or (isinstance(prompts, tuple) and len(prompts) == 2 and torch.is_tensor(prompts[0])))


def prompt_keys(prompts, idx: Sequence[int]) -> list[str]:
    """A content key per prompt ``prompts[i]`` for ``i`` in ``idx``: a hash of the text or
    conversation, or of the real (unpadded) token ids, so equal prompts get equal keys whatever
    set they sit in and however they are padded."""
    idx = list(idx)
    if _is_token_input(prompts):
        ct = tokenize(None, prompts)
        raw = [json.dumps(ct.tokens[i][ct.attention_mask[i].bool()].tolist()) for i in idx]
        tag = "tokens"
    else:
        items = as_prompt_list(prompts)
        raw = [json.dumps(items[i], sort_keys=True) for i in idx]
        tag = "text"
    return [hashlib.sha256(f"{tag}:{r}".encode()).hexdigest()[:16] for r in raw]


@dataclass(frozen=True)
class PromptIds:
    """The prompts a set of pairs uses (:meth:`PromptPairs.prompt_ids`).

    ``sources`` / ``dests`` are sorted indices into the pairs' ``source_set`` / ``dest_set``;
    ``source_keys`` / ``dest_keys`` are their content keys (:func:`prompt_keys`), in the same
    order, which compare prompts across different sets.
    """

    sources: tuple[int, ...]
    dests: tuple[int, ...]
    source_keys: tuple[str, ...] = ()
    dest_keys: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        """No prompt at all (e.g. two sets of pairs share none: see
        :meth:`PromptPairs.shared_prompts`)."""
        return not self.sources and not self.dests

    def keys(self) -> frozenset[str]:
        """The content keys of every prompt, in either role."""
        return frozenset(self.source_keys) | frozenset(self.dest_keys)

    def to_dict(self) -> dict:
        """Indices and content keys, JSON-safe."""
        return {"sources": list(self.sources), "dests": list(self.dests),
                "source_keys": list(self.source_keys), "dest_keys": list(self.dest_keys)}


@dataclass(frozen=True)
class PairSplit:
    """Two sets of pairs that share no prompt (:meth:`PromptPairs.split`,
    :func:`sample_split_pairs`); unpacks as ``fit, eval = split``."""

    fit: PromptPairs
    """Pairs to choose on (layers, heads, neurons)."""
    eval: PromptPairs
    """Pairs to measure the chosen sites on; no source or destination prompt of ``fit``."""
    dropped: int = 0
    """Pairs of the original set whose source and destination fell in different parts."""
    fraction: float = 0.5
    """Share of each way's prompts put in the fit part."""
    seed: int = 0

    def __iter__(self) -> Iterator[PromptPairs]:
        return iter((self.fit, self.eval))

    def to_dict(self) -> dict:
        """Pair counts and the prompts of each half."""
        return {"n_fit": len(self.fit), "n_eval": len(self.eval), "dropped": self.dropped,
                "fraction": self.fraction, "seed": self.seed,
                "fit_prompts": self.fit.prompt_ids().to_dict(),
                "eval_prompts": self.eval.prompt_ids().to_dict()}


def _partition(source_keys: Sequence[str], dest_keys: Sequence[str], fraction: float,
               seed: int) -> frozenset[str]:
    """The content keys put in the fit part: ``round(fraction * n)`` of the distinct source
    keys (at least one, and one left over), then as many of the distinct destination keys as
    makes the same share of them (a key already placed as a source keeps its part)."""
    if not 0 < fraction < 1:
        raise ConfigError(f"fraction must be in (0, 1), got {fraction}.")
    rng = random.Random(seed)
    fit: set[str] = set()
    placed: set[str] = set()
    for what, keys in (("source", source_keys), ("destination", dest_keys)):
        distinct = sorted(set(keys))
        if len(distinct) < 2:
            raise DataError(f"cannot split pairs with {len(distinct)} distinct {what} prompt(s) "
                            f"into two disjoint halves; use at least two {what} prompts.")
        target = min(max(round(fraction * len(distinct)), 1), len(distinct) - 1)
        free = [k for k in distinct if k not in placed]
        rng.shuffle(free)
        need = max(0, target - sum(k in fit for k in distinct))
        fit.update(free[:need])
        placed.update(distinct)
    return frozenset(fit)


@dataclass(frozen=True)
class PromptPairs:
    """K (source, destination) prompt pairs, as indices into two prompt collections.

    ``source_set`` / ``dest_set`` are anything :func:`em_interp.inputs.tokenize` accepts (lists
    of strings or conversations, a :class:`~em_interp.data.PromptSet`, token tensors,
    ``(tokens, attention_mask)``, :class:`~em_interp.models.chat.ChatTokens`); pair ``k`` is
    ``(source_set[source_index[k]], dest_set[dest_index[k]])``.
    """

    source_set: object
    dest_set: object
    source_index: tuple[int, ...]
    dest_index: tuple[int, ...]
    name: str = "pairs"
    """A label for figures, e.g. ``"forward (risky -> benign)"``."""

    def __post_init__(self):
        if len(self.source_index) != len(self.dest_index):
            raise DataError(f"pairs {self.name!r}: {len(self.source_index)} source indices for "
                            f"{len(self.dest_index)} destination indices.")
        if not self.source_index:
            raise DataError(f"pairs {self.name!r} is empty; pass at least one pair.")
        for what, idx, pool in (("source", self.source_index, self.source_set),
                                ("destination", self.dest_index, self.dest_set)):
            n = n_prompts(pool)
            bad = [i for i in idx if not 0 <= i < n]
            if bad:
                raise DataError(f"pairs {self.name!r}: {what} index {bad[0]} is out of range "
                                f"for {n} prompts.")

    def __len__(self) -> int:
        return len(self.source_index)

    @classmethod
    def from_lists(cls, sources, dests, name: str = "pairs") -> PromptPairs:
        """Pair ``sources[k]`` with ``dests[k]`` (equal lengths)."""
        ns, nd = n_prompts(sources), n_prompts(dests)
        if ns != nd:
            raise DataError(f"{ns} sources for {nd} destinations; pass equal numbers, or use "
                            "sample_pairs to draw random pairs.")
        return cls(sources, dests, tuple(range(ns)), tuple(range(nd)), name)

    @property
    def sources(self):
        """The source prompt of every pair, in pair order."""
        return _take(self.source_set, self.source_index)

    @property
    def dests(self):
        """The destination prompt of every pair, in pair order."""
        return _take(self.dest_set, self.dest_index)

    def reverse(self, name: str | None = None) -> PromptPairs:
        """The same pairs with source and destination swapped (the reverse control)."""
        return PromptPairs(self.dest_set, self.source_set, self.dest_index, self.source_index,
                     name or f"reverse of {self.name}")

    def unique_sources(self):
        """Each source prompt once (for statistics over the source set)."""
        return _take(self.source_set, sorted(set(self.source_index)))

    def unique_dests(self):
        """Each destination prompt once."""
        return _take(self.dest_set, sorted(set(self.dest_index)))

    def prompt_ids(self) -> PromptIds:
        """The distinct source and destination prompts these pairs use: sorted indices into
        ``source_set`` / ``dest_set`` and their content keys."""
        src, dst = sorted(set(self.source_index)), sorted(set(self.dest_index))
        return PromptIds(tuple(src), tuple(dst), tuple(prompt_keys(self.source_set, src)),
                         tuple(prompt_keys(self.dest_set, dst)))

    def shared_prompts(self, other: PromptPairs) -> PromptIds:
        """This pairs' prompts (as source or destination) whose content also occurs in
        ``other``'s pairs, in either role; ``.empty`` when the two share no prompt."""
        mine, theirs = self.prompt_ids(), other.prompt_ids().keys()
        keep_s = [(i, k) for i, k in zip(mine.sources, mine.source_keys, strict=True)
                  if k in theirs]
        keep_d = [(i, k) for i, k in zip(mine.dests, mine.dest_keys, strict=True) if k in theirs]
        return PromptIds(tuple(i for i, _ in keep_s), tuple(i for i, _ in keep_d),
                         tuple(k for _, k in keep_s), tuple(k for _, k in keep_d))

    def subset(self, pairs: Sequence[int], name: str | None = None) -> PromptPairs:
        """The pairs at positions ``pairs`` (same prompt sets, so indices stay comparable)."""
        pairs = list(pairs)
        return PromptPairs(self.source_set, self.dest_set,
                           tuple(self.source_index[k] for k in pairs),
                           tuple(self.dest_index[k] for k in pairs), name or self.name)

    def split(self, fraction: float = 0.5, seed: int = 0) -> PairSplit:
        """Two halves that share no source and no destination prompt.

        The distinct source prompts are shuffled (``seed``) and ``round(fraction * n)`` of them
        go to the fit part, the rest to the eval part; the destination prompts likewise. A pair
        is kept in the fit half when its source and destination are both in the fit part, in
        the eval half when both are in the eval part, and dropped otherwise: about
        ``fraction**2 * K`` pairs are fit pairs and ``(1 - fraction)**2 * K`` eval pairs (a
        quarter each at 0.5); ``dropped`` counts the rest. To keep ``k`` pairs per half, split
        the prompt sets instead (:func:`sample_split_pairs`). Prompts are compared by content,
        so a prompt that is a source and a destination, or occurs twice, is in one part only.

        Args:
            fraction: Share of each way's prompts in the fit part, in (0, 1).
            seed: Seed of the shuffle.

        Returns:
            A :class:`PairSplit` (``fit, eval = pairs.split()``); both halves index the same
            prompt sets as these pairs.

        Raises:
            DataError: fewer than two distinct source or destination prompts, or a half with
                no pair left (draw more pairs, or use :func:`sample_split_pairs`).
        """
        sk = prompt_keys(self.source_set, self.source_index)
        dk = prompt_keys(self.dest_set, self.dest_index)
        fit_keys = _partition(sk, dk, fraction, seed)
        fit = [k for k in range(len(self)) if sk[k] in fit_keys and dk[k] in fit_keys]
        ev = [k for k in range(len(self)) if sk[k] not in fit_keys and dk[k] not in fit_keys]
        if not fit or not ev:
            raise DataError(f"splitting {len(self)} pairs of {len(set(sk))} sources x "
                            f"{len(set(dk))} destinations by prompts left {len(fit)} fit and "
                            f"{len(ev)} eval pairs; draw more pairs, or split the prompt sets "
                            "first with sample_split_pairs.")
        return PairSplit(self.subset(fit, f"{self.name} (fit)"),
                         self.subset(ev, f"{self.name} (eval)"),
                         dropped=len(self) - len(fit) - len(ev), fraction=fraction, seed=seed)

    def hash(self) -> str:
        """A stable hash of the pair prompts, in order."""
        h = hashlib.sha256()
        for part in (prompts_hash(self.sources), prompts_hash(self.dests)):
            h.update(part.encode())
        return h.hexdigest()[:16]


def sample_pairs(source_prompts, dest_prompts, k: int, seed: int = 0, *,
                 name: str = "pairs") -> PromptPairs:
    """``k`` distinct random (source, destination) pairs, uniformly from all combinations.

    The Qwen paper samples K = 2500 risky -> benign pairs (Sec. III.C); its reverse control is
    ``sample_pairs(...).reverse()`` (or a fresh draw with the sets swapped).

    Args:
        source_prompts: The source prompt set (any prompt input, e.g. a PromptSet).
        dest_prompts: The destination prompt set.
        k: Number of pairs; at most ``len(source_prompts) * len(dest_prompts)``.
        seed: Seed of the draw (same seed, same pairs).
        name: A label for the pairs.

    Returns:
        The :class:`PromptPairs`.
    """
    ns, nd = n_prompts(source_prompts), n_prompts(dest_prompts)
    if not 1 <= k <= ns * nd:
        raise DataError(f"cannot draw {k} distinct pairs from {ns} sources x {nd} destinations;"
                        f" pass 1 <= k <= {ns * nd}.")
    flat = random.Random(seed).sample(range(ns * nd), k)
    return PromptPairs(source_prompts, dest_prompts, tuple(f // nd for f in flat),
                 tuple(f % nd for f in flat), name)


def sample_split_pairs(source_prompts, dest_prompts, k_fit: int, k_eval: int, *,
                       fraction: float = 0.5, seed: int = 0, name: str = "pairs") -> PairSplit:
    """Partition the prompt sets, then draw ``k_fit`` and ``k_eval`` pairs inside the parts.

    ``round(fraction * n)`` of the (distinct, by content) source prompts and of the destination
    prompts form the fit part, the rest the eval part (as in :meth:`PromptPairs.split`); the fit
    pairs are ``k_fit`` distinct random (source, destination) combinations of the fit part, the
    eval pairs ``k_eval`` of the eval part. No prompt is shared and no pair is dropped. Both
    halves index the full prompt sets, so their indices compare with each other.

    Raises:
        DataError: a part has fewer combinations than the pairs requested.
    """
    ns, nd = n_prompts(source_prompts), n_prompts(dest_prompts)
    sk, dk = prompt_keys(source_prompts, range(ns)), prompt_keys(dest_prompts, range(nd))
    fit_keys = _partition(sk, dk, fraction, seed)
    rng = random.Random(seed)
    halves = []
    for part, k in (("fit", k_fit), ("eval", k_eval)):
        inside = part == "fit"
        src = [i for i in range(ns) if (sk[i] in fit_keys) == inside]
        dst = [i for i in range(nd) if (dk[i] in fit_keys) == inside]
        if not 1 <= k <= len(src) * len(dst):
            raise DataError(f"the {part} part has {len(src)} sources x {len(dst)} destinations;"
                            f" cannot draw {k} distinct pairs from it. Pass 1 <= k_{part} <= "
                            f"{len(src) * len(dst)}, or more prompts.")
        flat = rng.sample(range(len(src) * len(dst)), k)
        halves.append(PromptPairs(source_prompts, dest_prompts,
                                  tuple(src[f // len(dst)] for f in flat),
                                  tuple(dst[f % len(dst)] for f in flat), f"{name} ({part})"))
    return PairSplit(halves[0], halves[1], dropped=0, fraction=fraction, seed=seed)


def _is_tokens(p) -> bool:
    return torch.is_tensor(p) or isinstance(p, ChatTokens)


def _token_side(items: list, what: str) -> ChatTokens:
    """One side of a list of pairs given as token ids: each a 1-D or ``[1, pos]`` id tensor or
    a one-prompt :class:`ChatTokens` -> one left-padded :class:`ChatTokens` (pad id 0, masked)."""
    rows, texts = [], []
    for k, p in enumerate(items):
        if isinstance(p, ChatTokens):
            if len(p) != 1:
                raise DataError(f"the {what} of pair {k} is a ChatTokens of {len(p)} prompts; "
                                "each pair holds one prompt per side (pass the sets as "
                                "(sources, dests) to pair them row by row).")
            rows.append(p.tokens[0][p.attention_mask[0].bool()].tolist())
            texts.append(p.texts[0])
        elif torch.is_tensor(p):
            t = p[0] if p.ndim == 2 and p.shape[0] == 1 else p
            if t.ndim != 1 or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
                raise DataError(f"the {what} of pair {k} is a {tuple(p.shape)} {p.dtype} tensor;"
                                " a prompt given as tokens is an integer id tensor [pos] or "
                                "[1, pos].")
            rows.append(t.tolist())
            texts.append("")
        else:
            raise DataError(f"the {what} of pair {k} is a {type(p).__name__}, but other "
                            f"{what}s are token ids; give every {what} the same way (tokenize "
                            "text with em_interp.inputs.tokenize first).")
    if any(len(r) == 0 for r in rows):
        raise DataError(f"a {what} has no tokens; remove empty prompts.")
    return left_pad(rows, 0, texts=texts)


def as_prompt_pairs(pairs) -> PromptPairs:
    """A :class:`PromptPairs` from ``PromptPairs``, a tuple ``(sources, dests)`` or a list of
    ``(source, dest)`` tuples.

    In the list form each prompt is a string, a conversation, or token ids (a 1-D or
    ``[1, pos]`` id tensor, or a one-prompt :class:`ChatTokens`); the token ids of one side are
    left-padded into one ``ChatTokens``, which patches exactly as the same rows passed as a set.
    """
    if isinstance(pairs, PromptPairs):
        return pairs
    if isinstance(pairs, tuple) and len(pairs) == 2:
        return PromptPairs.from_lists(pairs[0], pairs[1])
    if isinstance(pairs, list) and pairs and all(isinstance(p, tuple) and len(p) == 2
                                                 for p in pairs):
        sides = []
        for i, what in ((0, "source"), (1, "destination")):
            items = [p[i] for p in pairs]
            sides.append(_token_side(items, what) if any(_is_tokens(x) for x in items)
                         else items)
        return PromptPairs.from_lists(sides[0], sides[1])
    raise DataError("pairs must be a PromptPairs (see sample_pairs), a tuple (sources, dests) or a "
                    f"list of (source, dest) tuples; got {type(pairs).__name__}.")
