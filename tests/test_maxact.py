"""The offline ``maxact`` explainer: labels from shown examples, read back by the simulator,
scored on held-out windows (detection, fuzzing, simulation correlation)."""

from __future__ import annotations

import pytest

from training.autointerp import maxact, simulation, token_choice
from training.autointerp.explain import LatentRecord, Window, explain_offline
from training.autointerp.maxact import Description, describe, parse, simulate

FILLER = [" x", " =", " 1", " return", " y", " +", " print", "(", ")", ":", " if", " else"]


def _window(tokens: list[str], fire_on: set[str], after: str | None = None,
            scale: float = 1.0) -> Window:
    acts = [scale if t in fire_on and (after is None or (i and tokens[i - 1] == after))
            else 0.0 for i, t in enumerate(tokens)]
    return Window(tokens, acts)


def _line_start_record(count: int = 40) -> LatentRecord:
    """A latent firing on "def" / "class" at the start of a line (after a newline and
    indentation)."""
    windows = []
    for i in range(count):
        keyword = "def" if i % 3 else "class"
        tokens = [FILLER[i % 12], "\n", "    ", keyword, " foo", FILLER[(i + 5) % 12]]
        windows.append(Window(tokens, [0, 0, 0, 3.0 - i * 0.05, 0.1, 0]))
    return LatentRecord(index=7, max_activation=3.0, top=windows[:20],
                        quantiles=[windows[20 + 5 * b:25 + 5 * b] for b in range(4)],
                        top_logits=[" __init__", "(", " ", " self"])


def test_a_line_start_latent_is_labelled_in_words_and_read_back() -> None:
    record = _line_start_record()
    description = describe(record, record.top[:10])
    assert description.fires_on == ("def", "class") and description.line_start
    assert description.promotes == (" __init__", "(", " self")
    label = description.text()
    assert label == '"def", "class" at line start → promotes " __init__", "(", " self"'
    assert parse(label) == description
    tokens = ["\n", "def", " def", "x", "def", "\n", "  ", "class"]
    assert simulate(parse(label), tokens) == [0, 1, 0, 0, 0, 0, 0, 1]


def test_labels_keep_whitespace_quotes_and_context_and_refuse_other_text() -> None:
    description = Description(fires_on=("\n", ' "'), after=("(",))
    assert parse(description.text()) == description
    assert parse('any token after "import"') == Description((), ("import",))
    assert simulate(parse('any token after "import"'), ["import", " os", " x"]) == [0.5, 1, 0]
    assert simulate(Description(("Def",)), [" def", "Def", "x"]) == [0.5, 1, 0]
    with pytest.raises(ValueError, match="not a maxact label"):
        parse("Python keywords such as def")


def test_context_wins_when_no_token_dominates() -> None:
    """A latent firing on whatever follows "(" (a different token each time)."""
    windows = [Window([" f", "(", f" a{i}", ")"], [0, 0, 2.0, 0]) for i in range(12)]
    record = LatentRecord(index=1, max_activation=2.0, top=windows)
    assert describe(record, windows) == Description((), ("(",))


def test_offline_explanation_scores_a_clean_latent_high_on_held_out_windows() -> None:
    record = _line_start_record()
    negatives = [Window([FILLER[(i + j) % 12] for j in range(8)], [0.0] * 8)
                 for i in range(30)]
    result = explain_offline(record, negatives)
    assert result.label.startswith('"def", "class" at line start')
    held_out = 10 + 4 * 2  # the top examples after the 10 shown, two of each bucket
    assert result.detection == 1.0 and result.detection_n == held_out + len(negatives)
    assert result.fuzzing == 1.0 and result.fuzzing_n == 2 * held_out
    assert result.simulation > 0.9 and result.simulation_n == held_out + len(negatives)
    assert result.score == 1.0 and not result.errors


def test_a_wrong_label_scores_at_chance_and_nothing_is_scored_without_held_out() -> None:
    record = _line_start_record()
    held_out = [w for w in record.top[10:]]
    negatives = [Window([" x", " y"], [0.0, 0.0])] * 10
    wrong = Description(("zzz",))
    simulator = lambda tokens: simulate(wrong, tokens)  # noqa: E731
    measured = simulation.detection(simulator, held_out, negatives)
    assert measured.value == 0.5 and measured.n == len(held_out) + 10
    assert simulation.correlation(simulator, held_out).value == 0.0
    few = LatentRecord(index=2, max_activation=1.0, top=record.top[:3])
    result = explain_offline(few, negatives)
    assert result.label and result.detection is None
    assert result.errors == ["no held-out activating windows to score on"]


def test_simulator_needs_both_classes() -> None:
    simulator = lambda tokens: [1.0] * len(tokens)  # noqa: E731
    assert simulation.detection(simulator, [], [Window(["a"], [0.0])]).value is None
    assert simulation.correlation(simulator, [Window(["a"], [0.0])]).value is None
    assert maxact.VERSION in maxact.MaxActExplainer().model


def _error_record() -> tuple[LatentRecord, list[Window], dict[str, float]]:
    """A latent firing on " Error" in most windows, on " raise" in some and on " the" in
    a few (" the" also sits silent in most of them), with token frequencies where " the"
    is common and " raise" rare."""
    windows = []
    for i in range(20):
        if i % 5 == 4:  # fires on " the" here, though " the" is silent elsewhere
            tokens, acts = [" the", " x", " the", " y"], [1.0, 0, 0, 0]
        elif i % 5 == 3:
            tokens, acts = [" raise", " the", " z", " w"], [1.0, 0, 0, 0]
        else:
            tokens, acts = [" the", " Error", " the", FILLER[i % 12]], [0, 2.0, 0, 0]
        windows.append(Window(tokens, acts))
    record = LatentRecord(index=3, max_activation=2.0, top=windows[:10],
                          quantiles=[windows[10:]], top_logits=[" Error"])
    return record, windows, {"the": 0.1, "error": 1e-4, "raise": 1e-4, "x": 0.01}


def test_with_token_frequencies_a_common_token_is_left_out_and_a_rare_one_kept() -> None:
    """Windows of a latent firing on " Error" (in most) and on " the" (in a few, where " the"
    is one of the text's commonest tokens and usually silent): the label names " Error" and
    the rare " raise" it also fires on, not " the", whose false alarms would cost more
    silent windows than its hits gain."""
    record, windows, frequencies = _error_record()
    description = describe(record, windows, frequencies)
    assert description.fires_on == (" Error", " raise")
    assert not description.after and not description.line_start
    assert describe(record, windows).fires_on[0] == " Error"  # without: coverage rules
    result = explain_offline(record, [Window([" the", " a", " b"], [0, 0, 0])] * 5,
                             frequencies=frequencies)
    assert " the" not in parse(result.label).fires_on and result.detection is not None


def test_silent_windows_count_a_token_s_false_alarms() -> None:
    """Given windows where the latent is silent, false alarms are counted on them, not
    modelled from frequencies: " the" (common by its frequency) is named once it never
    appears where the latent is silent, and " raise" (rare by its frequency) is left out
    once it is in most silent windows."""
    record, windows, frequencies = _error_record()
    assert describe(record, windows, frequencies).fires_on == (" Error", " raise")
    silent = [[" raise", " q", FILLER[i % 12]] if i % 3 else [" q", " r", " s"]
              for i in range(30)]
    assert describe(record, windows, frequencies, silent).fires_on == (" Error", " the")
    few = silent[:token_choice.MIN_SILENT - 1]  # too few to count on: modelled again
    assert describe(record, windows, frequencies, few).fires_on == (" Error", " raise")


def test_search_embeddings_read_a_label_as_plain_words() -> None:
    assert maxact.search_words('"def", "class" at line start → promotes " __init__", "("') \
        == "def class at line start; promotes __init__ ("
    assert maxact.search_words('any token after "("') == "any token after ("
    assert maxact.search_words('"\\n", "    " → promotes " "') == "newline indent; promotes space"
    assert maxact.search_words("names of cities") == "names of cities"
