"""The report's building blocks and its self-contained HTML rendering.

A report is a list of :class:`ReportSection` (one per pipeline that ran), each
with key facts, tables and figures. Figures are embedded as base64 PNG and the
stylesheet is inline, so the HTML opens offline, without any network access.

Nothing here knows about Kedro: a section node builds a :class:`ReportSection`
with :func:`make_section` and :func:`render_report` turns sections into HTML.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

__all__ = [
    "FigureSpec",
    "ReportFigure",
    "ReportSection",
    "ReportTable",
    "ReportError",
    "figure_to_base64",
    "make_section",
    "render_report",
]


class ReportError(ValueError):
    """A report cannot be built from the inputs it was given (the message says why)."""


@dataclass(frozen=True)
class ReportTable:
    """A table of a section: ``frame`` is shown with at most ``max_rows`` rows."""

    key: str
    title: str
    frame: pd.DataFrame
    caption: str = ""
    max_rows: int | None = None  # None: the report's reporting.max_table_rows


@dataclass(frozen=True)
class ReportFigure:
    """A figure of a section, as a base64 PNG (``png_base64``)."""

    key: str
    title: str
    png_base64: str
    caption: str = ""


@dataclass(frozen=True)
class FigureSpec:
    """A figure with its report title and caption (what section nodes return): a matplotlib
    ``Figure`` the section drew, or the PNG bytes of a figure another pipeline drew (read
    through the catalog)."""

    figure: Figure | bytes
    title: str
    caption: str = ""


@dataclass
class ReportSection:
    """One section of the report: the outputs of one pipeline.

    Attributes
    ----------
    name
        The pipeline the section reports (``data_processing``...); the HTML
        element is ``<section id="section-<name>" data-section="<name>">``.
    title
        Heading of the section.
    intro
        One paragraph of plain text (escaped on rendering).
    facts
        Key facts shown as a two-column table (plain text values).
    tables, figures
        In display order. Figure and table keys are unique within a report
        (``data-figure`` / ``data-table`` attributes).
    notes
        Plain-text remarks shown at the end of the section (e.g. what was skipped).
    """

    name: str
    title: str
    intro: str = ""
    facts: dict[str, str] = field(default_factory=dict)
    tables: list[ReportTable] = field(default_factory=list)
    figures: list[ReportFigure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def figure_keys(self) -> list[str]:
        return [f.key for f in self.figures]

    @property
    def table_keys(self) -> list[str]:
        return [t.key for t in self.tables]


def figure_to_base64(figure: Figure | bytes) -> str:
    """The figure as a base64-encoded PNG (at the figure's own dpi, tight bounding box; PNG bytes as they are)."""
    if isinstance(figure, (bytes, bytearray)):
        return base64.b64encode(bytes(figure)).decode("ascii")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight", facecolor="white")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def make_section(
    name: str,
    title: str,
    *,
    figures: Mapping[str, FigureSpec],
    tables: Sequence[ReportTable] = (),
    facts: Mapping[str, Any] | None = None,
    intro: str = "",
    notes: Iterable[str] = (),
) -> ReportSection:
    """Build a section, rendering every figure of ``figures`` (key -> spec) to PNG."""
    rendered = [
        ReportFigure(key=key, title=spec.title, caption=spec.caption, png_base64=figure_to_base64(spec.figure))
        for key, spec in figures.items()
    ]
    return ReportSection(
        name=name,
        title=title,
        intro=intro,
        facts={str(k): _format_value(v) for k, v in (facts or {}).items()},
        tables=list(tables),
        figures=rendered,
        notes=[str(n) for n in notes],
    )


# ----------------------------------------------------------------------------- HTML
_CSS = """
:root { --ink:#1f2430; --muted:#5b6475; --line:#d9dee7; --accent:#2f6db5; --bg:#f6f7f9; }
* { box-sizing: border-box; }
body { margin:0; font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif;
       color:var(--ink); background:var(--bg); line-height:1.45; font-size:15px; }
header { background:#1f2a3a; color:#fff; padding:22px 36px; }
header h1 { margin:0 0 6px 0; font-size:26px; font-weight:600; }
header .meta { color:#c9d3e3; font-size:13px; }
header code { color:#fff; background:rgba(255,255,255,0.14); }
nav { background:#fff; border-bottom:1px solid var(--line); padding:10px 36px; position:sticky; top:0; z-index:2; }
nav a { color:var(--accent); text-decoration:none; margin-right:18px; font-size:14px; }
main { max-width:1320px; margin:0 auto; padding:10px 36px 40px 36px; }
section { background:#fff; border:1px solid var(--line); border-radius:8px; padding:18px 24px; margin:22px 0; }
section h2 { margin-top:0; font-size:21px; border-bottom:2px solid var(--accent); padding-bottom:6px; }
h3 { font-size:16px; margin:22px 0 8px 0; }
p.intro { color:var(--muted); }
table { border-collapse:collapse; font-size:13px; margin:6px 0 4px 0; }
th, td { border:1px solid var(--line); padding:4px 9px; text-align:right; white-space:nowrap; }
th { background:#eef2f8; }
td.text, th.text { text-align:left; }
table.facts td:first-child { text-align:left; font-weight:600; background:#f8f9fb; }
table.facts td { text-align:left; }
.tablewrap { overflow-x:auto; max-width:100%; }
.caption { color:var(--muted); font-size:13px; margin:4px 0 10px 0; }
figure { margin:14px 0 20px 0; }
figure img { max-width:100%; height:auto; border:1px solid var(--line); border-radius:4px; background:#fff; }
figcaption { color:var(--muted); font-size:13px; margin-top:4px; }
ul.notes { color:var(--muted); font-size:13px; }
details { margin:10px 0; }
details > summary { cursor:pointer; font-weight:600; font-size:15px; margin:14px 0 6px 0; }
code { background:#eef2f8; padding:1px 4px; border-radius:3px; font-size:12.5px; }
footer { color:var(--muted); font-size:12px; text-align:center; padding:20px; }
"""


def _format_value(value: Any) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if math.isnan(value):
            return "n/a"
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:,.4g}"
    return str(value)


def _table_html(frame: pd.DataFrame, max_rows: int, css_class: str = "") -> str:
    shown = frame.head(max_rows)
    text_columns = {
        c for c in shown.columns if not pd.api.types.is_numeric_dtype(shown[c]) or pd.api.types.is_bool_dtype(shown[c])
    }
    head = "".join(
        f'<th class="{"text" if c in text_columns else "num"}">{html.escape(str(c))}</th>' for c in shown.columns
    )
    rows = []
    for _, row in shown.iterrows():
        cells = "".join(
            f'<td class="{"text" if c in text_columns else "num"}">{html.escape(_format_value(row[c]))}</td>'
            for c in shown.columns
        )
        rows.append(f"<tr>{cells}</tr>")
    more = ""
    if len(frame) > max_rows:
        more = f'<p class="caption">Showing {max_rows} of {len(frame):,} rows; the full table is in the catalog.</p>'
    cls = f' class="{css_class}"' if css_class else ""
    body = "".join(rows)
    return f'<div class="tablewrap"><table{cls}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>{more}'


def _facts_html(facts: Mapping[str, str]) -> str:
    rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>" for k, v in facts.items())
    return f'<div class="tablewrap"><table class="facts"><tbody>{rows}</tbody></table></div>'


def _table_block(table: ReportTable, max_rows: int, collapsed: bool) -> str:
    caption = f'<p class="caption">{html.escape(table.caption)}</p>' if table.caption else ""
    body = caption + _table_html(table.frame, table.max_rows or max_rows)
    key = html.escape(table.key)
    if collapsed:
        return (
            f'<details data-table="{key}"><summary>{html.escape(table.title)} '
            f"({len(table.frame):,} rows)</summary>{body}</details>"
        )
    return f'<div data-table="{key}"><h3>{html.escape(table.title)}</h3>{body}</div>'


def _section_html(section: ReportSection, max_rows: int, inline_rows: int) -> str:
    """Facts, short tables, figures, then long tables (collapsed in ``<details>``)."""
    parts = [
        f'<section id="section-{html.escape(section.name)}" data-section="{html.escape(section.name)}">',
        f"<h2>{html.escape(section.title)}</h2>",
    ]
    if section.intro:
        parts.append(f'<p class="intro">{html.escape(section.intro)}</p>')
    if section.facts:
        parts.append(_facts_html(section.facts))
    short = [t for t in section.tables if len(t.frame) <= inline_rows]
    long = [t for t in section.tables if len(t.frame) > inline_rows]
    parts.extend(_table_block(t, max_rows, collapsed=False) for t in short)
    for fig in section.figures:
        parts.append(
            f'<figure data-figure="{html.escape(fig.key)}"><h3>{html.escape(fig.title)}</h3>'
            f'<img alt="{html.escape(fig.title)}" src="data:image/png;base64,{fig.png_base64}">'
            + (f"<figcaption>{html.escape(fig.caption)}</figcaption>" if fig.caption else "")
            + "</figure>"
        )
    parts.extend(_table_block(t, max_rows, collapsed=True) for t in long)
    if section.notes:
        items = "".join(f"<li>{html.escape(n)}</li>" for n in section.notes)
        parts.append(f'<ul class="notes">{items}</ul>')
    parts.append("</section>")
    return "\n".join(parts)


def _check_unique_keys(sections: Sequence[ReportSection]) -> None:
    names = [s.name for s in sections]
    if len(set(names)) != len(names):
        raise ReportError(f"Two report sections share a name: {names}. Every pipeline adds one section.")
    for kind in ("figure_keys", "table_keys"):
        keys = [k for s in sections for k in getattr(s, kind)]
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        if dupes:
            raise ReportError(f"Report {kind.split('_')[0]} keys must be unique across sections; repeated: {dupes}.")


def render_report(
    sections: Sequence[ReportSection],
    *,
    screen: str,
    provenance: ReportSection,
    header: Mapping[str, str] | None = None,
    max_rows: int = 40,
    inline_rows: int = 15,
    generated: _dt.datetime | None = None,
) -> str:
    """The full self-contained HTML page: header, navigation, sections, provenance.

    Tables longer than ``inline_rows`` are collapsed (``<details>``, no script) and
    show at most ``max_rows`` rows.
    """
    _check_unique_keys([*sections, provenance])
    generated = generated or _dt.datetime.now(_dt.UTC)
    meta = " &middot; ".join(f"{html.escape(k)}: <code>{html.escape(v)}</code>" for k, v in (header or {}).items())
    nav = "".join(
        f'<a href="#section-{html.escape(s.name)}">{html.escape(s.title)}</a>' for s in [*sections, provenance]
    )
    body = "\n".join(_section_html(s, max_rows, inline_rows) for s in [*sections, provenance])
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="perturbscope reporting pipeline">
<title>perturbscope report: {html.escape(screen)}</title>
<style>{_CSS}</style>
</head>
<body>
<header>
<h1>perturbscope report: {html.escape(screen)}</h1>
<div class="meta">{meta}</div>
<div class="meta">generated {html.escape(generated.strftime("%Y-%m-%d %H:%M:%S UTC"))}</div>
</header>
<nav>{nav}</nav>
<main>
{body}
</main>
<footer>Self-contained report: every image is embedded; no network access is needed.</footer>
</body>
</html>
"""
