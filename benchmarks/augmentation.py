"""Per-batch cost of the training augmentation, against torchvision's AutoAugment image by image.

    python -m benchmarks.augmentation --threads 1
    python -m benchmarks.augmentation --device cuda
    python -m benchmarks.augmentation --root ../shared/data/cifar10-jpeg --loader-workers 0 2 --step-ms 30

Three functions on the same uint8 batch, timed in alternation (median of the repeats): torchvision's
``v2.AutoAugment`` applied image by image (the baseline), ``vit.augment.auto_augment`` (the same
policy, images grouped by operation), and the whole training augmentation of
``configs/cifar10.yaml`` (AutoAugment, crop, flip, normalise, random erasing, mixup or CutMix).

With ``--root``, then the training batches of ``vit.data.ImageDataModule`` with that recipe's
augmentation, for each ``--loader-workers`` count: the loop draws a batch, moves it to the
device with Lightning's transfer (from memory that is not page-locked: the loader's stand-in
trainer is no Lightning ``Trainer``) and finishes its augmentation as the training loop does,
and sleeps ``--step-ms`` in place of a device's training step (during which the CPU is free, as
while a GPU computes). Printed per batch: the wall time beyond the step (what the data costs
the loop) and the training process's own CPU time (its threads, not the workers'), medians of
``--repeats`` passes of ``--batches`` batches.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torchvision.transforms import v2

from benchmarks import image_root
from benchmarks.pipeline import TrainingStandIn, training_epochs
from benchmarks.throughput import parse_device, synchronize
from vit.augment import (
    auto_augment,
    mixup_or_cutmix,
    normalize,
    random_crop,
    random_erasing,
    random_hflip,
)
from vit.data import ImageDataModule


def loader_costs(
    root: str, workers: int, batch_size: int, batches: int, repeats: int, step_ms: float,
    device: torch.device,
) -> tuple[float, float]:
    """Median ms per batch beyond the stand-in step (wall) and of the loop's own CPU time."""
    dm = ImageDataModule(root, download=False, batch_size=batch_size, val_fraction=0.1,
                         auto_augment=True, random_erasing=0.25, mixup_alpha=0.8,
                         cutmix_alpha=1.0, num_workers=workers)
    dm.setup("fit")
    dm.trainer = TrainingStandIn()
    batch_stream = training_epochs(dm)

    def one_batch() -> None:
        dm.on_after_batch_transfer(move_data_to_device(next(batch_stream), device), 0)
        synchronize(device)
        time.sleep(step_ms / 1000)

    for _ in range(3):  # warm-up: worker start, first batches
        one_batch()
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        for _ in range(batches):
            one_batch()
        wall.append((time.perf_counter() - start) / batches * 1000 - step_ms)
        cpu.append((time.process_time() - start_cpu) / batches * 1000)
    return statistics.median(wall), statistics.median(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--calls", type=int, default=10, help="calls per timed repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads on the CPU")
    parser.add_argument("--root", type=image_root, default=None,
                        help="CIFAR-10 or an image folder: also time the training loader")
    parser.add_argument("--loader-workers", type=int, nargs="+", default=[0, 2],
                        help="loader worker counts to time (with --root)")
    parser.add_argument("--step-ms", type=float, default=30.0,
                        help="the stand-in device step after each batch (with --root)")
    parser.add_argument("--batches", type=int, default=50, help="batches per pass (with --root)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = parse_device(parser, args.device)
    images = torch.randint(0, 256, (args.batch_size, 3, 32, 32), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 10, (args.batch_size,), device=device)
    policy = v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)

    def per_image() -> None:
        torch.stack([policy(image) for image in images])

    def grouped() -> None:
        auto_augment(images, torch.Generator().manual_seed(0))

    def whole_recipe() -> None:
        generator = torch.Generator().manual_seed(0)
        batch = random_hflip(random_crop(auto_augment(images, generator), 4, generator),
                             generator=generator)
        batch = random_erasing(normalize(batch, (0.5,) * 3, (0.25,) * 3), 0.25, generator)
        mixup_or_cutmix(batch, labels, 10, generator, mixup_alpha=0.8, cutmix_alpha=1.0)

    functions: dict[str, Callable[[], None]] = {
        "torchvision AutoAugment, image by image": per_image,
        "vit.augment.auto_augment, grouped": grouped,
        "whole training augmentation": whole_recipe,
    }
    for fn in functions.values():
        for _ in range(3):
            fn()
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(args.repeats):
        for name, fn in functions.items():
            synchronize(device)
            start = time.perf_counter()
            for _ in range(args.calls):
                fn()
            synchronize(device)
            times[name].append((time.perf_counter() - start) / args.calls * 1000)
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"{torch.get_num_threads()} threads")
    print(f"torch {torch.__version__}, {hardware}, batch {args.batch_size} uint8 32x32, "
          f"median of {args.repeats} interleaved repeats of {args.calls} calls")
    baseline = statistics.median(times["torchvision AutoAugment, image by image"])
    print("| function | ms per batch | speed-up over image by image |")
    print("|---|---|---|")
    for name, measured in times.items():
        median = statistics.median(measured)
        print(f"| {name} | {median:.2f} | {baseline / median:.2f} |")
    if args.root is None:
        return
    print(f"\ntraining loader of {args.root}, batch {args.batch_size}, the augmentation above, "
          f"a {args.step_ms:g} ms stand-in step, median of {args.repeats} passes of "
          f"{args.batches} batches")
    print("| loader workers | ms per batch beyond the step | training process CPU ms per batch |")
    print("|---|---|---|")
    for workers in args.loader_workers:
        wall, cpu = loader_costs(args.root, workers, args.batch_size, args.batches, args.repeats,
                                 args.step_ms, device)
        print(f"| {workers} | {wall:.2f} | {cpu:.2f} |")


if __name__ == "__main__":
    main()
