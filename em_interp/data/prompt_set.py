"""The :class:`PromptSet`: an immutable list of prompts with labels, splits, groups and extras.

See :mod:`em_interp.data` for the shipped sets and :mod:`em_interp.data.readers` for the
public-format readers.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from em_interp.errors import DataError

Conversation = list[dict[str, str]]
SPLITS = ("train", "test")


@dataclass(frozen=True)
class PromptSet:
    """An immutable, labelled, split prompt set (see the module docstring)."""

    name: str
    prompts: tuple[str | Conversation, ...]
    """A user message or a conversation (list of ``{"role", "content"}``) per item."""
    labels: tuple[int, ...] | None = None
    """An integer label per item (e.g. 1 = risky, 0 = benign), or ``None``."""
    split: tuple[str, ...] = ()
    """``"train"`` or ``"test"`` per item; the test split is never used for fitting."""
    groups: tuple[str, ...] | None = None
    """The template / topic / category of each item, for group-wise hold-outs."""
    extra: tuple[dict[str, Any], ...] = ()
    """Other per-item fields (answers, categories, full conversations)."""
    label_names: dict[int, str] = field(default_factory=dict)
    """What each label means, e.g. ``{0: "benign", 1: "risky"}``."""
    meta: dict[str, Any] = field(default_factory=dict)
    """The header: version, purpose, source file, ..."""

    def __post_init__(self):
        n = len(self.prompts)
        if n == 0:
            raise DataError(f"prompt set {self.name!r} is empty; a set needs at least one prompt.")
        if not self.split:
            object.__setattr__(self, "split", ("train",) * n)
        if not self.extra:
            object.__setattr__(self, "extra", tuple({} for _ in range(n)))
        for fname in ("labels", "split", "groups", "extra"):
            value = getattr(self, fname)
            if value is not None and len(value) != n:
                raise DataError(f"prompt set {self.name!r}: {fname} has {len(value)} entries "
                                f"for {n} prompts.")
        bad = sorted(set(self.split) - set(SPLITS))
        if bad:
            raise DataError(f"prompt set {self.name!r}: unknown split(s) {bad}; use "
                            f"{list(SPLITS)}.")

    def __len__(self) -> int:
        return len(self.prompts)

    def __iter__(self):
        return iter(self.prompts)

    def __getitem__(self, i):
        return self.prompts[i]

    def __repr__(self) -> str:
        counts = ""
        if self.labels is not None:
            by = {self.label_names.get(k, k): self.labels.count(k) for k in sorted(set(self.labels))}
            counts = f", labels={by}"
        return (f"PromptSet({self.name!r}, n={len(self)}{counts}, "
                f"train={self.split.count('train')}, test={self.split.count('test')})")

    # ------------------------------------------------------------------ views

    @property
    def texts(self) -> list[str]:
        """The last user message of each prompt (the prompt itself for plain strings)."""
        return [user_text(p) for p in self.prompts]

    @property
    def conversations(self) -> list[Conversation]:
        """Each item as a conversation: ``extra["messages"]`` where present, else the prompt."""
        out = []
        for p, x in zip(self.prompts, self.extra, strict=True):
            if "messages" in x:
                out.append(x["messages"])
            else:
                out.append([{"role": "user", "content": p}] if isinstance(p, str) else list(p))
        return out

    def subset(self, indices: Sequence[int], name: str | None = None) -> PromptSet:
        """The items at ``indices``, in that order."""
        idx = list(indices)
        if not idx:
            raise DataError(f"subset of {self.name!r} selects no prompts.")

        def pick(seq):
            return None if seq is None else tuple(seq[i] for i in idx)

        return replace(self, name=name or self.name, prompts=pick(self.prompts),
                       labels=pick(self.labels), split=pick(self.split),
                       groups=pick(self.groups), extra=pick(self.extra))

    def train(self) -> PromptSet:
        """The items of the ``train`` split."""
        return self.subset([i for i, s in enumerate(self.split) if s == "train"],
                           f"{self.name}[train]")

    def test(self) -> PromptSet:
        """The held-out ``test`` split."""
        return self.subset([i for i, s in enumerate(self.split) if s == "test"],
                           f"{self.name}[test]")

    def where(self, label: int) -> PromptSet:
        """The items with ``label``."""
        if self.labels is None:
            raise DataError(f"prompt set {self.name!r} has no labels.")
        name = self.label_names.get(label, str(label))
        return self.subset([i for i, y in enumerate(self.labels) if y == label],
                           f"{self.name}[{name}]")

    def sample(self, n: int, seed: int = 0, *, stratify: bool = True) -> PromptSet:
        """``n`` items drawn without replacement; per label in proportion when ``stratify``."""
        if n >= len(self):
            return self
        rng = random.Random(seed)
        if stratify and self.labels is not None:
            by: dict[int, list[int]] = {}
            for i, y in enumerate(self.labels):
                by.setdefault(y, []).append(i)
            idx: list[int] = []
            keys = sorted(by)
            for j, k in enumerate(keys):
                take = (n - len(idx)) if j == len(keys) - 1 else round(n * len(by[k]) / len(self))
                idx += rng.sample(by[k], min(take, len(by[k])))
            idx.sort()
        else:
            idx = sorted(rng.sample(range(len(self)), n))
        return self.subset(idx, f"{self.name}[{n}@{seed}]")

    @property
    def ids(self) -> list[str]:
        """A content id per item (12 hex digits of the SHA-256 of the prompt), the same whatever
        subset, sample or concatenation the item is reached through. Results record which ids
        they were fit on and which they were evaluated on, so a leak between the two is
        visible (:func:`prompt_ids`)."""
        return prompt_ids(self.prompts)

    def hash(self) -> str:
        """A stable content hash (prompts, labels, split), for manifests."""
        blob = json.dumps([self.prompts, self.labels, self.split], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def describe(self) -> dict:
        """JSON-safe summary for manifests: name, size, hash, version."""
        return {"name": self.name, "n": len(self), "hash": self.hash(),
                "version": self.meta.get("version"), "source": self.meta.get("source")}


def prompt_ids(prompts) -> list[str]:
    """Content ids of prompts (strings or conversations): see :attr:`PromptSet.ids`."""
    items = prompts.prompts if isinstance(prompts, PromptSet) else list(prompts)
    return [hashlib.sha256(json.dumps(p, sort_keys=True).encode()).hexdigest()[:12]
            for p in items]


def concat(a: PromptSet, b: PromptSet, name: str | None = None) -> PromptSet:
    """Two prompt sets one after the other (labels kept if both have them)."""
    labels = None if a.labels is None or b.labels is None else a.labels + b.labels
    groups = None if a.groups is None or b.groups is None else a.groups + b.groups
    return PromptSet(name=name or f"{a.name}+{b.name}", prompts=a.prompts + b.prompts,
                     labels=labels, split=a.split + b.split, groups=groups,
                     extra=a.extra + b.extra, label_names={**a.label_names, **b.label_names},
                     meta={"parts": [a.describe(), b.describe()]})


def labelled(positive: PromptSet, negative: PromptSet, name: str | None = None,
             names: tuple[str, str] | None = None) -> PromptSet:
    """``positive`` (label 1) followed by ``negative`` (label 0) as one labelled set."""
    pos_name, neg_name = names or (positive.name, negative.name)
    return concat(replace(positive, labels=(1,) * len(positive), label_names={1: pos_name}),
                  replace(negative, labels=(0,) * len(negative), label_names={0: neg_name}),
                  name=name)


def user_text(prompt) -> str:
    """The text a person reads for a prompt: the string itself, or a conversation's last user
    turn (its last message when it has no user turn)."""
    if isinstance(prompt, str):
        return prompt
    users = [m.get("content", "") for m in prompt if m.get("role") == "user"]
    return users[-1] if users else str(prompt[-1].get("content", "")) if prompt else ""
