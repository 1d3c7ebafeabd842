"""Packed example sets: what is packed reads back (tokens, rounded activations, order),
selections by kind and bucket, tables past 65,535 distinct strings, and bytes that are not
a pack are refused."""

from __future__ import annotations

import pytest

from app.store.example_pack import ExamplePack, PackError, StoredExample, pack_records


def _example(kind: str, bucket: int | None, rank: int, tokens: list[str]) -> StoredExample:
    return StoredExample(kind, bucket, rank, tokens, [0.5 * i + 0.123456 for i in
                                                      range(len(tokens))], 7 + rank, rank)


EXAMPLES = [_example("top", None, 0, ["def", " f", "("]), _example("top", None, 1, ["é"]),
            _example("quantile", 0, 0, ["\x00", "", "def"]),
            _example("quantile", 3, 0, []), _example("quantile", 3, 1, [" f", "\n"])]


def test_a_pack_reads_back_in_order_with_rounded_activations() -> None:
    pack = ExamplePack(pack_records(EXAMPLES))
    assert len(pack) == 5
    got = pack.examples()
    assert [e.tokens for e in got] == [e.tokens for e in EXAMPLES]
    assert [(e.kind, e.bucket, e.rank, e.context_index, e.position) for e in got] == [
        (e.kind, e.bucket, e.rank, e.context_index, e.position) for e in EXAMPLES]
    assert got[0].activations == [0.1235, 0.6235, 1.1235]


def test_selections_by_kind_and_bucket() -> None:
    pack = ExamplePack(pack_records(EXAMPLES))
    assert pack.bucket_counts() == {0: 1, 3: 2}
    assert [e.rank for e in pack.examples(buckets=())] == [0, 1]
    assert [(e.bucket, e.rank) for e in pack.examples(top=False, buckets=(3,))] == [(3, 0),
                                                                                   (3, 1)]
    assert pack.examples(top=False, buckets=(9,)) == []
    assert pack.first_top().tokens == ["def", " f", "("]
    empty = ExamplePack(None)
    assert (len(empty), empty.examples(), empty.bucket_counts(), empty.first_top()) == (
        0, [], {}, None)


def test_mostly_zero_activations_are_stored_sparsely() -> None:
    values = [0.0] * 30 + [2.5, 0.0, 1.25]
    example = StoredExample("top", None, 0, ["a"] * 33, values, 0, 16)
    dense = StoredExample("top", None, 0, ["a"] * 33, [1.0] * 33, 0, 16)
    assert len(pack_records([example])) < len(pack_records([dense])) - 100
    assert ExamplePack(pack_records([example])).examples()[0].activations == values


def test_more_than_65535_distinct_strings() -> None:
    tokens = [f"t{i}" for i in range(70_000)]
    pack = ExamplePack(pack_records([StoredExample("top", None, 0, tokens, [1.0] * 70_000,
                                                   0, 0)]))
    assert pack.examples()[0].tokens == tokens
    long = ["x" * 30_000, "y" * 30_000, "é" * 30_000]  # 90,000 characters of text
    pack = ExamplePack(pack_records([StoredExample("top", None, 0, long, [1.0] * 3, 0, 0)]))
    assert pack.examples()[0].tokens == long


def test_bad_input_is_refused() -> None:
    with pytest.raises(PackError, match="not a packed example set"):
        ExamplePack(b"JSON" + bytes(20))
    with pytest.raises(PackError, match="shorter than its header"):
        ExamplePack(b"SLX1")
    with pytest.raises(PackError, match="truncated"):
        ExamplePack(pack_records(EXAMPLES)[:40])
    with pytest.raises(PackError, match="2 tokens but 1 activations"):
        pack_records([StoredExample("top", None, 0, ["a", "b"], [1.0], 0, 0)])
    with pytest.raises(PackError, match="past 32 bits"):
        pack_records([StoredExample("top", None, 0, ["a"], [1.0], 1 << 40, 0)])
