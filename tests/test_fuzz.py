"""Random bytes into image decoding and random text and bytes into the tokenizers.

Every outcome must be a result or one of the project's clear errors (``ImageDecodeError``;
``ValueError``/``TypeError`` with a message from ``vit.tokenizer``), never another exception,
and never slow: hypothesis's deadline fails any example that takes longer than 5 s.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vit.data import ImageSource
from vit.imageio import ImageDecodeError, load_image
from vit.tokenizer import KINDS, TextTokenizer

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "cifar10-sample"
JPEG = (SAMPLE / "train" / "cat" / "0000.jpg").read_bytes()
# The first bytes of each format this project reads, so that random bytes reach each decoder.
MAGICS = [b"", b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*",
          b"RIFF\x00\x00\x00\x00WEBP", b"P6\n", b"P5\n32 32\n255\n"]
FUZZ = settings(max_examples=150, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture])


def decode(tmp_path: Path, data: bytes, name: str = "fuzz.png") -> None:
    path = tmp_path / name
    path.write_bytes(data)
    try:
        array = load_image(path, 16)
    except ImageDecodeError as err:
        assert str(path) in str(err)
        return
    assert array.shape == (16, 16, 3) and array.dtype == np.uint8


@FUZZ
@given(magic=st.sampled_from(MAGICS), tail=st.binary(max_size=2048))
def test_random_bytes_after_an_image_header(tmp_path: Path, magic: bytes, tail: bytes) -> None:
    decode(tmp_path, magic + tail)


@FUZZ
@given(cut=st.integers(0, len(JPEG)), flips=st.lists(st.tuples(st.integers(0, len(JPEG) - 1),
                                                              st.integers(1, 255)), max_size=8))
def test_a_real_jpeg_truncated_and_corrupted(tmp_path: Path, cut: int, flips: list[tuple[int, int]]) -> None:
    data = bytearray(JPEG)
    for position, mask in flips:
        data[position] ^= mask
    decode(tmp_path, bytes(data[:cut]), "fuzz.jpg")


@settings(max_examples=10, deadline=10_000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(garbage=st.lists(st.binary(max_size=512), min_size=1, max_size=4))
def test_unreadable_files_in_an_image_folder_are_skipped(tmp_path: Path, garbage: list[bytes]) -> None:
    root = tmp_path / "folder"
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            (root / split / name / "good.jpg").write_bytes(JPEG)
        for i, data in enumerate(garbage):
            (root / split / "cat" / f"bad{i}.jpg").write_bytes(data)
    images, labels = ImageSource(root).decode("train", 16)
    assert images.shape[1:] == (3, 16, 16) and 2 <= len(labels) <= 2 + len(garbage)


@functools.cache
def tokenizer(kind: str) -> TextTokenizer:
    texts = ["a gripping and moving film", "dull , slow and far too long", "great acting !",
             "the plot makes no sense", "warm , funny and clever", "i want my money back"] * 3
    return TextTokenizer.train(texts, kind, vocab_size=60, max_length=12)


def encode_or_refuse(kind: str, texts: list) -> None:
    try:
        ids, truncated = tokenizer(kind).encode_batch(texts)
    except (ValueError, TypeError) as err:
        assert "text " in str(err) or "encode_batch" in str(err), err
        return
    assert ids.shape[0] == len(texts) and ids.shape[1] <= 12 and 0 <= truncated <= len(texts)
    assert int(ids.max()) < tokenizer(kind).vocab_size


@pytest.mark.parametrize("kind", KINDS)
@FUZZ
@given(texts=st.lists(st.text(alphabet=st.characters() | st.characters(categories=["Cs"]), max_size=200),
                      min_size=1, max_size=4))
def test_random_unicode_is_encoded_or_refused_clearly(kind: str, texts: list[str]) -> None:
    encode_or_refuse(kind, texts)


@FUZZ
@given(kind=st.sampled_from(KINDS),
       texts=st.lists(st.one_of(st.binary(max_size=64), st.text(max_size=20), st.integers(), st.none()),
                      min_size=1, max_size=3))
def test_bytes_and_other_objects_are_refused_clearly(kind: str, texts: list) -> None:
    encode_or_refuse(kind, texts)


@FUZZ
@given(data=st.one_of(st.binary(max_size=256), st.text(max_size=256).map(str.encode)))
def test_random_tokenizer_files_are_refused_clearly(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_bytes(data)
    with pytest.raises(ValueError, match="tokenizer"):
        TextTokenizer.load(path)
