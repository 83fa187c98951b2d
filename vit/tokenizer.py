"""Text tokenizers: word, character, BPE and WordPiece, all through Hugging Face ``tokenizers``.

Every kind shares one normaliser (NFKC; format characters such as zero-width spaces removed;
runs of whitespace and control characters collapsed to one space; optional lowercasing) and
five special tokens with fixed ids: [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4 (reserved).
Each text is encoded as ``[CLS] tokens [SEP]``, truncated to ``max_length`` and padded with
[PAD] to the longest text of its batch. Text that merely looks like a special token (a user
typing "[CLS]") is encoded as ordinary text. The saved form is a standard ``tokenizer.json``
that ``tokenizers.Tokenizer.from_file`` also reads; that setting is not part of the file, so
a reader outside this project sets ``tokenizer.encode_special_tokens = True`` after loading
it to encode as this project does.

- word: Whitespace pre-tokenizer (runs of letters/digits, runs of punctuation), one id per
  word; out-of-vocabulary words become [UNK].
- char: one id per character, spaces shown as "▁"; rare characters become [UNK].
- bpe: byte-pair encoding of Sennrich et al. (2016) over SentencePiece-style "▁" words.
- wordpiece: the WordPiece of BERT (Devlin et al. 2019), continuation pieces marked "##".
"""

from __future__ import annotations

import sys
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from tokenizers import processors, trainers

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)  # a token's id is its index here
KINDS = ("word", "char", "bpe", "wordpiece")
MIN_LENGTH = 3  # [CLS], one token, [SEP]

_SPACE = "▁"


def is_blank(text: str) -> bool:
    """Whether ``text`` holds nothing but whitespace, control and format characters."""
    return all(ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf") for ch in text)


def _metaspace() -> pre_tokenizers.Metaspace:
    return pre_tokenizers.Metaspace(replacement=_SPACE, prepend_scheme="always", split=False)


def _metaspace_decoder() -> decoders.Metaspace:
    return decoders.Metaspace(replacement=_SPACE, prepend_scheme="always", split=False)


def _normalizer(lowercase: bool) -> normalizers.Normalizer:
    steps = [
        normalizers.NFKC(),
        normalizers.Replace(Regex(r"\p{Cf}"), ""),
        normalizers.Replace(Regex(r"[\s\p{Cc}]+"), " "),
        normalizers.Strip(),
    ]
    return normalizers.Sequence(steps + [normalizers.Lowercase()] if lowercase else steps)


def _progress_shown() -> bool:
    """The trainers' progress bars on a terminal only: elsewhere (a log, a pipe) they print
    blank lines."""
    return sys.stdout is not None and sys.stdout.isatty()


def _untrained(kind: str, vocab_size: int) -> tuple[Tokenizer, trainers.Trainer]:
    """An empty tokenizer of ``kind`` and the trainer that fills its vocabulary."""
    special = list(SPECIAL_TOKENS)
    if kind in ("word", "char"):
        tokenizer = Tokenizer(models.WordLevel(unk_token=UNK))
        trainer = trainers.WordLevelTrainer(
            vocab_size=vocab_size, special_tokens=special, show_progress=_progress_shown()
        )
        if kind == "word":
            tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
        else:
            tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
                [_metaspace(), pre_tokenizers.Split(Regex("."), behavior="isolated")]
            )
            tokenizer.decoder = _metaspace_decoder()
        return tokenizer, trainer
    if kind not in ("bpe", "wordpiece"):
        raise ValueError(f"unknown tokenizer kind {kind!r}: choose one of {', '.join(KINDS)}.")
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    # The trainer keeps every character it sees unless limited, however small vocab_size is.
    # WordPiece keeps each character twice, word-initial and as "##" continuation, and its
    # BPE also sees the word-start mark "▁", which does not enter the WordPiece vocabulary.
    room = vocab_size - len(special)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, min_frequency=2,
        show_progress=_progress_shown(),
        limit_alphabet=room // 2 + 1 if kind == "wordpiece" else room,
    )
    if kind == "bpe":
        # "▁word" pieces, each punctuation mark on its own, so "[CLS]" can never be one piece.
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            _metaspace(),
            pre_tokenizers.Split(Regex(rf"{_SPACE}?[^\p{{P}}{_SPACE}]+|{_SPACE}?\p{{P}}|{_SPACE}"),
                                 behavior="isolated"),
        ])
        tokenizer.decoder = _metaspace_decoder()
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.BertPreTokenizer(), _metaspace()]  # "▁" marks each word's start
        )
    return tokenizer, trainer


def _wordpiece_from_bpe(bpe: Tokenizer, vocab_size: int) -> Tokenizer:
    """The WordPiece tokenizer whose vocabulary is a BPE's learned on "▁"-marked BERT words.

    "▁piece" becomes the word-initial "piece" and an unmarked "piece" the continuation
    "##piece"; every character is kept in both forms, then pieces in merge order up to
    ``vocab_size``. This is what ``WordPieceTrainer`` (itself a BPE trainer) learns, made
    reproducible: that trainer numbers its "##" pieces in hash-map order, so two runs on the
    same text give different vocabularies (huggingface/tokenizers#1794).
    """
    pieces = [t for t, _ in sorted(bpe.get_vocab().items(), key=lambda item: item[1])]
    alphabet = [t for t in pieces if len(t) == 1 and t != _SPACE]
    vocab = dict.fromkeys(list(SPECIAL_TOKENS) + alphabet + [f"##{c}" for c in alphabet])
    for piece in pieces[len(SPECIAL_TOKENS):]:
        if len(vocab) >= vocab_size:
            break
        if piece != _SPACE:
            vocab.setdefault(piece[1:] if piece.startswith(_SPACE) else f"##{piece}")
    tokenizer = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token=UNK))
    tokenizer.normalizer = bpe.normalizer
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(cleanup=False)
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


def _kind_of(tokenizer: Tokenizer) -> str:
    if isinstance(tokenizer.model, models.BPE):
        return "bpe"
    if isinstance(tokenizer.model, models.WordPiece):
        return "wordpiece"
    if isinstance(tokenizer.model, models.WordLevel):
        return "word" if isinstance(tokenizer.pre_tokenizer, pre_tokenizers.Whitespace) else "char"
    raise ValueError(
        f"not a tokenizer of this project: its model is {type(tokenizer.model).__name__}; "
        f"train one with TextTokenizer.train (kinds: {', '.join(KINDS)})."
    )


def smallest_vocab_size(kind: str) -> int:
    """The least ``vocab_size`` a tokenizer of ``kind`` can fill: the special tokens and one
    character, twice for WordPiece (word-initial and ``##`` continuation)."""
    return len(SPECIAL_TOKENS) + (2 if kind == "wordpiece" else 1)


def too_small_vocabulary(kind: str) -> str:
    """What to say of a ``vocab_size`` below :func:`smallest_vocab_size`."""
    twice = ", each character twice (word-initial and ##)" if kind == "wordpiece" else ""
    return (
        f"leaves no room beside the {len(SPECIAL_TOKENS)} special tokens{twice}: choose a larger "
        f"vocabulary (a few hundred for char, thousands otherwise)."
    )


class TextTokenizer:
    """A trained ``tokenizers.Tokenizer`` with this project's special tokens, truncation and padding.

    Build one with ``TextTokenizer.train``, ``from_json`` or ``load``.

    Args:
        tokenizer: A tokenizer whose vocabulary holds the special tokens at their fixed ids
            and which truncates to its ``max_length``.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        wrong = {t: tokenizer.token_to_id(t) for i, t in enumerate(SPECIAL_TOKENS)
                 if tokenizer.token_to_id(t) != i}
        if wrong:
            raise ValueError(
                f"not a tokenizer of this project: special tokens at the wrong ids {wrong}, "
                f"expected {dict(zip(SPECIAL_TOKENS, range(len(SPECIAL_TOKENS))))}; "
                f"train one with TextTokenizer.train."
            )
        if tokenizer.truncation is None:
            raise ValueError("not a tokenizer of this project: it sets no truncation length.")
        self.kind = _kind_of(tokenizer)
        tokenizer.encode_special_tokens = True  # "[CLS]" typed by a user is text, not a token
        self._tokenizer = tokenizer

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        kind: str,
        vocab_size: int,
        max_length: int,
        *,
        lowercase: bool = True,
    ) -> TextTokenizer:
        """Learn a vocabulary of at most ``vocab_size`` ids (special tokens included) from ``texts``.

        Args:
            texts: The training texts.
            kind: "word", "char", "bpe" or "wordpiece".
            vocab_size: Largest vocabulary, the five special tokens included.
            max_length: Longest encoding, [CLS] and [SEP] included; longer texts are cut.
            lowercase: Lowercase every text before tokenizing.
        """
        if vocab_size < smallest_vocab_size(kind):
            raise ValueError(f"vocab_size={vocab_size} {too_small_vocabulary(kind)}")
        if max_length < MIN_LENGTH:
            raise ValueError(f"max_length={max_length} is below {MIN_LENGTH} ([CLS], one token, [SEP]).")
        tokenizer, trainer = _untrained(kind, vocab_size)
        tokenizer.normalizer = _normalizer(lowercase)
        tokenizer.train_from_iterator(texts, trainer)
        if kind == "wordpiece":
            tokenizer = _wordpiece_from_bpe(tokenizer, vocab_size)
        if tokenizer.get_vocab_size() <= len(SPECIAL_TOKENS):
            raise ValueError("the training texts hold no tokens: give the tokenizer some text to learn from.")
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{CLS} $A {SEP}",
            special_tokens=[(CLS, SPECIAL_TOKENS.index(CLS)), (SEP, SPECIAL_TOKENS.index(SEP))],
        )
        tokenizer.enable_truncation(max_length)
        tokenizer.enable_padding(pad_id=SPECIAL_TOKENS.index(PAD), pad_token=PAD)  # to the batch's longest
        return cls(tokenizer)

    @classmethod
    def from_json(cls, s: str) -> TextTokenizer:
        """The tokenizer that ``to_json`` wrote."""
        try:
            tokenizer = Tokenizer.from_str(s)
        except Exception as err:  # tokenizers raises a bare Exception on malformed JSON
            raise ValueError(f"not a tokenizer JSON ({err}).") from None
        return cls(tokenizer)

    def to_json(self) -> str:
        return self._tokenizer.to_str()

    def save(self, path: str | Path) -> None:
        """Write ``tokenizer.json`` (a standard ``tokenizers`` file) to ``path``."""
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> TextTokenizer:
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: no tokenizer file; training writes tokenizer.json into the run's folder."
            )
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: not a tokenizer JSON file (not UTF-8 at byte {err.start}).") from None
        try:
            return cls.from_json(text)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None

    @property
    def pad_id(self) -> int:
        return SPECIAL_TOKENS.index(PAD)

    @property
    def unk_id(self) -> int:
        return SPECIAL_TOKENS.index(UNK)

    @property
    def cls_id(self) -> int:
        return SPECIAL_TOKENS.index(CLS)

    @property
    def sep_id(self) -> int:
        return SPECIAL_TOKENS.index(SEP)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    @property
    def max_length(self) -> int:
        return self._tokenizer.truncation["max_length"]

    def vocabulary(self) -> dict[str, int]:
        """Each token of the vocabulary and its id, the special tokens included."""
        return self._tokenizer.get_vocab(with_added_tokens=True)

    def encode_batch(self, texts: Sequence[str]) -> tuple[torch.Tensor, int]:
        """Encode ``texts`` as ``[CLS] ... [SEP]``, padded with [PAD] to the longest of them.

        Returns:
            The (B, T) int64 ids with T <= ``max_length``, and how many texts were truncated.

        Raises:
            ValueError: A text is empty once whitespace and control characters are removed,
                or is not valid Unicode.
        """
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a list of texts, got one string: wrap it in a list.")
        if not texts:
            raise ValueError("encode_batch got no texts.")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"text {i} is a {type(text).__name__}, not a string: {text!r:.60}.")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as err:
                raise ValueError(
                    f"text {i} is not valid Unicode (a lone surrogate at position {err.start}): "
                    f"decode the input with errors='replace'."
                ) from None
            if is_blank(text):
                raise ValueError(
                    f"text {i} ({text!r:.60}) is empty once whitespace and control characters "
                    f"are removed: give it at least one visible character."
                )
        encodings = self._tokenizer.encode_batch(list(texts))
        truncated = sum(1 for encoding in encodings if encoding.overflowing)
        return torch.tensor([encoding.ids for encoding in encodings], dtype=torch.int64), truncated

    def tokens(self, text: str) -> list[str]:
        """The tokens of ``text`` as the model sees them, [CLS] first and [SEP] last."""
        ids, _ = self.encode_batch([text])
        return self.id_tokens(ids[0].tolist())

    def id_tokens(self, ids: Sequence[int]) -> list[str]:
        """The token string of each id, special tokens included."""
        return [self._tokenizer.id_to_token(i) for i in ids]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, special tokens ([UNK] among them) left out."""
        return self._tokenizer.decode(list(ids), skip_special_tokens=True)
