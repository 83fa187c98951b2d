"""Benchmarks of this project against its baselines, each ratio measured within one run."""

from __future__ import annotations

import argparse
from pathlib import Path

from vit.data import DataNotFoundError, ImageSource


def image_root(text: str) -> Path:
    """An argparse type: a data root holding images (CIFAR-10's batches or an image folder)."""
    root = Path(text).expanduser()
    try:
        ImageSource(root, "--root")
    except DataNotFoundError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return root
