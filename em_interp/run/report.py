"""The run report: one self-contained HTML file from a run folder's stage outputs.

A pipeline run (:mod:`em_interp.run.pipeline`) writes, for every finished stage,
``stages/<name>/stage.json`` (title, a short text saying what was computed and what the numbers
are, the headline numbers, the figure files) and its figures as plotly JSON
(``stages/<name>/figures/*.json``). :func:`build_report` turns those into ``report.html``:

* plotly.js is embedded once, inline, so the file opens offline and can be mailed around;
* every figure of every stage is drawn, with its caption;
* each stage's text and headline numbers (a table) come first;
* a banner states plainly what the model can and cannot show (the run's ``caveat``).

The report is rebuilt from disk, never from live objects, so a resumed run (or
``em-interp report RUN_DIR``) gives the same file as an uninterrupted one.
"""

from __future__ import annotations

import html
import json
import time
from pathlib import Path

from em_interp.atomic import atomic_write_bytes

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1b1f24;
background:#fafbfc}
main{max-width:1100px;margin:0 auto;padding:24px 32px 64px}
h1{font-size:1.7em;margin-bottom:.2em}h2{margin-top:2.2em;border-bottom:1px solid #d0d7de;
padding-bottom:.2em}
.meta{color:#57606a;font-size:.9em}.caveat{background:#fff8c5;border:1px solid #d4a72c;
padding:12px 16px;border-radius:6px;margin:16px 0}
.stage-text{white-space:pre-wrap;line-height:1.5}
table{border-collapse:collapse;font-size:.88em;margin:8px 0}caption{text-align:left;
font-weight:600;padding:4px 0}td,th{border:1px solid #d0d7de;
padding:3px 8px;text-align:left;vertical-align:top}th{background:#f1f3f5}
figure{margin:18px 0;background:white;border:1px solid #e1e4e8;border-radius:6px;padding:8px}
figcaption{color:#57606a;font-size:.88em;margin-top:4px}
nav a{margin-right:12px}.skipped{color:#8c959f}
"""


def _is_scalar(v) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def _flatten(d, prefix: str = "") -> list[tuple[str, object]]:
    """Headline numbers as (label, value) rows: scalars, and short lists of scalars. Nested
    records (lists of dicts, long per-layer lists) belong in the stage's tables and figures,
    not here, where they would print as Python reprs."""
    out: list[tuple[str, object]] = []
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if k == "prompts":
            continue
        if isinstance(v, dict):
            out += _flatten(v, key + " · ")
        elif isinstance(v, (list, tuple)):
            if v and len(v) <= 8 and all(_is_scalar(x) for x in v):
                out.append((key, list(v)))
        else:
            out.append((key, v))
    return out


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != v:
            return "–"
        return f"{v:.3g}" if (abs(v) < 1e-3 and v != 0) or abs(v) >= 1e5 else f"{v:.3f}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) for x in v)
    return str(v)


def _label(key: str) -> str:
    return key.replace("_", " ")


def _numbers_table(summary: dict, limit: int = 30) -> str:
    rows = _flatten(summary)
    if not rows:
        return ""
    more = (f"<tr><td colspan=2>... {len(rows) - limit} more in results.json</td></tr>"
            if len(rows) > limit else "")
    body = "".join(f"<tr><td>{html.escape(_label(k))}</td><td>{html.escape(_fmt(v))}</td></tr>"
                   for k, v in rows[:limit])
    return f"<table><tr><th>headline number</th><th>value</th></tr>{body}{more}</table>"


def _stage_table(table: dict, limit: int = 25) -> str:
    """One of a stage's tables (caption, columns, rows), numbers rounded as in a paper."""
    cols, rows = table.get("columns", []), table.get("rows", [])
    head = "".join(f"<th>{html.escape(_label(c))}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in r) + "</tr>"
                   for r in rows[:limit])
    more = (f"<tr><td colspan={len(cols)}>... {len(rows) - limit} more rows in the stage's "
            "results</td></tr>" if len(rows) > limit else "")
    cap = html.escape(table.get("caption", ""))
    return f"<table><caption>{cap}</caption><tr>{head}</tr>{body}{more}</table>"


def _held_out_line(held: dict | None) -> str:
    if not held:
        return ('<p class="meta">Selects nothing: every number is computed on the prompts '
                "named in the text.</p>")
    fit = f"{held.get('n_fit', 0)} prompts" + (f" ({held['fit_note']})"
                                               if held.get("fit_note") else "")
    ev = f"{held.get('n_evaluated', 0)} prompts" + (f" ({held['evaluated_note']})"
                                                    if held.get("evaluated_note") else "")
    return (f'<p class="meta heldout">Fit / selected on {html.escape(fit)}; evaluated on '
            f"{html.escape(ev)}; prompts in both: {held.get('overlap', 0)}.</p>")


def _figure_html(path: Path, div_id: str) -> str:
    import plotly.io as pio

    fig = pio.from_json(path.read_text())
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id,
                       default_width="100%", default_height="460px")


def build_report(run_dir: str | Path, *, title: str | None = None) -> Path:
    """Write ``run_dir/report.html`` from the stage outputs under ``run_dir/stages``."""
    import plotly.offline

    run_dir = Path(run_dir)
    if not (run_dir / "stages").is_dir():
        from em_interp.errors import ConfigError

        raise ConfigError(f"{str(run_dir)!r} is not a run folder (it has no stages/); run "
                          "`em-interp demo --out DIR` or `em-interp run CONFIG --out DIR` first.")
    manifest = _read_json(run_dir / "manifest.json")
    order = manifest.get("stages") or sorted(p.name for p in (run_dir / "stages").glob("*"))
    cached = set(manifest.get("cached", []))
    sections, nav = [], []
    for name in order:
        stage_dir = run_dir / "stages" / name
        info = _read_json(stage_dir / "stage.json")
        anchor = f"stage-{name}"
        nav.append(f'<a href="#{anchor}">{html.escape(name)}</a>')
        if not info:
            sections.append(f'<h2 id="{anchor}">{html.escape(name)}</h2>'
                            '<p class="skipped">not run (or not finished) in this run folder.</p>')
            continue
        parts = [f'<h2 id="{anchor}">{html.escape(info.get("title", name))}</h2>',
                 f'<p class="meta">stage <code>{html.escape(name)}</code> · '
                 f'{info.get("seconds", 0):.1f} s'
                 f'{" (computed by an earlier run)" if name in cached else ""}</p>',
                 _held_out_line(info.get("held_out")),
                 f'<div class="stage-text">{html.escape(info.get("text", ""))}</div>',
                 *(_stage_table(t) for t in info.get("tables", [])),
                 _numbers_table(info.get("summary", {}))]
        for i, fig in enumerate(info.get("figures", [])):
            path = stage_dir / fig["file"]
            if not path.is_file():
                parts.append(f'<p class="skipped">figure {html.escape(fig["file"])} missing</p>')
                continue
            parts.append(f"<figure>{_figure_html(path, f'{name}-fig{i}')}"
                         f"<figcaption>{html.escape(fig.get('caption', ''))}</figcaption>"
                         "</figure>")
        sections.append("\n".join(parts))
    caveat = manifest.get("caveat")
    head_title = title or f"em-interp run: {manifest.get('card', run_dir.name)}"
    doc = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(head_title)}</title>
<style>{_CSS}</style>
<script type="text/javascript">{plotly.offline.get_plotlyjs()}</script></head>
<body><main>
<h1>{html.escape(head_title)}</h1>
<p class="meta">card <code>{html.escape(str(manifest.get('card', '?')))}</code> ·
em-interp {html.escape(str(manifest.get('versions', {}).get('em-interp', '?')))} ·
written {time.strftime('%Y-%m-%d %H:%M')}</p>
{f'<div class="caveat">{html.escape(caveat)}</div>' if caveat else ''}
<nav>{' '.join(nav)}</nav>
{''.join(f'<section>{s}</section>' for s in sections)}
</main></body></html>
"""
    out = run_dir / "report.html"
    atomic_write_bytes(out, doc.encode("utf-8"))
    return out


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    return json.loads(path.read_text())
