"""Shared fixtures: the bundled sample, small models, a private cache folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "cifar10-sample"


@pytest.fixture(autouse=True)
def _seed_and_isolate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test seeded, single-threaded enough to be fast, caching into its own folder."""
    torch.manual_seed(0)
    monkeypatch.setenv("VIT_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def sample_root() -> Path:
    return SAMPLE


def save_checkpoint(path: Path, data_spec: dict, tokenizer_json: str | None = None) -> Path:
    """An untrained nano model saved the way train.py saves one: hyperparameters (with the
    data spec), the ``net.``-prefixed state dict and, for text, the tokenizer."""
    from vit.lit import Classifier

    model = Classifier("nano", data_spec=data_spec)
    checkpoint = {"hyper_parameters": dict(model.hparams), "state_dict": model.state_dict()}
    if tokenizer_json is not None:
        checkpoint["tokenizer"] = tokenizer_json
    torch.save(checkpoint, path)
    return path


@pytest.fixture
def image_checkpoint(tmp_path: Path) -> Path:
    """A CIFAR-10-shaped image checkpoint (32x32, ten classes)."""
    from vit.data import CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD

    spec = {"modality": "image", "class_names": CIFAR10_CLASSES, "image_size": 32,
            "mean": list(CIFAR10_MEAN), "std": list(CIFAR10_STD)}
    return save_checkpoint(tmp_path / "image.ckpt", spec)
