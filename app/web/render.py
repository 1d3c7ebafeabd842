"""Jinja2 rendering of pages and HTMX fragments.

A page lives in one template; an HTMX request whose target element id names one of the
template's ``{% block %}``s gets just that block, so one route serves the full page and its
live-updating parts. Autoescape is on for every template: text from the model or corpus
(a token ``<script>``) always shows as text.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup, escape

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = ROOT / "templates"
STATIC = ROOT / "static"

_VISIBLE = {"\n": "↵", "\t": "⇥", "\r": "␍"}
_ESCAPE_VISIBLE = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&#34;",
                                 "'": "&#39;", **{char: f'<span class="ws">{mark}</span>'
                                                  for char, mark in _VISIBLE.items()}})


@lru_cache(maxsize=1 << 16)
def _visible_html(token: str) -> str:
    """Escaped token text with newlines and tabs as marks and an all-space token as dots.
    Memoised: a feature page has ~1,000 tokens and a vocabulary repeats them."""
    if token and not token.strip(" "):
        return f'<span class="ws">{"·" * len(token)}</span>'
    return token.translate(_ESCAPE_VISIBLE)


def visible(token: str) -> Markup:
    """A token's text with newlines, tabs and all-space tokens shown as marks, escaped."""
    return Markup(_visible_html(token))


_SHADES = tuple(f' style="background-color: rgba(255, 122, 0, {i / 100:.2f})"'
                for i in range(101))
"""The ``style`` attribute of a firing token, by opacity in hundredths (what ``heat``
writes, looked up instead of formatted)."""


def token_spans(tokens: list[str], activations: list[float], top: float,
                peak: int | None = None) -> Markup:
    """Tokens as ``<span class="tok">`` shaded by activation / ``top``, the value in
    ``data-act`` (shown on hover). One comprehension over the tokens with the shades and
    escaped texts looked up, not a template loop: a feature page has ~1,000 of them."""
    scale = 100.0 / top if top > 0 else 0.0
    shades, html = _SHADES, _visible_html
    parts = [f'<span class="tok"{shades[int(min(100.0, value * scale) + 0.5)]}'
             f' data-act="{value:.3f}">{html(token)}</span>'
             if value > 0 and scale else
             f'<span class="tok" data-act="{value:.3f}">{html(token)}</span>'
             for token, value in zip(tokens, activations, strict=True)]
    if peak is not None and 0 <= peak < len(parts):
        parts[peak] = '<span class="tok peak"' + parts[peak][len('<span class="tok"'):]
    return Markup('<span class="tokens">' + "".join(parts) + "</span>")


def _peak(activations: list[float]) -> int | None:
    """Position of the (first) highest activation."""
    return activations.index(max(activations)) if activations else None


def example_html(tokens: list[str], activations: list[float], top: float) -> Markup:
    """One example window: its peak activation, then its tokens with the peak outlined."""
    peak = _peak(activations)
    high = activations[peak] if peak is not None else 0.0
    return Markup(f'<div class="example"><span class="ex-max">{number(high)}</span>'
                  f"{token_spans(tokens, activations, top, peak)}</div>")


def examples_html(examples: Iterable[Any], top: float) -> Markup:
    """Example windows (anything with ``tokens`` and ``activations``) in one call."""
    return Markup("".join([example_html(ex.tokens, ex.activations, top) for ex in examples]))


def snippet_html(tokens: list[str], activations: list[float], width: int = 6) -> Markup:
    """The peak of a latent's top example with ``width`` tokens each side, highlighted."""
    peak = _peak(activations)
    if peak is None:
        return Markup("")
    lo, hi = max(0, peak - width), min(len(tokens), peak + width + 1)
    return token_spans(tokens[lo:hi], activations[lo:hi], activations[peak], peak - lo)


def heat(value: float, top: float) -> str:
    """Inline background for an activation: orange, opacity value/top (0 = none)."""
    if value <= 0 or top <= 0:
        return ""
    return f"background-color: rgba(255, 122, 0, {min(1.0, value / top):.2f})"


def number(value: Any, digits: int = 3) -> str:
    """Compact numbers for tables: 3 significant digits, scientific when tiny."""
    if value is None:
        return "–"
    if isinstance(value, int):
        return f"{value:,}"
    value = float(value)
    if math.isnan(value):
        return "–"
    if value != 0 and abs(value) < 1e-2:
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}g}"


def percent(value: Any) -> str:
    return "–" if value is None else f"{100 * float(value):.1f}%"


def to_json(value: Any) -> Markup:
    """JSON for a ``data-*`` attribute (escaped by the attribute's quoting)."""
    return Markup(escape(json.dumps(value)))


class Renderer:
    """Renders templates with the request's CSRF token and sign-in state."""

    def __init__(self) -> None:
        self.env = Environment(loader=FileSystemLoader(TEMPLATES),
                               autoescape=select_autoescape(["html"]), trim_blocks=True,
                               lstrip_blocks=True)
        self.env.filters.update(visible=visible, number=number, percent=percent,
                                tojson_attr=to_json)
        self.env.globals.update(token_spans=token_spans, snippet_html=snippet_html,
                                example_html=example_html,
                                examples_html=examples_html)

    def __call__(self, request: Request, name: str, context: dict[str, Any] | None = None,
                 status: int = 200, headers: dict[str, str] | None = None,
                 block: str | None = None) -> HTMLResponse:
        ctx = {"request": request, "csrf_token": getattr(request.state, "csrf_token", ""),
               "needs_admin": bool(request.app.state.settings.admin_token),
               "signed_in": getattr(request.state, "admin", False), **(context or {})}
        template = self.env.get_template(name)
        block = block or fragment_name(request)
        if block and block in template.blocks:
            html = "".join(template.blocks[block](template.new_context(ctx)))
        else:
            html = template.render(ctx)
        return HTMLResponse(html, status_code=status, headers=headers)


def fragment_name(request: Request) -> str | None:
    """The block an HTMX request asks for: its target element's id ("-" read as "_")."""
    if request.headers.get("HX-Request") != "true":
        return None
    target = request.headers.get("HX-Target")
    return target.replace("-", "_") if target else None
