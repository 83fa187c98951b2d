"""The image data module: folder and CIFAR layouts, the uint8 cache, batched augmentation, errors."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from PIL import Image
from safetensors import SafetensorError
from torchvision.transforms import v2

import vit.data
from conftest import run_benchmark
from vit.augment import (
    apply_auto_augment,
    auto_augment,
    auto_augment_plan,
    downscale,
    mixup_or_cutmix,
    normalize,
    random_crop,
    random_erasing,
    random_hflip,
)
from vit.data import DataNotFoundError, ImageDataModule, ImageSource, default_cache_dir, load_split
from vit.errors import ConfigError
from vit.imageio import ImageDecodeError, load_image


def make_folder(root: Path, classes: dict[str, int], split: str = "train", size=(40, 30), mode="RGB") -> None:
    rng = np.random.default_rng(0)
    for name, count in classes.items():
        (root / split / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            array = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(array).convert(mode).save(root / split / name / f"{i}.png")


def test_bundled_sample_decodes_to_uint8_with_split(sample_root: Path) -> None:
    dm = ImageDataModule(str(sample_root), download=False, val_fraction=0.1)
    dm.setup("fit")
    assert dm.class_names[:3] == ["airplane", "automobile", "bird"] and dm.num_classes == 10
    train, val, test = dm.splits["train"], dm.splits["val"], dm.splits["test"]
    assert (len(train), len(val), len(test)) == (900, 100, 200)
    assert train.images.dtype == torch.uint8 and train.images.shape[1:] == (3, 32, 32)
    assert torch.bincount(test.labels).tolist() == [20] * 10


def test_first_test_batch_samples_every_class_not_the_first_folder(tmp_path: Path) -> None:
    make_folder(tmp_path, {"a": 2, "b": 2, "c": 2})
    make_folder(tmp_path, {"a": 8, "b": 8, "c": 8}, split="test", size=(8, 8))
    orders = []
    for seed in (0, 1):
        dm = ImageDataModule(str(tmp_path), download=False, val_fraction=0.0, batch_size=8,
                             cache_dir=str(tmp_path / "cache"), seed=seed)
        dm.setup("test")
        batches = list(dm.test_dataloader())
        assert len(set(batches[0][1].tolist())) == 3  # in file order the first batch is all "a"
        labels = torch.cat([labels for _, labels in batches])
        assert torch.bincount(labels).tolist() == [8, 8, 8]  # every image, once
        orders.append(torch.cat([images for images, _ in batches]))
        # prediction in the same order (vit.prediction_writer sorts its rows back)
        predicted = torch.cat([labels for _, labels in dm.predict_dataloader()])
        assert predicted.tolist() == labels.tolist()
    assert torch.equal(*orders)  # the same order, whatever the training seed


def test_second_setup_reads_the_cache_not_the_images(sample_root: Path, tmp_path: Path, monkeypatch) -> None:
    ImageDataModule(str(sample_root), download=False, cache_dir=str(tmp_path)).setup("fit")
    assert len(list(tmp_path.glob("*.safetensors"))) == 2  # train and test
    monkeypatch.setattr(ImageSource, "decode", lambda *a, **k: pytest.fail("decoded again"))
    dm = ImageDataModule(str(sample_root), download=False, cache_dir=str(tmp_path))
    dm.setup("fit")
    assert len(dm.splits["train"]) == 900


def test_prepare_data_decodes_once_for_every_process_of_a_machine(
    tmp_path: Path, monkeypatch
) -> None:
    make_folder(tmp_path, {"a": 3, "b": 3})
    make_folder(tmp_path, {"a": 2, "b": 2}, split="test")
    options = dict(download=False, val_fraction=0.0, cache_dir=str(tmp_path / "cache"))
    first = ImageDataModule(str(tmp_path), **options)
    first.prepare_data()  # Lightning: one process per machine, before every process's setup
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2
    monkeypatch.setattr(ImageSource, "decode", lambda *a, **k: pytest.fail("decoded again"))
    first.setup("fit")  # what it decoded, kept in memory
    other = ImageDataModule(str(tmp_path), **options)
    other.setup("fit")  # another DDP process: the cache
    for dm in (first, other):
        assert (len(dm.splits["train"]), len(dm.splits["test"])) == (6, 4)
    assert torch.equal(first.splits["test"].images, other.splits["test"].images)
    first.prepare_data()  # a later trainer.test: nothing to do
    assert not first._decoded


def test_without_a_writable_cache_every_process_decodes_in_setup(
    tmp_path: Path, capsys
) -> None:
    make_folder(tmp_path, {"a": 2, "b": 2})
    (tmp_path / "not_a_folder").write_text("")
    dm = ImageDataModule(str(tmp_path), download=False, val_fraction=0.0,
                         cache_dir=str(tmp_path / "not_a_folder" / "cache"))
    dm.prepare_data()  # decoding here would only make the other processes decode after it
    assert not dm._decoded
    dm.setup("fit")
    assert len(dm.splits["train"]) == 4
    assert "could not write the decoded-data cache" in capsys.readouterr().out


def test_a_cache_write_that_safetensors_refuses_warns_and_trains_on(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    """A folder that exists but cannot be written (a read-only mount, where root passes the
    permission check) makes safetensors raise its own error, not an OSError."""
    make_folder(tmp_path, {"a": 2, "b": 2})

    def refused(*args, **kwargs) -> None:
        raise SafetensorError("Read-only file system (os error 30)")

    monkeypatch.setattr(vit.data, "save_file", refused)
    images, labels = load_split(ImageSource(tmp_path), "train", 8, tmp_path / "cache")
    assert images.shape == (4, 3, 8, 8) and labels.tolist() == [0, 0, 1, 1]
    assert "could not write the decoded-data cache" in capsys.readouterr().out
    assert list((tmp_path / "cache").iterdir()) == []


def test_cache_files_take_the_umask_not_safetensors_private_mode(tmp_path: Path) -> None:
    make_folder(tmp_path, {"a": 2, "b": 2})
    mask = os.umask(0o027)
    try:
        load_split(ImageSource(tmp_path), "train", 8, tmp_path / "cache")
    finally:
        os.umask(mask)
    (written,) = (tmp_path / "cache").iterdir()
    assert written.stat().st_mode & 0o777 == 0o640


def test_an_empty_cache_variable_means_the_default_cache(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("VIT_CACHE_DIR", "")
    assert default_cache_dir() == tmp_path / "vit"
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    assert default_cache_dir() == Path.home() / ".cache" / "vit"
    monkeypatch.setenv("VIT_CACHE_DIR", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"


def test_one_class_folder_is_refused(tmp_path: Path) -> None:
    make_folder(tmp_path, {"images": 3})
    with pytest.raises(ConfigError, match=r"holds one class folder, 'images': a classifier needs "
                                          r"at least two"):
        ImageDataModule(str(tmp_path), download=False)


def test_cache_key_changes_when_a_file_changes(tmp_path: Path) -> None:
    root = tmp_path / "data"
    make_folder(root, {"a": 2, "b": 2})
    source = ImageSource(root)
    before = source.fingerprint("train", 32)
    make_folder(root, {"a": 3})
    assert ImageSource(root).fingerprint("train", 32) != before


def test_folders_of_any_size_and_mode_become_rgb_at_image_size(tmp_path: Path) -> None:
    make_folder(tmp_path, {"cats": 3}, size=(50, 20), mode="L")
    make_folder(tmp_path, {"dogs": 3}, size=(8, 8), mode="RGBA")
    make_folder(tmp_path, {"cats": 1, "dogs": 1}, split="test", size=(64, 64), mode="P")
    dm = ImageDataModule(str(tmp_path), download=False, image_size=24, val_fraction=0.0,
                         cache_dir=str(tmp_path / "cache"))
    dm.setup("fit")
    assert dm.class_names == ["cats", "dogs"]
    assert dm.splits["train"].images.shape == (6, 3, 24, 24)
    assert dm.splits["test"].images.shape == (2, 3, 24, 24)


def test_cifar_batches_folder_is_read(tmp_path: Path, monkeypatch) -> None:
    batches = tmp_path / "cifar-10-batches-py"
    batches.mkdir()
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        data = rng.integers(0, 255, (4, 3072), dtype=np.uint8)
        with open(batches / name, "wb") as f:
            pickle.dump({"data": data, "labels": [0, 1, 2, 3]}, f)
    with open(batches / "batches.meta", "wb") as f:
        pickle.dump({"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog",
                                      "frog", "horse", "ship", "truck"]}, f)
    import torchvision.datasets.cifar as tv_cifar

    with pytest.raises(DataNotFoundError, match="incomplete or corrupted"):  # md5s are checked
        ImageDataModule(str(tmp_path), download=False, cache_dir=None).setup("fit")
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a: True)  # not the official bytes
    for root in (tmp_path, batches):  # the folder holding the batches, or the batches folder
        dm = ImageDataModule(str(root), download=False, val_fraction=0.0, cache_dir=None)
        dm.setup("fit")
        assert dm.splits["train"].images.shape == (20, 3, 32, 32)
        assert dm.splits["test"].labels.tolist() == [0, 1, 2, 3]


def test_missing_data_without_network_says_how_to_point_at_a_copy(tmp_path: Path, monkeypatch) -> None:
    import torchvision.datasets.utils as tv_utils

    def offline(*args, **kwargs):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tv_utils, "download_url", offline)
    dm = ImageDataModule(str(tmp_path / "nowhere"), download=True)
    with pytest.raises(DataNotFoundError, match=r"download failed.*Point --data.root at a local copy.*cifar-10-batches-py") as failed:
        dm.prepare_data()
    assert "--data.download true" not in str(failed.value)  # it was set, and the network failed
    with pytest.raises(DataNotFoundError, match="found no train/ folder.*--data.download true"):
        ImageDataModule(str(tmp_path / "nowhere"), download=False)


def test_class_folders_that_differ_between_train_and_test_are_named(tmp_path: Path) -> None:
    make_folder(tmp_path, {"cats": 1, "dogs": 1})
    make_folder(tmp_path, {"cats": 1, "birds": 1}, split="test")
    with pytest.raises(ValueError, match=r"only in train: \['dogs'\], only in test: \['birds'\]"):
        ImageDataModule(str(tmp_path), download=False)


def test_unreadable_training_file_is_skipped_with_a_warning(tmp_path: Path, capsys) -> None:
    make_folder(tmp_path, {"a": 2, "b": 2})
    (tmp_path / "train" / "a" / "broken.jpg").write_bytes(b"not a jpeg")
    dm = ImageDataModule(str(tmp_path), download=False, val_fraction=0.0, cache_dir=None)
    dm.setup("fit")
    assert len(dm.splits["train"]) == 4
    assert "broken.jpg" in capsys.readouterr().out


def test_a_split_read_from_the_cache_still_says_files_were_skipped(tmp_path: Path, capsys) -> None:
    make_folder(tmp_path, {"a": 2, "b": 2})
    (tmp_path / "train" / "a" / "broken.jpg").write_bytes(b"not a jpeg")
    cache = tmp_path / "cache"
    load_split(ImageSource(tmp_path), "train", 8, cache)
    capsys.readouterr()
    images, _ = load_split(ImageSource(tmp_path), "train", 8, cache)
    (cache_file,) = cache.iterdir()
    assert len(images) == 4
    assert (f"1 unreadable file(s) in {tmp_path / 'train'} are left out; delete {cache_file}"
            in capsys.readouterr().out)
    (tmp_path / "train" / "a" / "broken.jpg").unlink()  # a new fingerprint: decoded afresh
    load_split(ImageSource(tmp_path), "train", 8, cache)
    load_split(ImageSource(tmp_path), "train", 8, cache)
    assert "unreadable" not in capsys.readouterr().out


@pytest.mark.parametrize("chunk", [2, 10_000])  # decoding processes, or decoding in-process
def test_images_decode_alike_in_processes_and_in_process(tmp_path: Path, capsys, monkeypatch,
                                                         chunk: int) -> None:
    make_folder(tmp_path, {"a": 6, "b": 6})
    (tmp_path / "train" / "b" / "broken.jpg").write_bytes(b"not a jpeg")
    monkeypatch.setattr(vit.data, "DECODE_CHUNK", chunk)
    images, labels = ImageSource(tmp_path).decode("train", 8)
    assert "broken.jpg" in capsys.readouterr().out
    expected = [load_image(path, 8) for path in sorted((tmp_path / "train").glob("*/*.png"))]
    assert torch.equal(images, torch.from_numpy(np.stack(expected)).permute(0, 3, 1, 2))
    assert labels.tolist() == [0] * 6 + [1] * 6


def _decoder_crash(path: Path, size: int) -> None:
    os._exit(1)  # as a process dies when the image decoder crashes or memory runs out


def test_a_decoding_process_that_dies_is_named_in_one_message(tmp_path: Path, monkeypatch) -> None:
    make_folder(tmp_path, {"a": 6, "b": 6})
    monkeypatch.setattr(vit.data, "DECODE_CHUNK", 2)
    if not vit.data.decoding_processes(12):
        pytest.skip("one core: the images decode in this process")
    monkeypatch.setattr(vit.data, "load_image_or_reason", _decoder_crash)
    with pytest.raises(ImageDecodeError, match="a decoding process died"):
        ImageSource(tmp_path).decode("train", 8)


def test_random_crop_moves_pixels_per_sample_and_keeps_content() -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(1, 256, (64, 3, 8, 8), dtype=torch.uint8)
    crops = random_crop(images, padding=2, generator=g)
    assert crops.shape == images.shape and crops.dtype == torch.uint8
    moved = [not torch.equal(c, i) for c, i in zip(crops, images)]
    assert 0 < sum(moved) < 64  # offsets differ per image; (2, 2) leaves an image in place
    for crop, image in zip(crops, images):  # each crop is a shifted window of its own image
        padded = torch.nn.functional.pad(image, (2, 2, 2, 2))
        assert any(torch.equal(padded[:, y:y + 8, x:x + 8], crop) for y in range(5) for x in range(5))


def test_random_hflip_mirrors_some_images_exactly() -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 4, 4), dtype=torch.uint8)
    flipped = random_hflip(images, generator=g)
    mirrored = [torch.equal(f, i.flip(-1)) for f, i in zip(flipped, images)]
    same = [torch.equal(f, i) for f, i in zip(flipped, images)]
    assert all(m or s for m, s in zip(mirrored, same)) and 10 < sum(mirrored) < 54


def test_training_batches_are_augmented_and_labels_stay_with_their_images(sample_root: Path) -> None:
    dm = ImageDataModule(str(sample_root), download=False, batch_size=32)
    dm.setup("fit")

    class Training:  # stands in for a Trainer in its training loop
        training = True

    dm.trainer = Training()
    images, labels = next(iter(dm.train_dataloader()))
    augmented, same_labels = dm.on_after_batch_transfer((images, labels), 0)
    assert same_labels is labels and augmented.dtype == torch.float32
    plain = normalize(images, dm.mean, dm.std)
    assert not torch.allclose(augmented, plain)
    lookup = {bytes(img.numpy()): int(lbl) for img, lbl in zip(dm.splits["train"].images, dm.splits["train"].labels)}
    assert [lookup[bytes(img.numpy())] for img in images] == labels.tolist()


def test_a_resumed_epoch_draws_the_batches_and_augmentations_an_uninterrupted_one_would(sample_root: Path) -> None:
    class Training:  # stands in for a Trainer in its training loop
        training = True

    def epoch_batches(dm: ImageDataModule, epoch: int) -> list[torch.Tensor]:
        dm.trainer = Training()
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)  # as Lightning does before each epoch
        return [dm.on_after_batch_transfer(batch, 0)[0] for batch in loader]

    whole = ImageDataModule(str(sample_root), download=False, batch_size=64)
    whole.setup("fit")
    first, second = epoch_batches(whole, 0), epoch_batches(whole, 1)
    assert len(second) == 14 and not torch.equal(first[0], second[0])  # reshuffled each epoch

    resumed = ImageDataModule(str(sample_root), download=False, batch_size=64)
    resumed.setup("fit")
    resumed.load_state_dict({"epoch": 1, "batches": 5})  # a checkpoint 5 batches into epoch 1
    rest = epoch_batches(resumed, 1)
    assert len(rest) == 9 and all(torch.equal(a, b) for a, b in zip(rest, second[5:]))
    assert resumed.state_dict() == {"epoch": 1, "batches": 14}


def test_loader_workers_augment_the_same_batches_as_the_device_and_resume_alike(sample_root: Path) -> None:
    class Training:  # stands in for a Trainer in its training loop
        training = True

    options = dict(download=False, batch_size=64, auto_augment=True, random_erasing=0.5,
                   mixup_alpha=0.8, cutmix_alpha=1.0, mix_probability=0.5)

    def epoch_batches(num_workers: int, resume_at: int = 0) -> list[tuple[torch.Tensor, ...]]:
        dm = ImageDataModule(str(sample_root), num_workers=num_workers, **options)
        dm.setup("fit")
        dm.load_state_dict({"epoch": 1, "batches": resume_at})
        dm.trainer = Training()
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(1)  # as Lightning does before each epoch
        batches = []
        for batch in loader:
            assert len(batch) == (3 if num_workers else 2)  # workers send their generator's state
            moved = move_data_to_device(batch, torch.device("cpu"))  # as the trainer does
            if num_workers:  # passed as it is, not taken apart as a sequence
                assert moved[2] is batch[2]
            batches.append(dm.on_after_batch_transfer(moved, 0))
        assert dm.state_dict() == {"epoch": 1, "batches": 14}
        return batches

    on_device, in_workers = epoch_batches(0), epoch_batches(2)
    assert len(on_device) == len(in_workers) == 14
    for (images, targets), (worker_images, worker_targets) in zip(on_device, in_workers):
        assert torch.equal(images, worker_images) and torch.equal(targets, worker_targets)
    resumed = epoch_batches(2, resume_at=5)
    assert len(resumed) == 9
    for (images, targets), (resumed_images, resumed_targets) in zip(on_device[5:], resumed):
        assert torch.equal(images, resumed_images) and torch.equal(targets, resumed_targets)


def test_loaders_page_lock_their_batches_only_for_a_gpu(sample_root: Path, monkeypatch) -> None:
    dm = ImageDataModule(str(sample_root), download=False)
    dm.setup("fit")
    dm.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False)
    assert not dm.train_dataloader().pin_memory and not dm.val_dataloader().pin_memory
    on_gpu = property(lambda _: torch.device("cuda", 0))
    monkeypatch.setattr(type(dm.trainer.strategy), "root_device", on_gpu)
    assert dm.train_dataloader().pin_memory and dm.val_dataloader().pin_memory


def test_negative_worker_count_is_named(sample_root: Path) -> None:
    message = "--data.num_workers must be 0 (no worker processes) or more, got -1"
    with pytest.raises(ConfigError, match=re.escape(message)):
        ImageDataModule(str(sample_root), download=False, num_workers=-1)


def test_random_erasing_fills_one_clipped_rectangle_in_the_chosen_images() -> None:
    images = torch.zeros(200, 3, 32, 32)
    erased = random_erasing(images, 0.5, torch.Generator().manual_seed(1))
    changed = (erased != 0).all(dim=1)  # (B, H, W): noise in every channel of an erased pixel
    hit = changed.flatten(1).any(dim=1)
    assert 60 < int(hit.sum()) < 140  # about half of the images
    for mask in changed[hit]:
        rows, cols = mask.any(dim=1).nonzero(), mask.any(dim=0).nonzero()
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert int(mask.sum()) == int(box) and 0 < int(box) <= 0.4 * 32 * 32  # one rectangle
    again = random_erasing(images, 0.5, torch.Generator().manual_seed(1))
    torch.testing.assert_close(again, erased)


@pytest.mark.parametrize("alphas", [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)], ids=["mixup", "cutmix", "either"])
def test_mixed_targets_are_the_shares_of_each_image_in_the_mixture(alphas: tuple[float, float]) -> None:
    batch = 8
    labels = torch.arange(batch)
    images = labels.float().view(-1, 1, 1, 1).expand(batch, 3, 16, 16)  # image i is all i
    for seed in range(10):
        mixed, targets = mixup_or_cutmix(
            images, labels, batch, torch.Generator().manual_seed(seed),
            mixup_alpha=alphas[0], cutmix_alpha=alphas[1],
        )
        torch.testing.assert_close(targets.sum(dim=1), torch.ones(batch))
        # each image's mean pixel is its targets' weighted class index, for blends and pastes alike
        torch.testing.assert_close(mixed.mean(dim=(1, 2, 3)), targets @ labels.float())
        assert (targets > 0).sum(dim=1).max() <= 2


def test_mix_probability_leaves_that_share_of_batches_as_they_are() -> None:
    images, labels = torch.rand(8, 3, 16, 16), torch.arange(8)
    one_hot = torch.eye(8)

    def mix(seed: int, probability: float) -> tuple[torch.Tensor, torch.Tensor]:
        return mixup_or_cutmix(images, labels, 8, torch.Generator().manual_seed(seed),
                               mixup_alpha=0.8, cutmix_alpha=1.0, probability=probability)

    for seed in range(5):
        kept, targets = mix(seed, 0.0)
        assert kept is images and torch.equal(targets, one_hot)
        assert not torch.equal(mix(seed, 1.0)[1], one_hot)
    mixed = [not torch.equal(mix(seed, 0.5)[1], one_hot) for seed in range(200)]
    assert 80 <= sum(mixed) <= 120


def test_auto_augment_is_seeded_by_its_generator_and_leaves_the_global_one_alone() -> None:
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    state = torch.get_rng_state()
    first = auto_augment(images, torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), state)
    assert first.dtype == torch.uint8 and first.shape == images.shape
    assert not torch.equal(first, images)
    assert torch.equal(auto_augment(images, torch.Generator().manual_seed(3)), first)


def test_batched_auto_augment_equals_torchvision_image_by_image() -> None:
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    plan = auto_augment_plan(len(images), 32, 32, torch.Generator().manual_seed(5))
    operations = {name for ops in plan for name, _ in ops}
    assert len(operations) >= 10 and max(len(ops) for ops in plan) == 2
    policy = v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)
    batched = apply_auto_augment(images, plan)
    for image, ops, result in zip(images, plan, batched):
        for name, magnitude in ops:
            image = policy._apply_image_or_video_transform(
                image, name, magnitude, interpolation=policy.interpolation, fill=policy._fill
            )
        assert torch.equal(result, image), ops


def test_mixing_options_give_label_mixtures_in_training_only(sample_root: Path) -> None:
    dm = ImageDataModule(str(sample_root), download=False, batch_size=32, auto_augment=True,
                         random_erasing=0.25, mixup_alpha=0.8, cutmix_alpha=1.0)
    dm.setup("fit")

    class Loop:  # stands in for a Trainer
        training = True

    dm.trainer = Loop()
    images, labels = next(iter(dm.train_dataloader()))
    augmented, targets = dm.on_after_batch_transfer((images, labels), 0)
    assert augmented.shape == (32, 3, 32, 32) and targets.shape == (32, 10)
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(32))
    Loop.training = False
    _, val_labels = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)
    assert val_labels.dtype == torch.int64 and val_labels.ndim == 1


def test_low_resolution_phase_shrinks_training_batches_for_its_share_of_the_run(sample_root: Path) -> None:
    dm = ImageDataModule(str(sample_root), download=False, batch_size=8, low_res_size=16,
                         low_res_fraction=0.5)
    dm.setup("fit")

    class Loop:  # stands in for a Trainer 4 steps into a run of 10
        training, global_step, estimated_stepping_batches, callbacks = True, 4, 10, []

    dm.trainer = Loop()
    batch = next(iter(dm.train_dataloader()))
    assert dm.on_after_batch_transfer(batch, 0)[0].shape == (8, 3, 16, 16)
    Loop.global_step = 5  # half the run: full size from here on
    assert dm.on_after_batch_transfer(batch, 0)[0].shape == (8, 3, 32, 32)
    Loop.global_step, Loop.training = 0, False  # validation always sees the full size
    assert dm.on_after_batch_transfer(batch, 0)[0].shape == (8, 3, 32, 32)


def test_downscale_averages_neighbouring_pixels() -> None:
    images = torch.arange(16.0).view(1, 1, 4, 4).expand(2, 3, 4, 4)
    small = downscale(images, 2)
    assert small.shape == (2, 3, 2, 2)
    torch.testing.assert_close(small[0, 0], torch.tensor([[2.5, 4.5], [10.5, 12.5]]))
    assert downscale(images, 4) is images


@pytest.mark.parametrize("options,message", [
    ({"low_res_size": 32}, "--data.low_res_size 32 must lie between 0 and --data.image_size 32"),
    ({"low_res_fraction": 1.5}, "--data.low_res_fraction must be in [0, 1], got 1.5"),
    ({"mixup_alpha": 0.8, "batch_size": 33}, "--data.batch_size 33: mixup and CutMix pair"),
    ({"random_erasing": 1.5}, "--data.random_erasing is a probability in [0, 1], got 1.5"),
    ({"cutmix_alpha": -1.0}, "--data.cutmix_alpha must be 0 (off) or positive, got -1.0"),
    ({"mix_probability": 1.5}, "--data.mix_probability is a probability in [0, 1]"),
    ({"mix_probability": -0.1}, "--data.mix_probability is a probability in [0, 1]"),
    ({"mix_probability": 0.5}, "--data.mix_probability 0.5 has nothing to mix: set --data.mixup_alpha"),
])
def test_bad_augmentation_options_are_named(sample_root: Path, options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        ImageDataModule(str(sample_root), download=False, **options)


def test_a_benchmark_given_a_root_without_images_says_so_in_one_line(tmp_path: Path) -> None:
    done = run_benchmark("pipeline", "--root", str(tmp_path))  # its --root is benchmarks.image_root
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert f"error: argument --root: no image data at --root {tmp_path} (found no train/ folder)" \
        in done.stderr
