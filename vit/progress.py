"""How far a training run has got, as a share of its length.

A run's length is its optimiser steps, or its ``--trainer.max_time`` when that ends it first.
The learning-rate schedule and the low-resolution phase of ``vit.data`` both follow it, so a
time-bounded run still completes its warmup, its cosine decay and its change of image size.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import Timer


def find_timer(trainer: L.Trainer) -> Timer | None:
    """The trainer's ``Timer`` callback (present when ``--trainer.max_time`` is set), or None."""
    return next((c for c in trainer.callbacks if isinstance(c, Timer)), None)


def run_progress(step: int, total_steps: int, timer: Timer | None) -> float:
    """Share of the run done after ``step`` of ``total_steps``: of the steps, or of the wall
    time allowed by ``timer`` when that share is larger. 0 at the start, 1 at the end."""
    progress = step / max(1, total_steps)
    remaining = timer.time_remaining("train") if timer is not None else None
    if remaining is not None:
        elapsed = timer.time_elapsed("train")
        progress = max(progress, elapsed / max(elapsed + remaining, 1e-9))
    return progress
