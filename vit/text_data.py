"""Text classification data: labelled sentences in TSV or CSV files, tokenized once per split.

A data folder holds ``train.tsv`` and ``test.tsv`` (or ``.csv``) and optionally ``dev.tsv``,
each with a header row naming a text column and a label column (SST-2's is
``label<TAB>sentence``). Labels may be integers or strings; they are mapped to class indices
in sorted order, and the class names travel with the model. The tokenizer is trained on the
training rows (never on validation or test rows) when the data module is built, so that its
vocabulary size is known before the model is.
"""

from __future__ import annotations

import csv
import functools
import io
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

from vit.data import BatchTensorDataset, DataNotFoundError, feeds_cuda, held_out_count
from vit.errors import ConfigError
from vit.tokenizer import (
    KINDS, MIN_LENGTH, TextTokenizer, is_blank, smallest_vocab_size, too_small_vocabulary,
)

SUFFIXES = (".tsv", ".csv")


class TextTable:
    """The (text, label) rows of one TSV/CSV file, with the rows it had to skip counted.

    Args:
        path: A ``.tsv`` (tab-separated, no quoting) or ``.csv`` (comma-separated, standard
            quoting) file with a header row.
        text_column: Header name of the text column.
        label_column: Header name of the label column.
        column_options: The options that name the two columns, for the message when one is
            missing; ``None`` where they cannot be chosen (the message asks to rename them).
    """

    def __init__(
        self,
        path: Path,
        text_column: str,
        label_column: str,
        column_options: tuple[str, str] | None = ("--data.text_column", "--data.label_column"),
    ) -> None:
        self.path = path
        if not path.is_file():
            raise DataNotFoundError(f"{path}: no such file.")
        raw = path.read_bytes()
        try:
            content = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            bad = [n for n, line in enumerate(raw.split(b"\n"), 1) if not _is_utf8(line)]
            content = raw.decode("utf-8-sig", errors="replace")
            print(
                f"warning: {path}: {len(bad)} line(s) hold bytes that are not UTF-8 (first on line "
                f"{bad[0]}); they were read as U+FFFD and become [UNK]. Re-encode the file as "
                f"UTF-8 (e.g. iconv -f latin1 -t utf-8) to keep those characters."
            )
        physical = content.split("\n")  # the file's lines, as the csv module counts them
        if path.suffix == ".tsv":
            rows = csv.reader(io.StringIO(content), delimiter="\t", quoting=csv.QUOTE_NONE)
        else:
            rows = csv.reader(io.StringIO(content))
        header = next(rows, None)
        if not header:
            raise ConfigError(f"{path} is empty: it needs a header row and one row per text.")
        missing = [c for c in (text_column, label_column) if c not in header]
        if missing:
            remedy = (
                f"Name the columns with {column_options[0]} and {column_options[1]}."
                if column_options else
                f"Name its text column {text_column!r} and its label column {label_column!r}."
            )
            raise ConfigError(
                f"{path} has no column {' or '.join(map(repr, missing))}; its header is {header}. "
                f"{remedy}"
            )
        text_at, label_at = header.index(text_column), header.index(label_column)
        self.texts: list[str] = []
        self.labels: list[str] = []
        skipped: dict[str, list[int]] = {"wrong number of fields": [], "empty text": [],
                                         "empty label": []}
        start = end = header_end = rows.line_num
        try:
            for row in rows:
                start, end = end + 1, rows.line_num  # a quoted field may span lines
                if not row:
                    continue
                if len(row) != len(header):
                    skipped["wrong number of fields"].append(end)
                elif is_blank(row[text_at]):
                    skipped["empty text"].append(end)
                elif not row[label_at].strip():
                    skipped["empty label"].append(end)
                else:
                    self.texts.append(row[text_at])
                    self.labels.append(row[label_at].strip())
        except csv.Error as err:  # e.g. a field over csv's size limit: an unclosed quote
            raise ConfigError(
                f"{path}, line {rows.line_num}: {err}. Look for an unclosed quote or a runaway "
                f"field there."
            ) from None
        # The csv module reads a quote never closed on to the end of the file: the last row.
        if path.suffix != ".tsv" and end > header_end and unclosed_quote(physical[start - 1:end]):
            raise ConfigError(
                f"{path}, line {start}: a quote opened there is never closed; it takes every line "
                f"to the end, line {end}, into one text. Close the quote, or double it (\"\") "
                f"inside a quoted field."
            )
        for reason, lines in skipped.items():
            if lines:
                print(f"warning: {path}: skipped {len(lines)} row(s) with {reason} "
                      f"(lines {', '.join(map(str, lines[:5]))}{', ...' if len(lines) > 5 else ''}).")
        if not self.texts:
            raise ConfigError(f"{path} holds no usable (text, label) rows.")


def unclosed_quote(lines: list[str]) -> bool:
    """Whether the CSV row made of ``lines`` opens a quoted field that it never closes: the
    csv module, not strict, reads such a field on to the end of the file, where a strict
    reader of the same lines stops with "unexpected end of data"."""
    if not any('"' in line for line in lines):
        return False
    try:
        list(csv.reader(io.StringIO("\n".join(lines)), strict=True))
    except csv.Error as err:
        return "unexpected end of data" in str(err)
    return False


def _is_utf8(line: bytes) -> bool:
    try:
        line.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


class LengthGroupedSampler(Sampler[int]):
    """A random order for each epoch in which neighbouring texts have similar lengths.

    The shuffled indices are cut into megabatches of ``group * batch_size``, each sorted by
    length and cut into batches, and the batches are shuffled (Hugging Face's
    ``LengthGroupedSampler``): batches stay random but carry little padding. The order follows
    from the seed and the epoch (``set_epoch``, which Lightning calls before each epoch), as
    torch's ``DistributedSampler`` does, so a run resumed at an epoch's start draws the batches
    an uninterrupted run would.

    Args:
        lengths: Token count of every text.
        batch_size: Texts per batch.
        group: Batches per megabatch.
        seed: Seed of the order.
    """

    def __init__(self, lengths: torch.Tensor, batch_size: int, *, group: int = 50, seed: int = 0) -> None:
        self.lengths = lengths
        self.batch_size = batch_size
        self.group = group
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw the order of ``epoch`` from now on."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator)
        batches = [
            batch
            for mega in order.split(self.group * self.batch_size)
            for batch in mega[self.lengths[mega].argsort(descending=True, stable=True)].split(self.batch_size)
        ]
        # The one short batch goes last, so that every batch the loader cuts is a whole one.
        shuffled = sorted(torch.randperm(len(batches), generator=generator).tolist(),
                          key=lambda i: len(batches[i]) < self.batch_size)
        return iter(torch.cat([batches[i] for i in shuffled]).tolist())


def is_integer_label(label: str) -> bool:
    """Whether ``label`` is written as an integer ("3", "-1", "02")."""
    return re.fullmatch(r"[+-]?[0-9]+", label) is not None


def label_key(label: str) -> str:
    """The label as the class maps know it: integers in their plain form ("02" -> "2")."""
    return str(int(label)) if is_integer_label(label) else label


def label_classes(labels: list[str], names: list[str] | None = None) -> tuple[list[str], dict[str, int]]:
    """Class names and the label -> class index map, from the training labels.

    Without ``names``, the distinct labels in sorted order (numeric order when all are
    integers) are the classes. With ``names``, integer labels index into it and string
    labels must be among it.
    """
    integers = all(is_integer_label(label) for label in labels)
    if names is not None:
        if len(names) < 2:
            raise ConfigError(f"--data.class_names {names} names fewer than two classes.")
        keys = [str(i) for i in range(len(names))] if integers else list(names)
        return list(names), {key: i for i, key in enumerate(keys)}
    classes = sorted({label_key(label) for label in labels}, key=int if integers else None)
    if len(classes) < 2:
        raise ConfigError(
            f"every training label is {classes[0]!r}: a classifier needs at least two classes."
        )
    return classes, {name: i for i, name in enumerate(classes)}


def trim_padding(
    batch: tuple[torch.Tensor, torch.Tensor], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut the padding columns beyond the longest text of the batch."""
    ids, labels = batch
    length = int((ids != pad_id).sum(dim=1).max())
    return ids[:, :length], labels


class TextDataModule(L.LightningDataModule):
    """Labelled texts from TSV/CSV files, tokenized by a tokenizer trained on the training rows.

    Batches are ``(ids, labels)``: (B, T) int64 token ids, ``[CLS]`` first, padded with
    ``[PAD]`` to the longest text of the batch, and (B,) int64 class indices.

    Args:
        root: Folder holding ``train``, ``test`` and optionally ``dev`` as ``.tsv`` or ``.csv``.
        train_file: A training file elsewhere (in place of ``root``'s); ``root`` is then not
            searched for the dev and test files either.
        dev_file: A validation file elsewhere (overrides ``root``'s).
        test_file: A test file elsewhere (overrides ``root``'s).
        text_column: Header name of the text column.
        label_column: Header name of the label column.
        class_names: Class names in index order. With integer labels 0..K-1 they name the
            indices; with string labels they fix the order. Default: the sorted labels.
        tokenizer_kind: "word", "char", "bpe" or "wordpiece".
        vocab_size: Largest vocabulary, the five special tokens included.
        max_length: Longest token sequence, [CLS] and [SEP] included; longer texts are cut
            (and counted).
        lowercase: Lowercase texts before tokenizing.
        tokenizer_file: A saved ``tokenizer.json`` to use instead of training one; it brings its
            own kind, vocabulary, ``max_length`` and casing.
        batch_size: Texts per batch (per device under DDP).
        val_fraction: Share of the training rows held out for validation when there is no
            dev file (seeded).
        num_workers: DataLoader worker processes (0 is fastest for in-memory tensors).
        seed: Seed of the train/validation split and of the shuffling.
    """

    def __init__(
        self,
        root: str = "data/sst2",
        *,
        train_file: str | None = None,
        dev_file: str | None = None,
        test_file: str | None = None,
        text_column: str = "sentence",
        label_column: str = "label",
        class_names: list[str] | None = None,
        tokenizer_kind: str = "wordpiece",
        vocab_size: int = 8000,
        max_length: int = 64,
        lowercase: bool = True,
        tokenizer_file: str | None = None,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if tokenizer_kind not in KINDS:
            raise ConfigError(
                f"--data.tokenizer_kind {tokenizer_kind!r} is unknown: choose one of {', '.join(KINDS)}."
            )
        if not 0 <= val_fraction < 1:
            raise ConfigError(f"--data.val_fraction must be in [0, 1), got {val_fraction}.")
        if batch_size < 1:
            raise ConfigError(f"--data.batch_size must be at least 1, got {batch_size}.")
        if not tokenizer_file and vocab_size < smallest_vocab_size(tokenizer_kind):
            raise ConfigError(
                f"--data.vocab_size {vocab_size} {too_small_vocabulary(tokenizer_kind)}"
            )
        if not tokenizer_file and max_length < MIN_LENGTH:
            raise ConfigError(f"--data.max_length {max_length} is below {MIN_LENGTH} ([CLS], one "
                              f"token, [SEP]).")
        self.root = Path(root).expanduser()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        # a training file named by itself is not paired with --data.root's dev and test files
        # (the config's SST-2 ones): those come only from their own options then
        self._root_searched = not train_file
        self.files = {
            "train": self._find("train", train_file, required=True),
            "val": self._find("dev", dev_file, required=False, in_root=self._root_searched),
            "test": self._find("test", test_file, required=False, in_root=self._root_searched),
        }
        train = TextTable(self.files["train"], text_column, label_column)
        self.class_names, self._label_index = label_classes(train.labels, class_names)
        self._classes_named = class_names is not None
        self.tables = {"train": (train.texts, self._indices(train.labels, self.files["train"]))}
        for split in ("val", "test"):
            if self.files[split] is not None:
                table = TextTable(self.files[split], text_column, label_column)
                self.tables[split] = (table.texts, self._indices(table.labels, self.files[split]))
        if self.files["val"] is None and val_fraction > 0:
            self._hold_out(val_fraction)
        if tokenizer_file:
            try:
                self.tokenizer = TextTokenizer.load(tokenizer_file)
            except (OSError, ValueError) as err:
                raise ConfigError(f"--data.tokenizer_file: {err}") from None
            overridden = [
                f"--data.{option} {given}"
                for option, given, own in (("tokenizer_kind", tokenizer_kind, self.tokenizer.kind),
                                           ("max_length", max_length, self.tokenizer.max_length))
                if given != own
            ]
            if overridden:
                print(f"note: --data.tokenizer_file {tokenizer_file} brings its own tokenizer "
                      f"({self.tokenizer.kind}, max_length {self.tokenizer.max_length}); "
                      f"{' and '.join(overridden)} {'does' if len(overridden) == 1 else 'do'} "
                      f"not apply.")
        else:
            self.tokenizer = TextTokenizer.train(
                self.tables["train"][0], tokenizer_kind, vocab_size, max_length, lowercase=lowercase
            )
        self.splits: dict[str, BatchTensorDataset] = {}
        self.lengths: dict[str, torch.Tensor] = {}

    def _find(
        self, name: str, override: str | None, *, required: bool, in_root: bool = True
    ) -> Path | None:
        if override:
            path = Path(override).expanduser()
            if not path.is_file():
                raise DataNotFoundError(f"--data.{name}_file {path}: no such file.")
            if path.suffix not in SUFFIXES:
                raise ConfigError(f"{path}: name a .tsv or .csv file.")
            return path
        if not in_root:
            return None
        found = [self.root / f"{name}{suffix}" for suffix in SUFFIXES if (self.root / f"{name}{suffix}").is_file()]
        if len(found) > 1:
            raise ConfigError(f"both {found[0]} and {found[1]} exist: keep one, or name it with --data.{name}_file.")
        if not found and required:
            raise DataNotFoundError(
                f"no {name}.tsv or {name}.csv in --data.root {self.root}: point --data.root at a folder "
                f"holding train.tsv and test.tsv (optionally dev.tsv), each with a header row, "
                f"or name the files with --data.train_file / --data.test_file."
            )
        return found[0] if found else None

    def _indices(self, labels: list[str], path: Path) -> torch.Tensor:
        keys = [label_key(label) for label in labels]
        unknown = sorted(set(keys) - set(self._label_index))
        if unknown and self._classes_named:
            indexed = list(self._label_index) == [str(i) for i in range(len(self.class_names))]
            from_training = ", or pass --data.class_names null to take the classes from the " \
                            "training labels" if path == self.files["train"] else ""
            raise ConfigError(
                f"{path} has labels {unknown[:10]} that --data.class_names "
                f"{self.class_names[:20]} does not name"
                f"{' (integer labels index it)' if indexed else ''}: name them there"
                f"{from_training}."
            )
        if unknown:
            raise ConfigError(
                f"{path} has labels {unknown[:10]} that are not among the classes "
                f"{list(self._label_index)[:20]}: every label must occur in the training file "
                f"(or be named by --data.class_names)."
            )
        return torch.tensor([self._label_index[k] for k in keys], dtype=torch.int64)

    def _hold_out(self, fraction: float) -> None:
        texts, labels = self.tables["train"]
        order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(self.seed))
        num_val = held_out_count(len(texts), fraction, "texts")
        val, train = order[:num_val], order[num_val:]
        self.tables["val"] = ([texts[i] for i in val.tolist()], labels[val])
        self.tables["train"] = ([texts[i] for i in train.tolist()], labels[train])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def spec(self) -> dict[str, Any]:
        """What a model needs to know of this data, saved with every checkpoint."""
        return {
            "modality": "text",
            "class_names": self.class_names,
            "vocab_size": self.tokenizer.vocab_size,
            "max_length": self.tokenizer.max_length,
            "pad_id": self.tokenizer.pad_id,
            "tokenizer": self.tokenizer.to_json(),
            "tokenizer_kind": self.tokenizer.kind,
            # integer labels: their own class names (--data.class_names null) or indices into
            # the names given; vit.compare reads test files the same way
            "classes_from_labels": not self._classes_named,
        }

    def _use_model_tokenizer(self) -> None:
        """Encode with the tokenizer a restored checkpoint carries when it differs from ours."""
        model = self.trainer.lightning_module if self.trainer is not None else None
        stored = getattr(model, "tokenizer_json", None)
        if stored is None:
            return
        tokenizer = TextTokenizer.from_json(stored)
        if tokenizer.to_json() != self.tokenizer.to_json():
            print("note: encoding the texts with the tokenizer stored in the checkpoint.")
            self.tokenizer = tokenizer
            self.splits.clear()

    def _dataset(self, split: str) -> BatchTensorDataset:
        if split not in self.splits:
            if split not in self.tables:
                searched = self._root_searched  # else naming a file in root would not help
                add_dev = "add dev.tsv beside train.tsv, " if searched else ""
                add_test = f"add test.tsv (or .csv) to {self.root}, " if searched else ""
                raise DataNotFoundError(
                    f"no validation texts: {add_dev}pass --data.dev_file, raise "
                    f"--data.val_fraction above 0, or pass --trainer.limit_val_batches 0 to "
                    f"train without validation." if split == "val" else
                    f"no test texts: {add_test}pass --data.test_file, or pass "
                    f"--test_after_fit false."
                )
            texts, labels = self.tables[split]
            ids, truncated = self.tokenizer.encode_batch(texts)
            if truncated:
                print(f"note: {truncated} of {len(texts)} {split} texts are longer than "
                      f"max_length={self.tokenizer.max_length} tokens and were cut; raise "
                      f"--data.max_length to keep more of them.")
            self.splits[split] = BatchTensorDataset(ids, labels)
            self.lengths[split] = (ids != self.tokenizer.pad_id).sum(dim=1)
        return self.splits[split]

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        self._use_model_tokenizer()
        dataset = self._dataset(split)
        sampler = LengthGroupedSampler(self.lengths[split], self.batch_size, seed=self.seed) \
            if shuffle else None
        return DataLoader(
            dataset, batch_size=self.batch_size, sampler=sampler,
            # a function of the pad id alone: spawned workers pickle it, not this module
            collate_fn=functools.partial(trim_padding, pad_id=self.tokenizer.pad_id),
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
            pin_memory=feeds_cuda(self.trainer),
        )

    def has_split(self, split: str) -> bool:
        """Whether the data holds any texts of ``split`` ("train", "val" or "test")."""
        return split in self.tables and len(self.tables[split][0]) > 0

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_item_names(self) -> list[str] | None:
        """The texts the predict loader serves, in the split's order."""
        return list(self.tables["test"][0]) if "test" in self.tables else None
