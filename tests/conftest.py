"""Shared fixtures: the bundled sample, small models, a private cache folder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "cifar10-sample"


@pytest.fixture(autouse=True)
def _seed_and_isolate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test seeded, single-threaded enough to be fast, caching into its own folder.

    One thread, here and in the processes tests start: on a shared machine two threads per
    process spin against each other and other jobs (a nano training step was 16x slower).
    """
    torch.manual_seed(0)
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("VIT_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def choose_linear_route(monkeypatch: pytest.MonkeyPatch):
    """``choose(value)`` sets ``VIT_CPU_LINEAR`` for one test ("1": large float32 linear layers
    through oneDNN, "0" or "": through F.linear); the route is recomputed."""
    from vit import cpu_linear

    def choose(value: str) -> None:
        monkeypatch.setenv(cpu_linear.ENV_SWITCH, value)
        cpu_linear.enabled.cache_clear()

    yield choose
    cpu_linear.enabled.cache_clear()


def run_benchmark(module: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """``python -m benchmarks.<module> args`` from the repository root, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", *args],
        capture_output=True, text=True, cwd=REPO, timeout=timeout,
    )


def table_rows(stdout: str, first_cell: str) -> list[list[str]]:
    """The stripped cells of the markdown table rows whose first cell starts with ``first_cell``."""
    return [[cell.strip() for cell in line.split("|")[1:-1]] for line in stdout.splitlines()
            if line.startswith(f"| {first_cell}")]


@pytest.fixture
def sample_root() -> Path:
    return SAMPLE


def save_checkpoint(
    path: Path, data_spec: dict, tokenizer_json: str | None = None, **model_options: bool
) -> Path:
    """An untrained nano model saved the way train.py saves one: hyperparameters (with the
    data spec), the ``net.``-prefixed state dict and, for text, the tokenizer."""
    from vit.lit import Classifier

    model = Classifier("nano", data_spec=data_spec, **model_options)
    checkpoint = {"hyper_parameters": dict(model.hparams), "state_dict": model.state_dict()}
    if tokenizer_json is not None:
        checkpoint["tokenizer"] = tokenizer_json
    torch.save(checkpoint, path)
    return path


@pytest.fixture
def image_spec() -> dict:
    """The data spec of CIFAR-10 (32x32, ten classes)."""
    from vit.data import CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD

    return {"modality": "image", "class_names": CIFAR10_CLASSES, "image_size": 32,
            "mean": list(CIFAR10_MEAN), "std": list(CIFAR10_STD)}


@pytest.fixture
def image_checkpoint(tmp_path: Path, image_spec: dict) -> Path:
    """A CIFAR-10-shaped image checkpoint (32x32, ten classes)."""
    return save_checkpoint(tmp_path / "image.ckpt", image_spec)


@pytest.fixture
def text_checkpoint(tmp_path: Path) -> Path:
    """A two-class text checkpoint with a word tokenizer of max_length 12."""
    from vit.tokenizer import TextTokenizer

    texts = ["a gripping and moving film", "dull , slow and far too long", "great acting",
             "the plot makes no sense", "warm funny and clever", "i want my money back"]
    tokenizer = TextTokenizer.train(texts, "word", vocab_size=64, max_length=12)
    spec = {"modality": "text", "class_names": ["negative", "positive"],
            "vocab_size": tokenizer.vocab_size, "max_length": tokenizer.max_length,
            "pad_id": tokenizer.pad_id, "tokenizer_kind": tokenizer.kind,
            "classes_from_labels": False}
    return save_checkpoint(tmp_path / "text.ckpt", spec, tokenizer.to_json())
