"""Automated interpretability: prompts, label parsing, example splits, balanced-accuracy
scoring, Claude through the real SDK against a local fake API (retries, fatal errors,
message batches), and the local model as explainer (slow)."""

from __future__ import annotations

import random
import time

import pytest

from tests.fake_anthropic import (
    FakeAnthropic,
    api_error,
    credit_too_low,
    overloaded,
    rate_limited,
    server_error,
    unauthorized,
    user_text,
)
from training.autointerp.claude import ClaudeExplainer
from training.autointerp.explain import (
    PROMPT_VERSION,
    ExplainSettings,
    LatentRecord,
    Window,
    detection_prompt,
    detection_score,
    explain_latent,
    explain_latents_batched,
    explain_prompt,
    fuzzing_prompt,
    fuzzing_score,
    parse_label,
    render_window,
    settings_key,
    split_examples,
)
from training.autointerp.protocol import ExplainerError, UsageMeter
from training.autointerp.scoring import random_marks

LABEL = "Python def keyword"
FILLER = [" x", " =", " 1", "\n", " return", " y", " +", " print", "(", ")", ":", " if",
          "    ", " else", " foo", "\t"]
SMALL = ExplainSettings(explain_top=4, explain_quantile=1, detection_n=3, fuzzing_n=3)


# -- synthetic latents: "fires on the keyword def" ---------------------------------------
def code_window(rng: random.Random, peak: float, fires: bool = True, length: int = 16) -> Window:
    """Filler code tokens; when ``fires``, one or two non-adjacent `` def`` tokens with
    activations near ``peak`` (every def fires, nothing else does)."""
    tokens = [rng.choice(FILLER) for _ in range(length)]
    acts = [0.0] * length
    if fires:
        for pos in rng.sample(range(0, length, 2), rng.choice([1, 2])):
            tokens[pos], acts[pos] = " def", peak * rng.uniform(0.8, 1.0)
    return Window(tokens, acts)


def keyword_record(index: int = 7, seed: int = 0) -> LatentRecord:
    """20 top examples and 10 quantile buckets × 5, all firing on `` def``."""
    rng = random.Random(seed)
    top = [code_window(rng, 10.0 - i * 0.1) for i in range(20)]
    quantiles = [[code_window(rng, 8.0 * (1 - b / 10)) for _ in range(5)] for b in range(10)]
    return LatentRecord(index=index, max_activation=10.0, top=top, quantiles=quantiles,
                        top_logits=[" foo", "(", " main"], bottom_logits=[" the", " and"])


def negatives_for(n: int = 10, seed: int = 1) -> list[Window]:
    rng = random.Random(seed)
    return [code_window(rng, 0.0, fires=False) for _ in range(n)]


def judged_text(body_or_text: dict | str) -> str:
    """The ``Text…`` paragraph of a judge prompt (the explanation is another paragraph)."""
    text = body_or_text if isinstance(body_or_text, str) else user_text(body_or_text)
    return next(p for p in text.split("\n\n") if p.startswith("Text"))


def perfect_answer(text: str) -> str:
    """A judge that knows the latent fires exactly on `` def``; a label otherwise."""
    if "Answer yes or no" not in text:
        return LABEL
    shown = judged_text(text)
    if "marked <<like this>>" in shown:
        return "yes" if "<<def>>" in shown else "no"
    return "Yes." if "def" in shown else "No."


def perfect(body: dict) -> str:
    return perfect_answer(user_text(body))


def always_yes(body: dict) -> str:
    return "yes" if "Answer yes or no" in user_text(body) else LABEL


class ScriptedExplainer:
    """An in-process explainer whose judge answers come from ``rule(messages)``."""

    name = "scripted"
    model = "script"
    concurrency = 1

    def __init__(self, rule) -> None:
        self.rule = rule
        self.usage = UsageMeter()

    def complete(self, messages, max_tokens):
        raise AssertionError("not used")

    def judge(self, messages) -> bool:
        answer = self.rule(messages[-1]["content"])
        if isinstance(answer, Exception):
            raise answer
        return answer


def claude(api: FakeAnthropic, **kwargs) -> ClaudeExplainer:
    options = {"model": "claude-test", "backoff_s": 0.01, "poll_interval_s": 0.01,
               "concurrency": 4} | kwargs
    return ClaudeExplainer("sk-test", base_url=api.url, **options)


# -- prompts and labels ------------------------------------------------------------------
def test_explain_prompt_marks_the_activating_tokens_of_each_window() -> None:
    window = Window(["x", " =", " def", " foo", "\n", "y"], [0.0, 0.2, 4.0, 3.0, 0.0, 0.5])
    record = LatentRecord(3, 4.0, [window], top_logits=[" foo"], bottom_logits=["\n"])
    system, user = explain_prompt(record, [window])
    assert system["role"] == "system" and "at most 12 words" in system["content"]
    assert user["role"] == "user"
    assert "1. x = <<def foo>>\\ny" in user["content"]  # 0.5 < 0.25 × 4 stays unmarked
    assert '" foo"' in user["content"] and '"\\n"' in user["content"]


def test_render_window_keeps_whitespace_outside_marks_and_escapes_newlines() -> None:
    window = Window(["a", "\n", " b", "\tc"], [0.0, 1.0, 0.0, 1.0])
    assert render_window(window, window.marked_positions()) == "a<<\\n>> b\\t<<c>>"
    assert render_window(window) == "a\\n b\\tc"


def test_judge_prompts_show_the_label_and_the_marks_asked_about() -> None:
    window = Window(["def", " f", "():"], [2.0, 0.0, 0.0])
    detection = detection_prompt(LABEL, window)[-1]["content"]
    assert LABEL in detection and "Text: def f():" in detection and "<<" not in detection
    fuzzing = fuzzing_prompt(LABEL, window, [2])[-1]["content"]
    assert "def f<<():>>" in fuzzing and "yes or no" in fuzzing


@pytest.mark.parametrize(("reply", "label"), [
    ('Label: "Python def keyword".', "Python def keyword"),
    ("**Label:** function definitions in code", "function definitions in code"),
    ("  'def statements'\n\nThe latent fires on def.", "def statements"),
    ("Explanation: the keyword def!", "the keyword def"),
    ("“closing brackets”", "closing brackets"),
    ("- newline characters in prose", "newline characters in prose"),
    ('The latent detects the presence of the keyword "def".', 'the keyword "def"'),
    ("This feature fires on: commas", "commas"),
    (" ".join(f"w{i}" for i in range(20)) + ".", " ".join(f"w{i}" for i in range(12))),
])
def test_parse_label_cleans_replies(reply: str, label: str) -> None:
    assert parse_label(reply) == label


@pytest.mark.parametrize("reply", ["", "  \n ", '""', "Label:", "**"])
def test_parse_label_refuses_empty_replies(reply: str) -> None:
    with pytest.raises(ValueError, match="no label"):
        parse_label(reply)


# -- splitting ---------------------------------------------------------------------------
def test_split_shows_top_and_quantile_samples_and_holds_out_the_rest() -> None:
    record = keyword_record()
    shown, held_out = split_examples(record, explain_top=10, explain_quantile=1, seed=3)
    assert shown[:10] == record.top[:10]
    assert len(shown) == 10 + 10 and len(held_out) == 10 + 10 * 2
    assert not {w.key() for w in shown} & {w.key() for w in held_out}
    assert split_examples(record, seed=3) == (shown, held_out)
    assert split_examples(record, seed=4).shown != shown
    # shown more of each bucket, an explainer is still scored on the same windows
    more = split_examples(record, explain_top=10, explain_quantile=3, seed=3)
    assert more.held_out == held_out and len(more.shown) == 10 + 10 * 3
    assert set(map(Window.key, shown)) < set(map(Window.key, more.shown))
    assert not {w.key() for w in more.shown} & {w.key() for w in held_out}


def test_split_never_holds_out_a_shown_window_or_a_silent_one() -> None:
    record = keyword_record()
    silent = Window(["a"], [0.0])
    record.quantiles[0].extend([record.top[0], silent])
    held_out = split_examples(record, explain_top=5, explain_quantile=0).held_out
    keys = {w.key() for w in held_out}
    assert record.top[0].key() not in keys and silent.key() not in keys
    assert len(keys) == len(held_out)


def test_random_marks_have_the_true_count_and_avoid_activating_tokens() -> None:
    rng = random.Random(0)
    for window in keyword_record().top:
        marks = random_marks(window, rng)
        assert len(marks) == len(window.marked_positions())
        assert all(window.activations[i] == 0 for i in marks)
    assert random_marks(Window(["a", "b"], [1.0, 1.0]), rng) is None


# -- scoring maths -----------------------------------------------------------------------
def test_balanced_accuracy_weighs_both_classes_equally() -> None:
    record = keyword_record()
    positives, negatives = record.top[:4], negatives_for(2)
    pos_texts = [render_window(w) for w in positives]

    def rule(text: str) -> bool:
        shown = judged_text(text)
        return shown != f"Text: {pos_texts[0]}" and ("def" in shown or shown.endswith(
            render_window(negatives[0])))

    score = detection_score(ScriptedExplainer(rule), LABEL, positives, negatives)
    assert (score.tpr, score.tnr, score.judged) == (0.75, 0.5, 6)
    assert score.value == pytest.approx(0.625)
    yes = detection_score(ScriptedExplainer(lambda t: True), LABEL, positives, negatives)
    assert yes.value == 0.5 and (yes.tpr, yes.tnr) == (1.0, 0.0)


def test_failed_judge_calls_are_excluded_and_reported_not_counted_wrong() -> None:
    record = keyword_record()
    failing = render_window(record.top[0])

    def rule(text: str) -> bool | Exception:
        if failing in text:
            return ExplainerError("overloaded")
        return perfect_answer(text).lower().startswith("yes")

    explainer = ScriptedExplainer(rule)
    score = detection_score(explainer, LABEL, record.top[:3], negatives_for(3))
    assert score.value == 1.0 and score.judged == 5
    assert score.errors == ["judge call failed: overloaded"]
    fuzz = fuzzing_score(explainer, LABEL, record.top[1:4], record.top[4:7], seed=1)
    assert fuzz.value == 1.0 and fuzz.judged == 6
    down = ScriptedExplainer(lambda t: ExplainerError("down"))
    nothing = detection_score(down, LABEL, record.top[:3], negatives_for(3))
    assert nothing.value is None and nothing.judged == 0 and len(nothing.errors) == 7


# -- Claude through the SDK --------------------------------------------------------------
def test_claude_completion_reports_usage_and_cost() -> None:
    with FakeAnthropic(perfect) as api:
        explainer = claude(api, price_per_mtok=(3.0, 15.0), model="claude-x")
        record = keyword_record()
        completion = explainer.complete(explain_prompt(record, record.top[:3]), 32)
    assert completion.text == LABEL
    usage = api.replies[0]["usage"]
    assert (completion.input_tokens, completion.output_tokens) == (
        usage["input_tokens"], usage["output_tokens"])
    assert completion.cost_usd == pytest.approx(
        (usage["input_tokens"] * 3 + usage["output_tokens"] * 15) / 1e6)
    assert explainer.usage.total.requests == 1
    body = api.requests[0].body
    assert body["model"] == "claude-x" and body["max_tokens"] == 32
    assert "sparse autoencoder" in body["system"] and body["messages"][0]["role"] == "user"
    headers = api.requests[0].headers
    assert "sk-test" in headers.get("x-api-key", "") + headers.get("authorization", "")


def test_claude_retries_rate_limits_overload_and_server_errors() -> None:
    with FakeAnthropic(perfect) as api:
        api.fail_next(rate_limited(), overloaded(), server_error())
        explainer = claude(api)
        assert explainer.judge(detection_prompt(LABEL, keyword_record().top[0])) is True
        assert api.paths() == ["/v1/messages"] * 4
        assert explainer.usage.total.requests == 1

        api.fail_next(*[overloaded()] * 3)
        with pytest.raises(ExplainerError, match="gave up after 3 attempts") as caught:
            claude(api, max_retries=2).complete([{"role": "user", "content": "hi"}], 8)
        assert caught.value.status == 529 and not caught.value.fatal
        assert len(api.paths()) == 4 + 3


def test_claude_waits_as_long_as_retry_after_asks() -> None:
    with FakeAnthropic(perfect) as api:
        api.fail_next(rate_limited(retry_after="0.3"))
        start = time.monotonic()
        claude(api, backoff_s=0.001).complete([{"role": "user", "content": "hi"}], 8)
        assert time.monotonic() - start >= 0.3


def test_credit_too_low_is_reported_per_latent_without_retries_or_scores() -> None:
    with FakeAnthropic(perfect) as api:
        api.fail_always(credit_too_low())
        result = explain_latent(keyword_record(), negatives_for(), claude(api), settings=SMALL)
    assert result.label is None and result.detection is None and result.fuzzing is None
    assert result.fatal and len(result.errors) == 1 and "credit balance" in result.errors[0]
    assert len(api.requests) == 1
    assert result.usage == {"requests": 0, "input_tokens": 0, "output_tokens": 0,
                            "cost_usd": 0.0}


def test_refused_requests_are_not_retried() -> None:
    with FakeAnthropic(perfect) as api:
        api.fail_always(unauthorized())
        with pytest.raises(ExplainerError, match="401") as caught:
            claude(api).complete([{"role": "user", "content": "hi"}], 8)
        assert caught.value.fatal
        api.fail_always(api_error(400, "invalid_request_error", "max_tokens: too large"))
        with pytest.raises(ExplainerError, match="too large") as caught:
            claude(api).complete([{"role": "user", "content": "hi"}], 8)
        assert not caught.value.fatal and caught.value.status == 400
        assert len(api.requests) == 2


def test_a_perfect_judge_scores_one_and_an_always_yes_judge_one_half() -> None:
    record, negatives = keyword_record(), negatives_for()
    with FakeAnthropic(perfect) as api:
        result = explain_latent(record, negatives, claude(api), seed=5)
    assert result.label == LABEL and result.errors == [] and not result.fatal
    assert result.detection == result.fuzzing == result.score == 1.0
    assert result.usage["requests"] == len(api.replies) == 1 + 10 + 10
    assert result.usage["cost_usd"] > 0
    with FakeAnthropic(always_yes) as api:
        result = explain_latent(record, negatives, claude(api), seed=5)
    assert result.detection == result.fuzzing == 0.5


def test_unparseable_judge_answers_are_excluded() -> None:
    def maybe(body: dict) -> str:
        answer = perfect(body)
        return "Perhaps." if answer == "No." else answer

    with FakeAnthropic(maybe) as api:
        result = explain_latent(keyword_record(), negatives_for(), claude(api), settings=SMALL)
    assert result.detection is None and result.fuzzing == 1.0
    assert sum("expected yes or no" in e for e in result.errors) == 3
    assert "detection: no score: no negative question could be judged" in result.errors


def test_message_batches_explain_and_score_many_latents() -> None:
    latents = [(keyword_record(i, seed=i), negatives_for(seed=10 + i)) for i in range(3)]
    with FakeAnthropic(perfect, batch_polls=2) as api:
        explainer = claude(api, price_per_mtok=(3.0, 15.0))
        results = explain_latents_batched(latents, explainer, settings=SMALL)
        assert api.paths() == ["/v1/messages/batches"] * 2
        polls = [p for p in api.paths("GET") if not p.endswith("/results")]
        assert len(polls) == 2 * (2 + 1 + 1)  # in progress ×2, ended, and results' retrieve
        assert sum(p.endswith("/results") for p in api.paths("GET")) == 2
    assert [r.index for r in results] == [0, 1, 2]
    for result in results:
        assert result.label == LABEL and result.errors == []
        assert result.detection == result.fuzzing == 1.0
        assert result.usage["requests"] == 1 + 6 + 6
    full = sum(r["usage"]["input_tokens"] * 3 + r["usage"]["output_tokens"] * 15
               for r in api.replies) / 1e6
    spent = sum(r.usage["cost_usd"] for r in results)
    assert spent == pytest.approx(full / 2, abs=1e-5)  # the batch discount


def test_a_failed_batch_request_gets_its_error_in_place() -> None:
    def flaky(body: dict):
        return overloaded() if "second" in user_text(body) else "fine"

    with FakeAnthropic(flaky) as api:
        replies = claude(api).complete_batch(
            [[{"role": "user", "content": w}] for w in ("first", "second", "third")], 8)
    assert [getattr(r, "text", None) for r in replies] == ["fine", None, "fine"]
    assert isinstance(replies[1], ExplainerError) and "overloaded_error" in str(replies[1])


def test_creating_a_batch_is_retried_only_when_it_cannot_have_been_created() -> None:
    prompts = [[{"role": "user", "content": "hi"}]] * 2
    with FakeAnthropic(perfect) as api:
        api.fail_next(rate_limited())
        assert all(r.text == LABEL for r in claude(api).complete_batch(prompts, 8))
        assert api.paths() == ["/v1/messages/batches"] * 2
        api.fail_next(overloaded())
        replies = claude(api).complete_batch(prompts, 8)
        assert all(isinstance(r, ExplainerError) and r.status == 529 for r in replies)
        assert api.paths() == ["/v1/messages/batches"] * 3


def test_settings_key_hashes_explainer_model_settings_and_prompt_version(monkeypatch) -> None:
    key = settings_key("claude", "claude-sonnet-4-5", explain_top=10, detection_n=5)
    assert len(key) == 64 and int(key, 16) >= 0
    assert key == settings_key("claude", "claude-sonnet-4-5", detection_n=5, explain_top=10)
    assert key != settings_key("claude", "claude-sonnet-4-5", explain_top=11, detection_n=5)
    assert key != settings_key("local", "claude-sonnet-4-5", explain_top=10, detection_n=5)
    monkeypatch.setattr("training.autointerp.explain.PROMPT_VERSION", PROMPT_VERSION + "x")
    assert key != settings_key("claude", "claude-sonnet-4-5", explain_top=10, detection_n=5)


# -- the local model ---------------------------------------------------------------------
@pytest.mark.slow
def test_local_explainer_labels_and_scores_a_latent(embedded_model) -> None:
    from training.autointerp.local import LocalExplainer

    explainer = LocalExplainer(embedded_model)
    settings = ExplainSettings(explain_top=5, explain_quantile=0, detection_n=2, fuzzing_n=2,
                               label_max_tokens=16)
    start = time.perf_counter()
    result = explain_latent(keyword_record(), negatives_for(), explainer, settings=settings)
    elapsed = time.perf_counter() - start
    print(f"local explainer: {elapsed:.2f} s for one latent, label {result.label!r}, "
          f"detection {result.detection}, fuzzing {result.fuzzing}")
    assert result.label and result.errors == []
    assert 0 <= result.detection <= 1 and 0 <= result.fuzzing <= 1
    assert result.usage["requests"] == 1 + 4 + 4 and result.usage["cost_usd"] == 0


def test_openai_server_errors_are_classified_like_claudes() -> None:
    """The SDK's own exception types, built from real HTTP responses."""
    import httpx
    import openai

    from training.autointerp.openai_compat import classify

    def status(code: int, body: dict) -> openai.APIStatusError:
        request = httpx.Request("POST", "http://server/v1/chat/completions")
        response = httpx.Response(code, json=body, request=request)
        return openai.OpenAI(base_url="http://server/v1", api_key="k")._make_status_error(
            "error", body=body, response=response)

    cases = {429: ({"error": {"message": "slow down", "type": "rate_limit"}}, True, False),
             503: ({"error": "overloaded"}, True, False),
             401: ({"error": {"message": "bad key"}}, False, True),
             404: ({"error": {"message": "no such model"}}, False, True),
             400: ({"error": {"message": "context too long"}}, False, False)}
    for code, (body, retry, fatal) in cases.items():
        retryable, error = classify(status(code, body))
        assert (retryable, error.fatal, error.status) == (retry, fatal, code), code
    quota = status(429, {"error": {"code": "insufficient_quota", "message": "pay up"}})
    assert classify(quota)[1].fatal
    request = httpx.Request("POST", "http://server/v1/chat/completions")
    assert classify(openai.APIConnectionError(request=request))[0]
