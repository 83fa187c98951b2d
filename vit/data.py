"""Image data: CIFAR-10 (torchvision download or a local copy) and image folders.

Every split is decoded once into a uint8 tensor, cached on disk (safetensors, keyed by the
files it came from) and served in whole batches; augmentation runs on the batch after it
reaches the device (``vit.augment``), so the training loop never touches PIL. With loader
workers (``--data.init_args.num_workers``), the workers run the uint8 part of it instead
(AutoAugment, crop, flip) on their CPU cores, beside the training step, and the device the
rest (normalisation, random erasing, mixup, CutMix): the same draws.

The order of the training batches and their augmentation are functions of the seed, the
epoch, the batch and the process's rank alone, never of the global random generator; the
data module saves how far into an epoch training got, so a run resumed from a mid-epoch
checkpoint sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import multiprocessing
import os
import sys
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from vit.augment import (
    auto_augment,
    downscale,
    mixup_or_cutmix,
    normalize,
    random_crop,
    random_erasing,
    random_hflip,
)
from vit.errors import ConfigError
from vit.imageio import ImageDecodeError, is_image_file, load_image_or_reason
from vit.progress import find_timer, run_progress

CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_BATCHES = "cifar-10-batches-py"
CACHE_FORMAT = 1  # bump when the cached layout changes
DECODE_CHUNK = 256  # images a decoding process takes at a time
TEST_ORDER_SEED = 0  # the test loader's fixed order, the same for every run


class DataNotFoundError(FileNotFoundError):
    """The data set is not where the configuration says and cannot be fetched."""


def default_cache_dir() -> Path:
    """``$VIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/vit``, else ``~/.cache/vit``."""
    if os.environ.get("VIT_CACHE_DIR"):  # set and not empty
        return Path(os.environ["VIT_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vit"


def _missing_data_message(
    root: Path, reason: str, option: str = "--data.root", offer_download: bool = True
) -> str:
    download = (f"; or, with network access, set --data.download true to fetch CIFAR-10 into "
                f"{root}" if option == "--data.root" and offer_download else "")
    return (
        f"no image data at {option} {root} ({reason}). Point {option} at a local copy: "
        f"torchvision's '{CIFAR10_BATCHES}' folder (or the folder holding it), or an image "
        f"folder laid out as train/<class>/*.jpg and test/<class>/*.jpg{download}."
    )


class ImageSource:
    """Where the images of one data set live: a CIFAR-10 batches folder or an image folder."""

    def __init__(self, root: Path, option: str = "--data.root") -> None:
        """``option`` is the command-line option that named ``root``, for error messages."""
        self.root, self.option = root, option
        self._files: dict[str, list[tuple[Path, int]]] = {}
        if (root / CIFAR10_BATCHES).is_dir():
            self.kind, self.batches_dir = "cifar10", root / CIFAR10_BATCHES
        elif root.name == CIFAR10_BATCHES and root.is_dir():
            self.kind, self.batches_dir = "cifar10", root
        elif (root / "train").is_dir():
            self.kind, self.batches_dir = "folder", None
        else:
            raise DataNotFoundError(_missing_data_message(root, "found no train/ folder", option))
        self.class_names = self._class_names()

    def _class_names(self) -> list[str]:
        if self.kind == "cifar10":
            return list(CIFAR10_CLASSES)
        splits = {s: self._folder_classes(s) for s in ("train", "test") if (self.root / s).is_dir()}
        if not splits["train"]:
            raise DataNotFoundError(
                _missing_data_message(
                    self.root, "train/ holds no class folders with images", self.option
                )
            )
        if len(splits["train"]) == 1:
            raise ConfigError(
                f"{self.root / 'train'} holds one class folder, {splits['train'][0]!r}: a "
                f"classifier needs at least two. Put each class's images in a folder of its own "
                f"(train/cat/*.jpg, train/dog/*.jpg, ...)."
            )
        if "test" in splits and splits["test"] != splits["train"]:
            only_train = sorted(set(splits["train"]) - set(splits["test"]))
            only_test = sorted(set(splits["test"]) - set(splits["train"]))
            raise ConfigError(
                f"class folders differ between {self.root / 'train'} and {self.root / 'test'}: "
                f"only in train: {only_train or 'none'}, only in test: {only_test or 'none'}. "
                f"Give both splits the same class folders."
            )
        return splits["train"]

    def _folder_classes(self, split: str) -> list[str]:
        return sorted(
            d.name for d in (self.root / split).iterdir()
            if d.is_dir() and any(is_image_file(f) for f in d.rglob("*"))
        )

    def has_split(self, split: str) -> bool:
        return self.kind == "cifar10" or (self.root / split).is_dir()

    def files(self, split: str) -> list[tuple[Path, int]]:
        """(path, label) for every image file of an image-folder split, in a fixed order."""
        if split not in self._files:
            self._files[split] = [
                (path, label)
                for label, name in enumerate(self.class_names)
                for path in sorted((self.root / split / name).rglob("*"))
                if is_image_file(path)
            ]
        return self._files[split]

    def warn_if_files_were_skipped(self, split: str, decoded: int, cache_file: Path) -> None:
        """Repeat, for a split read from the cache, that some of its files could not be read."""
        skipped = len(self.files(split)) - decoded if self.kind == "folder" else 0
        if skipped > 0:
            print(f"warning: {skipped} unreadable file(s) in {self.root / split} are left out; "
                  f"delete {cache_file} to decode the split again and see which.")

    def fingerprint(self, split: str, image_size: int) -> str:
        """A key that changes when any file of the split or the decoding changes."""
        h = hashlib.sha256(f"{CACHE_FORMAT}|{self.root.resolve()}|{split}|{image_size}".encode())
        if self.kind == "cifar10":
            listing = sorted(self.batches_dir.iterdir())
        else:
            listing = [path for path, _ in self.files(split)]
        for path in listing:
            stat = path.stat()
            h.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode())
        return h.hexdigest()[:20]

    def decode(self, split: str, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode a split into ((N, 3, S, S) uint8 images, (N,) int64 labels)."""
        if self.kind == "cifar10":
            return self._decode_cifar10(split, image_size)
        files = self.files(split)
        if not files:
            raise DataNotFoundError(
                _missing_data_message(self.root, f"{split}/ holds no images", self.option)
            )

        paths = [path for path, _ in files]
        decode_one = functools.partial(load_image_or_reason, size=image_size)
        bar = dict(total=len(paths), desc=f"decoding {self.root.name}/{split}", unit="img")
        # Processes, not threads: PIL holds the interpreter's lock for much of a small image's
        # decode, and two threads decoded CIFAR's JPEGs slower than one (benchmarks/RESULTS.md).
        # Forked on Linux (the children run PIL alone), where a spawned one imports torch first.
        processes = decoding_processes(len(paths))
        if not processes:
            results = [decode_one(path) for path in tqdm(paths, **bar)]
        else:
            context = multiprocessing.get_context("fork") if sys.platform == "linux" else None
            try:
                with ProcessPoolExecutor(processes, mp_context=context) as pool:
                    results = list(tqdm(pool.map(decode_one, paths, chunksize=DECODE_CHUNK), **bar))
            except BrokenProcessPool:
                raise ImageDecodeError(
                    f"{self.root / split}: a decoding process died, killed for lack of memory "
                    f"or by the image decoder crashing on a file there; free memory and run "
                    f"again, and if it dies again, look for a damaged file."
                ) from None
        failures = [r for r in results if isinstance(r, str)]
        if len(failures) == len(results):
            raise DataNotFoundError(f"no image under {self.root / split} could be read: {failures[0]}")
        if failures:
            print(f"warning: skipped {len(failures)} unreadable file(s) in {self.root / split}, "
                  f"for example {failures[0]}")
        kept = [(array, label) for array, (_, label) in zip(results, files) if not isinstance(array, str)]
        images = torch.from_numpy(np.stack([a for a, _ in kept])).permute(0, 3, 1, 2).contiguous()
        labels = torch.tensor([label for _, label in kept], dtype=torch.int64)
        return images, labels

    def _decode_cifar10(self, split: str, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        from torchvision.datasets import CIFAR10

        try:
            dataset = CIFAR10(str(self.batches_dir.parent), train=split == "train", download=False)
        except RuntimeError as err:  # torchvision's md5 check of the batch files failed
            raise DataNotFoundError(
                f"{self.batches_dir} is incomplete or corrupted ({err}). Delete it and download "
                f"again with --data.download true, or point --data.root at another copy."
            ) from None
        images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()
        if image_size != images.shape[-1]:
            images = torch.nn.functional.interpolate(
                images.float(), size=(image_size, image_size), mode="bicubic", antialias=True
            ).round().clamp(0, 255).to(torch.uint8)
        return images, torch.tensor(dataset.targets, dtype=torch.int64)


def decoding_processes(images: int) -> int:
    """Processes to decode ``images`` images with: one per core this process may run on, at most
    one per ``DECODE_CHUNK`` images and 61 (the most Windows allows); below 2, none."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    processes = min(cores or 1, images // DECODE_CHUNK, 61)
    return processes if processes >= 2 and not multiprocessing.current_process().daemon else 0


def load_split(
    source: ImageSource, split: str, image_size: int, cache_dir: Path | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoded split from the cache, decoding (and caching) it on the first call."""
    if cache_dir is None:
        return source.decode(split, image_size)
    path = cache_dir / f"{source.kind}-{split}-{source.fingerprint(split, image_size)}.safetensors"
    if path.exists():
        try:
            tensors = load_file(path)
            images, labels = tensors["images"], tensors["labels"]
        except Exception:  # a damaged cache file is decoded again, never trusted
            path.unlink(missing_ok=True)
        else:
            source.warn_if_files_were_skipped(split, len(labels), path)
            return images, labels
    images, labels = source.decode(split, image_size)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        save_file({"images": images, "labels": labels}, tmp,
                  metadata={"classes": json.dumps(source.class_names)})
        with contextlib.suppress(OSError):  # safetensors writes 0600; some file systems refuse
            os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)  # atomic: a reader never sees half a file
    except (OSError, SafetensorError) as err:
        print(f"warning: could not write the decoded-data cache in {cache_dir} ({err}); "
              f"set --data.cache_dir to a writable folder to skip decoding next time.")
    finally:
        with contextlib.suppress(OSError):  # a write that failed half way leaves no partial file
            tmp.unlink(missing_ok=True)
    return images, labels


def current_umask() -> int:
    """The process's file-mode creation mask: from Linux's ``/proc/self/status``, elsewhere by
    setting it and setting it back (which another thread creating a file meanwhile would see)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def writable_folder(folder: Path) -> bool:
    """Whether ``folder`` exists or can be made, and files can be written in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


def held_out_count(total: int, val_fraction: float, items: str) -> int:
    """How many of ``total`` training items ``--data.val_fraction`` holds out for validation:
    at least one, and one fewer than all, where the fraction is above 0."""
    count = round(total * val_fraction)
    if val_fraction > 0 and not 0 < count < total:
        raise ConfigError(
            f"--data.val_fraction {val_fraction} of {total} training {items} holds out {count} "
            f"for validation and leaves {total - count} to train on: choose a fraction that "
            f"keeps both, or add more data."
        )
    return count


class BatchTensorDataset(torch.utils.data.Dataset):
    """(images, labels) tensors served a whole batch at a time through ``__getitems__``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices)
        return self.images[index], self.labels[index]


def _batch_as_is(batch: tuple) -> tuple:
    return batch


def feeds_cuda(trainer: object) -> bool:
    """Whether ``trainer`` (a Lightning ``Trainer``, or anything else) trains on a CUDA device.

    Its loaders then page-lock their batches: a copy to the GPU from pageable memory first
    waits for all the work already queued on the GPU, from page-locked memory it does not.
    """
    return isinstance(trainer, L.Trainer) and trainer.strategy.root_device.type == "cuda"


def batch_generator(key: tuple[int, int, int, int]) -> torch.Generator:
    """The CPU generator of a training batch's augmentation, from (seed, rank, epoch, batch)."""
    seed = np.random.SeedSequence(list(key)).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(seed))


@dataclass(frozen=True)
class Uint8Augmentation:
    """The augmentations that work on uint8 pixels: AutoAugment, the random crop, the flip.

    They draw first from a batch's generator, before normalisation, random erasing and mixing,
    so they can run in a loader worker and the device can go on from the generator's state.
    """

    auto_augment: bool
    crop_padding: int
    hflip: bool

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.auto_augment:
            images = auto_augment(images, generator)
        images = random_crop(images, self.crop_padding, generator)
        if self.hflip:
            images = random_hflip(images, generator=generator)
        return images


class GeneratorState:
    """The state a batch's CPU generator reached in a loader worker, for the training process
    to go on drawing from.

    A plain object, not ``bytes`` or a tensor: Lightning's transfer to the device walks into
    every sequence and would rebuild ``bytes`` one byte at a time (about 7 ms a batch for the
    5 kB of a generator's state), and would copy a tensor to the GPU. It leaves this alone.
    """

    __slots__ = ("state",)

    def __init__(self, generator: torch.Generator) -> None:
        self.state = generator.get_state().numpy().tobytes()

    def generator(self) -> torch.Generator:
        """A CPU generator at this state."""
        generator = torch.Generator()
        generator.set_state(torch.frombuffer(bytearray(self.state), dtype=torch.uint8))
        return generator


class AugmentingBatches(BatchTensorDataset):
    """Training batches augmented where they are drawn (in loader workers): each comes with
    the ``GeneratorState`` its generator reached.

    Indices come from an ``EpochSampler`` with a ``batch_size``: (batch key, index) pairs.
    """

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, augment: Uint8Augmentation
    ) -> None:
        super().__init__(images, labels)
        self.augment = augment

    def __getitems__(  # type: ignore[override]
        self, keyed_indices: list[tuple[tuple[int, int, int, int], int]]
    ) -> tuple[torch.Tensor, torch.Tensor, GeneratorState]:
        images, labels = super().__getitems__([index for _, index in keyed_indices])
        generator = batch_generator(keyed_indices[0][0])
        images = self.augment(images, generator)
        return images, labels, GeneratorState(generator)


class EpochSampler(DistributedSampler):
    """This process's share of a data set, reshuffled each epoch from ``(seed, epoch)``.

    A ``DistributedSampler`` (of one replica when training is not distributed), so that
    Lightning keeps it under DDP instead of replacing it, and calls ``set_epoch`` before each
    epoch. ``resume`` makes the next pass start part-way through an epoch's order. Given a
    ``batch_size``, it yields (key, index) pairs instead of indices, the key (seed, rank, epoch,
    batch number) naming the batch the index falls in, for workers that augment (see
    ``AugmentingBatches``).
    """

    def __init__(
        self, dataset: BatchTensorDataset, *, num_replicas: int = 1, rank: int = 0, seed: int = 0,
        batch_size: int | None = None,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.batch_size = batch_size
        self._resume: tuple[int, int] | None = None

    def resume(self, epoch: int, start: int) -> None:
        """Begin the next pass at position ``start`` of the order, if that pass is of ``epoch``."""
        self._resume = (epoch, start)

    def __iter__(self) -> Iterator[int] | Iterator[tuple[tuple[int, int, int, int], int]]:
        indices = list(super().__iter__())
        start = 0
        if self._resume is not None:
            epoch, resume_at = self._resume
            self._resume = None
            if epoch == self.epoch:
                start = resume_at
        if self.batch_size is None:
            return iter(indices[start:])
        return (
            ((self.seed, self.rank, self.epoch, position // self.batch_size), indices[position])
            for position in range(start, len(indices))
        )


class ImageDataModule(L.LightningDataModule):
    """CIFAR-10 or any image folder, decoded once to uint8 and augmented batch-wise.

    Args:
        root: A folder holding torchvision's ``cifar-10-batches-py`` (downloaded here when
            missing and ``download`` is on), that folder itself, or an image folder with
            ``train/<class>/*`` and ``test/<class>/*``.
        download: Fetch CIFAR-10 into ``root`` through torchvision when nothing is there.
        image_size: Side of the square images the model sees; other sizes are resized.
        batch_size: Images per batch (per device under DDP).
        val_fraction: Share of the training images held out for validation (seeded).
        crop_padding: Pixels of zero padding for the random crop; 0 turns cropping off.
        hflip: Random horizontal flips.
        auto_augment: AutoAugment's CIFAR-10 policy on every training image (a loop over the
            batch's images on their device: slower than the batched augmentations).
        random_erasing: Probability of erasing one random rectangle of a training image.
        mixup_alpha: Beta parameter of mixup between training images; 0 turns it off.
        cutmix_alpha: Beta parameter of CutMix; 0 turns it off. With both on, each batch
            takes one of the two. Targets become label mixtures.
        mix_probability: Chance that mixup or CutMix mixes a training batch (timm's
            ``mix_prob``); a batch left unmixed keeps one-hot targets and every other
            augmentation.
        low_res_size: Train on images shrunk to this side (a multiple of the patch size) for
            the first ``low_res_fraction`` of the run: fewer tokens, several times the steps
            per second, the same parameters (positions are resampled). 0 turns it off.
            Validation and test always see ``image_size``.
        low_res_fraction: Share of the run, in steps or in ``--trainer.max_time`` as for the
            learning-rate schedule, trained at ``low_res_size``.
        mean: Per-channel mean used for normalisation, in [0, 1].
        std: Per-channel standard deviation used for normalisation, in [0, 1].
        cache_dir: Where decoded splits are cached; defaults to ``~/.cache/vit``.
        num_workers: DataLoader worker processes. 0: batches are sliced from memory in the
            training process and augmented on the device. More: the workers also run
            AutoAugment, the crop and the flip on their CPU cores while the device trains,
            which a GPU's small steps would otherwise wait for (AutoAugment launches many
            small kernels); on a CPU they would share the training's cores.
        seed: Seed of the train/validation split, of the order of training batches and of
            their augmentation.
    """

    def __init__(
        self,
        root: str = "data/cifar10",
        *,
        download: bool = True,
        image_size: int = 32,
        batch_size: int = 128,
        val_fraction: float = 0.1,
        crop_padding: int = 4,
        hflip: bool = True,
        auto_augment: bool = False,
        random_erasing: float = 0.0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        mix_probability: float = 1.0,
        low_res_size: int = 0,
        low_res_fraction: float = 0.5,
        mean: tuple[float, float, float] = CIFAR10_MEAN,
        std: tuple[float, float, float] = CIFAR10_STD,
        cache_dir: str | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0 <= val_fraction < 1:
            raise ConfigError(f"--data.val_fraction must be in [0, 1), got {val_fraction}.")
        if batch_size < 1:
            raise ConfigError(f"--data.batch_size must be at least 1, got {batch_size}.")
        if image_size < 1:
            raise ConfigError(f"--data.image_size must be at least 1, got {image_size}.")
        if crop_padding < 0:
            raise ConfigError(
                f"--data.crop_padding must be 0 (no crops) or more, got {crop_padding}."
            )
        if not 0 <= random_erasing <= 1:
            raise ConfigError(f"--data.random_erasing is a probability in [0, 1], got {random_erasing}.")
        for name, alpha in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
            if alpha < 0:
                raise ConfigError(f"--data.{name} must be 0 (off) or positive, got {alpha}.")
        if not 0 <= mix_probability <= 1:
            raise ConfigError(
                f"--data.mix_probability is a probability in [0, 1] (the chance a training "
                f"batch is mixed), got {mix_probability}."
            )
        if mix_probability < 1 and mixup_alpha <= 0 and cutmix_alpha <= 0:
            raise ConfigError(
                f"--data.mix_probability {mix_probability} has nothing to mix: set "
                f"--data.mixup_alpha or --data.cutmix_alpha above 0, or leave it at 1."
            )
        if (mixup_alpha > 0 or cutmix_alpha > 0) and batch_size % 2:
            raise ConfigError(
                f"--data.batch_size {batch_size}: mixup and CutMix pair each image with another "
                f"of its batch; choose an even batch size."
            )
        if low_res_size and not 0 < low_res_size < image_size:
            raise ConfigError(
                f"--data.low_res_size {low_res_size} must lie between 0 and --data.image_size "
                f"{image_size} (0 turns the low-resolution phase off)."
            )
        if not 0 <= low_res_fraction <= 1:
            raise ConfigError(f"--data.low_res_fraction must be in [0, 1], got {low_res_fraction}.")
        if num_workers < 0:
            raise ConfigError(
                f"--data.num_workers must be 0 (no worker processes) or more, got {num_workers}."
            )
        self.root = Path(root).expanduser()
        self.download = download
        self.image_size = image_size
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.uint8_augmentation = Uint8Augmentation(auto_augment, crop_padding, hflip)
        self.random_erasing = random_erasing
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.mix_probability = mix_probability
        self.low_res_size, self.low_res_fraction = low_res_size, low_res_fraction
        self._total_steps: int | None = None  # the run's optimiser steps, read at its first batch
        self.mean, self.std = tuple(mean), tuple(std)
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.num_workers = num_workers
        self.seed = seed
        self.class_names = self._find_class_names()
        self.splits: dict[str, BatchTensorDataset] = {}
        self._decoded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # by prepare_data
        self._source: ImageSource | None = None  # what setup read the splits from
        self._sampler: EpochSampler | None = None
        self._epoch, self._batches = 0, 0  # training batches drawn so far in this epoch

    def _find_class_names(self) -> list[str]:
        try:
            return ImageSource(self.root).class_names
        except DataNotFoundError:
            if self.download and not (self.root.exists() and any(self.root.iterdir())):
                return list(CIFAR10_CLASSES)  # fetched in prepare_data
            raise

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def spec(self) -> dict:
        """What a model needs to know of this data, saved in every checkpoint."""
        return {
            "modality": "image",
            "class_names": self.class_names,
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    def prepare_data(self) -> None:
        """Download CIFAR-10 when ``root`` holds no data, and decode the splits into the cache.

        Lightning runs this in one process per machine, before ``setup``: under DDP the other
        processes wait for it and then read the cache instead of each decoding every image with
        a process per core. This process keeps what it decoded for its own ``setup``. Where the
        cache folder cannot be written, every process decodes in its ``setup`` instead.
        """
        if self.splits:
            return
        try:
            source = ImageSource(self.root)
        except DataNotFoundError:
            if not self.download:
                raise
            self._download_cifar10()
            source = ImageSource(self.root)
        if not writable_folder(self.cache_dir):
            return
        for split in ("train", "test"):
            if source.has_split(split) and split not in self._decoded:
                self._decoded[split] = load_split(source, split, self.image_size, self.cache_dir)

    def _download_cifar10(self) -> None:
        from torchvision.datasets import CIFAR10

        try:
            for train in (True, False):
                CIFAR10(str(self.root), train=train, download=True)
        except Exception as err:  # URLError, socket errors, HTTP errors, bad archives
            raise DataNotFoundError(
                _missing_data_message(self.root, f"the CIFAR-10 download failed: {err}",
                                      offer_download=False)
            ) from None

    def _load(self, source: ImageSource, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A split as ``prepare_data`` decoded it in this process, else from the cache or files."""
        if split in self._decoded:
            return self._decoded.pop(split)
        return load_split(source, split, self.image_size, self.cache_dir)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        source = self._source = ImageSource(self.root)
        images, labels = self._load(source, "train")
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.seed))
        num_val = held_out_count(len(labels), self.val_fraction, "images")
        val_idx, train_idx = order[:num_val], order[num_val:]
        self.splits["train"] = BatchTensorDataset(images[train_idx], labels[train_idx])
        self.splits["val"] = BatchTensorDataset(images[val_idx], labels[val_idx])
        if source.has_split("test"):
            self.splits["test"] = BatchTensorDataset(*self._load(source, "test"))

    def _loader(self, split: str, shuffle: bool, mixed_order: bool = False) -> DataLoader:
        """``split``'s loader: shuffled each epoch (training), in the split's own order, or with
        ``mixed_order`` in one fixed shuffled order."""
        if split not in self.splits or len(self.splits[split]) == 0:
            raise DataNotFoundError(
                f"no {split} images under {self.root}"
                + (": raise --data.val_fraction above 0, or pass --trainer.limit_val_batches 0 "
                   "to train without validation." if split == "val" else
                   ": add a test/<class>/ folder beside train/.")
            )
        dataset = self.splits[split]
        sampler = None
        if shuffle:
            trainer = self.trainer if isinstance(self.trainer, L.Trainer) else None
            rank, world_size = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
            in_workers = self.num_workers > 0
            if in_workers:
                dataset = AugmentingBatches(dataset.images, dataset.labels, self.uint8_augmentation)
            sampler = EpochSampler(
                dataset, num_replicas=world_size, rank=rank, seed=self.seed,
                batch_size=self.batch_size if in_workers else None,
            )
            sampler.resume(self._epoch, self._batches * self.batch_size)
            self._sampler = sampler
        elif mixed_order:
            generator = torch.Generator().manual_seed(TEST_ORDER_SEED)
            sampler = torch.randperm(len(dataset), generator=generator).tolist()
        return DataLoader(
            dataset, batch_size=self.batch_size, sampler=sampler, collate_fn=_batch_as_is,
            drop_last=shuffle and len(sampler) > self.batch_size,
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
            pin_memory=feeds_cuda(self.trainer),
            generator=torch.Generator().manual_seed(self.seed),  # leaves the global generator alone
        )

    def has_split(self, split: str) -> bool:
        """Whether the data holds any images of ``split`` ("train", "val" or "test"); reads
        the data first (``setup``) where it has not been read."""
        self.setup()
        return len(self.splits.get(split, ())) > 0

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    # An image folder lists its test images class by class; in a fixed shuffled order the first
    # batches (``--trainer.limit_test_batches``, ``limit_predict_batches``) sample every class,
    # not the first. ``vit.prediction_writer`` writes predictions back in the split's order.
    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False, mixed_order=True)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False, mixed_order=True)

    def predict_item_names(self) -> list[str] | None:
        """The image files of the test split in its order, for an image folder whose files
        all decoded; None for CIFAR-10's batches, or where unreadable files were left out."""
        self.setup()
        source = self._source
        if source is None or source.kind != "folder" or not source.has_split("test"):
            return None
        files = [str(path) for path, _ in source.files("test")]
        return files if len(files) == len(self.splits.get("test", ())) else None

    def on_after_batch_transfer(
        self, batch: tuple[torch.Tensor, ...], dataloader_idx: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment (training only) and normalise the uint8 batch on its device.

        A batch from the loader's workers is (images, labels, generator state): the workers
        ran the uint8 augmentations, and the rest goes on from that state. With mixup or CutMix
        on, training labels become (B, classes) label mixtures.
        """
        images, labels, *worker_state = batch
        if self.trainer is None or not self.trainer.training:
            return normalize(images, self.mean, self.std), labels
        key = self._next_training_batch()
        if worker_state:  # the workers drew from this batch's generator; go on from there
            generator = worker_state[0].generator()
        else:
            generator = batch_generator(key)
            images = self.uint8_augmentation(images, generator)
        images = normalize(images, self.mean, self.std)
        if self._in_low_res_phase():
            images = downscale(images, self.low_res_size)
        if self.random_erasing > 0:
            images = random_erasing(images, self.random_erasing, generator)
        if (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and len(images) % 2 == 0:
            images, labels = mixup_or_cutmix(
                images, labels, self.num_classes, generator,
                mixup_alpha=self.mixup_alpha, cutmix_alpha=self.cutmix_alpha,
                probability=self.mix_probability,
            )
        return images, labels

    def _in_low_res_phase(self) -> bool:
        """Whether this training batch falls in the run's first ``low_res_fraction``."""
        if not self.low_res_size:
            return False
        trainer = self.trainer
        if self._total_steps is None:
            self._total_steps = int(trainer.estimated_stepping_batches)
        progress = run_progress(trainer.global_step, self._total_steps, find_timer(trainer))
        return progress < self.low_res_fraction

    def _next_training_batch(self) -> tuple[int, int, int, int]:
        """Count a training batch; its key (seed, rank, epoch, batch) for ``batch_generator``."""
        epoch, rank = self._sampler.epoch, self._sampler.rank  # Lightning sets the epoch
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, 0
        key = (self.seed, rank, epoch, self._batches)
        self._batches += 1
        return key

    def state_dict(self) -> dict[str, int]:
        """How far training got: the epoch, and how many of its batches were drawn."""
        return {"epoch": self._epoch, "batches": self._batches}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._epoch, self._batches = state_dict["epoch"], state_dict["batches"]
