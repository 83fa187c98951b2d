"""Test accuracy of one image checkpoint four ways: raw or averaged weights, one view or two.

    python -m benchmarks.evaluation_ablation runs/cifar10_cpu/version_0/checkpoints/last.ckpt \
        --root ../shared/data/cifar10-jpeg

A checkpoint written with ``vit.ema.EMA`` holds the moving average as its weights and the raw
weights beside them (``current_model_state``); this scores both, each on the test images alone
and averaged with their mirror images (``--model.flip_average``), so that what the average and
the flip each add is read off one trained model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks import image_root
from vit.augment import normalize
from vit.checkpoint import load_saved_model, torch_load_safely
from vit.data import ImageSource, default_cache_dir, load_split
from vit.model import ImageClassifier


@torch.inference_mode()
def accuracy(model: ImageClassifier, images: torch.Tensor, labels: torch.Tensor, spec: dict,
             batch_size: int = 500) -> float:
    """Top-1 accuracy of ``model`` (in eval mode) on uint8 ``images``."""
    right = 0
    for start in range(0, len(labels), batch_size):
        batch = normalize(images[start : start + batch_size], spec["mean"], spec["std"])
        right += int((model(batch).argmax(-1) == labels[start : start + batch_size]).sum())
    return right / len(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a .ckpt written by train.py")
    parser.add_argument("--root", type=image_root, required=True,
                        help="the data root holding test/")
    args = parser.parse_args()

    saved = load_saved_model(args.checkpoint)
    if saved.spec["modality"] != "image":
        raise SystemExit(f"{args.checkpoint}: a {saved.spec['modality']} model; this scores images.")
    model = saved.model
    images, labels = load_split(ImageSource(args.root), "test", saved.spec["image_size"],
                                default_cache_dir())
    weights = {"as saved": {k: v.clone() for k, v in model.state_dict().items()}}
    raw = torch_load_safely(args.checkpoint).get("current_model_state")
    if raw is not None:
        weights = {"moving average": weights["as saved"],
                   "raw": {k.removeprefix("net."): v for k, v in raw.items() if k.startswith("net.")}}
    print(f"{args.checkpoint}: {len(labels)} test images")
    print("| weights | one view | flip-averaged | flip adds |")
    print("|---|---|---|---|")
    for name, state in weights.items():
        model.load_state_dict(state)
        scores = []
        for flip in (False, True):
            model.flip_average = flip
            scores.append(accuracy(model, images, labels, saved.spec))
        print(f"| {name} | {100 * scores[0]:.2f} % | {100 * scores[1]:.2f} % | "
              f"{100 * (scores[1] - scores[0]):+.2f} |")


if __name__ == "__main__":
    main()
