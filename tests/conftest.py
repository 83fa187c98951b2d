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
