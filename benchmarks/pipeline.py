"""The training data pipeline against torchvision's, and the epoch overhead of ours.

    python -m benchmarks.pipeline --root ../shared/data/cifar10-jpeg --batches 100

1. Images/s of training batches, ready on the device (augmented, normalised float): this
   project's decoded uint8 cache with batched crop and flip, against torchvision's
   ``ImageFolder`` with per-sample ``RandomCrop(padding=4)``, ``RandomHorizontalFlip``,
   ``ToTensor`` and ``Normalize`` through a ``DataLoader`` (``--workers`` processes, started
   before and stopped after each of its timings, so that they never decode while ours is
   timed). Interleaved repeats, median, ratio.
2. Epoch overhead: the wall time of ``--batches`` training steps fed by the pipeline, divided
   by the time of the same model steps on one batch already in memory, minus one; then the
   same for a whole Lightning training epoch of ``train.py``'s ``Classifier`` (loader,
   augmentation, metrics, logging and progress bar included) against as many bare steps
   timed right after each epoch, epoch by epoch.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections.abc import Iterator

import lightning as L
import torch
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from benchmarks import image_root
from benchmarks.training_loop import LoopClock, bare_step
from vit.data import CIFAR10_MEAN, CIFAR10_STD, ImageDataModule
from vit.lit import Classifier
from vit.model import ImageClassifier, encoder_config


class TrainingStandIn:
    """Stands in for a Trainer in its training loop, so the data module augments."""

    training = True


def training_epochs(dm: ImageDataModule) -> Iterator[tuple]:
    """The data module's training batches as its loader gives them, epoch after epoch, each pass
    a new epoch as Lightning's loop sets it (else the data module would take every pass for the
    epoch it has been counting batches of, and resume it where that count ended)."""
    loader = dm.train_dataloader()
    for epoch in itertools.count(dm.state_dict()["epoch"] + 1):
        loader.sampler.set_epoch(epoch)
        yield from loader


def ours_batches(dm: ImageDataModule) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Training batches augmented and normalised as the training loop gets them, without end."""
    for batch in training_epochs(dm):
        yield dm.on_after_batch_transfer(batch, 0)


def torchvision_loader(root: str, batch_size: int, workers: int) -> DataLoader:
    transform = transforms.Compose([
        transforms.RandomCrop(32, padding=4),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD),
    ])
    folder = datasets.ImageFolder(f"{root}/train", transform=transform)
    return DataLoader(folder, batch_size=batch_size, shuffle=True, num_workers=workers,
                      drop_last=True)


def rate(batches, n: int, batch_size: int) -> float:
    start = time.perf_counter()
    for _ in itertools.islice(batches, n):
        pass
    return n * batch_size / (time.perf_counter() - start)


def loader_rate(loader: DataLoader, n: int, batch_size: int) -> float:
    """Images/s of ``n`` batches from a fresh pass over ``loader``, its workers started and its
    first batch taken before the clock (a data set of fewer batches is passed over again, each
    pass starting its workers on the clock). The workers are shut down afterwards: left
    running, they would go on decoding their next batches while the other pipeline is timed."""
    batches = itertools.chain.from_iterable(itertools.repeat(loader))
    next(batches)
    result = rate(batches, n, batch_size)
    del batches  # joins the worker processes
    return result


def lightning_overhead(
    dm: ImageDataModule, variant: str, n: int, epochs: int
) -> tuple[float, float, float]:
    """The median ratio of a Lightning epoch of ``n`` steps to the ``n`` bare steps timed right
    after it, minus one, over the epochs after the first; and the two medians in seconds."""
    module = Classifier(variant, data_spec=dm.spec)
    clock = LoopClock(epochs)
    trainer = L.Trainer(
        max_epochs=epochs, limit_train_batches=n, limit_val_batches=0, logger=False,
        enable_checkpointing=False, callbacks=[clock], log_every_n_steps=10,
    )
    trainer.fit(module, datamodule=dm)
    epoch_times, bare_times = clock.loop[1:] or clock.loop, clock.bare[1:] or clock.bare
    overhead = statistics.median(e / b for e, b in zip(epoch_times, bare_times)) - 1
    return overhead, statistics.median(epoch_times), statistics.median(bare_times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=image_root, default="data/cifar10-sample")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=50, help="batches per timed repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="torchvision DataLoader workers")
    parser.add_argument("--variant", default="tiny", help="model for the epoch-overhead part")
    args = parser.parse_args()

    dm = ImageDataModule(args.root, download=False, batch_size=args.batch_size)
    dm.setup("fit")  # decodes once, or reads the cache
    dm.trainer = TrainingStandIn()

    ours, loader = ours_batches(dm), torchvision_loader(args.root, args.batch_size, args.workers)
    timers = {
        "ours": lambda batches: rate(ours, batches, args.batch_size),
        "torchvision": lambda batches: loader_rate(loader, batches, args.batch_size),
    }
    for timer in timers.values():  # warm up: caches hot
        timer(3)
    rates: dict[str, list[float]] = {name: [] for name in timers}
    for _ in range(args.repeats):
        for name, timer in timers.items():
            rates[name].append(timer(args.batches))
    median = {name: statistics.median(r) for name, r in rates.items()}
    print(f"pipeline, {args.root}, batch {args.batch_size}, median of {args.repeats} interleaved "
          f"repeats of {args.batches} batches; torchvision with {args.workers} workers")
    print("| pipeline | images/s |\n|---|---|")
    for name, value in median.items():
        print(f"| {name} | {value:.0f} |")
    print(f"ours / torchvision: {median['ours'] / median['torchvision']:.1f}")

    model = ImageClassifier(image_size=32, patch_size=4, num_classes=dm.num_classes,
                            encoder=encoder_config(args.variant))
    step = bare_step(model, torch.optim.AdamW(model.parameters(), lr=1e-4))

    fixed = next(ours_batches(dm))
    step(*fixed)  # warm up: kernels built or loaded, memory allocated, before either clock
    n = min(args.batches, len(dm.train_dataloader()))
    fed, alone = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for images, labels in itertools.islice(ours_batches(dm), n):
            step(images, labels)
        fed.append(time.perf_counter() - start)
        start = time.perf_counter()
        for _ in range(n):
            step(*fixed)
        alone.append(time.perf_counter() - start)
    overhead = statistics.median(f / a for f, a in zip(fed, alone)) - 1
    print(f"epoch overhead ({args.variant}, {n} steps): {100 * overhead:.1f} % "
          f"(fed {statistics.median(fed):.2f} s vs model alone {statistics.median(alone):.2f} s)")

    overhead, epoch, bare = lightning_overhead(dm, args.variant, n, epochs=args.repeats + 1)
    print(f"Lightning epoch overhead ({args.variant}, {n} steps, median of {args.repeats} epochs "
          f"after the first, each against the bare steps right after it): {100 * overhead:.1f} % "
          f"(epoch {epoch:.2f} s vs bare steps {bare:.2f} s, medians)")


if __name__ == "__main__":
    main()
