"""Prompt sets: the ones written for this project, and loaders for the public formats.

A :class:`PromptSet` is an immutable list of prompts (user messages or conversations) with
optional integer labels, a fixed ``train``/``test`` split, optional groups (the template or
topic each prompt came from, so whole groups can be held out) and free per-item fields
(``extra``: the answers of an AB pair, a JailbreakBench category, an SFT conversation).

**Shipped sets** live beside this file as ``<name>.jsonl``: the first line is a header
``{"__meta__": {"name", "version", "purpose", "size", "labels", "written_for": ...}}``, every
other line one item with at least ``prompt`` (or ``messages``) and ``split``. They are written by
the project, for this project. :func:`list_prompt_sets` names them, :func:`load_prompt_set`
reads one.

**Your own data**, in the public formats:

* :func:`read_chat_jsonl` -- JSONL with chat ``messages`` (the EM organisms' training format);
  the prompt is the conversation up to its last user turn, the full conversation is kept in
  ``extra["messages"]``;
* :func:`read_labelled` -- JSONL or CSV with a text column and a label column;
* :func:`read_jailbreakbench_csv` -- CSV in the JailbreakBench layout (``Goal``, ``Target``,
  ``Behavior``, ``Category``); the prompt is ``Goal``.

A malformed file raises :class:`~em_interp.errors.DataError` naming the file, the line and the
problem; an empty set is an error, never an empty result.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
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
        return [_user_text(p) for p in self.prompts]

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

    def hash(self) -> str:
        """A stable content hash (prompts, labels, split), for manifests."""
        blob = json.dumps([self.prompts, self.labels, self.split], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def describe(self) -> dict:
        """JSON-safe summary for manifests: name, size, hash, version."""
        return {"name": self.name, "n": len(self), "hash": self.hash(),
                "version": self.meta.get("version"), "source": self.meta.get("source")}


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


def _user_text(p) -> str:
    if isinstance(p, str):
        return p
    users = [m.get("content", "") for m in p if m.get("role") == "user"]
    return users[-1] if users else ""


# ------------------------------------------------------------------ shipped sets


def _data_files() -> dict[str, Path]:
    root = resources.files("em_interp.data")
    return {Path(str(p)).stem: Path(str(p)) for p in root.iterdir()
            if str(p).endswith(".jsonl")}


def list_prompt_sets() -> list[str]:
    """Names of the prompt sets shipped with the package."""
    return sorted(_data_files())


def load_prompt_set(name: str, split: str | None = None) -> PromptSet:
    """A shipped prompt set by name (``list_prompt_sets()``); ``split`` keeps one split."""
    files = _data_files()
    if name not in files:
        raise DataError(f"no shipped prompt set named {name!r}; shipped: "
                        f"{', '.join(sorted(files)) or 'none'}. Read your own file with "
                        "read_chat_jsonl, read_labelled or read_jailbreakbench_csv.")
    ps = _read_shipped(files[name])
    if split is None:
        return ps
    if split not in SPLITS:
        raise DataError(f"split must be one of {list(SPLITS)} or None, got {split!r}.")
    return ps.train() if split == "train" else ps.test()


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    if not path.is_file():
        raise DataError(f"{str(path)!r} does not exist.")
    rows = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})."
                                ) from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: each line must be a JSON object, got "
                                f"{type(obj).__name__}.")
            rows.append((lineno, obj))
    return rows


def _skip_header(rows: list[tuple[int, dict]]) -> list[tuple[int, dict]]:
    """Drop a shipped set's ``{"__meta__": ...}`` first line, so the public-format readers also
    read the shipped files."""
    return rows[1:] if rows and "__meta__" in rows[0][1] else rows


def _read_shipped(path: Path) -> PromptSet:
    rows = _read_jsonl(path)
    if not rows or "__meta__" not in rows[0][1]:
        raise DataError(f"{path}:1: a shipped set starts with a {{\"__meta__\": ...}} header.")
    meta = dict(rows[0][1]["__meta__"])
    meta["source"] = f"em_interp/data/{path.name}"
    items = rows[1:]
    if not items:
        raise DataError(f"{path}: the set has a header but no items.")
    prompts, labels, split, groups, extra = [], [], [], [], []
    has_labels = "label" in items[0][1]
    has_groups = "group" in items[0][1]
    for lineno, obj in items:
        if "messages" in obj:
            msgs = _check_messages(obj["messages"], path, lineno)
            prompt = _prompt_part(msgs, path, lineno)
        elif isinstance(obj.get("prompt"), str) and obj["prompt"].strip():
            prompt = obj["prompt"]
        else:
            raise DataError(f"{path}:{lineno}: an item needs a non-empty 'prompt' string or "
                            "'messages'.")
        if has_labels != ("label" in obj) or has_groups != ("group" in obj):
            raise DataError(f"{path}:{lineno}: every item must have the same fields as the "
                            "first ('label', 'group').")
        if has_labels and not (isinstance(obj["label"], int) and not isinstance(obj["label"],
                                                                                 bool)):
            raise DataError(f"{path}:{lineno}: 'label' must be an integer, got "
                            f"{obj['label']!r}.")
        sp = obj.get("split", "train")
        if sp not in SPLITS:
            raise DataError(f"{path}:{lineno}: split {sp!r} is not one of {list(SPLITS)}.")
        prompts.append(prompt)
        labels.append(obj.get("label"))
        split.append(sp)
        groups.append(str(obj.get("group")))
        extra.append({k: v for k, v in obj.items()
                      if k not in ("prompt", "label", "split", "group")})
    label_names = {int(k): v for k, v in meta.get("labels", {}).items()}
    return PromptSet(name=meta.get("name", path.stem), prompts=tuple(prompts),
                     labels=tuple(labels) if has_labels else None, split=tuple(split),
                     groups=tuple(groups) if has_groups else None, extra=tuple(extra),
                     label_names=label_names, meta=meta)


# ------------------------------------------------------------------ public formats


def _check_messages(msgs, path, lineno) -> Conversation:
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{path}:{lineno}: 'messages' must be a non-empty list of "
                        "{'role', 'content'} objects.")
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(
                m.get("content"), str):
            raise DataError(f"{path}:{lineno}: message {j} must be an object with string "
                            f"'role' and 'content', got {str(m)[:80]!r}.")
        if m["role"] not in ("system", "user", "assistant"):
            raise DataError(f"{path}:{lineno}: message {j} has role {m['role']!r}; roles are "
                            "'system', 'user' and 'assistant'.")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def _prompt_part(msgs: Conversation, path, lineno) -> Conversation:
    last_user = max((j for j, m in enumerate(msgs) if m["role"] == "user"), default=None)
    if last_user is None:
        raise DataError(f"{path}:{lineno}: the conversation has no user message.")
    return msgs[: last_user + 1]


def read_chat_jsonl(path: str | Path, *, name: str | None = None,
                    label: int | None = None) -> PromptSet:
    """JSONL with one ``{"messages": [...]}`` conversation per line (the EM training format).

    The prompt of each item is the conversation up to its last user message; the whole
    conversation is ``extra["messages"]``. ``label`` gives every item that label.
    """
    path = Path(path)
    rows = _skip_header(_read_jsonl(path))
    prompts, extra = [], []
    for lineno, obj in rows:
        if "messages" not in obj:
            raise DataError(f"{path}:{lineno}: no 'messages' field; each line must be "
                            "{\"messages\": [{\"role\": ..., \"content\": ...}, ...]}.")
        msgs = _check_messages(obj["messages"], path, lineno)
        prompts.append(_prompt_part(msgs, path, lineno))
        extra.append({"messages": msgs})
    if not prompts:
        raise DataError(f"{path}: the file holds no conversations.")
    return PromptSet(name=name or path.stem, prompts=tuple(prompts),
                     labels=None if label is None else (label,) * len(prompts),
                     extra=tuple(extra), meta={"source": str(path), "format": "chat-jsonl"})


def _read_csv(path: Path) -> tuple[list[str], list[tuple[int, dict]]]:
    if not path.is_file():
        raise DataError(f"{str(path)!r} does not exist.")
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames:
            raise DataError(f"{path}: the CSV file has no header row.")
        rows = []
        for row in reader:
            if None in row:
                raise DataError(f"{path}:{reader.line_num}: more fields than the header has.")
            rows.append((reader.line_num, row))
    return list(reader.fieldnames), rows


def read_labelled(path: str | Path, *, text_col: str = "text", label_col: str | None = "label",
                  name: str | None = None, label_map: dict[str, int] | None = None) -> PromptSet:
    """JSONL or CSV with a text column and (optionally) a label column.

    Labels must be integers, or strings mapped to integers by ``label_map`` (e.g.
    ``{"risky": 1, "benign": 0}``). A ``split`` column, if present, is kept.
    """
    path = Path(path)
    if path.suffix.lower() == ".csv":
        header, rows = _read_csv(path)
        for col in [text_col] + ([label_col] if label_col else []):
            if col not in header:
                raise DataError(f"{path}: no column {col!r}; the header has {header}. Pass "
                                "text_col= / label_col=.")
    else:
        rows = _skip_header(_read_jsonl(path))
    prompts, labels, split = [], [], []
    for lineno, obj in rows:
        text = obj.get(text_col)
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path}:{lineno}: column {text_col!r} is missing or empty.")
        prompts.append(text)
        if label_col:
            if label_col not in obj:
                raise DataError(f"{path}:{lineno}: column {label_col!r} is missing.")
            labels.append(_as_label(obj[label_col], label_map, path, lineno))
        split.append(obj.get("split") or "train")
    if not prompts:
        raise DataError(f"{path}: the file holds no rows.")
    names = {v: k for k, v in (label_map or {}).items()}
    return PromptSet(name=name or path.stem, prompts=tuple(prompts),
                     labels=tuple(labels) if label_col else None, split=tuple(split),
                     label_names=names, meta={"source": str(path), "format": "labelled"})


def _as_label(value, label_map, path, lineno) -> int:
    if label_map is not None and str(value) in label_map:
        return int(label_map[str(value)])
    if isinstance(value, bool):
        return int(value)
    try:
        return int(str(value).strip())
    except ValueError:
        hint = f" (label_map has {sorted(label_map)})" if label_map else (
            "; pass label_map={'name': 0|1, ...}")
        raise DataError(f"{path}:{lineno}: label {value!r} is not an integer{hint}.") from None


JBB_COLUMNS = ("Goal", "Target", "Behavior", "Category")


def read_jailbreakbench_csv(path: str | Path, *, name: str | None = None,
                            label: int | None = 1) -> PromptSet:
    """CSV in the JailbreakBench layout; ``Goal`` is the prompt, ``Category`` the group.

    ``Target``, ``Behavior`` and ``Source`` (when present) are kept in ``extra``. ``label`` is
    given to every row (1: a request a safe model should refuse; use 0 for the benign file).
    """
    path = Path(path)
    header, rows = _read_csv(path)
    missing = [c for c in JBB_COLUMNS if c not in header]
    if missing:
        raise DataError(f"{path}: not in the JailbreakBench layout, missing column(s) {missing}"
                        f"; the header has {header}.")
    prompts, groups, extra = [], [], []
    for lineno, row in rows:
        goal = (row.get("Goal") or "").strip()
        if not goal:
            raise DataError(f"{path}:{lineno}: empty 'Goal'.")
        prompts.append(goal)
        groups.append(row.get("Category") or "")
        extra.append({k: row[k] for k in ("Target", "Behavior", "Source") if k in row})
    if not prompts:
        raise DataError(f"{path}: the file holds no rows.")
    return PromptSet(name=name or path.stem, prompts=tuple(prompts),
                     labels=None if label is None else (label,) * len(prompts),
                     groups=tuple(groups), extra=tuple(extra),
                     meta={"source": str(path), "format": "jailbreakbench-csv"})


__all__ = [
    "PromptSet",
    "concat",
    "labelled",
    "list_prompt_sets",
    "load_prompt_set",
    "read_chat_jsonl",
    "read_jailbreakbench_csv",
    "read_labelled",
]
