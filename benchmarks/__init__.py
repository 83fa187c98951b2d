"""Benchmarks of this project against its baselines, each ratio measured within one run."""

from __future__ import annotations

import argparse
from pathlib import Path

from vit.data import DataNotFoundError, ImageSource
from vit.errors import ConfigError


def image_root(text: str) -> Path:
    """An argparse type: a data root holding images (CIFAR-10's batches or an image folder)."""
    root = Path(text).expanduser()
    try:
        ImageSource(root, "--root")
    except (DataNotFoundError, ConfigError) as err:  # no images; one class; classes differ
        raise argparse.ArgumentTypeError(str(err)) from None
    return root
