"""The patch-versus-text comparison: attention capture, probes, costs and the report command."""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import pytest
import torch

import vit.compare
import vit.matched
from vit.attention_maps import attention_rollout, capture_attention
from vit.compare import load_image_side, load_text_side, main, run, tokenization, train_tokenizers
from vit.errors import ConfigError
from vit.matched import Budget, encode_texts, run_matched
from vit.measure import (
    EvalSet,
    accuracy,
    flops_per_sample,
    parameter_counts,
    positional_probes,
    positions_removed,
    shuffle_tokens,
)
from vit.model import ImageClassifier, TextClassifier, encoder_config
from vit.report import code_span
from vit.text_data import TextTable
from vit.tokenizer import TextTokenizer

REPO = Path(__file__).resolve().parents[1]
SST2 = REPO / "data" / "sst2"
SAMPLE = REPO / "data" / "cifar10-sample"


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a shared two-core machine this is several times faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def text_model() -> TextClassifier:
    return TextClassifier(
        vocab_size=30, max_length=10, pad_id=0, num_classes=2, encoder=encoder_config("nano")
    )


def image_model() -> ImageClassifier:
    return ImageClassifier(
        image_size=16, patch_size=4, num_classes=3, encoder=encoder_config("nano")
    )


def test_captured_attention_is_softmax_qk_and_what_sdpa_applied() -> None:
    model = text_model().eval()
    ids = torch.tensor([[2, 7, 8, 9, 10, 3], [2, 11, 12, 3, 0, 0]])
    with capture_attention(model) as maps, torch.no_grad():
        logits = model(ids)
    assert len(maps) == len(model.blocks)
    with torch.no_grad():
        tokens, pad = model.embed_tokens(ids, None)
        x = torch.cat([model.cls_token.expand(2, -1, -1), tokens], 1) + model.pos_embed[:, :6]
        pad = torch.nn.functional.pad(pad, (1, 0), value=False)
        for block, captured in zip(model.blocks, maps):
            attn = block.attn
            h = block.norm1(x)
            b, n, d = h.shape
            q, k, v = (
                attn.qkv(h).view(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
            )
            scores = q @ k.transpose(-1, -2) / math.sqrt(attn.head_dim)
            reference = scores.masked_fill(pad[:, None, None, :], float("-inf")).softmax(-1)
            torch.testing.assert_close(captured, reference)
            applied = attn.proj((reference @ v).transpose(1, 2).reshape(b, n, d))
            torch.testing.assert_close(
                applied, attn(h, pad), atol=1e-5, rtol=1e-4
            )  # fused SDPA path
            x = block(x, pad)
        assert captured[1, :, :, 4:].abs().max() == 0  # padding never attended to
    torch.testing.assert_close(model(ids), logits)
    assert not any(m._forward_hooks for m in model.modules())


def test_rollout_rows_are_distributions_and_one_layer_is_half_identity() -> None:
    weights = torch.rand(2, 3, 5, 5).softmax(-1)
    rollout = attention_rollout([weights])
    torch.testing.assert_close(rollout, 0.5 * (weights.mean(1) + torch.eye(5)))
    two = attention_rollout([weights, weights.flip(-1)])
    torch.testing.assert_close(two.sum(-1), torch.ones(2, 5))


def test_shuffled_patches_are_a_permutation_and_order_free_without_positions() -> None:
    model = image_model().eval()
    images = torch.randn(4, 3, 16, 16)
    shuffled = shuffle_tokens(model, images, torch.Generator().manual_seed(0))
    patches = lambda x: x.unfold(2, 4, 4).unfold(3, 4, 4).reshape(4, 3, 16, 16).permute(0, 2, 1, 3)
    assert not torch.equal(shuffled, images)
    torch.testing.assert_close(patches(shuffled).sum(1), patches(images).sum(1))
    with positions_removed(model), torch.no_grad():
        torch.testing.assert_close(model(shuffled), model(images), atol=1e-5, rtol=1e-4)
    assert model.pos_embed[:, 1:].abs().sum() > 0  # restored


def test_text_shuffle_keeps_cls_sep_and_padding() -> None:
    ids = torch.tensor([[2, 5, 6, 7, 8, 3, 0], [2, 9, 3, 0, 0, 0, 0]])
    out = shuffle_tokens(text_model(), ids, torch.Generator().manual_seed(1), pad_id=0)
    assert out[:, 0].tolist() == [2, 2] and out[0, 5] == 3 and out[1].tolist() == ids[1].tolist()
    assert sorted(out[0, 1:5].tolist()) == [5, 6, 7, 8] and out[0, 1:5].tolist() != [5, 6, 7, 8]


def test_probes_and_accuracy_are_measured() -> None:
    model = text_model().eval()
    ids = torch.randint(5, 30, (40, 8))
    ids[:, 0], ids[:, -1] = 2, 3
    with torch.no_grad():
        predicted = model(ids).argmax(-1)
    data = EvalSet(ids, predicted, pad_id=0)
    probes = positional_probes(model, data)
    assert probes["accuracy"] == 1.0 == accuracy(model, EvalSet(ids, predicted, 0))
    assert accuracy(model, EvalSet(ids, 1 - predicted, 0)) == 0.0
    assert 0 <= probes["shuffled"] <= 1 and 0 <= probes["no_positions"] <= 1


def test_flops_count_the_attention_products() -> None:
    model = image_model()
    d, n, depth, hidden = 64, 17, 2, 128
    per_layer = (
        n * (d * 3 * d + d * d + 2 * d * hidden) + 2 * n * n * d
    )  # projections, MLP, QK^T and AV
    last_layer = n * d * 2 * d + (d * d + d * d + 2 * d * hidden) + 2 * n * d  # CLS alone queries
    expected = 2 * ((depth - 1) * per_layer + last_layer + 16 * 48 * d + d * 3)
    assert flops_per_sample(model, torch.randn(1, 3, 16, 16)) == expected
    counts = parameter_counts(model)
    assert sum(counts.values()) == sum(p.numel() for p in model.parameters())
    assert counts["front_end"] == 48 * d + d


def test_tokenization_marks_unknown_and_special_tokens() -> None:
    tokenizer = TextTokenizer.train(
        ["a good film", "a bad film"], "word", vocab_size=20, max_length=16
    )
    view = tokenization(tokenizer, "a great film")
    assert view["tokens"] == ["[CLS]", "a", "[UNK]", "film", "[SEP]"]
    assert view["unknown"] == [False, False, True, False, False]
    assert view["special"] == [True, False, False, False, True] and view["count"] == 5  # [UNK] is unknown


def test_text_side_from_a_checkpoint(text_checkpoint: Path) -> None:
    table = TextTable(SST2 / "train.tsv", "sentence", "label")
    side = load_text_side(str(text_checkpoint), SST2 / "test.tsv", table, {}, "nano", 0, 50)
    assert len(side.data) == 50 and side.data.inputs.shape[1] <= 12
    assert side.class_names == ["negative", "positive"]


def test_integer_labels_map_to_the_classes_they_were_trained_as(tmp_path: Path) -> None:
    tokenizer = TextTokenizer.train(["a fine film", "a dull film"], "word", 50, 16)
    stars = tmp_path / "stars.tsv"  # labels 1-5, trained with --data.class_names null; no 5 here
    stars.write_text("label\tsentence\n1\ta dull film\n4\ta fine film\n02\tdull\n")
    table = TextTable(stars, "sentence", "label")
    names = ["1", "2", "3", "4", "5"]
    for recorded in (True, None):  # None: a spec from before it recorded how
        assert encode_texts(table, tokenizer, names, classes_from_labels=recorded).labels.tolist() == [0, 3, 1]
    # the same labels indexing names given as --data.class_names '[1, 2, 3, 4, 5]'
    assert encode_texts(table, tokenizer, names, classes_from_labels=False).labels.tolist() == [1, 4, 2]
    sst = tmp_path / "sst.tsv"  # labels 0/1 naming the classes by index
    sst.write_text("label\tsentence\n1\ta fine film\n0\ta dull film\n")
    table = TextTable(sst, "sentence", "label")
    for recorded in (False, None):
        assert encode_texts(table, tokenizer, ["negative", "positive"],
                            classes_from_labels=recorded).labels.tolist() == [1, 0]


@pytest.mark.parametrize("token,span", [
    ("good", "`good`"),
    ("`", "`` ` ``"),  # SST-2 writes opening quotes as `` and single ones as `
    ("``", "``` `` ```"),
    ("don`t", "``don`t``"),
])
def test_a_token_with_backticks_is_one_markdown_code_span(token: str, span: str) -> None:
    assert code_span(token) == span


def test_report_end_to_end(
    tmp_path: Path, image_checkpoint: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "report"
    start = time.perf_counter()
    main(
        [
            "--image-checkpoint",
            str(image_checkpoint),
            "--out",
            str(out),
            "--max-texts",
            "120",
            "--tokenizer-texts",
            "400",
            "--matched-steps",
            "2",
            "--matched-text-train",
            "100",
            "--throughput-seconds",
            "0.05",
            "--examples",
            "2",
        ]
    )
    assert time.perf_counter() - start < 60
    for name in (
        "report.html",
        "report.md",
        "summary.json",
        "tokens_image.png",
        "token_counts.png",
        "attention_images.png",
        "attention_text_0.png",
        "probes.png",
        "positions_image.png",
        "positions_text.png",
    ):
        assert (out / name).stat().st_size > 0, name
    page = (out / "report.html").read_text()
    assert re.findall(r"src='([^']{0,22})", page) and all(
        s.startswith("data:image/png;base64") for s in re.findall(r"src='([^']{0,22})", page)
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["image_checkpoint"] == str(image_checkpoint)
    assert summary["text_checkpoint"].startswith("freshly initialised")

    # The numbers come from the data and the models, not from constants.
    costs = summary["side_by_side"]
    assert costs["image"]["test_samples"] == 200 and costs["text"]["test_samples"] == 120
    texts = TextTable(SST2 / "test.tsv", "sentence", "label").texts[:120]
    wordpiece = train_tokenizers(TextTable(SST2 / "train.tsv", "sentence", "label").texts[:400])[
        "wordpiece"
    ]
    ids, _ = wordpiece.encode_batch(texts)
    assert costs["text"]["tokens"] == (ids != 0).sum(1).tolist()
    assert costs["image"]["tokens_mean"] == 65 and costs["image"]["tokens_std"] == 0
    assert costs["image"]["parameters"]["encoder"] == costs["text"]["parameters"]["encoder"]
    assert costs["image"]["flops_per_sample"] > costs["text"]["flops_per_sample"] > 0
    assert costs["image"]["samples_per_s"] > 0 and costs["text"]["tokens_per_s"] > 0
    assert (
        summary["text_tokenization"]["wordpiece"]["ids"]
        == wordpiece.encode_batch([summary["text_tokenization"]["sentence"]])[0][0].tolist()
    )
    assert summary["image_tokenization"]["sequence_length"] == 65

    attention = summary["attention"]
    for example in attention["image"]:
        assert len(example["cls_attention"]) == 2 and len(example["rollout"]) == 64
    for example in attention["text"]:
        assert len(example["rollout"]) == len(example["tokens"]) - 1
        assert example["tokens"][0] == "[CLS]" and example["tokens"][-1] == "[SEP]"
    for probe in summary["positional_probes"].values():
        assert set(probe) == {"accuracy", "shuffled", "no_positions"}
    assert summary["positional_probes"]["image"]["accuracy"] == costs["image"]["test_accuracy"]
    assert len(summary["positional_embeddings"]["image_similarity"]) == 64
    rows = summary["matched_budget"]["rows"]
    assert [r["modality"] for r in rows] == ["image", "text"]
    assert rows[0]["tokens_per_sample"] == rows[1]["tokens_per_sample"] == 65
    assert rows[0]["encoder_parameters"] == rows[1]["encoder_parameters"]
    assert all(
        0 <= r[k] <= 1
        for r in rows
        for k in ("test_accuracy", "shuffled_accuracy", "no_positions_accuracy")
    )
    assert "wrote" in capsys.readouterr().out


def test_tokens_command_prints_patches_and_every_tokenizer(capsys: pytest.CaptureFixture) -> None:
    image = REPO / "data" / "cifar10-sample" / "test" / "cat" / "0000.jpg"
    main(
        [
            "tokens",
            "--image",
            str(image),
            "--text",
            "A quietly moving film.",
            "--tokenizer-texts",
            "300",
        ]
    )
    printed = capsys.readouterr().out
    assert "64 patch tokens + CLS = 65 tokens, 48 values each" in printed
    for kind in ("word", "char", "bpe", "wordpiece"):
        assert f"\n{kind} (vocabulary" in printed


@pytest.mark.parametrize(
    "case", ["missing texts", "not an image", "missing checkpoint", "no images", "other modality",
             "out is a file", "not matched results", "tokens not square", "patch too large",
             "empty text", "invisible text", "empty sentence"]
)
def test_a_users_mistake_is_one_line_naming_the_option_or_file(
    case: str, tmp_path: Path, text_checkpoint: Path, capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (tmp_path / "notes.jpg").write_text("not a picture")
    (tmp_path / "results.json").write_text('{"rows": []}')
    image = str(SAMPLE / "test" / "cat" / "0000.jpg")
    args, message = {
        "missing texts": (["tokens", "--text", "hi", "--text-train", str(tmp_path / "none.tsv")],
                          "none.tsv: no such file."),
        "not an image": (["tokens", "--image", str(tmp_path / "notes.jpg")],
                         "notes.jpg: not an image"),
        "missing checkpoint": (["report", "--image-checkpoint", str(tmp_path / "none.ckpt")],
                               "none.ckpt: no such file"),
        "no images": (["report", "--image-root", str(tmp_path)],
                      f"no image data at --image-root {tmp_path} (found no train/ folder)"),
        "other modality": (["report", "--image-checkpoint", str(text_checkpoint),
                            "--tokenizer-texts", "50"],
                           "holds a text model; pass it as --text-checkpoint"),
        "out is a file": (["report", "--out", str(tmp_path / "notes.jpg")],
                          f"--out {tmp_path / 'notes.jpg'}: cannot make the folder"),
        "not matched results": (["report", "--matched-results", str(tmp_path / "results.json")],
                                "is not a matched.json (it lacks 'budget')"),
        "tokens not square": (["matched", "--tokens", "50"], "--tokens 50 is not a square number"),
        "patch too large": (["tokens", "--image", image, "--patch-size", "64"],
                            "--patch-size 64 does not tile --image-size 32 images: choose one of "
                            "1, 2, 4, 8, 16, 32."),
        "empty text": (["tokens", "--text", " "], "--text ' ' is empty"),
        "invisible text": (["tokens", "--text", "\u200b\x01"], "is empty once whitespace and control"),
        "empty sentence": (["report", "--sentence", ""], "--sentence '' is empty"),
    }[case]
    if args[0] in ("report", "matched") and "--out" not in args:
        args = [*args, "--out", str(tmp_path / "out")]

    def work(*args, **kwargs) -> None:
        raise AssertionError("the work began before the mistake was found")

    for module, name in ((vit.compare, "train_tokenizers"), (vit.compare, "load_split"),
                         (vit.matched, "image_split")):
        monkeypatch.setattr(module, name, work)
    assert run(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err, err
    assert "--data." not in err


def test_an_unknown_variant_or_a_negative_limit_is_refused_by_the_parser(capsys: pytest.CaptureFixture) -> None:
    for command in ("report", "matched"):
        with pytest.raises(SystemExit) as refused:
            run([command, "--variant", "huge"])
        assert refused.value.code == 2
        err = capsys.readouterr().err
        assert "--variant: invalid choice: 'huge'" in err and "lite7" in err
    with pytest.raises(SystemExit) as refused:
        run(["matched", "--text-train-limit", "-5"])
    assert refused.value.code == 2
    assert "--text-train-limit: must be 0 or more, got -5" in capsys.readouterr().err


def test_text_files_without_the_sst2_columns_are_named_in_the_message(tmp_path: Path) -> None:
    table = tmp_path / "texts.tsv"
    table.write_text("text\tlabel\ngood film\t1\n")
    with pytest.raises(ConfigError, match="no column 'sentence'.*Name its text column 'sentence'"):
        TextTable(table, "sentence", "label", column_options=None)
    with pytest.raises(ConfigError, match="Name the columns with --data.text_column and "):
        TextTable(table, "sentence", "label")


def test_matched_models_saved_as_bundles_reproduce_their_accuracy(tmp_path: Path) -> None:
    budget = Budget(steps=2, batch_size=8)
    result = run_matched(SAMPLE, SST2, budget, text_train_limit=100, save_dir=tmp_path)
    image = load_image_side(str(tmp_path / "image"), SAMPLE, "nano", 0)
    table = TextTable(SST2 / "train.tsv", "sentence", "label")
    text = load_text_side(str(tmp_path / "text"), SST2 / "test.tsv", table, {}, "nano", 0, None)
    assert accuracy(image.model, image.data) == result["rows"][0]["test_accuracy"]
    assert accuracy(text.model, text.data) == result["rows"][1]["test_accuracy"]


def test_image_side_without_a_checkpoint_is_a_fresh_model_on_the_test_split() -> None:
    side = load_image_side(None, SAMPLE, "nano", 0)
    assert isinstance(side.model, ImageClassifier) and side.source.startswith("freshly initialised")
    assert side.images.shape == (200, 3, 32, 32) and len(side.data) == 200
    assert side.class_names == sorted(p.name for p in (SAMPLE / "test").iterdir())
