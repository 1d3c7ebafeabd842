"""``maxact``: a deterministic label for every latent, from its shown examples alone.

No language model is involved, so every latent of an SAE is labelled in seconds, offline
and identically on every run. From the windows the explainer is shown (``split_examples``:
top examples plus samples of each activation quantile, never the held-out ones) it reads:

* the tokens it fires on. With the analysed text's token frequencies and windows of the
  capture where the latent is silent (what the explain stage passes; never the windows
  its detection is scored on), the set whose expected detection score is best
  (``training.autointerp.token_choice``): each token must catch more activating windows
  than it raises false alarms in silent ones. Without them, the tokens marked as
  activating in most shown windows, in order of how many windows they cover (up to
  ``MAX_TOKENS``, until ``COVERAGE`` of the windows is covered, each marked in at least
  ``MIN_SHARE`` of them), with the context rules below;
* the token just before the peak, when one token precedes it in at least ``CONSISTENT`` of
  the windows (``after "("``), and whether the peak sits at the start of a line;
* the tokens its decoder direction promotes most (the logit lens).

The label is text in a small, readable grammar, e.g.
``"def", "class" at line start → promotes " __init__", "("`` or
``any token after "import" → promotes " os"``. Tokens are JSON-quoted so that their spaces
and newlines show. ``simulate`` reads a label back into a predicted activation per token,
which is how the label is scored (``training.autointerp.simulation``): the simulator sees
only the label text, like any judge.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from training.autointerp.records import LatentRecord, Window
from training.autointerp.token_choice import choose_tokens
from training.autointerp.token_choice import loose as loose_key

VERSION = "maxact-3"
"""Changes whenever the label rules or the grammar change (part of the settings key)."""
MAX_TOKENS = 6
COVERAGE = 0.9
MIN_SHARE = 0.1
"""A token after the first must be marked in at least this share of the windows."""
CONSISTENT = 0.6
PROMOTED = 3
ANY = "any token"
ARROW = " → promotes "
_STR = r'"(?:[^"\\]|\\.)*"'
_LIST = rf"{_STR}(?:, {_STR})*"
_GRAMMAR = re.compile(rf"^(?P<fires>{ANY}|{_LIST})(?: after (?P<after>{_LIST}))?"
                      rf"(?P<line> at line start)?(?:{re.escape(ARROW)}(?P<promotes>{_LIST}))?$")


@dataclass(frozen=True)
class Description:
    """What a maxact label says, and what ``simulate`` reads back from its text."""

    fires_on: tuple[str, ...]
    """Token texts it fires on; empty means any token (the context decides)."""
    after: tuple[str, ...] = ()
    """It fires only after one of these tokens (empty: anywhere)."""
    line_start: bool = False
    """It fires only on the first token of a line."""
    promotes: tuple[str, ...] = ()

    def text(self) -> str:
        parts = [_quoted(self.fires_on) if self.fires_on else ANY]
        if self.after:
            parts.append(f" after {_quoted(self.after)}")
        if self.line_start:
            parts.append(" at line start")
        if self.promotes:
            parts.append(ARROW + _quoted(self.promotes))
        return "".join(parts)


def describe(record: LatentRecord, shown: Sequence[Window],
             frequencies: Mapping[str, float] | None = None,
             silent: Sequence[Sequence[str]] = ()) -> Description:
    """The description of a latent from the ``shown`` windows and its logit tokens;
    ``frequencies`` (loose token key -> share of the analysed text) and ``silent`` (token
    texts of windows where the latent never fires, none of them scored on) pick the tokens
    for the best expected detection (then no context rule is added)."""
    promotes = tuple(t for t in record.top_logits if t.strip())[:PROMOTED]
    if frequencies is not None:
        keys = choose_tokens(shown, frequencies, silent)
        return Description(_spelled(shown, keys), promotes=promotes)
    peaks = [_peak(w) for w in shown if w.max_activation > 0]
    marked = [{w.tokens[i] for i in w.marked_positions()} for w in shown
              if w.max_activation > 0]
    fires_on, covered = _fire_tokens(marked)
    before = Counter(w.tokens[p - 1] for w, p in peaks if p > 0)
    after: tuple[str, ...] = ()
    if before and before.most_common(1)[0][1] >= CONSISTENT * len(peaks):
        after = (before.most_common(1)[0][0],)
    line_start = sum(_starts_line(w.tokens, p) for w, p in peaks) >= CONSISTENT * len(peaks)
    if line_start and after and not after[0].strip():
        after = ()  # "after a newline / indentation" says what "at line start" says
    if covered < 0.5 and after:
        fires_on = ()  # no token dominates: the preceding token is the description
    return Description(fires_on, after, line_start and bool(peaks), promotes)


def _spelled(shown: Sequence[Window], keys: Sequence[str]) -> tuple[str, ...]:
    """Each loose key in its commonest marked spelling in ``shown``."""
    spelled = Counter(w.tokens[i] for w in shown for i in w.marked_positions())
    return tuple(max((t for t in spelled if loose_key(t) == key), key=spelled.__getitem__)
                 for key in keys)


def explain_label(record: LatentRecord, shown: Sequence[Window],
                  frequencies: Mapping[str, float] | None = None,
                  silent: Sequence[Sequence[str]] = ()) -> str:
    return describe(record, shown, frequencies, silent).text()


def parse(label: str) -> Description:
    """The description a label text states; ValueError for text outside the grammar."""
    match = _GRAMMAR.match(label.strip())
    if not match:
        raise ValueError(f"not a maxact label: {label[:80]!r}")
    fires = match["fires"]
    return Description(fires_on=() if fires == ANY else _unquoted(fires),
                       after=_unquoted(match["after"]) if match["after"] else (),
                       line_start=bool(match["line"]),
                       promotes=_unquoted(match["promotes"]) if match["promotes"] else ())


def search_words(label: str) -> str:
    """What a search embedding should read of a label: a maxact label's tokens as plain
    words (``"def", "\\n" at line start → promotes " self"`` -> ``def newline at line
    start; promotes self``), which spends the embedder's time on the tokens rather than on
    quotes and arrows; any other text as it is."""
    try:
        description = parse(label)
    except ValueError:
        return label
    words = " ".join(map(_word, description.fires_on)) or ANY
    if description.after:
        words += " after " + " ".join(map(_word, description.after))
    if description.line_start:
        words += " at line start"
    if description.promotes:
        words += "; promotes " + " ".join(map(_word, description.promotes))
    return words


def _word(token: str) -> str:
    """A token as a word; whitespace spelled out (newline, tab, space, indent)."""
    if token.strip():
        return token.strip()
    names = [name for char, name in (("\n", "newline"), ("\t", "tab")) if char in token]
    if " " in token:
        names.append("indent" if token.count(" ") > 1 else "space")
    return " ".join(names) or "whitespace"


def simulate(description: Description, tokens: Sequence[str]) -> list[float]:
    """Predicted activation (0, 0.5 or 1) of each token: 1 where the token and its context
    match the description; 0.5 where the token matches only up to case and spaces, or the
    context cannot be seen (the first token of a window)."""
    wanted = set(description.fires_on)
    loose = {_loose(t) for t in wanted}
    out = []
    loose.discard("")
    for i, token in enumerate(tokens):
        if not wanted or token in wanted:
            value = 1.0
        else:
            value = 0.5 if token.strip().lower() in loose else 0.0
        if value and (description.after or description.line_start):
            value *= _context(description, tokens, i)
        out.append(value)
    return out


def _context(description: Description, tokens: Sequence[str], i: int) -> float:
    if i == 0:
        return 0.5
    previous = tokens[i - 1]
    if description.after and previous not in description.after:
        return 0.0
    if description.line_start and not _starts_line(tokens, i):
        return 0.0
    return 1.0


def _fire_tokens(marked: list[set[str]]) -> tuple[tuple[str, ...], float]:
    """The tokens that cover most windows' marked sets, and the share they cover. Tokens
    equal up to case and spaces count as one (" Info", "info"), shown in their commonest
    spelling."""
    if not marked:
        return (), 0.0
    loose = [{_loose(t) or t for t in tokens} for tokens in marked]
    counts = Counter(key for keys in loose for key in keys)
    chosen: list[str] = []
    for key, count in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        if len(chosen) == MAX_TOKENS or _coverage(loose, chosen) >= COVERAGE:
            break
        if chosen and count < max(2, MIN_SHARE * len(loose)):
            break
        chosen.append(key)
    spelled = Counter(t for tokens in marked for t in tokens)
    shown = tuple(max((t for t in spelled if (_loose(t) or t) == key), key=spelled.__getitem__)
                  for key in chosen)
    return shown, _coverage(loose, chosen)


def _coverage(loose: list[set[str]], chosen: list[str]) -> float:
    return sum(bool(keys & set(chosen)) for keys in loose) / len(loose)


def _peak(window: Window) -> tuple[Window, int]:
    acts = window.activations
    return window, max(range(len(acts)), key=acts.__getitem__)


def _starts_line(tokens: Sequence[str], i: int) -> bool:
    """Token ``i`` is the first on its line (what precedes it ends with a newline, maybe
    followed by indentation)."""
    j = i - 1
    while j >= 0 and tokens[j].strip(" \t") == "" and "\n" not in tokens[j]:
        j -= 1
    return j >= 0 and tokens[j].rstrip(" \t").endswith("\n")


def _loose(token: str) -> str:
    return token.strip().lower()


def _quoted(tokens: Sequence[str]) -> str:
    return ", ".join(json.dumps(t, ensure_ascii=False) for t in tokens)


def _unquoted(text: str) -> tuple[str, ...]:
    return tuple(json.loads(item) for item in re.findall(_STR, text))


class MaxActExplainer:
    """The maxact labeller as the explain stage sees it: a name and a version for the
    settings key and the explanation's source; labels come from ``explain.explain_offline``
    (no calls, no cost)."""

    name = "maxact"
    model = VERSION
    concurrency = 1
