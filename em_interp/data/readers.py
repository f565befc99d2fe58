"""Reading prompt sets from files: the shipped ``*.jsonl`` sets and the public formats.

See the docstring of :mod:`em_interp.data` for the formats.
"""

from __future__ import annotations

import csv
import json
from importlib import resources
from pathlib import Path

from em_interp.data.prompt_set import SPLITS, Conversation, PromptSet
from em_interp.errors import DataError


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
