"""Steering edits (exact algebra), sampling settings and streamed chat decoding."""

from __future__ import annotations

import pytest
import torch

from training.data.hooks import block_output
from training.inference.sampling import IncrementalText, stop_token_ids
from training.inference.steering import (
    STEERED_ROWS,
    Sampling,
    Steer,
    chat_prompt_ids,
    generate,
    generate_pair,
    latent_values,
    steering_edit,
)
from training.sae.autoencoder import SaeConfig, SparseAutoencoder

D = 64
LAYER = 1


@pytest.fixture(scope="module")
def sae() -> SparseAutoencoder:
    torch.manual_seed(0)
    return SparseAutoencoder(SaeConfig(d_in=D, n_latents=128, k=8)).eval()


@pytest.fixture(scope="module")
def hidden(tiny_model) -> torch.Tensor:
    """A real block output of the tiny model, [2, 12, D]."""
    ids = torch.randint(4, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    return block_output(tiny_model.model, tiny_model.blocks, LAYER, ids)


def busiest_latent(sae: SparseAutoencoder, h: torch.Tensor) -> int:
    """The latent selected on most positions of h (so a clamp has a z_f to remove)."""
    enc = sae.encode(h.reshape(-1, D))
    return int(torch.bincount(enc.indices[enc.values > 0].reshape(-1)).argmax())


def z_of(sae: SparseAutoencoder, h: torch.Tensor, feature: int) -> torch.Tensor:
    """z_f per position of h [B, T, D] -> [B, T, 1], from the dense code."""
    return sae.dense_latents(h.reshape(-1, D))[:, feature].reshape(*h.shape[:2], 1)


def prompt(tiny_model, text: str = "the cat sat") -> list[int]:
    return chat_prompt_ids(tiny_model, text)


# -- the edit ---------------------------------------------------------------------------
def test_clamp_adds_the_missing_code_along_the_decoder_row(sae, hidden) -> None:
    f = busiest_latent(sae, hidden)
    edited = steering_edit(sae, [Steer(f, "clamp", 0.5)], {f: 4.0})(hidden)
    z = z_of(sae, hidden, f)
    assert (z > 0).any()
    expected = hidden + (0.5 * 4.0 - z) * sae.w_dec[f].detach()
    torch.testing.assert_close(edited, expected)


def test_clamp_sets_the_code_when_the_decoder_is_orthonormal(hidden) -> None:
    sae = SparseAutoencoder(SaeConfig(d_in=D, n_latents=32, k=4)).eval()
    basis = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(2)))[0]
    with torch.no_grad():
        sae.w_dec.copy_(basis[:32])
        sae.w_enc.copy_(basis[:32])
    f = busiest_latent(sae, hidden)
    fired = z_of(sae, hidden, f) > 0
    edited = steering_edit(sae, [Steer(f, "clamp", 3.0)], {f: 2.0})(hidden)
    clamped = z_of(sae, edited, f)[fired]
    torch.testing.assert_close(clamped, torch.full_like(clamped, 6.0))
    others = torch.arange(32) != f
    before = sae.pre_activations(hidden.reshape(-1, D))[:, others]
    torch.testing.assert_close(sae.pre_activations(edited.reshape(-1, D))[:, others], before)


def test_add_moves_every_position_by_the_same_vector(sae, hidden) -> None:
    edited = steering_edit(sae, [Steer(7, "add", -1.5)], {7: 2.0})(hidden)
    torch.testing.assert_close(edited - hidden,
                               (-3.0 * sae.w_dec[7].detach()).expand_as(hidden))


def test_add_zero_leaves_h_unchanged(sae, hidden) -> None:
    assert torch.equal(steering_edit(sae, [Steer(7, "add", 0.0)], {7: 5.0})(hidden), hidden)
    assert torch.equal(steering_edit(sae, [], {})(hidden), hidden)


def test_several_steers_sum_deltas_from_the_original_code(sae, hidden) -> None:
    f = busiest_latent(sae, hidden)
    g = (f + 1) % 128
    steers = [Steer(f, "clamp", 0.0), Steer(g, "add", 1.0)]
    edited = steering_edit(sae, steers, {f: 3.0, g: 2.0})(hidden)
    w = sae.w_dec.detach()
    expected = hidden - z_of(sae, hidden, f) * w[f] + 2.0 * w[g]
    torch.testing.assert_close(edited, expected)


def test_rows_limit_the_edit_to_a_batch_slice(sae, hidden) -> None:
    f = busiest_latent(sae, hidden)
    steers, maxes = [Steer(f, "clamp", 2.0)], {f: 1.0}
    edited = steering_edit(sae, steers, maxes, rows=STEERED_ROWS)(hidden)
    assert torch.equal(edited[0], hidden[0])
    torch.testing.assert_close(edited[1:], steering_edit(sae, steers, maxes)(hidden[1:]))


def test_edit_keeps_the_dtype_of_h(sae, hidden) -> None:
    f = busiest_latent(sae, hidden)
    half = hidden.to(torch.bfloat16)
    edited = steering_edit(sae, [Steer(f, "clamp", 1.0)], {f: 3.0})(half)
    assert edited.dtype == torch.bfloat16
    reference = steering_edit(sae, [Steer(f, "clamp", 1.0)], {f: 3.0})(half.float())
    torch.testing.assert_close(edited.float(), reference, atol=0.1, rtol=0.02)


def test_latent_values_match_the_dense_code(sae, hidden) -> None:
    x = hidden.reshape(-1, D)
    features = torch.tensor([busiest_latent(sae, hidden), 3, 90])
    torch.testing.assert_close(latent_values(sae, x, features),
                               sae.dense_latents(x)[:, features])


@pytest.mark.parametrize(("steer", "maxes", "message"), [
    (Steer(128, "clamp", 1.0), {128: 1.0}, "feature 128 is out of range"),
    (Steer(-1, "add", 1.0), {-1: 1.0}, "feature -1 is out of range"),
    (Steer(5, "scale", 1.0), {5: 1.0}, "feature 5: unknown steering mode"),  # type: ignore[arg-type]
    (Steer(5, "add", float("nan")), {5: 1.0}, "feature 5: steering value"),
    (Steer(5, "add", 1.0), {}, "feature 5 has no max activation"),
])
def test_bad_steers_are_rejected(sae, steer, maxes, message) -> None:
    with pytest.raises(ValueError, match=message):
        steering_edit(sae, [steer], maxes)


def test_a_feature_steered_twice_is_rejected(sae) -> None:
    with pytest.raises(ValueError, match="feature 5 is steered twice"):
        steering_edit(sae, [Steer(5, "add", 1.0), Steer(5, "clamp", 0.0)], {5: 1.0})


# -- sampling settings and text -----------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "field"), [
    ({"temperature": -0.1}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 513}, "max_tokens"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.01}, "top_p"),
])
def test_bad_sampling_is_rejected(kwargs, field) -> None:
    with pytest.raises(ValueError, match=field):
        Sampling(**kwargs)


class ByteTokenizer:
    """Ids are UTF-8 bytes, as in byte-level BPE vocabularies at their finest."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def test_incremental_text_holds_back_incomplete_characters() -> None:
    text = "né 日本 😀!"
    stream = IncrementalText(ByteTokenizer())
    pieces = [stream.push(byte) for byte in text.encode()]
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) + stream.flush() == text
    assert pieces[1:3] == ["", "é"]


def test_prompt_without_chat_template_is_bos_and_text(tiny_model) -> None:
    tokenizer = tiny_model.tokenizer
    assert not getattr(tokenizer, "chat_template", None)
    ids = chat_prompt_ids(tiny_model, "hi you")
    assert ids == [tiny_model.bos_id, *tokenizer.encode("hi you", add_special_tokens=False)]
    with pytest.raises(ValueError, match="prompt is empty"):
        chat_prompt_ids(tiny_model, "  ")


# -- decoding ---------------------------------------------------------------------------
def reference_greedy(lm, ids: list[int], steps: int) -> list[int]:
    """Greedy decoding by full forward passes, no cache."""
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(steps):
            logits = lm.model(input_ids=torch.tensor([ids]), use_cache=False).logits
            ids.append(int(logits[0, -1].argmax()))
            out.append(ids[-1])
    return out


def test_greedy_generate_matches_a_no_cache_loop(tiny_model) -> None:
    ids = prompt(tiny_model)
    text = "".join(generate(tiny_model, LAYER, None, ids, Sampling(temperature=0, max_tokens=24),
                            ignore_eos=True))
    expected = reference_greedy(tiny_model, ids, 24)
    assert text == tiny_model.tokenizer.decode(expected, skip_special_tokens=True)
    assert text


def rows_text(pieces) -> tuple[str, str]:
    out = ["", ""]
    for row, piece in pieces:
        out[row] += piece
    return out[0], out[1]


def test_pair_without_edit_gives_identical_rows(tiny_model) -> None:
    sampling = Sampling(temperature=1.0, max_tokens=30, seed=3)
    base, steered = rows_text(generate_pair(tiny_model, LAYER, None, prompt(tiny_model),
                                            sampling))
    assert base and base == steered
    other, _ = rows_text(generate_pair(tiny_model, LAYER, None, prompt(tiny_model),
                                       Sampling(temperature=1.0, max_tokens=30, seed=4)))
    assert other != base


def test_strong_add_changes_only_the_steered_row(tiny_model, sae) -> None:
    sampling = Sampling(temperature=0, max_tokens=20)
    ids = prompt(tiny_model)
    edit = steering_edit(sae, [Steer(11, "add", 40.0)], {11: 1.0}, rows=STEERED_ROWS)
    base, steered = rows_text(generate_pair(tiny_model, LAYER, edit, ids, sampling))
    plain, _ = rows_text(generate_pair(tiny_model, LAYER, None, ids, sampling))
    assert base == plain
    assert steered != base


class EosEdit:
    """Pushes the last block's output along EOS's unembedding, so the next token is EOS;
    counts the forward passes it sees."""

    def __init__(self, lm, rows: slice = slice(None)) -> None:
        self.eos = lm.model.get_output_embeddings().weight[lm.tokenizer.eos_token_id]
        self.rows = rows
        self.calls = 0

    def __call__(self, h: torch.Tensor, steerable: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1
        out = h.clone()
        out[self.rows] += 1000 * self.eos
        return out


def test_a_row_stops_at_eos_while_the_other_runs_on(tiny_model) -> None:
    last = tiny_model.n_layers - 1
    sampling = Sampling(temperature=0, max_tokens=20)
    ids = prompt(tiny_model)
    assert tiny_model.tokenizer.eos_token_id in stop_token_ids(tiny_model)
    pieces = list(generate_pair(tiny_model, last, EosEdit(tiny_model, STEERED_ROWS), ids,
                                sampling))
    assert pieces and {row for row, _ in pieces} == {0}
    plain, _ = rows_text(generate_pair(tiny_model, last, None, ids, sampling))
    assert rows_text(pieces)[0] == plain
    alone = EosEdit(tiny_model)
    assert list(generate(tiny_model, last, alone, ids, sampling)) == []
    assert alone.calls == 1
    assert list(generate(tiny_model, last, alone, ids, sampling, ignore_eos=True)) == []
    assert alone.calls == 1 + 20


def test_decoding_rejects_bad_arguments_before_the_first_token(tiny_model, sae) -> None:
    edit = steering_edit(sae, [Steer(1, "add", 1.0)], {1: 1.0})
    with pytest.raises(ValueError, match="layer 9 is out of range"):
        generate(tiny_model, 9, edit, prompt(tiny_model), Sampling())
    with pytest.raises(ValueError, match="prompt has no tokens"):
        generate_pair(tiny_model, LAYER, None, [], Sampling())
    with pytest.raises(ValueError, match="exceeds"):
        generate(tiny_model, LAYER, None, [1] * 200, Sampling(max_tokens=100))


# -- the embedded model -----------------------------------------------------------------
@pytest.mark.slow
def test_embedded_model_chats_through_its_template(embedded_model) -> None:
    tokenizer = embedded_model.tokenizer
    ids = chat_prompt_ids(embedded_model, "What is the capital of France?")
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>") and text.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>" in text
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(embedded_model)
    reply = "".join(generate(embedded_model, 3, None, ids,
                             Sampling(temperature=0, max_tokens=24)))
    assert reply.strip()


# -- what steering leaves alone --------------------------------------------------------------
class MaskRecorder:
    """Records the steerable masks an edit is given and edits nothing."""

    def __init__(self) -> None:
        self.masks: list[torch.Tensor | None] = []

    def __call__(self, h: torch.Tensor, steerable: torch.Tensor | None = None) -> torch.Tensor:
        self.masks.append(None if steerable is None else steerable.clone())
        return h


def test_position_zero_and_special_tokens_are_not_steered_unless_asked(tiny_model) -> None:
    bos, eos = tiny_model.tokenizer.bos_token_id, tiny_model.tokenizer.eos_token_id
    ids = [bos, 10, 11, eos, 12]  # a special token inside the prompt (a template marker)
    recorder = MaskRecorder()
    list(generate(tiny_model, LAYER, recorder, ids, Sampling(temperature=0, max_tokens=3),
                  ignore_eos=True))
    prefill, *steps = recorder.masks
    assert prefill.tolist() == [[False, True, True, False, True]]
    assert all(m.shape == (1, 1) for m in steps)
    recorder = MaskRecorder()
    list(generate(tiny_model, LAYER, recorder, ids, Sampling(temperature=0, max_tokens=2,
                                                             steer_special=True)))
    assert recorder.masks[0] is None


def test_a_masked_position_keeps_its_hidden_state(sae, hidden) -> None:
    edit = steering_edit(sae, [Steer(3, "add", 5.0)], {3: 1.0})
    mask = torch.ones(hidden.shape[:2], dtype=torch.bool)
    mask[:, 0] = False
    edited = edit(hidden, mask)
    assert torch.equal(edited[:, 0], hidden[:, 0])
    torch.testing.assert_close(edited[:, 1:], edit(hidden)[:, 1:])


# -- steer-eval ---------------------------------------------------------------------------
def test_per_row_clamp_sets_each_rows_latent_and_leaves_the_baseline(sae, hidden) -> None:
    from training.inference.steer_eval import per_row_clamp
    from training.inference.steering import latent_values

    f, g = 5, 9
    three = torch.cat([hidden[:1]] * 3)  # row 0 baseline, row 1 clamps f, row 2 clamps g
    edit = per_row_clamp(sae, torch.tensor([-1, f, g]), torch.tensor([0.0, 3.0, 1.5]))
    edited = edit(three)
    assert torch.equal(edited[0], three[0])
    for row, (feature, target) in enumerate([(f, 3.0), (g, 1.5)], start=1):
        z = latent_values(sae, edited[row].reshape(-1, D), torch.tensor([feature]))
        expected = steering_edit(sae, [Steer(feature, "clamp", target)], {feature: 1.0})
        torch.testing.assert_close(edited[row], expected(three[row:row + 1])[0])
        assert z.shape == (three.shape[1], 1)


def test_steer_eval_reads_every_reply_back_per_strength(tiny_model, sae) -> None:
    from training.inference.steer_eval import SteerEvalConfig, steer_eval

    cfg = SteerEvalConfig(prompts=("the cat", "a dog ran"), strengths=(0.5, 20.0),
                          max_tokens=6, temperature=0.0)
    last = tiny_model.n_layers - 1
    records = steer_eval(tiny_model, sae, last, [3, 7], {3: 2.0, 7: 1.0}, cfg)
    assert [r.index for r in records] == [3, 7]
    for record in records:
        assert record.prompts == 2 and [s.strength for s in record.strengths] == [0.5, 20.0]
        weak, strong = record.strengths
        assert weak.loss_baseline == strong.loss_baseline  # one shared baseline reply
        assert strong.loss_steered != strong.loss_baseline  # clamping at 20× changed it
        assert record.steerability == max(s.steered_share for s in record.strengths)


def test_steerability_counts_prompts_whose_concept_rose_within_the_fluency_bound() -> None:
    from training.inference.steer_eval import SteerEvalConfig, _record, _Reply

    cfg = SteerEvalConfig(strengths=(1.0, 4.0), rise=0.1, fluency_bound=1.0)
    base = _Reply(concept=0.02, loss=2.0)
    figures = {(5, 1.0): [(base, _Reply(0.05, 2.1)), (base, _Reply(0.5, 2.2))],
               (5, 4.0): [(base, _Reply(0.6, 2.5)), (base, _Reply(0.9, 3.5)),
                          (base, _Reply(0.9, None))]}
    record = _record(5, figures, SteerEvalConfig(strengths=(1.0, 4.0), prompts=("a", "b")))
    assert [s.steered_share for s in record.strengths] == [0.5, 1 / 3]
    assert record.steerability == 0.5 and record.best_strength == 1.0
    assert cfg.rise == 0.1 and record.strengths[1].loss_steered == 3.0


def test_a_cap_limits_the_component_along_the_decoder_direction(sae, hidden) -> None:
    f = 7
    u = (sae.w_dec[f] / sae.w_dec[f].norm()).detach()
    along = hidden.reshape(-1, D) @ u
    limit = float(along.median())  # half the positions above it
    value = limit / float(sae.w_dec[f].detach().norm())  # max_f = 1: v·max·‖W_dec[f]‖ = limit
    edited = steering_edit(sae, [Steer(f, "cap", value)], {f: 1.0})(hidden).reshape(-1, D)
    after = edited @ u
    torch.testing.assert_close(after, torch.clamp(along, max=limit), atol=1e-4, rtol=1e-4)
    rest = hidden.reshape(-1, D) - along[:, None] * u
    torch.testing.assert_close(edited - after[:, None] * u, rest, atol=1e-4, rtol=1e-4)
