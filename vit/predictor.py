"""Classify images or texts with a trained model: the Python API behind ``vit.classify``.

    predictor = Predictor.load("runs/quickstart/version_0/checkpoints/last.ckpt")
    predictor.classify([Image.open("cat.jpg"), "dog.png"], top_k=3)

The checkpoint (or exported bundle) supplies the class names, the architecture, the image
size and normalisation, and for text the tokenizer; inputs go through the preprocessing the
model was trained with.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from vit.augment import normalize
from vit.checkpoint import SavedModel, load_saved_model
from vit.imageio import load_image, resize_and_center_crop, to_rgb
from vit.tokenizer import is_blank

UNIT_RANGE_SLACK = 0.25
"""How far past [0, 1] a float image may reach before it is refused rather than clipped."""

ImageInput = Image.Image | torch.Tensor | str | Path


class Prediction(NamedTuple):
    """One class and its probability."""

    label: str
    probability: float


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` or ``"auto"`` -> the GPU when there is one, else the CPU; anything else checked."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N.") from None
    if resolved.type == "cpu" or (resolved.type == "mps" and torch.backends.mps.is_available()):
        return resolved  # mps: Apple's GPU, where torch has it
    if resolved.type != "cuda":
        raise ValueError(
            f"device {device!r} is not supported here: use auto, cpu, cuda or cuda:N."
        )
    if not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but this machine has no CUDA GPU: use cpu.")
    count = torch.cuda.device_count()
    if resolved.index is not None and resolved.index >= count:
        raise ValueError(
            f"device {device!r} asked for, but this machine has {count} CUDA GPU(s): "
            f"use cuda:0{f' to cuda:{count - 1}' if count > 1 else ''}."
        )
    return resolved


def check_unit_range(image: torch.Tensor) -> None:
    """Refuse a float image that is not in [0, 1]: one in [0, 255] or already normalised would
    otherwise be clipped into a nearly white or black picture. Resampling's overshoots (bicubic
    rings past the range by a few percent) pass."""
    if not torch.isfinite(image).all():
        raise ValueError("the image tensor holds NaN or infinite values.")
    low, high = float(image.min()), float(image.max())
    if low < -UNIT_RANGE_SLACK or high > 1 + UNIT_RANGE_SLACK:
        raise ValueError(
            f"float image tensors must hold values in [0, 1], this one holds {low:.3g} to "
            f"{high:.3g}: divide values in [0, 255] by 255, and pass images before "
            f"normalisation (the model normalises them itself)."
        )


class Predictor:
    """A trained classifier with the preprocessing it was trained with.

    Args:
        saved: The model and its description, from ``vit.checkpoint.load_saved_model``.
        device: Where the model runs: ``"auto"`` (the GPU when there is one), ``"cpu"``,
            ``"cuda"``, ``"cuda:1"``...
    """

    def __init__(self, saved: SavedModel, device: str | torch.device | None = "auto") -> None:
        self.spec = saved.spec
        self.device = resolve_device(device)
        self.model = saved.model.to(self.device).eval()
        self.tokenizer = saved.tokenizer

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = "auto") -> Predictor:
        """Load a training checkpoint (``.ckpt``) or a bundle folder written by ``vit.export``.

        Raises:
            vit.checkpoint.CheckpointError: the file is missing, corrupt, unsafe or foreign.
        """
        return cls(load_saved_model(path), device)

    @property
    def modality(self) -> str:
        """``"image"`` or ``"text"``."""
        return self.spec["modality"]

    @property
    def class_names(self) -> list[str]:
        return list(self.spec["class_names"])

    def image_tensor(self, image: ImageInput) -> torch.Tensor:
        """One image (file path, PIL image or tensor) -> (3, S, S) uint8 at the model's size.

        Tensors are (3, H, W) or (1, H, W), uint8 in [0, 255] or float in [0, 1] (the small
        overshoots of resampling are clipped).

        Raises:
            vit.imageio.ImageDecodeError: a file cannot be read as an image.
            ValueError: a tensor of another shape or type.
        """
        self._expect("image")
        size = self.spec["image_size"]
        if isinstance(image, (str, Path)):
            array = load_image(image, size)
        elif isinstance(image, Image.Image):
            array = np.asarray(resize_and_center_crop(to_rgb(image), size), dtype=np.uint8)
        elif isinstance(image, torch.Tensor):
            return self._tensor_image(image)
        else:
            raise TypeError(
                f"cannot classify a {type(image).__name__} as an image: pass a file path, a "
                f"PIL image or a (3, H, W) tensor."
            )
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))  # (3, S, S)

    def _tensor_image(self, image: torch.Tensor) -> torch.Tensor:
        if image.ndim != 3 or image.shape[0] not in (1, 3):
            raise ValueError(
                f"image tensors must be (3, H, W) or (1, H, W), got shape {tuple(image.shape)}; "
                f"pass a batch as a (B, 3, H, W) tensor or a list."
            )
        if image.is_floating_point():
            image = image.detach().cpu().float()
            check_unit_range(image)
            image = (image.clamp(0, 1) * 255).round().to(torch.uint8)
        elif image.dtype != torch.uint8:
            raise ValueError(
                f"image tensors must be uint8 in [0, 255] or float in [0, 1], got {image.dtype}."
            )
        image = image.detach().cpu().expand(3, -1, -1)
        size = self.spec["image_size"]
        if image.shape[-2:] != (size, size):
            pil = Image.fromarray(image.permute(1, 2, 0).numpy())
            return self.image_tensor(pil)
        return image.contiguous()

    def encode_text(self, text: str) -> tuple[torch.Tensor, bool]:
        """One text -> ((T,) token ids, whether it was truncated to the model's max_length).

        Raises:
            ValueError: the text is empty or only whitespace.
        """
        self._expect("text")
        if not isinstance(text, str):
            raise TypeError(f"cannot classify a {type(text).__name__} with a text model: pass strings.")
        if is_blank(text):
            raise ValueError("empty or only whitespace: give it at least one visible character.")
        ids, truncated = self.tokenizer.encode_batch([text])
        return ids[0], truncated > 0

    def prepare(self, item: ImageInput) -> torch.Tensor:
        """One input -> the tensor ``collate`` batches: an image, or a text's token ids."""
        if self.modality == "text":
            return self.encode_text(item)[0]
        return self.image_tensor(item)

    def collate(self, prepared: Sequence[torch.Tensor]) -> torch.Tensor:
        """Stack prepared images into (B, 3, S, S), or pad token ids into (B, T) with [PAD]."""
        if self.modality == "image":
            return torch.stack(list(prepared))
        return torch.nn.utils.rnn.pad_sequence(
            list(prepared), batch_first=True, padding_value=self.spec["pad_id"]
        )

    @torch.inference_mode()
    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        """Class probabilities (B, num_classes), on the CPU, for a batch from ``collate``."""
        inputs = batch.to(self.device, non_blocking=True)
        if self.modality == "image":
            inputs = normalize(inputs, self.spec["mean"], self.spec["std"])
        return self.model(inputs).float().softmax(dim=-1).cpu()

    def top_k(self, probabilities: torch.Tensor, k: int) -> list[list[Prediction]]:
        """The ``k`` most probable classes of each row, most probable first."""
        values, indices = probabilities.topk(min(k, probabilities.shape[-1]), dim=-1)
        names = self.spec["class_names"]
        return [
            [Prediction(names[i], p) for i, p in zip(row_indices, row_values)]
            for row_indices, row_values in zip(indices.tolist(), values.tolist())
        ]

    def classify(
        self,
        inputs: Sequence[ImageInput] | ImageInput,
        top_k: int = 5,
        batch_size: int = 64,
    ) -> list[list[Prediction]]:
        """The top-k classes of each input, in order.

        Args:
            inputs: For an image model: file paths, PIL images, (3, H, W) tensors, or one
                (B, 3, H, W) tensor. For a text model: strings. A single input is
                classified as a list of one.
            top_k: Classes returned per input, at most the number of classes.
            batch_size: Inputs per forward pass.

        Raises:
            ValueError: an input does not suit this model (``ImageDecodeError`` for a bad
                image file); nothing is returned then. ``vit.classify`` reports bad inputs
                one by one instead.
        """
        if top_k < 1 or batch_size < 1:
            raise ValueError(f"top_k and batch_size must be at least 1, got {top_k} and {batch_size}.")
        if isinstance(inputs, torch.Tensor) and inputs.ndim not in (3, 4):
            raise ValueError(
                f"a tensor of shape {tuple(inputs.shape)}: pass one (3, H, W) or (1, H, W) image, "
                f"or a (B, 3, H, W) batch (a greyscale (H, W) image as image[None])."
            )
        if isinstance(inputs, (str, Path, Image.Image)) or (
            isinstance(inputs, torch.Tensor) and inputs.ndim == 3
        ):
            inputs = [inputs]
        results: list[list[Prediction]] = []
        items = list(inputs)
        for start in range(0, len(items), batch_size):
            batch = self.collate([self.prepare(x) for x in items[start:start + batch_size]])
            results.extend(self.top_k(self.probabilities(batch), top_k))
        return results

    def _expect(self, modality: str) -> None:
        if self.modality != modality:
            wanted = "strings" if self.modality == "text" else "file paths, PIL images or tensors"
            raise ValueError(
                f"this model classifies {self.modality}s, not {modality}s: pass {wanted}."
            )
