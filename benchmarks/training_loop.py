"""The training loop's cost beyond the model, for a recipe as ``train.py fit`` runs it.

    python -m benchmarks.training_loop --config configs/cifar10.yaml \\
        --data.root ../shared/data/cifar10-jpeg --data.init_args.batch_size 128 --model.lr 1e-3
    python -m benchmarks.training_loop --config configs/quickstart.yaml --batches 10 --profile 5

Every option that is not this benchmark's goes to ``train.py fit``: the model, data,
precision, compilation and device are the recipe's (one device: the bare steps exchange no
gradients). It trains ``--epochs`` epochs of ``--batches`` steps without validation, and after
each epoch times as many bare steps on the device (the baseline: the same model, optimiser and
precision on the epoch's first batch, augmented there; the forward, the loss, the backward and
the optimiser's step, nothing else; they train the model too, so later epochs start from
slightly other weights). Printed: ms per step of the loop and of the bare steps, epoch by epoch,
and the median ratio of the two over the epochs after the first (the first compiles and starts
the loader). What the ratio exceeds 1 by is what Lightning's loop, the data, the augmentation,
the metrics and the logging add; the epoch-end checkpoints are written after the clock stops.

``--profile N`` then runs one more epoch and records N of its steps with ``torch.profiler``:
the host's time by operator, where a GPU loop shows whether it waits for the device
(``cudaStreamSynchronize``, ``aten::item``, copies) or launches kernels; ``--trace FILE``
writes those steps as a Chrome trace.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from benchmarks.throughput import synchronize
from vit.cli import TrainCLI, user_error
from vit.errors import positive_int


def bare_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, label_smoothing: float = 0.0,
    precision: Callable[[], AbstractContextManager] = contextlib.nullcontext,
) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """One optimiser step of ``model`` alone on a batch, its forward and loss inside
    ``precision`` (a trainer's autocast): what a step costs without its loop."""

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        with precision():
            loss = F.cross_entropy(model(images), labels, label_smoothing=label_smoothing)
        loss.backward()
        optimizer.step()

    return step


class LoopClock(Callback):
    """Wall time of each of the first ``epochs`` training epochs, and right after each of as
    many bare steps on that epoch's first batch (a recipe may change the image size during the
    run); the device is waited for before each reading."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs
        self.steps: list[int] = []
        self.loop: list[float] = []
        self.bare: list[float] = []
        self._batch: tuple[torch.Tensor, torch.Tensor] | None = None

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._batch = None
        synchronize(module.device)
        self._start = time.perf_counter()

    def on_train_batch_start(
        self, trainer: L.Trainer, module: L.LightningModule, batch: tuple, batch_idx: int
    ) -> None:
        if self._batch is None:  # augmented and on the device, as the training step gets it
            self._batch = (batch[0].detach().clone(), batch[1].detach().clone())

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.current_epoch >= self.epochs:
            return
        synchronize(module.device)
        self.loop.append(time.perf_counter() - self._start)
        self.steps.append(trainer.num_training_batches)
        step = bare_step(module.net, trainer.optimizers[0], module.hparams.label_smoothing,
                         trainer.precision_plugin.forward_context)
        start = time.perf_counter()
        for _ in range(trainer.num_training_batches):
            step(*self._batch)
        synchronize(module.device)
        self.bare.append(time.perf_counter() - start)


class StepProfile(Callback):
    """``torch.profiler`` over the first ``steps`` training steps of the epoch numbered
    ``epoch`` (fewer where the epoch is shorter); ``recorded`` counts them."""

    def __init__(self, epoch: int, steps: int) -> None:
        self.epoch, self.steps = epoch, steps
        self.profiler: torch.profiler.profile | None = None
        self.recorded = 0
        self._running = False

    def on_train_batch_start(
        self, trainer: L.Trainer, module: L.LightningModule, batch: tuple, batch_idx: int
    ) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == 0:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if module.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()
            self._running = True

    def on_train_batch_end(
        self, trainer: L.Trainer, module: L.LightningModule, outputs: object, batch: tuple,
        batch_idx: int,
    ) -> None:
        if self._running:
            self.recorded += 1
            if self.recorded == self.steps:
                self._stop(module)

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self._running:
            self._stop(module)

    def _stop(self, module: L.LightningModule) -> None:
        synchronize(module.device)
        self.profiler.__exit__(None, None, None)
        self._running = False


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Every other option is train.py fit's (--config, --data.*, --model.*, --trainer.*).",
    )
    parser.add_argument("--batches", type=positive_int, default=50,
                        help="steps per epoch (default: 50)")
    parser.add_argument("--epochs", type=positive_int, default=4,
                        help="timed epochs; the first is left out of the median (default: 4)")
    parser.add_argument("--profile", type=positive_int, default=None, metavar="N",
                        help="then profile N steps of one more, untimed epoch")
    parser.add_argument("--trace", default=None, metavar="FILE",
                        help="with --profile: also write the steps as a Chrome trace")
    args, fit_options = parser.parse_known_args(argv)
    if args.trace and not args.profile:
        parser.error("--trace needs --profile N (the steps to record).")
    if args.trace and not Path(args.trace).resolve().parent.is_dir():
        parser.error(f"--trace {args.trace}: its folder does not exist.")
    if args.profile and args.profile > args.batches:
        parser.error(f"--profile {args.profile}: at most --batches ({args.batches}) steps.")

    clock = LoopClock(args.epochs)
    profile = StepProfile(args.epochs, args.profile) if args.profile else None
    # train.py's option errors in a few lines, and none of the warnings about what this run
    # leaves out on purpose (validation, and so the checkpoint's monitored accuracy)
    usage = f"{parser.prog} [--batches N] [--epochs N] [--profile N] [train.py fit options]"
    warnings.filterwarnings("ignore", message=".*args parameter is intended.*")
    warnings.filterwarnings("ignore", message=".*could not find the monitored key.*")
    with tempfile.TemporaryDirectory() as scratch:
        try:
            cli = TrainCLI(args=[
                *fit_options,
                f"--trainer.max_epochs={args.epochs + (1 if profile else 0)}",
                f"--trainer.limit_train_batches={args.batches}",
                "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
                "--trainer.max_time=null", "--trainer.max_steps=-1",
                "--trainer.enable_progress_bar=false",
                f"--trainer.default_root_dir={scratch}",
            ], run=False, parser_kwargs={"usage": usage, "prog": "train.py fit"})
            if cli.trainer.world_size > 1:
                parser.error("the bare steps run on one device without gradient exchange: "
                             "train on one (--trainer.devices 1).")
            cli.trainer.callbacks.extend([clock] + ([profile] if profile else []))
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        except Exception as error:  # a user's error is one line, as in train.py
            found = user_error(error)
            if found is None:
                raise
            sys.exit(f"error: {found}")

    print(f"\ntraining loop against bare steps: {' '.join(fit_options)}")
    print(f"device {cli.trainer.strategy.root_device}, precision {cli.trainer.precision}")
    print("| epoch | steps | loop ms a step | bare ms a step | loop / bare |")
    print("|---|---|---|---|---|")
    for epoch, (steps, loop, bare) in enumerate(zip(clock.steps, clock.loop, clock.bare)):
        print(f"| {epoch} | {steps} | {1000 * loop / steps:.2f} | {1000 * bare / steps:.2f} "
              f"| {loop / bare:.2f} |")
    ratios = [loop / bare for loop, bare in zip(clock.loop, clock.bare)]
    which = f"epochs 1-{len(ratios) - 1}" if len(ratios) > 1 else "the one epoch"
    print(f"loop / bare steps, median of {which}: {statistics.median(ratios[1:] or ratios):.2f}")
    if profile and profile.profiler is not None:
        table = profile.profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
        print(f"\nhost time of {profile.recorded} training steps by operator:\n{table}")
        if args.trace:
            profile.profiler.export_chrome_trace(args.trace)
            print(f"trace written to {args.trace}")


if __name__ == "__main__":
    sys.exit(main())
