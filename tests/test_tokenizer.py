"""The text tokenizers: special tokens, round trips, truncation, padding and odd input."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from vit.tokenizer import KINDS, SPECIAL_TOKENS, TextTokenizer

REPO = Path(__file__).resolve().parents[1]
LITERALS = "[CLS] [SEP] [PAD] [UNK] [MASK]"
VOCAB = {"word": 10000, "char": 100, "bpe": 1000, "wordpiece": 1000}


@cache
def corpus() -> tuple[str, ...]:
    """The first 2,000 SST-2 training phrases, plus the special tokens' names as plain text."""
    lines = (REPO / "data" / "sst2" / "train.tsv").read_text(encoding="utf-8").splitlines()[1:2001]
    return tuple(line.split("\t", 1)[1] for line in lines) + (LITERALS.lower(), LITERALS)


@cache
def trained(kind: str, lowercase: bool = True) -> TextTokenizer:
    return TextTokenizer.train(corpus(), kind, VOCAB[kind], max_length=48, lowercase=lowercase)


def content(tokenizer: TextTokenizer, ids: torch.Tensor) -> list[int]:
    """The ids of one encoded row between [CLS] and [SEP], padding removed."""
    row = ids[ids != tokenizer.pad_id].tolist()
    assert row[0] == tokenizer.cls_id and row[-1] == tokenizer.sep_id
    return row[1:-1]


@pytest.mark.parametrize("kind", KINDS)
def test_special_tokens_have_fixed_ids_and_places(kind: str) -> None:
    tokenizer = trained(kind)
    assert [tokenizer.pad_id, tokenizer.unk_id, tokenizer.cls_id, tokenizer.sep_id] == [0, 1, 2, 3]
    assert [tokenizer._tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    ids, truncated = tokenizer.encode_batch(["a good film", "the worst movie of the year , by far"])
    assert truncated == 0
    assert (ids[:, 0] == tokenizer.cls_id).all()
    short, long = ids.tolist()
    assert long[-1] == tokenizer.sep_id and tokenizer.pad_id not in long
    end = short.index(tokenizer.sep_id)
    assert set(short[end + 1:]) == {tokenizer.pad_id}
    assert tokenizer.tokens("a good film")[0] == "[CLS]" and tokenizer.tokens("a good film")[-1] == "[SEP]"


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip(kind: str) -> None:
    tokenizer = trained(kind)
    texts = [text for text in corpus() if len(text) < 40][:200]  # short enough not to be cut
    ids, truncated = tokenizer.encode_batch(texts)
    assert truncated == 0
    assert tokenizer.unk_id not in ids  # the vocabulary covers its own training text
    for text, row in zip(texts, ids):
        decoded = tokenizer.decode(row.tolist())
        if kind in ("char", "bpe"):  # lossless on text its vocabulary covers
            assert decoded == text
        again, _ = tokenizer.encode_batch([decoded])
        assert content(tokenizer, again[0]) == content(tokenizer, row)


@pytest.mark.parametrize("lowercase", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_text_that_looks_like_a_special_token_stays_text(kind: str, lowercase: bool) -> None:
    tokenizer = trained(kind, lowercase)
    ids, _ = tokenizer.encode_batch([LITERALS, "[PAD]", f"a {LITERALS} b"])
    for row in ids:
        inner = content(tokenizer, row)
        assert inner and not set(inner) & set(range(len(SPECIAL_TOKENS))), tokenizer.tokens(LITERALS)
    assert "CLS" in tokenizer.decode(ids[0].tolist()).upper()


@pytest.mark.parametrize("kind", KINDS)
def test_unknown_characters_become_unk(kind: str) -> None:
    tokenizer = trained(kind)
    ids, _ = tokenizer.encode_batch(["a 短 film"])
    assert tokenizer.unk_id in content(tokenizer, ids[0])


@pytest.mark.parametrize("text", ["", "   ", "\t\n", "\x00\x01", "\u200b"])
def test_empty_text_is_refused_naming_it(text: str) -> None:
    with pytest.raises(ValueError, match=r"text 1 .*empty"):
        trained("word").encode_batch(["fine", text])


def test_control_and_format_characters_are_whitespace_or_removed() -> None:
    tokenizer = trained("wordpiece")
    plain, _ = tokenizer.encode_batch(["a good film"])
    for odd in ["a\x00good\tfilm", "  a good\r\nfilm  ", "a go\u200bod film", "A GOOD FILM"]:
        ids, _ = tokenizer.encode_batch([odd])
        assert ids.tolist() == plain.tolist(), odd


def test_long_texts_are_truncated_and_counted() -> None:
    tokenizer = trained("word")
    ids, truncated = tokenizer.encode_batch(["good " * 500, "bad", "fine " * 47])
    assert truncated == 2 and ids.shape == (3, tokenizer.max_length) == (3, 48)
    assert (ids[[0, 2], -1] == tokenizer.sep_id).all()


def test_padding_goes_to_the_longest_text_of_the_batch() -> None:
    tokenizer = trained("word")
    ids, _ = tokenizer.encode_batch(["good", "a good film"])
    assert ids.shape == (2, 5)


def test_wrong_input_types_are_clear_errors() -> None:
    tokenizer = trained("word")
    with pytest.raises(TypeError, match="list of texts"):
        tokenizer.encode_batch("a good film")
    with pytest.raises(TypeError, match="text 1 is a NoneType"):
        tokenizer.encode_batch(["good", None])


@pytest.mark.parametrize("kind", KINDS)
def test_json_file_round_trip_keeps_kind_and_encoding(kind: str, tmp_path: Path) -> None:
    tokenizer = trained(kind)
    path = tmp_path / "tokenizer.json"
    tokenizer.save(path)
    loaded = TextTokenizer.load(path)
    assert (loaded.kind, loaded.vocab_size, loaded.max_length) == (kind, tokenizer.vocab_size, 48)
    texts = ["a [CLS] good film", "the worst movie of the year"]
    assert loaded.encode_batch(texts)[0].tolist() == tokenizer.encode_batch(texts)[0].tolist()
    assert Tokenizer.from_file(str(path)).get_vocab_size() == tokenizer.vocab_size  # standard file


def test_bad_json_and_bad_options_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="not a tokenizer JSON"):
        TextTokenizer.from_json("{")
    with pytest.raises(ValueError, match="unknown tokenizer kind 'sentencepiece'"):
        TextTokenizer.train(["a"], "sentencepiece", 100, 16)
    with pytest.raises(ValueError, match="vocab_size=5 leaves no room"):
        TextTokenizer.train(["a"], "word", 5, 16)
    with pytest.raises(ValueError, match="max_length=2"):
        TextTokenizer.train(["a"], "word", 100, 2)
    with pytest.raises(ValueError, match=r"vocab_size=6 leaves no room .* each character twice"):
        TextTokenizer.train(["a"], "wordpiece", 6, 16)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("vocab_size", [7, 8, 20])
def test_a_small_vocabulary_is_never_exceeded(kind: str, vocab_size: int) -> None:
    """The corpus holds more distinct characters than these vocabularies have room for."""
    tokenizer = TextTokenizer.train(corpus(), kind, vocab_size, 48)
    assert len(SPECIAL_TOKENS) < tokenizer.vocab_size <= vocab_size
    ids, _ = tokenizer.encode_batch(["a gripping film"])
    assert int(ids.max()) < tokenizer.vocab_size


@pytest.mark.parametrize("kind", KINDS)
def test_training_is_reproducible(kind: str) -> None:
    """Same text and options, same vocabulary (tokenizers' WordPieceTrainer alone fails this)."""
    runs = {TextTokenizer.train(corpus(), kind, VOCAB[kind], 48).to_json() for _ in range(3)}
    assert len(runs) == 1


def test_training_off_a_terminal_prints_nothing(capfd: pytest.CaptureFixture) -> None:
    """tokenizers' progress bars print blank lines into logs and pipes; they show on terminals only."""
    for kind in KINDS:
        TextTokenizer.train(corpus()[:200], kind, VOCAB[kind], 48)
    assert capfd.readouterr().out == ""
