"""Keeping freed memory: reallocating what a step just freed takes no page faults."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vit.allocator import is_glibc

pytestmark = pytest.mark.skipif(not is_glibc(), reason="the malloc policy is glibc's")

# Activations in miniature: 12 MB and up allocated, written and freed, a little larger each time
# (each larger than glibc's default threshold has grown to, so by default each is mapped
# afresh). Prints the median page faults of a cycle (the median: the kernel may reclaim an idle
# page now and then, whatever the policy).
CYCLES = """
import resource, statistics, sys, torch
from vit.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def cycle(size):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    activation = torch.ones(size)
    del activation
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(statistics.median(cycle(3_000_000 + 65_536 * k) for k in range(9)))
"""


def faults_per_cycle(policy: str) -> float:
    command = [sys.executable, "-c", CYCLES, policy]
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    return float(out.stdout)


def test_kept_memory_is_reused_without_page_faults_where_the_default_faults_it_back_in() -> None:
    assert faults_per_cycle("default") > 2500  # each 12 MB mapped afresh: over 2,900 pages
    assert faults_per_cycle("keep") < 1000  # the heap only grows by the 256 KB added: 64-256


def test_train_keeps_freed_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    import vit.cli

    calls = []
    monkeypatch.setattr(vit.cli, "keep_freed_memory", lambda: calls.append(True))
    monkeypatch.setattr(vit.cli, "TrainCLI", lambda args: None)
    vit.cli.main(["fit"])
    assert calls == [True]
