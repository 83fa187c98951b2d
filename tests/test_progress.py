"""A run's progress, shared by the learning-rate schedule and the low-resolution phase."""

from __future__ import annotations

import pytest

from vit.progress import run_progress


class StubTimer:
    """Answers like Lightning's ``Timer``: seconds elapsed and left (None without a limit)."""

    def __init__(self, elapsed: float, remaining: float | None) -> None:
        self.elapsed, self.remaining = elapsed, remaining

    def time_elapsed(self, stage: str) -> float:
        return self.elapsed

    def time_remaining(self, stage: str) -> float | None:
        return self.remaining


def test_progress_counts_steps_without_a_time_limit() -> None:
    assert run_progress(25, 100, None) == 0.25
    assert run_progress(25, 100, StubTimer(elapsed=90.0, remaining=None)) == 0.25


@pytest.mark.parametrize("elapsed,expected", [(60.0, 0.6), (10.0, 0.25)], ids=["time-ahead", "steps-ahead"])
def test_progress_under_a_time_limit_is_the_larger_share(elapsed: float, expected: float) -> None:
    timer = StubTimer(elapsed=elapsed, remaining=100.0 - elapsed)
    assert run_progress(25, 100, timer) == pytest.approx(expected)
