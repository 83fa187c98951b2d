"""Per-batch cost of the training augmentation, against torchvision's AutoAugment image by image.

    python -m benchmarks.augmentation --threads 1
    python -m benchmarks.augmentation --device cuda

Three functions on the same uint8 batch, timed in alternation (median of the repeats): torchvision's
``v2.AutoAugment`` applied image by image (the baseline), ``vit.augment.auto_augment`` (the same
policy, images grouped by operation), and the whole training augmentation of
``configs/cifar10.yaml`` (AutoAugment, crop, flip, normalise, random erasing, mixup or CutMix).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torchvision.transforms import v2

from benchmarks.throughput import parse_device, synchronize
from vit.augment import (
    auto_augment,
    mixup_or_cutmix,
    normalize,
    random_crop,
    random_erasing,
    random_hflip,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--calls", type=int, default=10, help="calls per timed repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads on the CPU")
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


if __name__ == "__main__":
    main()
