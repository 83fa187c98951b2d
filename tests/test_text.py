"""Text mode: the shared encoder, padding invariance, the TSV/CSV data module, a short SST-2 fit."""

from __future__ import annotations

import csv
import pickle
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from vit.attention import Attention
from vit.checkpoint import CheckpointError
from vit.cli import main
from vit.data import DataNotFoundError
from vit.encoder import Block, Encoder
from vit.errors import ConfigError
from vit.lit import Classifier
from vit.model import ImageClassifier, TextClassifier, TokenClassifier, encoder_config
from vit.text_data import LengthGroupedSampler, TextDataModule, label_classes
from vit.tokenizer import TextTokenizer

REPO = Path(__file__).resolve().parents[1]
SST2 = REPO / "data" / "sst2"
VOCAB, MAX_LENGTH, PAD, CLS, SEP = 40, 16, 0, 2, 3


def text_model() -> TextClassifier:
    torch.manual_seed(0)
    return TextClassifier(vocab_size=VOCAB, max_length=MAX_LENGTH, pad_id=PAD, num_classes=3,
                          encoder=encoder_config("nano")).eval()


MODEL = text_model()


def test_image_and_text_models_run_the_same_encoder_code() -> None:
    image = ImageClassifier(image_size=16, patch_size=8, num_classes=3, encoder=encoder_config("nano"))
    text = text_model()
    assert type(image.blocks) is type(text.blocks) is Encoder
    assert {type(block) for block in [*image.blocks, *text.blocks]} == {Block}
    assert type(image).forward_features is type(text).forward_features is TokenClassifier.forward_features
    seen: list[tuple[Attention, bool]] = []
    original = Attention.forward

    def spy(
        self: Attention, x: torch.Tensor, padding_mask: torch.Tensor | None = None, **kwargs: bool
    ) -> torch.Tensor:
        seen.append((self, padding_mask is not None))
        return original(self, x, padding_mask, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Attention, "forward", spy)
        image(torch.randn(2, 3, 16, 16))
        text(torch.tensor([[CLS, 7, 8, SEP, PAD]]))
    image_calls = [masked for module, masked in seen if any(module is b.attn for b in image.blocks)]
    text_calls = [masked for module, masked in seen if any(module is b.attn for b in text.blocks)]
    assert image_calls == [False, False] and text_calls == [True, True]  # 2 blocks each


@st.composite
def padded_batches(draw: st.DrawFn) -> torch.Tensor:
    """(B, T) ids: [CLS] tokens [SEP], padded with [PAD] to the longest row."""
    rows = draw(st.lists(st.lists(st.integers(5, VOCAB - 1), min_size=1, max_size=10),
                         min_size=1, max_size=4))
    longest = max(len(row) for row in rows) + 2
    return torch.tensor([[CLS, *row, SEP] + [PAD] * (longest - len(row) - 2) for row in rows])


@settings(max_examples=30, deadline=None, derandomize=True)
@given(ids=padded_batches(), extra=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_padding_changes_no_logit(ids: torch.Tensor, extra: int, seed: int) -> None:
    with torch.no_grad():
        logits = MODEL(ids)
        more_padding = MODEL(F.pad(ids, (0, extra), value=PAD))
        padding = ids == PAD
        noise = torch.randint(5, VOCAB, ids.shape, generator=torch.Generator().manual_seed(seed))
        other_ids_under_padding = MODEL(torch.where(padding, noise, ids), padding)
        every_token_encoded = MODEL.forward_head(MODEL.forward_features(ids))
    torch.testing.assert_close(every_token_encoded, logits)  # the CLS-only last block is exact
    torch.testing.assert_close(more_padding, logits)
    torch.testing.assert_close(other_ids_under_padding, logits)


def write(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def sst2_slice(root: Path, train: int = 300, dev: int = 60, test: int = 60) -> Path:
    """The first rows of each bundled SST-2 split, header included."""
    for name, rows in (("train", train), ("dev", dev), ("test", test)):
        lines = (SST2 / f"{name}.tsv").read_text(encoding="utf-8").splitlines()
        write(root / f"{name}.tsv", lines[: rows + 1])
    return root


def test_sst2_slice_gives_spec_and_batches_padded_to_their_longest(tmp_path: Path) -> None:
    root = sst2_slice(tmp_path / "sst2")
    data = TextDataModule(str(root), class_names=["negative", "positive"], tokenizer_kind="word",
                          vocab_size=500, max_length=32, batch_size=16)
    spec = data.spec
    assert spec["modality"] == "text" and spec["class_names"] == ["negative", "positive"]
    assert (spec["pad_id"], spec["max_length"], spec["tokenizer_kind"]) == (0, 32, "word")
    assert TextTokenizer.from_json(spec["tokenizer"]).vocab_size == spec["vocab_size"] <= 500
    assert [len(data.tables[s][0]) for s in ("train", "val", "test")] == [300, 60, 60]
    lengths = set()
    for ids, labels in data.train_dataloader():
        assert ids.dtype == labels.dtype == torch.int64 and set(labels.tolist()) <= {0, 1}
        assert (ids[:, 0] == data.tokenizer.cls_id).all()
        assert (ids[:, -1] != PAD).any()  # no column of padding only
        lengths.add(ids.shape[1])
    assert len(lengths) > 1
    # loader workers started by spawn (macOS, Windows) pickle the collate function: it must
    # not carry the data module, whose trainer holds the model and its local functions
    assert len(pickle.dumps(data.train_dataloader().collate_fn)) < 1_000


def test_the_length_grouped_order_follows_the_seed_and_the_epoch() -> None:
    lengths = torch.randint(1, 50, (103,), generator=torch.Generator().manual_seed(0))
    sampler, resumed = (LengthGroupedSampler(lengths, 8, group=3, seed=5) for _ in range(2))
    first = list(sampler)
    assert sorted(first) == list(range(103)) and list(sampler) == first
    sampler.set_epoch(1)
    resumed.set_epoch(1)  # a run resumed at epoch 1's start
    second = list(resumed)
    assert list(sampler) == second != first
    batches = [lengths[second[i:i + 8]] for i in range(0, 96, 8)]
    spread = sum(int(b.max() - b.min()) for b in batches) / len(batches)
    shuffled = lengths[torch.randperm(103, generator=torch.Generator().manual_seed(1))[:96]]
    random_spread = sum(int(b.max() - b.min()) for b in shuffled.split(8)) / 12
    assert spread < random_spread / 2  # neighbours in a batch have similar lengths


def test_string_labels_csv_quoting_and_held_out_validation(tmp_path: Path) -> None:
    questions = [("what is a virus ?", "DESC"), ("who wrote hamlet ?", "HUM"),
                 ("how many moons does mars have ?", "NUM"), ('what does "ok" mean, exactly ?', "DESC"),
                 ("where is the eiffel tower ?", "LOC"), ("what is the fastest animal ?", "ENTY")] * 5
    write(tmp_path / "q" / "train.csv", ["question,coarse"] + [f'"{q.replace(chr(34), 2 * chr(34))}",{c}'
                                                                for q, c in questions])
    write(tmp_path / "q" / "test.csv", ["coarse,question", "HUM,who painted the mona lisa ?",
                                        "NUM,how old is the universe ?"])
    data = TextDataModule(str(tmp_path / "q"), text_column="question", label_column="coarse",
                          tokenizer_kind="bpe", vocab_size=200, val_fraction=0.2)
    assert data.class_names == ["DESC", "ENTY", "HUM", "LOC", "NUM"]
    assert 'what does "ok" mean, exactly ?' in data.tables["train"][0] + data.tables["val"][0]
    assert (len(data.tables["train"][0]), len(data.tables["val"][0])) == (24, 6)
    assert data.tables["test"][1].tolist() == [2, 4]
    assert data.has_split("val") and data.has_split("test")
    ids, labels = next(iter(data.test_dataloader()))
    assert ids.shape[0] == 2 and labels.tolist() == [2, 4]


def test_a_named_training_file_takes_no_dev_or_test_file_from_the_root(tmp_path: Path) -> None:
    root = sst2_slice(tmp_path / "sst2")  # has train, dev and test files
    own = write(tmp_path / "own" / "reviews.tsv",
                ["label\tsentence", *(f"{i % 2}\treview {i}" for i in range(20))])
    data = TextDataModule(str(root), train_file=str(own), val_fraction=0.2)
    assert data.files == {"train": own, "val": None, "test": None}
    assert [len(data.tables[s][0]) for s in ("train", "val")] == [16, 4] and not data.has_split("test")
    with pytest.raises(DataNotFoundError, match=r"^no test texts: pass --data.test_file, or pass"):
        data._dataset("test")  # not "add test.tsv to" a root that is not read
    named = TextDataModule(str(root), train_file=str(own), test_file=str(root / "test.tsv"))
    assert named.files["test"] == root / "test.tsv" and named.files["val"] is None


def test_integer_labels_keep_their_numeric_order(tmp_path: Path) -> None:
    rows = [f"{star}\tfilm number {i}" for i, star in enumerate([1, 2, 3, 4, 5, 10] * 3)]
    write(tmp_path / "stars" / "train.tsv", ["label\tsentence"] + rows)
    write(tmp_path / "stars" / "test.tsv", ["label\tsentence", "10\tgreat", "02\tpoor"])
    data = TextDataModule(str(tmp_path / "stars"), tokenizer_kind="char", vocab_size=60)
    assert data.class_names == ["1", "2", "3", "4", "5", "10"]
    assert data.tables["test"][1].tolist() == [5, 1]
    names, _ = label_classes(["+-5", "\u00b2", "3"])  # not integers: kept as strings, sorted
    assert names == ["+-5", "3", "\u00b2"]


def test_odd_rows_are_skipped_or_kept_with_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "odd"
    lines = ["label\tsentence", "1\ta fine film", "0\t   ", "1\ttoo\tmany", "\tno label",
             "0\ta dull film", "1\t[CLS] a bold film [PAD]"]
    (root).mkdir()
    (root / "train.tsv").write_bytes(("\n".join(lines) + "\n").encode() + b"0\tna\xefve but bad\n")
    write(root / "test.tsv", ["label\tsentence", "1\tfine"])
    data = TextDataModule(str(root), tokenizer_kind="word", vocab_size=100, val_fraction=0)
    out = capsys.readouterr().out
    assert "1 line(s) hold bytes that are not UTF-8 (first on line 8)" in out
    for reason in ("empty text (lines 3)", "wrong number of fields (lines 4)", "empty label (lines 5)"):
        assert reason in out
    texts = data.tables["train"][0]
    assert texts == ["a fine film", "a dull film", "[CLS] a bold film [PAD]", "na\ufffdve but bad"]
    ids, _ = data.tokenizer.encode_batch(texts[2:3])
    assert ids[0].tolist().count(data.tokenizer.cls_id) == 1 and data.tokenizer.pad_id not in ids
    assert not data.has_split("val")
    with pytest.raises(DataNotFoundError, match="no validation texts"):
        data.val_dataloader()


def test_data_errors_name_the_file_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match="no train.tsv or train.csv"):
        TextDataModule(str(tmp_path))
    write(tmp_path / "a" / "train.tsv", ["label\ttext", "0\tbad", "1\tgood"])
    with pytest.raises(ValueError, match=r"no column 'sentence'.*--data.text_column"):
        TextDataModule(str(tmp_path / "a"))
    write(tmp_path / "b" / "train.tsv", ["label\tsentence", "0\tbad", "1\tgood"])
    write(tmp_path / "b" / "test.tsv", ["label\tsentence", "2\tugly"])
    with pytest.raises(ValueError, match=r"test.tsv has labels \['2'\]"):
        TextDataModule(str(tmp_path / "b"))
    write(tmp_path / "n" / "train.tsv", ["label\tsentence", "neg\tbad", "pos\tgood"])
    with pytest.raises(ConfigError, match=r"train.tsv has labels \['neg', 'pos'\] that "
                                          r"--data.class_names \['negative', 'positive'\] does not "
                                          r"name: name them there, or pass --data.class_names null"):
        TextDataModule(str(tmp_path / "n"), class_names=["negative", "positive"], val_fraction=0)
    write(tmp_path / "q" / "train.csv", ["label,sentence", "0,bad", '1,"good' + " and long" * 20000])
    with pytest.raises(ValueError, match=r"train.csv, line \d+: .*unclosed quote"):
        TextDataModule(str(tmp_path / "q"))
    rows = [f"{i % 2},text {i}" for i in range(20)]
    rows[3] = '1,"an opening quote never closed'  # line 5: the csv module reads on to the end
    write(tmp_path / "u" / "train.csv", ["label,sentence", *rows])
    with pytest.raises(ConfigError, match=r"train.csv, line 5: a quote opened there is never closed; "
                                          r"it takes every line to the end, line 21, into one text"):
        TextDataModule(str(tmp_path / "u"))
    write(tmp_path / "e" / "train.csv", ["label,sentence", *rows[:3], *rows[4:], '1,"open at the end'])
    with pytest.raises(ConfigError, match=r"train.csv, line 21: a quote opened there is never closed"):
        TextDataModule(str(tmp_path / "e"))
    write(tmp_path / "m" / "train.csv", ["label,sentence", '0,"two', 'lines"', '1,"two', 'lines" (cut)',
                                         *rows[:3], *rows[4:]])
    split = TextDataModule(str(tmp_path / "m"), val_fraction=0.2).tables
    texts = split["train"][0] + split["val"][0]  # quoted line breaks are text, as is text after a quote
    assert "two\nlines" in texts and "two\nlines (cut)" in texts
    write(tmp_path / "c" / "train.tsv", ["label\tsentence", "0\tbad", "0\tworse"])
    with pytest.raises(ValueError, match="at least two classes"):
        TextDataModule(str(tmp_path / "c"))
    write(tmp_path / "d" / "train.tsv", ["label\tsentence", "0\tbad", "1\tgood", "0\tdull", "1\tfine"])
    with pytest.raises(ConfigError, match=r"--data.val_fraction 0.1 of 4 training texts holds out 0"):
        TextDataModule(str(tmp_path / "d"))
    with pytest.raises(ConfigError, match=r"--data.vocab_size 3 leaves no room"):
        TextDataModule(str(tmp_path / "d"), vocab_size=3, val_fraction=0)
    with pytest.raises(ConfigError, match=r"--data.vocab_size 6 leaves no room .* twice"):
        TextDataModule(str(tmp_path / "d"), tokenizer_kind="wordpiece", vocab_size=6, val_fraction=0)
    with pytest.raises(ConfigError, match=r"--data.max_length 2 is below 3"):
        TextDataModule(str(tmp_path / "d"), max_length=2, val_fraction=0)
    with pytest.raises(ConfigError, match=r"--data.tokenizer_file: \S*nowhere.json: no tokenizer file"):
        TextDataModule(str(tmp_path / "d"), tokenizer_file=str(tmp_path / "nowhere.json"),
                       val_fraction=0)


def test_a_few_steps_of_fit_on_sst2_keep_the_tokenizer_beside_the_checkpoints(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    cli = main([
        "fit", "--config", str(REPO / "configs" / "sst2.yaml"),
        "--data.root", str(sst2_slice(tmp_path / "sst2")), "--data.vocab_size", "600",
        "--model.variant", "nano", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "4",
        "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(tmp_path / "runs"),
    ])
    assert cli.trainer.global_step == 4 and "test/acc" in cli.trainer.callback_metrics
    run = Path(cli.trainer.log_dir)
    saved = TextTokenizer.load(run / "tokenizer.json")
    assert saved.to_json() == cli.datamodule.tokenizer.to_json() and saved.kind == "wordpiece"
    hparams = yaml.safe_load((run / "hparams.yaml").read_text())
    assert "tokenizer" not in hparams["data_spec"] and hparams["data_spec"]["vocab_size"] == saved.vocab_size
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert TextTokenizer.from_json(checkpoint["tokenizer"]).to_json() == saved.to_json()
    model = Classifier.load_from_checkpoint(run / "checkpoints" / "last.ckpt", map_location="cpu")
    assert model.tokenizer_json is not None and model.class_names == ["negative", "positive"]
    ids, _ = saved.encode_batch(["a gorgeous , witty film", "[CLS] dull"])
    assert model(ids).shape == (2, 2)
    predicted = main(["predict", "--config", str(REPO / "configs" / "sst2.yaml"),
                      "--data.root", str(sst2_slice(tmp_path / "sst2")), "--data.vocab_size", "600",
                      "--model.variant", "nano", "--trainer.enable_progress_bar", "false",
                      "--trainer.default_root_dir", str(tmp_path / "predicted"),
                      "--ckpt_path", str(run / "checkpoints" / "last.ckpt")])
    rows = list(csv.DictReader((Path(predicted.trainer.log_dir) / "predictions.csv").open()))
    assert [r["input"] for r in rows] == predicted.datamodule.tables["test"][0]  # the texts

    # Its weights start a run on other texts only with its tokenizer: a tokenizer trained
    # there would give the same ids to other tokens (the vocabularies may even be as large).
    other = sst2_slice(tmp_path / "other")
    lines = (SST2 / "train.tsv").read_text(encoding="utf-8").splitlines()
    write(other / "train.tsv", lines[:1] + lines[301:601])
    again = ["fit", "--config", str(REPO / "configs" / "sst2.yaml"), "--data.root", str(other),
             "--data.vocab_size", "600", "--model.variant", "nano", "--trainer.max_steps", "2",
             "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path / "runs"),
             "--test_after_fit", "false", "--model.init_from", str(run / "checkpoints" / "last.ckpt")]
    with pytest.raises(CheckpointError, match=r"trained with another tokenizer \(\d+ of their \d+ token ids"
                                              rf".*--data.tokenizer_file {re.escape(str(run / 'tokenizer.json'))}\."):
        main(again)
    assert main([*again, "--data.tokenizer_file", str(run / "tokenizer.json")]).trainer.global_step == 2
    assert "note: --data.tokenizer_file" not in capsys.readouterr().out  # the config's options agree
    TextDataModule(str(other), tokenizer_file=str(run / "tokenizer.json"), tokenizer_kind="char",
                   max_length=16)
    assert (f"note: --data.tokenizer_file {run / 'tokenizer.json'} brings its own tokenizer (wordpiece, "
            "max_length 64); --data.tokenizer_kind char and --data.max_length 16 do not apply."
            ) in capsys.readouterr().out


def test_flip_averaging_a_text_model_is_refused_naming_the_option() -> None:
    spec = {"modality": "text", "class_names": ["neg", "pos"], "vocab_size": VOCAB,
            "max_length": MAX_LENGTH, "pad_id": PAD, "tokenizer_kind": "word"}
    with pytest.raises(ConfigError, match="--model.flip_average mirrors images"):
        Classifier("nano", data_spec=spec, flip_average=True)


def test_sincos_positions_for_a_text_model_are_refused_naming_the_option() -> None:
    spec = {"modality": "text", "class_names": ["neg", "pos"], "vocab_size": VOCAB,
            "max_length": MAX_LENGTH, "pad_id": PAD, "tokenizer_kind": "word"}
    with pytest.raises(ConfigError, match="--model.position_init sincos lays positions on a 2-D"):
        Classifier("nano", data_spec=spec, position_init="sincos")
