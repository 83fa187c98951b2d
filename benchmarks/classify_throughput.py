"""End-to-end classify throughput against timm's inference path, and the script's accuracy.

    python -m benchmarks.classify_throughput CHECKPOINT --images /tmp/cifar1k/test --repeats 5

Both paths go from image files on disk to written top-5 predictions (CSV), in this process,
from the same checkpoint file: ``vit.classify`` (checkpoint loading, folder walk, threaded
decoding beside batched inference) against the path of timm's ``inference.py``: timm's
``ImageDataset`` and ``create_loader`` (``create_transform``: bicubic resize, centre crop,
normalise) feeding timm's ``VisionTransformer`` holding the checkpoint's weights. Repeats are
interleaved, so that the machine's noise hits both alike; medians and their ratio are printed.
The folder's class subfolders are the labels: the accuracy of the script's predictions is
printed beside timm's, and the whole command (interpreter start and imports included) is
timed once as a subprocess.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from timm.data import ImageDataset, create_loader
from timm.models.vision_transformer import VisionTransformer

from vit.checkpoint import load_saved_model
from vit.classify import main as classify
from vit.model import mirror_averaged


def ours(checkpoint: str, images: str, out: Path, batch_size: int, workers: int) -> None:
    argv = [checkpoint, images, "--format", "csv", "--output", str(out), "--device", "cpu",
            "--batch-size", str(batch_size), "--workers", str(workers)]
    with contextlib.redirect_stderr(io.StringIO()):  # the progress bar
        status = classify(argv)
    if status != 0:
        raise SystemExit(f"vit.classify exited with {status}")


def timm_path(checkpoint: str, images: str, out: Path, batch_size: int, workers: int) -> None:
    saved = load_saved_model(checkpoint)
    spec, arch = saved.spec, saved.architecture
    size = spec["image_size"]
    model = VisionTransformer(
        img_size=size, patch_size=arch["patch_size"], num_classes=len(spec["class_names"]),
        embed_dim=arch["embed_dim"], depth=arch["depth"], num_heads=arch["num_heads"],
        mlp_ratio=arch["mlp_ratio"],
    )
    model.load_state_dict(saved.model.state_dict())
    model.eval()
    dataset = ImageDataset(images)
    loader = create_loader(
        dataset, input_size=(3, size, size), batch_size=batch_size, use_prefetcher=False,
        interpolation="bicubic", mean=tuple(spec["mean"]), std=tuple(spec["std"]),
        num_workers=workers, crop_pct=1.0,
    )
    names = spec["class_names"]

    def logits(inputs: torch.Tensor) -> torch.Tensor:
        return mirror_averaged(model, inputs) if arch.get("flip_average") else model(inputs)

    with open(out, "w", newline="") as file, torch.inference_mode():
        writer = csv.writer(file)
        writer.writerow(["input", "rank", "label", "probability"])
        index = 0
        for inputs, _ in loader:
            top = logits(inputs).softmax(dim=-1).topk(5)
            for values, indices in zip(top.values.tolist(), top.indices.tolist()):
                path = dataset.filename(index, absolute=True)
                writer.writerows([path, r, names[i], f"{p:.6f}"]
                                 for r, (i, p) in enumerate(zip(indices, values), 1))
                index += 1


def accuracy(csv_path: Path) -> tuple[float, int]:
    """Top-1 accuracy against the parent folder's name, and the number of inputs."""
    rows = [r for r in csv.DictReader(open(csv_path)) if r["rank"] == "1"]
    return sum(Path(r["input"]).parent.name == r["label"] for r in rows) / len(rows), len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--images", required=True, help="a folder of <class>/<image> files")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="decoding threads (ours) and loader processes (timm)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    count = sum(1 for p in Path(args.images).rglob("*") if p.is_file())
    tmp = Path(tempfile.mkdtemp())
    paths: dict[str, Callable[[str, str, Path, int, int], None]] = {
        "vit.classify": ours,
        f"timm, {args.workers} loader workers": timm_path,
        "timm, 0 loader workers": timm_path,
    }
    workers = {name: 0 if "0 loader" in name else args.workers for name in paths}
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.repeats):
        for name, run in paths.items():
            out = tmp / f"{len(seconds[name])}-{list(paths).index(name)}.csv"
            start = time.perf_counter()
            run(args.checkpoint, args.images, out, args.batch_size, workers[name])
            seconds[name].append(time.perf_counter() - start)

    print(f"{count} images in {args.images}; torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads, batch {args.batch_size}; median of {args.repeats} interleaved repeats")
    print("| path | images/s | seconds (median) | top-1 accuracy |")
    print("|---|---|---|---|")
    baseline = None
    for name in paths:
        median = statistics.median(seconds[name])
        acc, rows = accuracy(tmp / f"0-{list(paths).index(name)}.csv")
        assert rows == count, f"{name} wrote {rows} predictions for {count} images"
        print(f"| {name} | {count / median:.0f} | {median:.2f} | {acc:.4f} |")
        if name != "vit.classify":
            baseline = max(baseline or 0.0, count / median)
    ours_rate = count / statistics.median(seconds["vit.classify"])
    print(f"vit.classify / fastest timm path: {ours_rate / baseline:.2f}")

    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "vit.classify", args.checkpoint, args.images, "--format", "csv",
         "--output", str(tmp / "command.csv"), "--device", "cpu"],
        check=True, stderr=subprocess.DEVNULL,
    )
    whole = time.perf_counter() - start
    print(f"whole command (python -m vit.classify, interpreter start and imports included): "
          f"{whole:.2f} s, {count / whole:.0f} images/s")


if __name__ == "__main__":
    main()
