"""Measurements of a token classifier on a test set: accuracy, positional probes and cost.

The positional probes ask how much a model leans on token order: its accuracy once each
sample's tokens are shuffled (patches moved around the image; words around the sentence,
[CLS] and [SEP] kept in place), and once the learned positional embeddings of the tokens are
zeroed (CLS's own position kept, since it carries no order).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from einops import rearrange
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from vit.model import ImageClassifier, TokenClassifier


@dataclass
class EvalSet:
    """Model-ready test inputs: normalised (N, 3, S, S) images or (N, T) ids padded with ``pad_id``."""

    inputs: torch.Tensor
    labels: torch.Tensor
    pad_id: int | None = None  # None for images

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(inputs, labels) batches in order; text padding trimmed to each batch's longest."""
        for start in range(0, len(self), batch_size):
            inputs = self.inputs[start : start + batch_size]
            if self.pad_id is not None:
                inputs = inputs[:, : int((inputs != self.pad_id).sum(dim=1).max())]
            yield inputs, self.labels[start : start + batch_size]


def tokens_per_sample(model: TokenClassifier, data: EvalSet) -> torch.Tensor:
    """(N,) tokens the encoder sees per sample, CLS included (padding not counted)."""
    if isinstance(model, ImageClassifier):
        return torch.full((len(data),), 1 + model.patch_embed.num_patches)
    return (data.inputs != data.pad_id).sum(dim=1)  # the tokenizer's [CLS] stands for cls_token


@torch.inference_mode()
def accuracy(model: TokenClassifier, data: EvalSet, batch_size: int = 256) -> float:
    """Share of ``data`` that ``model`` classifies correctly."""
    model.eval()
    correct = sum(
        int((model(inputs).argmax(dim=-1) == labels).sum())
        for inputs, labels in data.batches(batch_size)
    )
    return correct / len(data)


def shuffle_tokens(
    model: TokenClassifier,
    inputs: torch.Tensor,
    generator: torch.Generator,
    pad_id: int | None = None,
) -> torch.Tensor:
    """``inputs`` with each sample's tokens in a random order: image patches or text ids."""
    if isinstance(model, ImageClassifier):
        p = model.patch_embed.patch_size
        patches = rearrange(inputs, "b c (gh p) (gw q) -> b (gh gw) c p q", p=p, q=p)
        order = torch.rand(patches.shape[:2], generator=generator).argsort(dim=1)
        patches = patches[torch.arange(len(patches))[:, None], order]
        return rearrange(
            patches, "b (gh gw) c p q -> b c (gh p) (gw q)", gh=model.patch_embed.grid_size
        )
    shuffled = inputs.clone()
    for row, length in zip(shuffled, (inputs != pad_id).sum(dim=1).tolist()):
        inner = torch.randperm(max(length - 2, 0), generator=generator) + 1  # [CLS] ... [SEP] kept
        row[1 : length - 1] = row[inner]
    return shuffled


@contextmanager
def positions_removed(model: TokenClassifier) -> Iterator[None]:
    """Within the block, the tokens' positional embeddings are zero (CLS's is kept)."""
    saved = model.pos_embed.detach().clone()
    with torch.no_grad():
        model.pos_embed[:, 1:] = 0
    try:
        yield
    finally:
        with torch.no_grad():
            model.pos_embed.copy_(saved)


def positional_probes(model: TokenClassifier, data: EvalSet, seed: int = 0) -> dict[str, float]:
    """Test accuracy as it is, with each sample's tokens shuffled, and without positions."""
    generator = torch.Generator().manual_seed(seed)
    shuffled = EvalSet(
        shuffle_tokens(model, data.inputs, generator, data.pad_id), data.labels, data.pad_id
    )
    with positions_removed(model):
        no_positions = accuracy(model, data)
    return {
        "accuracy": accuracy(model, data),
        "shuffled": accuracy(model, shuffled),
        "no_positions": no_positions,
    }


def parameter_counts(model: TokenClassifier) -> dict[str, int]:
    """Parameters of the front end, of CLS + positions, of the shared encoder and of the head."""
    front = model.patch_embed if isinstance(model, ImageClassifier) else model.token_embed
    count = lambda module: sum(p.numel() for p in module.parameters())
    return {
        "front_end": count(front),
        "cls_and_positions": model.cls_token.numel() + model.pos_embed.numel(),
        "encoder": count(model.blocks),
        "norm_and_head": count(model.norm) + count(model.head),
    }


def flops_per_sample(model: TokenClassifier, sample: torch.Tensor) -> int:
    """Floating-point operations (a multiply-add counts 2) of one forward pass on ``sample`` (1, ...).

    Counted through SDPA's math backend: its matrix products are visible to the counter,
    where a fused CPU kernel would count as zero.
    """
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH), torch.inference_mode():
        model(sample)
    return counter.get_total_flops()


@torch.inference_mode()
def throughput(
    model: TokenClassifier, data: EvalSet, batch_size: int = 64, seconds: float = 1.0
) -> dict[str, float]:
    """Forward-pass samples/s and tokens/s on this machine, over whole passes of ``data``."""
    model.eval()
    tokens = tokens_per_sample(model, data)
    model(next(data.batches(batch_size))[0])  # warm-up
    samples = counted = 0
    start = time.perf_counter()
    while True:
        for (inputs, _), begin in zip(data.batches(batch_size), range(0, len(data), batch_size)):
            model(inputs)
            samples += len(inputs)
            counted += int(tokens[begin : begin + batch_size].sum())
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return {"samples_per_s": samples / elapsed, "tokens_per_s": counted / elapsed}
