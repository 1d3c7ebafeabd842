"""Prompts for explaining a latent and for judging an explanation, and label parsing.

Rendering decisions:
* Activating tokens are wrapped as ``<<token>>`` (see ``MARK_FRACTION``); a run of
  consecutive marked tokens becomes one span, with its outer whitespace moved outside the
  marks, so ``<<def foo>>`` reads as text rather than ``<< def>><< foo>>``.
* Every window is one line: newlines show as ``\\n`` and tabs as ``\\t``, so examples cannot
  run into each other and code stays recognisable.
* Top/bottom logit tokens are JSON-quoted to make their spaces visible.

``PROMPT_VERSION`` changes whenever a prompt's wording or rendering changes: it is part of
the settings key, so explanations written with an older prompt are not taken as current.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable

from training.autointerp.protocol import Messages
from training.autointerp.records import LatentRecord, Window

PROMPT_VERSION = "1"
MAX_LABEL_WORDS = 12
_ESCAPES = str.maketrans({"\n": "\\n", "\t": "\\t", "\r": "\\r"})

EXPLAIN_SYSTEM = (
    "You label latents (features) of a sparse autoencoder trained on a language model's "
    "activations. You see text excerpts in which the tokens where the latent fires are marked "
    "<<like this>>, and the tokens it makes more and less likely next. Reply with a short "
    f"label (at most {MAX_LABEL_WORDS} words) saying what the marked tokens have in common, "
    "in their context, such as: closing parentheses; years in dates; words after 'not'; "
    "plural nouns in legal text. Reply with the label only."
)
JUDGE_SYSTEM = (
    "You check explanations of latents (features) of a sparse autoencoder trained on a "
    "language model. Answer with one word: yes or no."
)


def render_window(window: Window, marks: Iterable[int] = ()) -> str:
    """The window's text on one line with the tokens at positions ``marks`` wrapped in
    ``<<…>>``."""
    marked = set(marks)
    parts: list[str] = []
    run: list[str] = []
    for i, token in enumerate(window.tokens):
        if i in marked:
            run.append(token)
            continue
        if run:
            parts.append(_mark("".join(run)))
            run = []
        parts.append(token)
    if run:
        parts.append(_mark("".join(run)))
    return "".join(parts).translate(_ESCAPES)


def _mark(text: str) -> str:
    """``<<text>>`` with surrounding whitespace kept outside (whitespace-only text stays
    inside: a latent may fire on a newline)."""
    core = text.strip()
    if not core:
        return f"<<{text}>>"
    start = text.index(core)
    return f"{text[:start]}<<{core}>>{text[start + len(core):]}"


def explain_prompt(record: LatentRecord, shown: list[Window]) -> Messages:
    """System + user messages asking for a label of ``record`` from the ``shown`` windows,
    each with its activating tokens marked."""
    lines = [f"{n}. {render_window(w, w.marked_positions())}" for n, w in enumerate(shown, 1)]
    parts = ["Excerpts where the latent fires (activating tokens marked <<like this>>):",
             "\n".join(lines)]
    if record.top_logits:
        parts.append("Tokens it makes more likely next: " + _token_list(record.top_logits))
    if record.bottom_logits:
        parts.append("Tokens it makes less likely next: " + _token_list(record.bottom_logits))
    parts.append(f"What does this latent detect? Reply with a label of at most "
                 f"{MAX_LABEL_WORDS} words and nothing else.")
    return [{"role": "system", "content": EXPLAIN_SYSTEM},
            {"role": "user", "content": "\n\n".join(parts)}]


def _token_list(tokens: list[str]) -> str:
    return ", ".join(json.dumps(token, ensure_ascii=False) for token in tokens)


def detection_prompt(label: str, window: Window) -> Messages:
    """Does the latent described by ``label`` fire anywhere in ``window`` (shown without
    marks)?"""
    user = (f"Explanation of the latent: {label}\n\n"
            f"Text: {render_window(window)}\n\n"
            "Does the latent described by the explanation fire on this text? "
            "Answer yes or no.")
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


def fuzzing_prompt(label: str, window: Window, marks: Iterable[int]) -> Messages:
    """Are the tokens of ``window`` at ``marks`` the ones the latent described by ``label``
    fires on?"""
    user = (f"Explanation of the latent: {label}\n\n"
            f"Text with some tokens marked <<like this>>: {render_window(window, marks)}\n\n"
            "Are the marked tokens the ones the latent described by the explanation fires "
            "on? Answer yes or no.")
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


_PREFIX = re.compile(
    r"^(?:[*_]*(?:the\s+)?(?:label|explanation|answer|feature|latent)\s*(?:\d+\s*)?:[*_]*"
    r"|(?:this|the)\s+(?:latent|feature)\s+(?:detects|fires\s+on|responds\s+to|represents)"
    r"(?:\s+the\s+presence\s+of)?:?)\s*", re.IGNORECASE)
_PAIRS = {'"': '"', "'": "'", "`": "`", "“": "”", "‘": "’", "«": "»", "*": "*", "_": "_"}
_DECORATION = " \t#->" + "".join(_PAIRS) + "".join(_PAIRS.values())
_TRAILING = ".,;:!?。 "


def parse_label(text: str) -> str:
    """The label in a reply: its first line with words, without markdown, wrapping quotes,
    a ``Label:`` or "The latent detects" prefix or trailing punctuation, cut to
    ``MAX_LABEL_WORDS`` words. Raises ValueError when nothing is left."""
    line = next((ln for ln in text.splitlines() if ln.strip(_DECORATION)), "")
    label = line.strip().lstrip("#->").strip()
    for _ in range(2):  # "**Label:** \"x\"" needs the prefix off, then the quotes
        label = _PREFIX.sub("", _unwrap(label)).strip()
    label = _unwrap(label.rstrip(_TRAILING)).rstrip(_TRAILING)
    words = label.split()
    if not words:
        raise ValueError(f"the explainer returned no label: {text[:80]!r}")
    return " ".join(words[:MAX_LABEL_WORDS]).rstrip(_TRAILING)


def _unwrap(text: str) -> str:
    """``text`` without quotes or emphasis wrapped around all of it."""
    text = text.strip()
    while len(text) >= 2 and _PAIRS.get(text[0]) == text[-1]:
        text = text[1:-1].strip()
    return text
