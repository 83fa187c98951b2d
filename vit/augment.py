"""Batched image augmentation on whole (B, C, H, W) tensors, on whatever device they are.

One indexing operation crops every image of a batch at its own random offset, one mask erases
a rectangle of its own in every image: no per-sample Python loop and no PIL in the training
loop; AutoAugment transforms together the images that drew the same operation. Every random
draw comes from the ``generator`` passed in, so a batch's augmentation is a function of that
generator's seed alone; timm's ``Mixup`` and ``RandomErasing`` draw from the global
generators instead, which would break the exact mid-epoch resume of ``vit.data``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import v2


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A tensor drawn on the CPU, on ``device``, without making the host wait for a GPU.

    A plain copy to a GPU waits for every kernel already queued there, so each copy in the
    augmentation stopped the host once a step and left the GPU idle while the next work was
    queued. From page-locked memory the copy is queued like a kernel.
    """
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def random_crop(
    images: torch.Tensor, padding: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Zero-pad each side by ``padding`` and crop every image back at its own random offset.

    The batched form of torchvision's ``RandomCrop(size, padding=padding)``.
    """
    if padding == 0:
        return images
    b, _, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))  # (B, C, H + 2p, W + 2p)
    offsets = torch.randint(0, 2 * padding + 1, (2, b, 1), generator=generator)
    offsets = to_device(offsets, images.device)
    rows = offsets[0] + torch.arange(h, device=images.device)  # (B, H)
    cols = offsets[1] + torch.arange(w, device=images.device)  # (B, W)
    batch = torch.arange(b, device=images.device)[:, None, None]
    crops = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return crops.permute(0, 3, 1, 2)


def random_hflip(
    images: torch.Tensor, p: float = 0.5, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Mirror each image left-right with probability ``p``."""
    flip = to_device(torch.rand(images.shape[0], generator=generator) < p, images.device)
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def normalize(
    images: torch.Tensor, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """uint8 (B, C, H, W) in [0, 255] -> float32, standardised per channel."""
    mean_t = to_device(torch.tensor(mean), images.device).view(1, -1, 1, 1) * 255
    std_t = to_device(torch.tensor(std), images.device).view(1, -1, 1, 1) * 255
    return (images.float() - mean_t) / std_t


AugmentPlan = list[list[tuple[str, float]]]
"""Per image, the AutoAugment operations to apply in order: (torchvision's name, magnitude)."""

# AutoAugment's policy table and kernel dispatch are private to torchvision (stable since
# transforms.v2 appeared in 0.15); its public forward takes one image at a time.
_POLICY = v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)


SubPolicy = tuple[tuple[str, float, float, bool], ...]
"""A sub-policy's operations at one image size: (name, probability, magnitude, signed) each."""


@functools.lru_cache(maxsize=8)
def _sub_policies(height: int, width: int) -> tuple[SubPolicy, ...]:
    """The 25 sub-policies of the CIFAR-10 policy, magnitudes computed for this image size."""
    table = []
    for sub_policy in _POLICY._policies:
        operations = []
        for name, probability, level in sub_policy:
            magnitudes_fn, signed = _POLICY._AUGMENTATION_SPACE[name]
            magnitudes = magnitudes_fn(10, height, width)
            magnitude = 0.0 if magnitudes is None else float(magnitudes[level])
            operations.append((name, probability, magnitude, signed))
        table.append(tuple(operations))
    return tuple(table)


def auto_augment_plan(
    batch_size: int, height: int, width: int, generator: torch.Generator
) -> AugmentPlan:
    """Draw AutoAugment's CIFAR-10 policy (Cubuk et al. 2019) for each image of a batch.

    As torchvision's ``AutoAugment`` does per image: one of the 25 sub-policies, then each of
    its two operations with its own probability, and a random sign for signed magnitudes.
    """
    sub_policies = _sub_policies(height, width)
    chosen = torch.randint(len(sub_policies), (batch_size,), generator=generator).tolist()
    coins = torch.rand(batch_size, 2, 2, generator=generator).tolist()  # (image, op, apply/sign)
    return [
        [(name, -magnitude if signed and sign <= 0.5 else magnitude)
         for (name, probability, magnitude, signed), (apply, sign)
         in zip(sub_policies[sub_policy], image_coins) if apply <= probability]
        for sub_policy, image_coins in zip(chosen, coins)
    ]


def apply_auto_augment(images: torch.Tensor, plan: AugmentPlan) -> torch.Tensor:
    """Apply a drawn plan: images that share an operation and magnitude go through together.

    torchvision's kernels take a whole batch with one magnitude, so grouping turns a batch of 128
    into a few dozen kernel calls instead of one call per image and operation (the per-image loop
    of ``v2.AutoAugment``); the result is the same image by image (tested). Measured with
    ``benchmarks/augmentation.py``: 3.6x faster on an H100, about 3x on the CPU.
    """
    augmented = images.clone()
    for step in range(max((len(ops) for ops in plan), default=0)):
        groups: dict[tuple[str, float], list[int]] = {}
        for index, operations in enumerate(plan):
            if step < len(operations):
                groups.setdefault(operations[step], []).append(index)
        for (name, magnitude), members in groups.items():
            index = to_device(torch.tensor(members), images.device)
            augmented[index] = _POLICY._apply_image_or_video_transform(
                augmented[index], name, magnitude, interpolation=_POLICY.interpolation,
                fill=_POLICY._fill,
            )
    return augmented


def auto_augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """AutoAugment's CIFAR-10 policy on a uint8 (B, C, H, W) batch; draws from ``generator``."""
    _, _, height, width = images.shape
    return apply_auto_augment(images, auto_augment_plan(len(images), height, width, generator))


def downscale(images: torch.Tensor, size: int) -> torch.Tensor:
    """Shrink float (B, C, H, W) images to ``size`` x ``size``: each output pixel is the mean
    of the input pixels it covers (``area``; plain average pooling for whole factors)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="area")


def random_erasing(
    images: torch.Tensor,
    p: float,
    generator: torch.Generator,
    *,
    area: tuple[float, float] = (0.02, 1 / 3),
    log_aspect: tuple[float, float] = (math.log(0.3), math.log(1 / 0.3)),
) -> torch.Tensor:
    """Replace one rectangle per image, with probability ``p``, by standard normal noise.

    Zhong et al. (2020), "Random Erasing Data Augmentation", in timm's "pixel" mode, on
    normalised float images: each rectangle covers ``area`` of the image and has a
    log-uniform aspect ratio; rectangles are clipped to the image.
    """
    b, c, h, w = images.shape
    device = images.device
    draws = to_device(torch.rand(5, b, generator=generator), device)
    target = h * w * (area[0] + (area[1] - area[0]) * draws[0])
    aspect = torch.exp(log_aspect[0] + (log_aspect[1] - log_aspect[0]) * draws[1])
    box_h = torch.sqrt(target * aspect).round().clamp(1, h)
    box_w = torch.sqrt(target / aspect).round().clamp(1, w)
    top = ((h - box_h + 1) * draws[2]).floor()
    left = ((w - box_w + 1) * draws[3]).floor()
    rows, cols = torch.arange(h, device=device), torch.arange(w, device=device)
    inside_rows = (rows >= top[:, None]) & (rows < (top + box_h)[:, None])  # (B, H)
    inside_cols = (cols >= left[:, None]) & (cols < (left + box_w)[:, None])  # (B, W)
    mask = inside_rows[:, :, None] & inside_cols[:, None, :] & (draws[4] < p)[:, None, None]
    # The noise is drawn where the images are, by a generator seeded from ``generator``: a
    # batch of 128 CIFAR images would otherwise copy 1.5 MB of CPU noise to the GPU per step.
    noise_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    noise_generator = torch.Generator(device).manual_seed(noise_seed)
    noise = torch.randn(images.shape, generator=noise_generator, device=device, dtype=images.dtype)
    return torch.where(mask[:, None], noise, images)


def mixup_or_cutmix(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    generator: torch.Generator,
    *,
    mixup_alpha: float = 0.0,
    cutmix_alpha: float = 0.0,
    probability: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix each image with the batch's mirror-order partner: (images, (B, classes) targets).

    Zhang et al. (2018) mixup blends whole images with weight ``lam ~ Beta(alpha, alpha)``;
    Yun et al. (2019) CutMix pastes a box of area ``1 - lam`` from the partner. When both are
    on, each batch takes one of the two with equal odds (timm's ``Mixup`` in batch mode, with
    the label weight corrected to the box's clipped area). Targets are the label mix. A batch
    is mixed with ``probability`` (timm's ``mix_prob``), else left as it is, its targets one-hot.
    """
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        raise ValueError("mixup_or_cutmix needs mixup_alpha or cutmix_alpha above 0.")
    if probability < 1 and bool(torch.rand(1, generator=generator) >= probability):
        return images, F.one_hot(labels, num_classes).to(images.dtype)
    use_cutmix = cutmix_alpha > 0 and (
        mixup_alpha <= 0 or bool(torch.rand(1, generator=generator) < 0.5)
    )
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))  # torch's Beta takes no generator
    partner = images.flip(0)
    if use_cutmix:
        h, w = images.shape[-2:]
        cut = math.sqrt(1.0 - lam)
        centre = torch.rand(2, generator=generator)
        cy, cx = int(centre[0] * h), int(centre[1] * w)
        top, bottom = max(cy - int(h * cut) // 2, 0), min(cy + int(h * cut) // 2, h)
        left, right = max(cx - int(w * cut) // 2, 0), min(cx + int(w * cut) // 2, w)
        images = images.clone()
        images[..., top:bottom, left:right] = partner[..., top:bottom, left:right]
        lam = 1.0 - (bottom - top) * (right - left) / (h * w)
    else:
        images = images * lam + partner * (1.0 - lam)
    one_hot = F.one_hot(labels, num_classes).to(images.dtype)
    return images, one_hot * lam + one_hot.flip(0) * (1.0 - lam)
