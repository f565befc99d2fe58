"""MkDocs hooks for the em-interp site (registered under ``hooks:`` in ``mkdocs.yml``).

1. The package's docstrings use Sphinx cross-reference roles (``:func:`load```); mkdocstrings
   renders those as the literal role followed by code. :func:`on_page_content` drops the role
   and, for ``~a.b.C``, keeps only ``C``, as Sphinx would show it.
2. :func:`on_page_markdown` compares the shipped-cards table in ``docs/cards.md`` with one freshly
   generated from ``adapters/*.toml`` and logs a warning when they differ, so that
   ``mkdocs build --strict`` fails on a stale page.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from pathlib import Path

log = logging.getLogger("mkdocs.plugins.em_interp")

_ROLE = re.compile(r":(?:func|meth|class|mod|attr|data|exc|obj):<code>(~?)([^<]*)</code>")


def _cards_table_module():
    path = Path(__file__).with_name("cards_table.py")
    spec = importlib.util.spec_from_file_location("em_interp_docs_cards_table", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri != "cards.md":
        return markdown
    table = _cards_table_module()
    committed = table.current_block(markdown)
    if committed is None:
        log.warning("docs/cards.md: the generated cards table (markers) is missing; run "
                    "`python scripts/cards_table.py --write` after restoring the markers")
    elif committed != table.generate():
        log.warning("docs/cards.md: the shipped-cards table is out of date with adapters/*.toml; "
                    "run `python scripts/cards_table.py --write`")
    return markdown


def _plain(match: re.Match) -> str:
    target = match[2].rsplit(".", 1)[-1] if match[1] else match[2]
    return f"<code>{target}</code>"


def on_page_content(html: str, page, config, files) -> str:
    return _ROLE.sub(_plain, html)
