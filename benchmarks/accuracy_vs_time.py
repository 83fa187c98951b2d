"""Plot validation accuracy against wall time for one or more training runs.

    python -m benchmarks.accuracy_vs_time runs/cifar10_cpu/version_0 --labels "tiny, patch 4" \
        --out benchmarks/cifar10_cpu_accuracy.png

Reads each run's ``metrics.csv`` (written by ``train.py``): the ``val/acc`` of every
validation against its ``time/fit_minutes``, and the run's ``test/acc`` as a marker at the
end of its curve.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_curve(run_dir: Path) -> tuple[list[float], list[float], float | None]:
    """Minutes and validation accuracies of a run, and its test accuracy if it was tested."""
    path = run_dir / "metrics.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass a run folder such as runs/NAME/version_0")
    minutes, accuracies, test = [], [], None
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            if row.get("val/acc") and row.get("time/fit_minutes"):
                minutes.append(float(row["time/fit_minutes"]))
                accuracies.append(100 * float(row["val/acc"]))
            if row.get("test/acc"):
                test = 100 * float(row["test/acc"])
    if not minutes:
        raise ValueError(f"{path} has no rows with both val/acc and time/fit_minutes")
    return minutes, accuracies, test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders holding metrics.csv")
    parser.add_argument("--labels", nargs="+", help="one legend label per run")
    parser.add_argument("--title", default="CIFAR-10 on a 2-core CPU")
    parser.add_argument("--out", type=Path, default=Path("accuracy_vs_time.png"))
    args = parser.parse_args()
    labels = args.labels or [str(run) for run in args.runs]
    if len(labels) != len(args.runs):
        sys.exit(f"error: {len(labels)} --labels for {len(args.runs)} runs: give one per run")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run, label in zip(args.runs, labels):
        try:
            minutes, accuracies, test = read_curve(run)
        except (FileNotFoundError, ValueError) as err:
            sys.exit(f"error: {err}")
        (line,) = ax.plot(minutes, accuracies, marker="o", markersize=3, label=f"{label} (val)")
        if test is not None:
            ax.plot(minutes[-1], test, marker="*", markersize=12, color=line.get_color(),
                    linestyle="none", label=f"{label}: test {test:.1f} %")
    ax.set_xlabel("wall time of fit (minutes)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(args.title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
