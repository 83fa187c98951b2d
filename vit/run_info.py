"""What a run was made of, saved as ``run_info.json`` beside its ``config.yaml``.

The package versions, the Python, platform, CUDA and GPUs, the command line, the git commit
of the code (and whether the working tree had uncommitted changes), and the checkpoint a run
resumed from: with the resolved configuration that LightningCLI saves, enough to run it again.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

PACKAGES = (
    "vit", "torch", "torchvision", "lightning", "torchmetrics", "timm", "tokenizers",
    "jsonargparse", "safetensors", "numpy", "pillow",
)
RUN_INFO = "run_info.json"


def package_versions() -> dict[str, str | None]:
    """Installed version of each of ``PACKAGES`` (``None`` when one is not installed)."""
    found: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def git_state(folder: Path) -> dict[str, Any] | None:
    """``{"commit": ..., "dirty": ...}`` of the git checkout holding ``folder``, else ``None``."""
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=folder, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}


class RunInfo(Callback):
    """Write ``run_info.json`` into the run's log folder when a fit starts (global rank 0)."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        log_dir = trainer.log_dir  # a broadcast under DDP: every rank must ask
        if not trainer.is_global_zero or log_dir is None:
            return
        info = {
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": sys.argv,
            "resumed_from": str(trainer.ckpt_path) if trainer.ckpt_path else None,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "packages": package_versions(),
            "cuda": torch.version.cuda,
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            "git": git_state(Path(__file__).resolve().parent),
            "world_size": trainer.world_size,
        }
        path = Path(log_dir) / RUN_INFO
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
