"""The matched-budget experiment: patch tokens and text tokens under one training budget.

Both models get the same encoder, the same number of tokens per sample (an image of S x S
pixels cut into patches of S / sqrt(tokens); every text padded or cut to ``tokens`` tokens
after [CLS]), the same optimiser (AdamW, decay on weight matrices only), the same schedule
(linear warmup, then cosine decay), the same batch size and the same number of steps. No
augmentation on either side, so that only the tokens differ. Each trained model then goes
through the positional probes of ``vit.measure``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from vit.augment import normalize
from vit.checkpoint import SavedModel, save_bundle
from vit.data import CIFAR10_MEAN, CIFAR10_STD, ImageSource, default_cache_dir, load_split
from vit.errors import ConfigError
from vit.measure import EvalSet, parameter_counts, positional_probes, tokens_per_sample
from vit.model import TokenClassifier, build_model
from vit.optimizers import takes_weight_decay
from vit.text_data import TextTable, is_integer_label, label_classes, label_key
from vit.tokenizer import TextTokenizer


@dataclass(frozen=True)
class Budget:
    """What both models share."""

    variant: str = "nano"  # encoder size, from vit.model.VARIANTS
    tokens: int = 64  # tokens per sample besides CLS; a square number for images
    steps: int = 30  # optimiser steps
    batch_size: int = 32  # samples per step
    lr: float = 1e-3  # peak learning rate
    weight_decay: float = 0.05  # AdamW decay on weight matrices
    warmup_fraction: float = 0.1  # share of the steps spent warming up
    seed: int = 0  # model initialisation and batch order


def image_split(
    root: Path, split: str, image_size: int, option: str = "--image-root"
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(N, 3, S, S) normalised CIFAR-statistics images, labels and class names of one split
    (``option``: the command-line option that named ``root``, for error messages)."""
    source = ImageSource(root, option)
    images, labels = load_split(source, split, image_size, default_cache_dir())
    return normalize(images, CIFAR10_MEAN, CIFAR10_STD), labels, source.class_names


def encode_texts(
    table: TextTable,
    tokenizer: TextTokenizer,
    class_names: list[str],
    *,
    classes_from_labels: bool | None,
    length: int | None = None,
    limit: int | None = None,
) -> EvalSet:
    """The first ``limit`` rows of ``table`` encoded; with ``length``, cut or [PAD]-padded to it.

    Labels map to ``class_names`` as they did in training: with ``classes_from_labels`` the
    classes are the training labels themselves (``--data.class_names null``) and a label is its
    own class's name; otherwise integer labels index into the names. ``None`` (a model saved
    before its spec recorded this) reads integer class names as labels.
    """
    if classes_from_labels is None:
        classes_from_labels = all(is_integer_label(name) for name in class_names)
    if classes_from_labels:
        index = {label_key(name): i for i, name in enumerate(class_names)}
    else:
        _, index = label_classes(table.labels, class_names)
    ids, _ = tokenizer.encode_batch(table.texts[:limit])
    if length is not None:
        ids = torch.nn.functional.pad(
            ids[:, :length], (0, max(0, length - ids.shape[1])), value=tokenizer.pad_id
        )
    keys = [label_key(label) for label in table.labels[:limit]]
    missing = sorted(set(keys) - set(index))
    if missing:
        raise ConfigError(
            f"{table.path} has labels {missing[:10]} that the model's classes "
            f"{class_names} do not cover."
        )
    return EvalSet(ids, torch.tensor([index[key] for key in keys]), tokenizer.pad_id)


def train(model: TokenClassifier, data: EvalSet, budget: Budget) -> dict[str, float]:
    """``budget.steps`` AdamW steps on random batches of ``data``; the last losses and the time."""
    decay = [p for n, p in model.named_parameters() if takes_weight_decay(n, p)]
    keep = [p for n, p in model.named_parameters() if not takes_weight_decay(n, p)]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": budget.weight_decay},
            {"params": keep, "weight_decay": 0.0},
        ],
        lr=budget.lr,
    )
    warmup = max(1, round(budget.warmup_fraction * budget.steps))

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, budget.steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    generator = torch.Generator().manual_seed(budget.seed)
    model.train()
    losses = []
    start = time.perf_counter()
    for _ in range(budget.steps):
        batch = torch.randint(len(data), (budget.batch_size,), generator=generator)
        loss = torch.nn.functional.cross_entropy(model(data.inputs[batch]), data.labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    tail = losses[-max(1, len(losses) // 10) :]
    return {"train_seconds": time.perf_counter() - start, "final_train_loss": sum(tail) / len(tail)}


def _row(
    model: TokenClassifier, name: str, train_set: EvalSet, test_set: EvalSet, budget: Budget
) -> dict[str, Any]:
    torch.manual_seed(budget.seed)
    fit = train(model, train_set, budget)
    counts = parameter_counts(model)
    probes = positional_probes(model, test_set, budget.seed)
    majority = int(torch.bincount(test_set.labels).max()) / len(test_set)
    return {
        "modality": name,
        "train_samples": len(train_set),
        "test_samples": len(test_set),
        "tokens_per_sample": 1 + budget.tokens,
        "unpadded_tokens_mean": float(tokens_per_sample(model, test_set).float().mean()),
        "encoder_parameters": counts["encoder"],
        "total_parameters": sum(counts.values()),
        **fit,
        "test_accuracy": probes["accuracy"],
        "shuffled_accuracy": probes["shuffled"],
        "no_positions_accuracy": probes["no_positions"],
        "majority_class_accuracy": majority,
    }


def run_matched(
    image_root: Path,
    text_root: Path,
    budget: Budget,
    *,
    text_train_limit: int | None = 5000,
    tokenizer_kind: str = "wordpiece",
    vocab_size: int = 8000,
    save_dir: Path | None = None,
    image_option: str = "--image-root",
) -> dict[str, Any]:
    """Train an image and a text model under ``budget``; one result row for each.

    Args:
        image_root: An image folder (train/ and test/) or a CIFAR-10 batches folder.
        text_root: A folder with train.tsv and test.tsv (SST-2 layout).
        budget: What both share.
        text_train_limit: Use only the first this many training texts (None: all).
        tokenizer_kind: The text tokenizer.
        vocab_size: The text tokenizer's vocabulary.
        save_dir: Where to write the two trained models as bundles (``image/``, ``text/``),
            which ``vit.classify`` and ``vit.compare --image-checkpoint`` read.
        image_option: The command-line option that named ``image_root``, for error messages.
    """
    grid = math.isqrt(budget.tokens)
    if grid * grid != budget.tokens:
        raise ConfigError(
            f"--tokens {budget.tokens} is not a square number: images need a g x g patch grid "
            f"(for example 16, 64 or 256)."
        )
    image_size = 32
    if image_size % grid:
        raise ConfigError(
            f"--tokens {budget.tokens} gives a {grid}x{grid} grid that does not tile "
            f"{image_size}x{image_size} images: use 4, 16, 64, 256 or 1024 tokens."
        )
    train_images, train_labels, classes = image_split(image_root, "train", image_size, image_option)
    test_images, test_labels, _ = image_split(image_root, "test", image_size, image_option)
    image_spec = {
        "modality": "image",
        "class_names": classes,
        "image_size": image_size,
        "mean": list(CIFAR10_MEAN),
        "std": list(CIFAR10_STD),
    }
    torch.manual_seed(budget.seed)
    image_model = build_model(image_spec, variant=budget.variant, patch_size=image_size // grid)

    table = TextTable(text_root / "train.tsv", "sentence", "label", column_options=None)
    text_classes, _ = label_classes(table.labels)
    length = 1 + budget.tokens  # [CLS] + tokens, [SEP] among them
    tokenizer = TextTokenizer.train(
        table.texts[:text_train_limit], tokenizer_kind, vocab_size, length
    )
    text_spec = {
        "modality": "text",
        "class_names": text_classes,
        "vocab_size": tokenizer.vocab_size,
        "max_length": length,
        "pad_id": tokenizer.pad_id,
        "classes_from_labels": True,
    }
    torch.manual_seed(budget.seed)
    text_model = build_model(text_spec, variant=budget.variant)
    text_train = encode_texts(table, tokenizer, text_classes, classes_from_labels=True,
                              length=length, limit=text_train_limit)
    text_test = encode_texts(
        TextTable(text_root / "test.tsv", "sentence", "label", column_options=None),
        tokenizer,
        text_classes,
        classes_from_labels=True,
        length=length,
    )
    rows = [
        _row(
            image_model,
            "image",
            EvalSet(train_images, train_labels),
            EvalSet(test_images, test_labels),
            budget,
        ),
        _row(text_model, "text", text_train, text_test, budget),
    ]
    if save_dir is not None:
        for name, model, spec, patch, text_tokenizer in (
            ("image", image_model, image_spec, image_size // grid, None),
            ("text", text_model, text_spec, 4, tokenizer),
        ):
            architecture = {
                "variant": budget.variant,
                **asdict(model.encoder_config),
                "patch_size": patch,
            }
            save_bundle(
                SavedModel(model.eval(), spec, architecture, text_tokenizer), save_dir / name
            )
    return {
        "budget": asdict(budget),
        "image_root": str(image_root),
        "text_root": str(text_root),
        "text_train_limit": text_train_limit,
        "tokenizer": tokenizer_kind,
        "rows": rows,
    }
