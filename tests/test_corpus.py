"""Tests for training.data.corpus: text sources (embedded, local files, HF hub) and packing."""

from __future__ import annotations

import ast
import importlib.util
import json
import sys
import types
from itertools import islice

import pytest

from training.data import corpus
from training.data.corpus import EMBEDDED_CORPUS, CorpusError, iter_texts
from training.data.embedded import embedded_corpus_sources
from training.data.packing import pack_contexts

BOS, EOS = 1, 2
_HAS_DATASETS = importlib.util.find_spec("datasets") is not None
_HAS_PYARROW = importlib.util.find_spec("pyarrow") is not None


def _char_vocab() -> dict[str, int]:
    vocab = {f"<{i}>": i for i in range(4)}
    for char in ["\n", *map(chr, range(32, 127))]:
        vocab[char] = len(vocab)
    return vocab


def _char_tokenizer(with_eos: bool = True):
    """A real fast HF tokenizer mapping each character to its own id (BOS 1, EOS 2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=_char_vocab(), unk_token="<3>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    specials = {"bos_token": "<1>", "unk_token": "<3>", "pad_token": "<0>"}
    if with_eos:
        specials["eos_token"] = "<2>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, **specials)


class _PlainTokenizer:
    """A tokenizer without a Rust backend: exercises the HF-call fallback path."""

    eos_token_id = EOS

    def __call__(self, texts, add_special_tokens=True, return_attention_mask=True):
        assert add_special_tokens is False
        return {"input_ids": [[_char_vocab()[c] for c in text] for text in texts]}


@pytest.fixture(scope="module")
def char_tok():
    return _char_tokenizer()


def _ids(text: str) -> list[int]:
    vocab = _char_vocab()
    return [vocab[c] for c in text]


# --------------------------------------------------------------------------- packing


def test_pack_shapes_and_bos(tiny_model):
    texts = ["hello world"] * 10 + ["x" * 50]
    contexts = list(pack_contexts(texts, tiny_model.tokenizer, 16, tiny_model.bos_id))
    assert contexts
    assert all(len(ctx) == 16 for ctx in contexts)
    assert all(ctx[0] == tiny_model.bos_id for ctx in contexts)
    # No BOS inside the body: the tokenizer's BOS is never added as a special token.
    assert all(tiny_model.bos_id not in ctx[1:] for ctx in contexts)
    stream = 10 * 11 + 50 + 10  # characters plus 10 EOS separators
    assert len(contexts) == stream // 15


def test_pack_content_and_eos_separators(char_tok):
    contexts = list(pack_contexts(["abc", "de"], char_tok, 4, BOS))
    # stream: a b c EOS d e -> two contexts of BOS + 3 stream tokens
    assert contexts == [[BOS, *_ids("abc")], [BOS, EOS, *_ids("de")]]


def test_pack_eos_between_documents_only(tiny_model):
    tok = tiny_model.tokenizer
    contexts = list(pack_contexts(["aaaa", "bbb", "cc"], tok, 12, tiny_model.bos_id))
    assert len(contexts) == 1  # 4 + 1 + 3 + 1 + 2 = 11 stream tokens, exactly one context
    body = contexts[0][1:]
    assert [i for i, tid in enumerate(body) if tid == tok.eos_token_id] == [4, 8]


def test_pack_drops_trailing_partial_context(char_tok):
    text = "abcdefghij"  # 10 stream tokens
    assert len(list(pack_contexts([text], char_tok, 4, BOS))) == 3  # 3 * 3 = 9, 1 dropped
    assert len(list(pack_contexts([text], char_tok, 11, BOS))) == 1
    assert list(pack_contexts([text], char_tok, 12, BOS)) == []
    last = list(pack_contexts([text], char_tok, 4, BOS))[-1]
    assert last == [BOS, *_ids("ghi")]


def test_pack_skips_empty_texts(char_tok):
    contexts = list(pack_contexts(["ab", "", "cd"], char_tok, 6, BOS))
    assert contexts == [[BOS, *_ids("ab"), EOS, *_ids("cd")]]


def test_pack_without_eos_concatenates():
    tok = _char_tokenizer(with_eos=False)
    assert tok.eos_token_id is None
    assert list(pack_contexts(["ab", "cd"], tok, 5, BOS)) == [[BOS, *_ids("abcd")]]


def test_pack_independent_of_batch_size_and_backend(char_tok):
    texts = [f"document {i}: " + "xyz" * (i % 7) for i in range(50)]
    reference = list(pack_contexts(texts, char_tok, 9, BOS))
    assert reference
    for batch in (1, 3, 64, 1000):
        assert list(pack_contexts(texts, char_tok, 9, BOS, batch_texts=batch)) == reference
    assert list(pack_contexts(texts, _PlainTokenizer(), 9, BOS)) == reference


def test_pack_is_lazy(char_tok):
    def texts():
        yield "abcdef"
        raise AssertionError("pack_contexts read past what the first context needed")

    first = next(pack_contexts(texts(), char_tok, 4, BOS, batch_texts=1))
    assert first == [BOS, *_ids("abc")]


@pytest.mark.parametrize("context", [1, 0, -5])
def test_pack_rejects_short_context(char_tok, context):
    with pytest.raises(ValueError, match="context"):
        pack_contexts(["abc"], char_tok, context, BOS)  # raised eagerly, before iterating


# --------------------------------------------------------------------------- embedded corpus


def _looks_like_code(text: str) -> bool:
    try:
        ast.parse(text)
    except SyntaxError:
        return False
    return any(line.startswith(("def ", "class ", "import ", "from ")) for line in text.split("\n"))


def test_embedded_corpus_is_deterministic():
    first = list(islice(iter_texts(EMBEDDED_CORPUS), 40))
    second = list(islice(iter_texts(EMBEDDED_CORPUS), 40))
    assert len(first) == 40
    assert first == second
    assert all(isinstance(text, str) and text.strip() for text in first)


def test_embedded_prefix_mixes_prose_and_code():
    docs = list(islice(iter_texts(EMBEDDED_CORPUS), 20))
    code = [doc for doc in docs if _looks_like_code(doc)]
    prose = [doc for doc in docs if not _looks_like_code(doc)]
    assert len(code) >= 5
    assert len(prose) >= 5


def test_embedded_sources():
    sources = embedded_corpus_sources()
    assert sources == sorted(sources)
    assert len(sources) > 100
    names = {path.name for path in sources}
    assert {"topics.py", "argparse.py", "__init__.py"} <= names
    for path in sources:
        assert path.is_file()
        assert path.suffix == ".py"
        assert path.stat().st_size <= 1_000_000
        assert not {"test", "tests", "idle_test", "site-packages"} & set(path.parts)


@pytest.mark.slow
def test_embedded_corpus_has_two_million_smollm2_tokens(embedded_model):
    tok = embedded_model.tokenizer
    target, total, docs = 2_000_000, 0, 0
    texts = iter_texts(EMBEDDED_CORPUS)
    while total < target and (batch := list(islice(texts, 64))):
        docs += len(batch)
        total += sum(len(ids) for ids in tok(batch, add_special_tokens=False)["input_ids"])
    assert total >= target, f"embedded corpus has only {total} tokens in {docs} documents"

    first = list(islice(iter_texts(EMBEDDED_CORPUS), 20))
    assert any(_looks_like_code(doc) for doc in first)
    assert any(not _looks_like_code(doc) for doc in first)


@pytest.mark.slow
def test_pack_embedded_corpus_with_smollm2(embedded_model):
    tok, bos = embedded_model.tokenizer, embedded_model.bos_id
    texts = list(islice(iter_texts(EMBEDDED_CORPUS), 6))
    contexts = list(pack_contexts(texts, tok, 128, bos))
    assert len(contexts) > 10
    assert all(len(ctx) == 128 and ctx[0] == bos for ctx in contexts)
    # Same stream as encoding through the HF call, joined with EOS.
    stream: list[int] = []
    for ids in tok(texts, add_special_tokens=False)["input_ids"]:
        stream.extend([*([tok.eos_token_id] if stream else []), *ids])
    assert [t for ctx in contexts for t in ctx[1:]] == stream[: 127 * len(contexts)]


# --------------------------------------------------------------------------- local files


def test_txt_file(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text("first line\nsecond line\n", encoding="utf-8")
    assert list(iter_texts(str(path))) == ["first line\nsecond line\n"]


def test_big_txt_file_is_cut_at_blank_lines(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "_TXT_CHUNK_CHARS", 20)
    text = "".join(f"paragraph {i} line\nmore\n\n" for i in range(5))
    path = tmp_path / "big.txt"
    path.write_text(text, encoding="utf-8")
    docs = list(iter_texts(str(path)))
    assert len(docs) == 5
    assert "".join(docs) == text


def test_jsonl_file(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"text": "alpha", "id": 1}, {"text": None}, {"text": "beta"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert list(iter_texts(str(path))) == ["alpha", "beta"]


def test_jsonl_custom_and_missing_column(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"body": "gamma"}) + "\n", encoding="utf-8")
    assert list(iter_texts(str(path), text_column="body")) == ["gamma"]
    with pytest.raises(CorpusError, match=r"data\.jsonl.*'text'.*body"):
        list(iter_texts(str(path)))


def test_jsonl_invalid_json(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{not json\n', encoding="utf-8")
    with pytest.raises(CorpusError, match=r"bad\.jsonl.*invalid JSON at bad\.jsonl:2"):
        list(iter_texts(str(path)))


@pytest.mark.skipif(not _HAS_PYARROW, reason="pyarrow is not installed")
def test_parquet_file_and_missing_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "data.parquet"
    table = pa.table({"text": ["one", None, "two", "three"], "n": [1, 2, 3, 4]})
    pq.write_table(table, path, row_group_size=2)
    assert list(iter_texts(str(path))) == ["one", "two", "three"]
    with pytest.raises(CorpusError, match=r"data\.parquet.*'content'"):
        list(iter_texts(str(path), text_column="content"))


@pytest.mark.skipif(not _HAS_PYARROW, reason="pyarrow is not installed")
def test_directory_in_sorted_order(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "b").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "c.txt").write_text("from c", encoding="utf-8")
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "from a"}) + "\n", encoding="utf-8")
    pq.write_table(pa.table({"text": ["from b"]}), tmp_path / "b" / "part.parquet")
    (tmp_path / ".hidden" / "x.txt").write_text("hidden", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    assert list(iter_texts(str(tmp_path))) == ["from a", "from b", "from c"]
    assert list(iter_texts(str(tmp_path))) == list(iter_texts(str(tmp_path)))


def test_missing_path(tmp_path):
    missing = tmp_path / "nowhere" / "data.jsonl"
    with pytest.raises(CorpusError, match="no such file") as info:
        iter_texts(str(missing))  # raised when called, not on first iteration
    assert str(missing) in str(info.value)
    with pytest.raises(CorpusError, match=r"'missing\.txt'"):
        iter_texts("missing.txt")


def test_unsupported_extension(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("text\nhello\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=r"data\.csv.*unsupported"):
        iter_texts(str(path))


@pytest.mark.parametrize(
    ("name", "content"), [("empty.txt", ""), ("blank.txt", " \n\n"), ("empty.jsonl", "\n\n")]
)
def test_empty_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(CorpusError, match="no text") as info:
        list(iter_texts(str(path)))
    assert name in str(info.value)


def test_empty_directory(tmp_path):
    with pytest.raises(CorpusError, match="holds no"):
        list(iter_texts(str(tmp_path)))
    (tmp_path / "readme.md").write_text("not a data file", encoding="utf-8")
    with pytest.raises(CorpusError, match="holds no"):
        list(iter_texts(str(tmp_path)))
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    with pytest.raises(CorpusError, match="no text"):
        list(iter_texts(str(tmp_path)))


# --------------------------------------------------------------------------- HF hub


def _fake_datasets(monkeypatch, records: list[dict]) -> list[tuple]:
    calls: list[tuple] = []

    def load_dataset(path, name=None, *, split, streaming):
        calls.append((path, name, split, streaming))
        return iter(records)

    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", module)
    return calls


def test_hub_streaming_with_config(monkeypatch):
    calls = _fake_datasets(monkeypatch, [{"text": "hub one"}, {"text": "hub two"}])
    assert list(iter_texts("someone/corpus:en", split="validation")) == ["hub one", "hub two"]
    assert calls == [("someone/corpus", "en", "validation", True)]


def test_hub_missing_column_and_empty(monkeypatch):
    _fake_datasets(monkeypatch, [{"content": "x"}])
    with pytest.raises(CorpusError, match=r"'someone/corpus'.*'text'.*content"):
        list(iter_texts("someone/corpus"))
    _fake_datasets(monkeypatch, [])
    with pytest.raises(CorpusError, match=r"'someone/corpus' contains no text"):
        list(iter_texts("someone/corpus"))


@pytest.mark.skipif(not _HAS_DATASETS, reason="the datasets package is not installed")
def test_hub_unreachable_dataset_is_a_corpus_error(monkeypatch):
    import datasets
    import huggingface_hub.constants

    # The env var alone is too late once huggingface_hub is imported: patch the constants too.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    name = "saelab-test/no-such-dataset-anywhere"
    with pytest.raises(CorpusError, match="no-such-dataset-anywhere") as info:
        list(iter_texts(name))
    assert "\n" not in str(info.value)
