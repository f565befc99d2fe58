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

from em_interp.data.prompt_set import PromptSet, concat, labelled, prompt_ids, user_text
from em_interp.data.readers import (
    list_prompt_sets,
    load_prompt_set,
    read_chat_jsonl,
    read_jailbreakbench_csv,
    read_labelled,
)

__all__ = [
    "PromptSet",
    "concat",
    "labelled",
    "list_prompt_sets",
    "load_prompt_set",
    "prompt_ids",
    "read_chat_jsonl",
    "read_jailbreakbench_csv",
    "read_labelled",
    "user_text",
]
