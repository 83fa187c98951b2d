"""Kill a training run at random moments, resume it each time, compare with an uninterrupted one.

    python -m benchmarks.kill_resume --kills 20 --epochs 4 --every 5 --out /tmp/kill_resume

The run is ``configs/quickstart.yaml`` with the ``nano`` model on the bundled sample, writing
``last.ckpt`` every ``--every`` steps. It runs once uninterrupted; beside it, the same run is
started with ``--ckpt_path last`` again and again: each start is killed with SIGKILL once it
has trained a random number of steps (one kill lands in the middle of a checkpoint save,
between the write and the rename), then one is stopped with SIGTERM, and the last one runs to
the end. For each
interruption it records the steps trained and the step of the checkpoint the next start
resumes from (the difference is the work lost); at the end, the optimiser steps of both runs
and the accuracy of their final checkpoints on the validation split.

Each training run is a process forked from a server that imported everything once
(``multiprocessing``'s forkserver), so that a start costs seconds, not an import of torch.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from vit.cli import run
from vit.data import ImageDataModule
from vit.fault_tolerance import find_last_checkpoint
from vit.lit import Classifier

REPO = Path(__file__).resolve().parents[1]
TRAIN_IMAGES = 900  # of the sample, after the validation split; the last partial batch is dropped


class Progress(Callback):
    """Write the optimiser step to ``path`` after every training batch (for the harness)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(str(trainer.global_step))
        os.replace(tmp, self.path)


@dataclass
class Interruption:
    signal: str  # "SIGKILL" or "SIGTERM"
    during_save: bool  # killed between a checkpoint's write and its rename
    steps_trained: int  # optimiser steps done when the signal came
    resumed_from_step: int  # step of the checkpoint the next start resumed from
    exit_code: int | None

    @property
    def steps_lost(self) -> int:
        return self.steps_trained - self.resumed_from_step


@dataclass
class Outcome:
    checkpoint: str  # the final last.ckpt
    global_step: int  # its optimiser steps
    val_acc: float  # its accuracy on the whole validation split


def _child(args: list[str], log: str, save_delay: float) -> None:
    """A training run, in a forked process; output goes to ``log``."""
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(out, 1)
    os.dup2(out, 2)
    torch.set_num_threads(1)  # two runs side by side, one core each
    if save_delay:  # hold each checkpoint between its write and its rename
        fsync = os.fsync

        def slow_fsync(fd: int) -> None:
            time.sleep(save_delay)
            fsync(fd)

        os.fsync = slow_fsync
    sys.exit(run(args))


class Harness:
    """Starts, watches and interrupts training runs; their output goes to ``workdir/train.log``."""

    def __init__(
        self, workdir: Path, epochs: int, every: int, seed: int, batch_size: int = 64,
        batches_per_epoch: int | None = None,
    ) -> None:
        self.epochs = epochs
        self.every = every
        self.batch_size = batch_size
        self.batches_per_epoch = batches_per_epoch or TRAIN_IMAGES // batch_size
        self.rng = random.Random(seed)
        self.log = workdir / "train.log"
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(["vit.cli"])

    @property
    def total_steps(self) -> int:
        return self.epochs * self.batches_per_epoch

    def _progress(self, root: Path) -> Path:
        return root.with_name(f"{root.name}.progress")

    def _args(self, root: Path) -> list[str]:
        progress = {"class_path": "benchmarks.kill_resume.Progress",
                    "init_args": {"path": str(self._progress(root))}}
        return [
            "fit", "--config", str(REPO / "configs" / "quickstart.yaml"),
            "--data.root", str(REPO / "data" / "cifar10-sample"),
            "--data.batch_size", str(self.batch_size),
            "--model.variant", "nano", "--trainer.max_epochs", str(self.epochs),
            "--trainer.limit_train_batches", str(self.batches_per_epoch),
            "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.num_sanity_val_steps", "0",
            "--test_after_fit", "false",
            "--checkpoint_every_n_steps", str(self.every), "--ckpt_path", "last",
            f"--trainer.callbacks+={json.dumps(progress)}",
        ]

    def start(self, root: Path, save_delay: float = 0.0) -> multiprocessing.Process:
        """Start a training run (resuming from the last checkpoint under ``root``, if any)."""
        root.parent.mkdir(parents=True, exist_ok=True)
        self._progress(root).unlink(missing_ok=True)
        args = (self._args(root), str(self.log), save_delay)
        process = self.context.Process(target=_child, args=args)
        process.start()
        return process

    def _steps(self, root: Path) -> int:
        try:
            return int(self._progress(root).read_text())
        except (FileNotFoundError, ValueError):
            return -1

    def _wait(self, process: multiprocessing.Process, until, timeout: float) -> bool:
        """Poll until ``until()`` holds (True) or the process ends (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if until():
                return True
            if not process.is_alive():
                return False
            time.sleep(0.005)
        process.kill()
        raise TimeoutError(f"a training run made no progress in {timeout:.0f} s; see {self.log}")

    def finish(self, process: multiprocessing.Process, timeout: float) -> None:
        """Wait for a run to end; raise unless it ended well."""
        process.join(timeout)
        if process.exitcode != 0:
            process.kill()
            raise RuntimeError(f"training exited with {process.exitcode}; see {self.log}")

    def interrupt(
        self, root: Path, sig: signal.Signals, during_save: bool, timeout: float
    ) -> Interruption | None:
        """Start a run; interrupt it after a random number of steps (or during a save).

        Returns None when the run finished before the moment came.
        """
        last = find_last_checkpoint(root)
        resumed = _checkpoint_step(last) if last else 0
        process = self.start(root, save_delay=0.3 if during_save else 0.0)
        if during_save:
            saving = lambda: any(root.glob("**/checkpoints/.*.tmp"))  # noqa: E731
            reached = self._wait(process, lambda: self._steps(root) > resumed and saving(), timeout)
        else:
            target = min(resumed + self.rng.randint(1, self.every + 1), self.total_steps - 1)
            reached = self._wait(process, lambda: self._steps(root) >= target, timeout)
            time.sleep(self.rng.uniform(0, 0.05))  # anywhere inside the next step
        if not reached:
            process.join()
            return None
        os.kill(process.pid, sig)
        process.join(timeout)
        last = find_last_checkpoint(root)
        return Interruption(
            signal=sig.name, during_save=during_save, steps_trained=self._steps(root),
            resumed_from_step=_checkpoint_step(last) if last else 0, exit_code=process.exitcode,
        )

    def outcome(self, root: Path) -> Outcome:
        """Optimiser steps and validation accuracy of the newest checkpoint under ``root``."""
        last = find_last_checkpoint(root)
        return Outcome(str(last), _checkpoint_step(last), val_accuracy(last))


def _checkpoint_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


def weight_difference(a: str | Path, b: str | Path) -> float:
    """Largest absolute difference between the model weights of two checkpoints."""
    first, second = (
        torch.load(p, map_location="cpu", weights_only=True)["state_dict"] for p in (a, b)
    )
    return max(float((first[k] - second[k]).abs().max()) for k in first)


def val_accuracy(checkpoint: Path) -> float:
    """Accuracy of a checkpoint of the quickstart run on the sample's whole validation split."""
    model = Classifier.load_from_checkpoint(checkpoint, map_location="cpu").eval()
    dm = ImageDataModule(str(REPO / "data" / "cifar10-sample"), download=False, batch_size=64)
    dm.setup("fit")
    correct = 0
    with torch.no_grad():
        for batch in dm.val_dataloader():
            images, labels = dm.on_after_batch_transfer(batch, 0)
            correct += int((model(images).argmax(-1) == labels).sum())
    return correct / len(dm.splits["val"])


def kill_and_resume(
    workdir: Path, kills: int, epochs: int = 3, every: int = 5, seed: int = 0, batch_size: int = 64,
    batches_per_epoch: int | None = None, timeout: float = 120.0,
) -> tuple[Outcome, Outcome, list[Interruption]]:
    """The uninterrupted run, the interrupted one, and its interruptions (``kills`` SIGKILLs,
    the second of them during a save, then one SIGTERM). The uninterrupted run trains beside
    the interrupted ones, in its own process."""
    harness = Harness(workdir, epochs, every, seed, batch_size, batches_per_epoch)
    uninterrupted = harness.start(workdir / "uninterrupted")
    root = workdir / "interrupted"
    interruptions: list[Interruption] = []
    plan = [(signal.SIGKILL, i == 1) for i in range(kills)] + [(signal.SIGTERM, False)]
    for sig, during_save in plan:
        stop = harness.interrupt(root, sig, during_save, timeout)
        if stop is None:
            break
        interruptions.append(stop)
    harness.finish(harness.start(root), timeout)
    harness.finish(uninterrupted, timeout)
    return harness.outcome(workdir / "uninterrupted"), harness.outcome(root), interruptions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs before the SIGTERM")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--every", type=int, default=5, help="--checkpoint_every_n_steps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches-per-epoch", type=int, default=None, help="default: all of them")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--out", type=Path, default=Path("/tmp/kill_resume"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from benchmarks import kill_resume  # the forked runs find their code under this name

    start = time.monotonic()
    reference, resumed, interruptions = kill_resume.kill_and_resume(
        args.out, args.kills, args.epochs, args.every, args.seed, args.batch_size,
        args.batches_per_epoch,
    )
    seconds = time.monotonic() - start
    for i, stop in enumerate(interruptions):
        print(f"{i + 1:2d} {stop.signal:7s} {'during save' if stop.during_save else '':11s} "
              f"trained {stop.steps_trained:3d}  resumed from {stop.resumed_from_step:3d}  "
              f"lost {stop.steps_lost}  exit {stop.exit_code}")
    lost = [s.steps_lost for s in interruptions if s.signal == "SIGKILL"]
    print(f"SIGKILLs survived: {len(lost)}, steps lost per kill: mean {sum(lost) / len(lost):.1f}, "
          f"max {max(lost)}")
    print(f"uninterrupted: {reference.global_step} steps, val acc {reference.val_acc:.4f}")
    print(f"interrupted:   {resumed.global_step} steps, val acc {resumed.val_acc:.4f}")
    difference = weight_difference(reference.checkpoint, resumed.checkpoint)
    print(f"largest difference between their weights: {difference:g}")
    print(f"{seconds:.0f} s in all")
    summary = {"reference": asdict(reference), "resumed": asdict(resumed), "seconds": seconds,
               "weight_difference": difference,
               "interruptions": [{**asdict(s), "steps_lost": s.steps_lost} for s in interruptions]}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
