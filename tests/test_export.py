"""The deployment bundle and its ONNX graph: same predictions as the checkpoint, clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer

from vit.checkpoint import CheckpointError, load_saved_model
from vit.classify import main as classify
from vit.export import main as export
from vit.predictor import Predictor


def write_images(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        size = (int(rng.integers(20, 90)), int(rng.integers(20, 90)))
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def classify_output(capsys: pytest.CaptureFixture, *argv: str | Path) -> str:
    assert classify([str(a) for a in argv]) == 0
    return capsys.readouterr().out


def test_image_bundle_gives_the_checkpoints_predictions(image_checkpoint: Path, tmp_path: Path, capsys) -> None:
    bundle = tmp_path / "bundle"
    assert export([str(image_checkpoint), str(bundle)]) == 0
    assert capsys.readouterr().out.split() == [str(bundle / "config.json"), str(bundle / "model.safetensors")]
    assert sorted(p.name for p in bundle.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((bundle / "config.json").read_text())
    assert config["modality"] == "image" and config["class_names"][:2] == ["airplane", "automobile"]
    assert config["architecture"] == {"variant": "nano", "embed_dim": 64, "depth": 2, "num_heads": 2,
                                      "mlp_ratio": 2.0, "patch_size": 4, "flip_average": False}
    assert set(config["preprocessing"]) == {"image_size", "mean", "std"}

    images = write_images(tmp_path / "images", 9)
    argv = [images, "--format", "json", "--top-k", "10"]
    assert classify_output(capsys, bundle, *argv) == classify_output(capsys, image_checkpoint, *argv)
    pixels = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    from_checkpoint = Predictor.load(image_checkpoint, device="cpu").probabilities(pixels)
    assert torch.equal(Predictor.load(bundle, device="cpu").probabilities(pixels), from_checkpoint)
    assert torch.equal(Predictor.load(bundle / "config.json", device="cpu").probabilities(pixels), from_checkpoint)


def test_text_bundle_carries_the_tokenizer(text_checkpoint: Path, tmp_path: Path, capsys) -> None:
    bundle = tmp_path / "bundle"
    assert export([str(text_checkpoint), str(bundle)]) == 0
    capsys.readouterr()
    assert (bundle / "tokenizer.json").read_text() == torch.load(text_checkpoint, weights_only=True)["tokenizer"]
    assert set(json.loads((bundle / "config.json").read_text())["preprocessing"]) == {
        "vocab_size", "max_length", "pad_id", "tokenizer_kind", "classes_from_labels"}
    argv = ["--text", "great acting", "--text", "the plot makes no sense at all", "--format", "csv"]
    assert classify_output(capsys, bundle, *argv) == classify_output(capsys, text_checkpoint, *argv)


def test_a_bundle_tokenizer_read_as_the_readme_says_encodes_as_the_model_does(
    text_checkpoint: Path, tmp_path: Path
) -> None:
    bundle = tmp_path / "bundle"
    assert export([str(text_checkpoint), str(bundle)]) == 0
    reader = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    reader.encode_special_tokens = True
    text = "[PAD] [CLS] a gripping film"
    ids, _ = Predictor.load(bundle).tokenizer.encode_batch([text])
    assert reader.encode(text).ids == ids[0].tolist()


def test_a_text_bundle_with_an_unreadable_tokenizer_is_named(text_checkpoint: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    assert export([str(text_checkpoint), str(bundle)]) == 0
    (bundle / "tokenizer.json").write_bytes(b"\xff\xfe not text")
    with pytest.raises(CheckpointError, match=r"bundle/tokenizer\.json: not readable as UTF-8 text"):
        Predictor.load(bundle)


def test_a_bundle_is_not_exported_over_itself(image_checkpoint: Path, tmp_path: Path, capsys) -> None:
    bundle = tmp_path / "bundle"
    assert export([str(image_checkpoint), str(bundle)]) == 0
    before = {path.name: path.read_bytes() for path in bundle.iterdir()}
    capsys.readouterr()
    for source in (bundle, bundle / "config.json"):  # the folder, or its config.json
        assert export([str(source), str(bundle)]) == 2
        assert "the bundle to write is the one being read" in capsys.readouterr().err
    assert {path.name: path.read_bytes() for path in bundle.iterdir()} == before


def test_a_bundle_exports_again_unchanged(image_checkpoint: Path, tmp_path: Path) -> None:
    assert export([str(image_checkpoint), str(tmp_path / "a")]) == 0
    assert export([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    for name in ("config.json", "model.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_exporting_over_a_bundle_leaves_no_file_of_the_old_one_and_readable_weights(
    image_checkpoint: Path, text_checkpoint: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    bundle = tmp_path / "bundle"
    assert export([str(text_checkpoint), str(bundle)]) == 0
    (bundle / "model.onnx").write_bytes(b"an earlier export's graph")
    assert export([str(image_checkpoint), str(bundle)]) == 0
    assert "removed " + str(bundle / "model.onnx") in capsys.readouterr().err
    assert sorted(p.name for p in bundle.iterdir()) == ["config.json", "model.safetensors"]
    config_mode = (bundle / "config.json").stat().st_mode & 0o777
    assert (bundle / "model.safetensors").stat().st_mode & 0o777 == config_mode

    def no_onnx(*args) -> None:
        raise ModuleNotFoundError("--onnx needs onnx")

    (bundle / "model.onnx").write_bytes(b"an earlier export's graph")
    monkeypatch.setattr("vit.export.export_onnx", no_onnx)
    assert export([str(image_checkpoint), str(bundle), "--onnx"]) == 2  # the graph failed
    assert not (bundle / "model.onnx").exists()


@pytest.mark.parametrize("checkpoint", ["image_checkpoint", "text_checkpoint"])
def test_onnx_graph_matches_pytorch_at_any_batch_size(
    checkpoint: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    path = request.getfixturevalue(checkpoint)
    assert export([str(path), str(tmp_path / "bundle"), "--onnx"]) == 0
    session = ort.InferenceSession(str(tmp_path / "bundle" / "model.onnx"))
    saved = load_saved_model(path)
    for batch in (1, 3, 7):
        if saved.spec["modality"] == "image":
            name, inputs = "images", torch.randn(batch, 3, 32, 32)
        else:
            name = "input_ids"
            inputs = torch.randint(5, saved.spec["vocab_size"], (batch, 2 + batch))
            inputs[:, 0] = 2  # [CLS]
            inputs[0, 2:] = saved.spec["pad_id"]
        (logits,) = session.run(None, {name: inputs.numpy()})
        with torch.no_grad():
            expected = saved.model(inputs).numpy()
        np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=1e-4)


def test_broken_bundles_are_one_clear_error(image_checkpoint: Path, tmp_path: Path) -> None:
    good = tmp_path / "good"
    assert export([str(image_checkpoint), str(good)]) == 0

    def broken(name: str, edit) -> Path:
        folder = tmp_path / name
        shutil.copytree(good, folder)
        edit(folder)
        return folder

    def set_config(**changes):
        def edit(folder: Path) -> None:
            config = json.loads((folder / "config.json").read_text())
            config.update(changes)
            (folder / "config.json").write_text(json.dumps(config))
        return edit

    cases = {
        broken("not_json", lambda f: (f / "config.json").write_text("{oops")): "config.json: not readable JSON",
        broken("foreign", set_config(format="something-else")): "not a vit-classifier bundle config",
        broken("future", set_config(format_version=99)): "format version 99, this version of vit reads 1",
        broken("no_weights", lambda f: (f / "model.safetensors").unlink()): "model.safetensors: no such file",
        broken("torn", lambda f: (f / "model.safetensors").write_bytes(b"\x00" * 64)): "not a readable safetensors",
        broken("deeper", set_config(architecture={"variant": "nano", "depth": 3})): "cannot rebuild the model",
        broken("no_classes", set_config(class_names=[])): "lacks class names",
        broken("flat", set_config(preprocessing=32)): "preprocessing missing or not a JSON object",
        good / "model.safetensors": "bare weights, without class names",
    }
    for path, message in cases.items():
        with pytest.raises(CheckpointError, match=message):
            Predictor.load(path)


def test_export_of_a_bad_checkpoint_exits_2_with_one_line(tmp_path: Path, capsys) -> None:
    (tmp_path / "junk.ckpt").write_bytes(b"junk" * 10)
    assert export([str(tmp_path / "junk.ckpt"), str(tmp_path / "out")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith(f"error: {tmp_path / 'junk.ckpt'}")
    assert not (tmp_path / "out").exists()
