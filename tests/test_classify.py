"""The classify script and the Predictor API: inputs of every kind, bad inputs, bad checkpoints."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import save_checkpoint
from vit.checkpoint import CheckpointError, load_saved_model, save_bundle
from vit.classify import main, table_cell
from vit.predictor import Prediction, Predictor

REPO = Path(__file__).resolve().parents[1]


def run(capsys: pytest.CaptureFixture, *argv: str | Path) -> tuple[int, str, list[str]]:
    """Exit status, stdout, and the non-empty stderr lines of one ``vit.classify`` run."""
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, [line for line in err.splitlines() if line.strip()]


def random_image(size: tuple[int, int] = (40, 30), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def decompression_bomb(path: Path) -> Path:
    """A tiny PNG whose header claims 30000 x 30000 pixels."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", 30000, 30000)  # IHDR width and height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def test_paths_pil_images_and_tensors_give_the_same_predictions(image_checkpoint: Path, tmp_path: Path) -> None:
    predictor = Predictor.load(image_checkpoint, device="cpu")
    image = random_image((32, 32))
    image.save(tmp_path / "x.png")
    pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)  # (3, 32, 32) uint8
    results = predictor.classify(
        [tmp_path / "x.png", str(tmp_path / "x.png"), image, pixels, pixels.float() / 255], top_k=3
    )
    assert all(r == results[0] for r in results)
    assert len(results[0]) == 3 and isinstance(results[0][0], Prediction)
    assert results[0][0].label in predictor.class_names
    assert results[0][0].probability >= results[0][1].probability >= results[0][2].probability
    assert predictor.classify(image, top_k=50)[0] == predictor.classify([image], top_k=10)[0]
    assert len(predictor.classify(torch.stack([pixels] * 3))) == 3


def test_probabilities_match_the_model_on_normalised_pixels(image_checkpoint: Path) -> None:
    saved = load_saved_model(image_checkpoint)
    predictor = Predictor(saved, device="cpu")
    pixels = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    mean = torch.tensor(saved.spec["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(saved.spec["std"]).view(1, 3, 1, 1)
    expected = saved.model((pixels / 255 - mean) / std).softmax(-1)
    torch.testing.assert_close(predictor.probabilities(pixels), expected, atol=1e-6, rtol=1e-5)


def test_image_tensors_of_the_wrong_shape_or_type_are_refused(image_checkpoint: Path) -> None:
    predictor = Predictor.load(image_checkpoint, device="cpu")
    with pytest.raises(ValueError, match=r"\(3, H, W\) or \(1, H, W\), got shape \(4, 32, 32\)"):
        predictor.classify(torch.zeros(4, 32, 32))
    for shape in ((32, 32), (1, 1, 3, 32, 32)):  # not taken as a list of rows or of batches
        with pytest.raises(ValueError, match=rf"a tensor of shape {re.escape(str(shape))}: pass one"):
            predictor.classify(torch.zeros(shape))
    with pytest.raises(ValueError, match="uint8 in \\[0, 255\\] or float in \\[0, 1\\], got torch.int32"):
        predictor.classify(torch.zeros(3, 32, 32, dtype=torch.int32))
    with pytest.raises(ValueError, match="this model classifies images, not texts"):
        predictor.encode_text("a film")
    image = torch.rand(3, 32, 32)
    for wrong in (image * 255, image * 4 - 2):  # 0-255 values; a normalised image
        with pytest.raises(ValueError, match=r"must hold values in \[0, 1\], this one holds"):
            predictor.classify(wrong)
    with pytest.raises(ValueError, match="NaN or infinite"):
        predictor.classify(torch.full((3, 32, 32), float("nan")))
    overshoot = (image * 1.1 - 0.05)  # as bicubic resampling rings past the range
    assert predictor.classify(overshoot) == predictor.classify(overshoot.clamp(0, 1))


def test_images_of_any_size_and_mode_are_classified(image_checkpoint: Path, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "images"
    (folder / "nested").mkdir(parents=True)
    base = random_image((64, 48))
    base.convert("L").save(folder / "grey.png")
    base.convert("RGBA").save(folder / "rgba.png")
    base.convert("P").save(folder / "palette.gif")
    base.convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray((np.asarray(base.convert("L"), dtype=np.uint16) * 257)).save(folder / "deep16.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    base.save(folder / "nested" / "rotated.jpg", exif=exif)
    base.resize((7, 300)).save(folder / "nested" / "thin.bmp")
    (folder / "README.txt").write_text("not an image, and not named: skipped in folders")
    status, out, err = run(capsys, image_checkpoint, folder, "--format", "csv", "--top-k", "1")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert status == 0 and err == []
    assert sorted(Path(r["input"]).name for r in rows) == [
        "cmyk.jpg", "deep16.png", "grey.png", "palette.gif", "rgba.png", "rotated.jpg", "thin.bmp"]


def test_exif_rotation_is_applied_before_resizing(image_checkpoint: Path, tmp_path: Path) -> None:
    predictor = Predictor.load(image_checkpoint, device="cpu")
    base = random_image((64, 40), seed=3)
    exif = Image.Exif()
    exif[0x0112] = 6
    base.save(tmp_path / "tagged.png", exif=exif)
    upright = base.transpose(Image.Transpose.ROTATE_270)
    torch.testing.assert_close(predictor.image_tensor(tmp_path / "tagged.png"), predictor.image_tensor(upright))


def test_each_bad_input_gets_one_line_and_the_rest_are_classified(
    image_checkpoint: Path, tmp_path: Path, capsys
) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    random_image().save(folder / "good.png")
    random_image(seed=1).save(folder / "also_good.jpg")
    (folder / "zero.png").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not an image")
    good_bytes = (folder / "also_good.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(good_bytes[: len(good_bytes) // 3])
    decompression_bomb(folder / "bomb.png")
    (tmp_path / "notes.txt").write_text("an unsupported file, named explicitly")
    status, out, err = run(
        capsys, image_checkpoint, folder, tmp_path / "notes.txt", tmp_path / "missing.png",
        str(tmp_path / "nowhere" / "*.png"), "--format", "json",
    )
    assert status == 1
    assert sorted(Path(r["input"]).name for r in json.loads(out)) == ["also_good.jpg", "good.png"]
    expected = {
        "zero.png": "empty file", "text.jpg": "not an image", "truncated.jpg": "cannot decode",
        "bomb.png": "too many pixels", "notes.txt": "not an image", "missing.png": "no such file",
        "*.png": "no file matches this pattern",
    }
    assert len(err) == len(expected), err
    for name, reason in expected.items():
        assert sum(name in line and reason in line for line in err) == 1, (name, err)
    assert all(line.startswith("error: ") for line in err)


def test_all_good_inputs_exit_zero_in_every_format(image_checkpoint: Path, tmp_path: Path, capsys) -> None:
    for i in range(3):
        random_image(seed=i).save(tmp_path / f"{i}.png")
    pattern = str(tmp_path / "*.png")
    status, out, err = run(capsys, image_checkpoint, pattern, "--format", "table", "--top-k", "2")
    assert status == 0 and err == []
    lines = out.splitlines()
    assert len(lines) == 3 and all(len(line.split()) == 1 + 2 * 2 for line in lines)
    status, out, _ = run(capsys, image_checkpoint, pattern, "--format", "csv", "--top-k", "99")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert status == 0 and len(rows) == 3 * 10  # top-k capped at the ten classes
    assert {r["rank"] for r in rows} == {str(k) for k in range(1, 11)}
    status, out, _ = run(capsys, image_checkpoint, pattern, "--output", tmp_path / "out.json",
                         "--format", "json", "--batch-size", "2")
    records = json.loads((tmp_path / "out.json").read_text())
    assert status == 0 and out == "" and len(records) == 3
    assert [len(r["predictions"]) for r in records] == [5, 5, 5]
    status, _, err = run(capsys, image_checkpoint, pattern, "--output", tmp_path / "no" / "out.csv")
    assert status == 2 and err == [f"error: --output {tmp_path / 'no' / 'out.csv'}: cannot write "
                                   f"there (No such file or directory); pass a file in a folder "
                                   f"that exists and can be written."]


def test_many_inputs_show_progress_on_stderr_and_keep_stdout_clean(
    image_checkpoint: Path, tmp_path: Path, capsys
) -> None:
    for i in range(12):
        random_image((8, 8), seed=i).save(tmp_path / f"{i:02d}.png")
    status, out, err = run(capsys, image_checkpoint, tmp_path, "--format", "json", "--batch-size", "5")
    assert status == 0 and len(json.loads(out)) == 12
    assert any("12/12" in line for line in err)


def test_texts_and_text_files_with_empty_lines_are_reported_one_by_one(
    text_checkpoint: Path, tmp_path: Path, capsys
) -> None:
    # a form feed inside a line does not end it (str.splitlines would split there)
    # (and the byte-order mark some editors write first is not part of the first text)
    (tmp_path / "reviews.txt").write_text("\ufeffgreat acting\n   \na plot that\x0cmakes no sense\n")
    status, out, err = run(
        capsys, text_checkpoint, "--text", "warm and clever", "--text", "", "--text-file",
        tmp_path / "reviews.txt", "--text-file", tmp_path / "absent.txt", "--format", "json",
        "--top-k", "5",
    )
    assert status == 1
    records = json.loads(out)
    assert [r["input"] for r in records] == ["warm and clever", "great acting", "a plot that\x0cmakes no sense"]
    assert all(len(r["predictions"]) == 2 for r in records)  # top-k capped at two classes
    assert len(err) == 3
    assert any(line.startswith("error: --text 2: empty") for line in err)
    assert any(line.startswith(f"error: {tmp_path / 'reviews.txt'}:2: empty") for line in err)
    assert any("absent.txt: no such text file" in line for line in err)


def test_table_cells_keep_a_texts_first_words_and_a_paths_file_name() -> None:
    assert table_cell("a  film\nof rare wit", 30) == "a film of rare wit"
    assert table_cell("a film of rare wit and grace", 18) == "a film of rare..."
    assert table_cell("x" * 40, 18) == "x" * 15 + "..."  # one long word
    for path in ("/data/" + "x" * 70 + "/cat_0001.jpg", r"C:\Users\Jane Doe\My Pictures\cat_0001.jpg"):
        assert table_cell(path, 20, path=True) == "..." + path[-17:]  # the file name is kept
    assert table_cell("/data/cat.jpg", 20, path=True) == "/data/cat.jpg"


def test_long_texts_are_truncated_with_a_note(text_checkpoint: Path, capsys) -> None:
    status, out, err = run(capsys, text_checkpoint, "--text", "great " * 40, "--format", "csv")
    assert status == 0 and len(out.splitlines()) == 1 + 2
    assert err == ["note: 1 text(s) longer than max_length=12 tokens were truncated."]


def test_text_predictor_pads_batches_without_changing_answers(text_checkpoint: Path) -> None:
    predictor = Predictor.load(text_checkpoint, device="cpu")
    texts = ["great acting", "dull , slow and far too long and the plot makes no sense"]
    together = predictor.classify(texts, top_k=2)
    alone = [predictor.classify(t, top_k=2)[0] for t in texts]
    for a, b in zip(together, alone):
        assert [p.label for p in a] == [p.label for p in b]
        np.testing.assert_allclose([p.probability for p in a], [p.probability for p in b], atol=1e-6)
    with pytest.raises(ValueError, match="empty or only whitespace"):
        predictor.classify([" \t "])


@pytest.mark.parametrize("argv, message", [
    (["IMAGES"], "is a text classifier, given 1 file argument(s): pass texts with --text"),
    ([], "nothing to classify: pass texts with --text or --text-file"),
])
def test_text_model_given_images_is_one_clear_error(
    text_checkpoint: Path, tmp_path: Path, capsys, argv: list[str], message: str
) -> None:
    random_image().save(tmp_path / "a.png")
    argv = [str(tmp_path) if a == "IMAGES" else a for a in argv]
    status, out, err = run(capsys, text_checkpoint, *argv)
    assert status == 2 and out == "" and len(err) == 1 and message in err[0]


def test_image_model_given_texts_is_one_clear_error(image_checkpoint: Path, capsys) -> None:
    status, out, err = run(capsys, image_checkpoint, "--text", "a film")
    assert status == 2 and out == ""
    assert err == [f"error: {image_checkpoint} is an image classifier, given --text/--text-file: "
                   f"pass image files, folders or glob patterns."]


def test_corrupt_and_foreign_checkpoints_are_one_clear_error(
    image_checkpoint: Path, tmp_path: Path, capsys
) -> None:
    random_image().save(tmp_path / "image.png")
    data = image_checkpoint.read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.ckpt").write_bytes(b"")
    (tmp_path / "photo.ckpt").write_bytes((tmp_path / "image.png").read_bytes())
    torch.save({"model": {"w": torch.zeros(2)}}, tmp_path / "weights.pth")
    (tmp_path / "folder").mkdir()
    cases = {
        "truncated.ckpt": "not a readable PyTorch checkpoint",
        "empty.ckpt": "the file is empty",
        "photo.ckpt": "not a PyTorch checkpoint",
        "weights.pth": "not a training checkpoint of this project",
        "missing.ckpt": "no such file",
        "folder": "a folder without config.json",
    }
    for name, reason in cases.items():
        status, out, err = run(capsys, tmp_path / name, tmp_path / "image.png")
        assert status == 2 and out == "", name
        assert len(err) == 1 and err[0].startswith(f"error: {tmp_path / name}") and reason in err[0], err


def test_text_checkpoint_without_a_readable_tokenizer_is_refused(text_checkpoint: Path, tmp_path: Path) -> None:
    checkpoint = torch.load(text_checkpoint, weights_only=True)
    checkpoint["tokenizer"] = "{not a tokenizer"
    torch.save(checkpoint, tmp_path / "torn.ckpt")
    del checkpoint["tokenizer"]
    torch.save(checkpoint, tmp_path / "bare.ckpt")
    with pytest.raises(CheckpointError, match="torn.ckpt: the stored tokenizer is unreadable"):
        Predictor.load(tmp_path / "torn.ckpt")
    with pytest.raises(CheckpointError, match="bare.ckpt: a text model without its tokenizer"):
        Predictor.load(tmp_path / "bare.ckpt")


class RunsACommand:
    """Unpickling this calls os.system: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_whose_pickle_runs_a_command_is_refused(
    image_checkpoint: Path, tmp_path: Path, capsys
) -> None:
    marker = tmp_path / "command-ran"
    checkpoint = torch.load(image_checkpoint, weights_only=True)
    checkpoint["hyper_parameters"]["payload"] = RunsACommand(marker)
    evil = tmp_path / "evil.ckpt"
    torch.save(checkpoint, evil)
    with pytest.raises(CheckpointError, match=r"refused to load.*import (posix|nt)\.system"):
        Predictor.load(evil)
    random_image().save(tmp_path / "a.png")
    status, out, err = run(capsys, evil, tmp_path / "a.png")
    assert status == 2 and out == "" and len(err) == 1 and "refused to load" in err[0]
    assert not marker.exists()


def test_unavailable_device_is_one_clear_error(image_checkpoint: Path, tmp_path: Path, capsys) -> None:
    random_image().save(tmp_path / "a.png")
    status, _, err = run(capsys, image_checkpoint, tmp_path / "a.png", "--device", "tpu:7")
    assert status == 2 and err == ["error: unknown device 'tpu:7': use auto, cpu, cuda or cuda:N."]
    unsupported = ("meta", "xpu") + (() if torch.backends.mps.is_available() else ("mps",))
    for device in unsupported:  # torch knows them; the classifier runs on cpu, cuda (or mps)
        status, _, err = run(capsys, image_checkpoint, tmp_path / "a.png", "--device", device)
        assert status == 2 and err == [f"error: device '{device}' is not supported here: use auto, "
                                       "cpu, cuda or cuda:N."]
    if not torch.cuda.is_available():
        status, _, err = run(capsys, image_checkpoint, tmp_path / "a.png", "--device", "cuda")
        assert status == 2 and "has no CUDA GPU: use cpu" in err[0]
    else:
        beyond = f"cuda:{torch.cuda.device_count()}"
        status, _, err = run(capsys, image_checkpoint, tmp_path / "a.png", "--device", beyond)
        assert status == 2 and f"device '{beyond}' asked for, but this machine has" in err[0]


AVERAGED_AND_MIRRORED = [
    "--trainer.callbacks+=vit.ema.EMA", "--trainer.callbacks.decay=0.5", "--model.flip_average=true",
]


@pytest.mark.parametrize("options", [[], AVERAGED_AND_MIRRORED], ids=["plain", "ema-and-flip"])
def test_a_trained_checkpoint_classifies_the_test_split_as_train_test_scores_it(
    options: list[str], tmp_path: Path, sample_root: Path, capsys
) -> None:
    from vit.cli import main as train

    cli = train([
        "fit", "--config", str(REPO / "configs" / "quickstart.yaml"), "--model.variant", "nano",
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "6",
        "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(tmp_path / "runs"), *options,
    ])
    test_acc = cli.trainer.callback_metrics["test/acc"].item()
    capsys.readouterr()
    checkpoint = Path(cli.trainer.checkpoint_callback.best_model_path)
    if options:  # the checkpoint holds the average as its weights, the raw ones beside them
        saved = torch.load(checkpoint, weights_only=False)
        raw, averaged = saved["current_model_state"], saved["state_dict"]
        assert not torch.equal(raw["net.head.weight"], averaged["net.head.weight"])
    status, out, _ = run(capsys, checkpoint, sample_root / "test", "--format", "csv", "--top-k", "1")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert status == 0 and len(rows) == 200
    accuracy = np.mean([Path(r["input"]).parent.name == r["label"] for r in rows])
    assert accuracy == pytest.approx(test_acc, abs=1e-6)


def test_a_trained_text_checkpoint_classifies_its_test_texts_as_train_test_scores_them(
    tmp_path: Path, capsys
) -> None:
    from vit.cli import main as train

    root = tmp_path / "sst2"
    root.mkdir()
    for split, rows in (("train", 300), ("dev", 40), ("test", 60)):
        lines = (REPO / "data" / "sst2" / f"{split}.tsv").read_text(encoding="utf-8").splitlines()
        (root / f"{split}.tsv").write_text("\n".join(lines[: rows + 1]) + "\n", encoding="utf-8")
    cli = train([
        "fit", "--config", str(REPO / "configs" / "sst2.yaml"), "--data.root", str(root),
        "--data.vocab_size", "600", "--data.tokenizer_kind", "word", "--model.variant", "nano",
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
        "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(tmp_path / "runs"),
    ])
    test_acc = cli.trainer.callback_metrics["test/acc"].item()
    capsys.readouterr()
    rows = [line.split("\t") for line in (root / "test.tsv").read_text().splitlines()[1:]]
    (tmp_path / "texts.txt").write_text("\n".join(sentence for _, sentence in rows) + "\n")
    checkpoint = Path(cli.trainer.checkpoint_callback.best_model_path)
    status, out, _ = run(capsys, checkpoint, "--text-file", tmp_path / "texts.txt",
                         "--format", "json", "--top-k", "1")
    predicted = [r["predictions"][0]["label"] for r in json.loads(out)]
    truth = [["negative", "positive"][int(label)] for label, _ in rows]
    assert status == 0 and len(predicted) == 60
    assert np.mean([p == t for p, t in zip(predicted, truth)]) == pytest.approx(test_acc, abs=1e-6)


def test_module_runs_as_a_script(image_checkpoint: Path, tmp_path: Path) -> None:
    import subprocess

    random_image().save(tmp_path / "a.png")
    done = subprocess.run(
        [sys.executable, "-m", "vit.classify", str(image_checkpoint), str(tmp_path / "a.png"),
         str(tmp_path / "b.png"), "--top-k", "1", "--format", "csv"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert done.returncode == 1
    assert done.stdout.splitlines()[1].startswith(f"{tmp_path / 'a.png'},1,")
    assert done.stderr.strip() == f"error: {tmp_path / 'b.png'}: no such file or folder"


def test_a_flip_averaged_model_classifies_on_the_mean_of_image_and_mirror(
    tmp_path: Path, image_spec: dict
) -> None:
    saved = load_saved_model(save_checkpoint(tmp_path / "flip.ckpt", image_spec, flip_average=True))
    save_bundle(saved, tmp_path / "bundle")
    bundled = load_saved_model(tmp_path / "bundle")
    images = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        saved.model.flip_average = False
        expected = (saved.model(images) + saved.model(images.flip(-1))) / 2
        assert not torch.allclose(expected, saved.model(images))
        torch.testing.assert_close(bundled.model(images), expected)
        bundled.model.train()
        torch.testing.assert_close(bundled.model(images), saved.model(images))  # training: one view
