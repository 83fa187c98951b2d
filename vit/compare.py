"""Compare patch tokens with text tokens: one command, one report.

    python -m vit.compare --image-checkpoint A.ckpt --text-checkpoint B.ckpt --out DIR
    python -m vit.compare tokens --image cat.jpg --text "a gripping, moving film"
    python -m vit.compare matched --steps 300 --out DIR

The report (``DIR/report.html``, self-contained; ``DIR/report.md``; the figures as PNG;
``DIR/summary.json`` with every number shown) covers tokenisation, cost, attention,
positional probes, the learned positional embeddings and a matched-budget experiment.
Either checkpoint may be left out: that side then uses a freshly initialised model (and,
for text, a WordPiece tokenizer trained on the training texts).
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vit import figures
from vit.allocator import keep_freed_memory
from vit.attention_maps import attention_rollout, capture_attention
from vit.augment import normalize
from vit.checkpoint import CheckpointError, SavedModel, load_saved_model
from vit.data import (
    CIFAR10_MEAN, CIFAR10_STD, DataNotFoundError, ImageSource, default_cache_dir, load_split,
    writable_folder,
)
from vit.errors import ConfigError, divisors_text, non_negative_int, positive_float, positive_int
from vit.imageio import ImageDecodeError, load_image
from vit.matched import Budget, encode_texts, run_matched
from vit.measure import (
    EvalSet,
    accuracy,
    flops_per_sample,
    parameter_counts,
    positional_probes,
    throughput,
    tokens_per_sample,
)
from vit.model import VARIANTS, ImageClassifier, TextClassifier, build_model
from vit.report import Report, Table, Tokens
from vit.text_data import TextTable, label_classes
from vit.tokenizer import KINDS, SPECIAL_TOKENS, UNK, TextTokenizer, is_blank

DEFAULT_SENTENCE = "A gripping, beautifully acted film -- though its ending feels unearned."
VOCAB_SIZES = {"word": 8000, "char": 300, "bpe": 8000, "wordpiece": 8000}
TEXT_MAX_LENGTH = 64
TOKEN_UNITS = {"word": "word", "char": "character", "bpe": "subword", "wordpiece": "subword"}
"""What one text token is, by tokenizer kind, for the report's labels."""


@dataclass
class Side:
    """One modality's model, where it came from, and its test set."""

    model: ImageClassifier | TextClassifier
    source: str  # the checkpoint, or how the model was initialised
    data: EvalSet
    class_names: list[str]
    images: torch.Tensor | None = None  # (N, 3, S, S) uint8, for pictures
    tokenizer: TextTokenizer | None = None


def load_model_of(modality: str, checkpoint: str) -> SavedModel:
    """The model saved at ``checkpoint`` (named by ``--{modality}-checkpoint``), which must be
    one of ``modality``."""
    saved = load_saved_model(checkpoint)
    if saved.spec["modality"] != modality:
        other = saved.spec["modality"]
        raise ConfigError(
            f"--{modality}-checkpoint {checkpoint} holds {'an' if other == 'image' else 'a'} "
            f"{other} model; pass it as --{other}-checkpoint, and "
            f"{'an' if modality == 'image' else 'a'} {modality} model's as --{modality}-checkpoint."
        )
    return saved


def load_image_side(
    checkpoint: str | None, root: Path, variant: str, seed: int, saved: SavedModel | None = None
) -> Side:
    """The image model (``saved``, loaded from ``checkpoint``, or fresh with ``variant``) and the
    test split of ``root``."""
    image_source = ImageSource(root, "--image-root")
    if checkpoint:
        saved = saved or load_model_of("image", checkpoint)
        model, spec, source = saved.model, saved.spec, checkpoint
    else:
        spec = {
            "modality": "image",
            "class_names": image_source.class_names,
            "image_size": 32,
            "mean": list(CIFAR10_MEAN),
            "std": list(CIFAR10_STD),
        }
        torch.manual_seed(seed)
        model = build_model(spec, variant=variant)
        source = f"freshly initialised ({variant}, seed {seed}, patch 4)"
    if image_source.class_names != list(spec["class_names"]):
        raise ConfigError(
            f"the image model's classes {spec['class_names']} differ from the class folders of "
            f"{root} {image_source.class_names}: pass --image-root with the data it was trained on."
        )
    images, labels = load_split(image_source, "test", spec["image_size"], default_cache_dir())
    data = EvalSet(normalize(images, spec["mean"], spec["std"]), labels)
    return Side(model.eval(), source, data, list(spec["class_names"]), images=images)


def train_tokenizers(texts: list[str]) -> dict[str, TextTokenizer]:
    """One tokenizer of each kind, trained on ``texts``."""
    return {
        kind: TextTokenizer.train(texts, kind, VOCAB_SIZES[kind], TEXT_MAX_LENGTH) for kind in KINDS
    }


def load_text_side(
    checkpoint: str | None,
    test_file: Path,
    train_table: TextTable,
    tokenizers: dict[str, TextTokenizer],
    variant: str,
    seed: int,
    limit: int | None,
    saved: SavedModel | None = None,
) -> Side:
    """The text model (``saved``, loaded from ``checkpoint``, or fresh with the WordPiece
    tokenizer) and ``limit`` test texts."""
    if checkpoint:
        saved = saved or load_model_of("text", checkpoint)
        model, tokenizer, class_names, source = (
            saved.model,
            saved.tokenizer,
            saved.spec["class_names"],
            checkpoint,
        )
        classes_from_labels = saved.spec.get("classes_from_labels")
    else:
        tokenizer = tokenizers["wordpiece"]
        class_names, _ = label_classes(train_table.labels)
        classes_from_labels = True
        spec = {
            "modality": "text",
            "class_names": class_names,
            "vocab_size": tokenizer.vocab_size,
            "max_length": tokenizer.max_length,
            "pad_id": tokenizer.pad_id,
            "classes_from_labels": classes_from_labels,
        }
        torch.manual_seed(seed)
        model = build_model(spec, variant=variant)
        source = f"freshly initialised ({variant}, seed {seed}, WordPiece)"
    table = TextTable(test_file, "sentence", "label", column_options=None)
    data = encode_texts(table, tokenizer, list(class_names),
                        classes_from_labels=classes_from_labels, limit=limit)
    return Side(model.eval(), source, data, list(class_names), tokenizer=tokenizer)


def tokenization(tokenizer: TextTokenizer, text: str) -> dict[str, Any]:
    """How ``tokenizer`` cuts ``text``: tokens, ids, which are special, which unknown."""
    encoded, truncated = tokenizer.encode_batch([text])
    ids = encoded[0].tolist()
    tokens = tokenizer.tokens(text)
    return {
        "kind": tokenizer.kind,
        "vocab_size": tokenizer.vocab_size,
        "tokens": tokens,
        "ids": ids,
        # [UNK] counts as unknown, not as special
        "special": [i < len(SPECIAL_TOKENS) and i != tokenizer.unk_id for i in ids],
        "unknown": [t == UNK for t in tokens],
        "count": len(ids),
        "unknown_count": sum(t == UNK for t in tokens),
        "truncated": truncated > 0,
        "max_length": tokenizer.max_length,
    }


def image_tokenization(image_size: int, patch_size: int) -> dict[str, int]:
    """How an image becomes tokens: grid, patches, sequence length, values per token."""
    grid = image_size // patch_size
    return {
        "image_size": image_size,
        "patch_size": patch_size,
        "grid": grid,
        "patches": grid * grid,
        "sequence_length": 1 + grid * grid,
        "values_per_token": patch_size * patch_size * 3,
    }


def cost_summary(side: Side, batch_size: int, seconds: float) -> dict[str, Any]:
    """Tokens per sample, parameters, FLOPs per (mean-length) sample, throughput, accuracy."""
    tokens = tokens_per_sample(side.model, side.data).float()
    if isinstance(side.model, ImageClassifier):
        sample = side.data.inputs[:1]
    else:  # the test text whose length is closest to the mean
        nearest = int((tokens - tokens.mean()).abs().argmin())
        sample = side.data.inputs[nearest : nearest + 1, : int(tokens[nearest])]
    return {
        "tokens_mean": float(tokens.mean()),
        "tokens_std": float(tokens.std()),
        "tokens_min": int(tokens.min()),
        "tokens_max": int(tokens.max()),
        "tokens": tokens.int().tolist(),
        "parameters": parameter_counts(side.model),
        "flops_per_sample": flops_per_sample(side.model, sample),
        "flops_sample_tokens": int(sample.shape[1]) if sample.ndim == 2 else int(tokens[0]),
        **throughput(side.model, side.data, batch_size, seconds),
        "test_accuracy": accuracy(side.model, side.data),
        "test_samples": len(side.data),
    }


def attention_examples(side: Side, indices: list[int]) -> list[dict[str, Any]]:
    """Per sample: per-layer CLS attention (heads averaged) and rollout over its tokens."""
    examples = []
    for i in indices:
        inputs = side.data.inputs[i : i + 1]
        if side.data.pad_id is not None:
            inputs = inputs[:, : int((inputs != side.data.pad_id).sum())]
        with capture_attention(side.model) as maps, torch.inference_mode():
            logits = side.model(inputs)
        cls = torch.stack([m[0].mean(dim=0)[0, 1:] for m in maps])  # (layers, N)
        example = {
            "index": i,
            "label": side.class_names[int(side.data.labels[i])],
            "predicted": side.class_names[int(logits.argmax())],
            "cls_attention": cls.numpy().round(5).tolist(),
            "rollout": attention_rollout(maps)[0, 0, 1:].numpy().round(5).tolist(),
        }
        if side.tokenizer is not None:
            example["tokens"] = side.tokenizer.id_tokens(inputs[0].tolist())
        examples.append(example)
    return examples


def _spread_indices(labels: torch.Tensor, count: int) -> list[int]:
    """``count`` test samples of different classes where possible, first of each class."""
    picked: list[int] = []
    for label in labels.unique().tolist():
        picked.append(int((labels == label).nonzero()[0]))
    picked = picked[:: max(1, len(picked) // count)][:count]
    return picked + [i for i in range(len(labels)) if i not in picked][: count - len(picked)]


def _short_text_indices(side: Side, count: int, longest: int = 20) -> list[int]:
    tokens = tokens_per_sample(side.model, side.data)
    short = [i for i in range(len(side.data)) if 6 <= int(tokens[i]) <= longest]
    return (short or list(range(len(side.data))))[:count]


def position_similarity_summary(model: ImageClassifier | TextClassifier) -> dict[str, float]:
    """Mean cosine similarity of neighbouring positions against that of all pairs."""
    sim = torch.from_numpy(figures.cosine_similarity(model.pos_embed[0, 1:]))
    n = len(sim)
    if isinstance(model, ImageClassifier):
        g = model.patch_embed.grid_size
        rows, cols = torch.arange(n) // g, torch.arange(n) % g
        neighbour = ((rows[:, None] - rows[None]).abs() + (cols[:, None] - cols[None]).abs()) == 1
    else:
        neighbour = (torch.arange(n)[:, None] - torch.arange(n)[None]).abs() == 1
    off_diagonal = ~torch.eye(n, dtype=torch.bool)
    return {
        "neighbour_mean": float(sim[neighbour].mean()),
        "all_pairs_mean": float(sim[off_diagonal].mean()),
    }


def _fmt(value: float, digits: int = 1) -> str:
    return f"{value:,.{digits}f}"


def _machine() -> str:
    return (
        f"{platform.platform()}, Python {platform.python_version()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU thread(s), "
        + (f"GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "no GPU")
    )


def build_report(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Measure everything, draw the figures and write report.html, report.md and summary.json."""
    started = time.perf_counter()
    matched = read_matched_results(Path(args.matched_results)) if args.matched_results else None
    checkpoints = {"image": args.image_checkpoint, "text": args.text_checkpoint}
    saved = {  # both checked before the work
        modality: load_model_of(modality, checkpoint)
        for modality, checkpoint in checkpoints.items() if checkpoint
    }
    out = output_folder(Path(args.out))
    report = Report("Patch tokens and text tokens through one encoder", out)
    train_table = TextTable(Path(args.text_train), "sentence", "label", column_options=None)
    image = load_image_side(
        args.image_checkpoint, Path(args.image_root), args.variant, args.seed, saved.get("image")
    )
    tokenizers = train_tokenizers(train_table.texts[: args.tokenizer_texts])
    text = load_text_side(
        args.text_checkpoint,
        Path(args.text_test),
        train_table,
        tokenizers,
        args.variant,
        args.seed,
        args.max_texts,
        saved.get("text"),
    )
    summary: dict[str, Any] = {
        "command": command,
        "machine": _machine(),
        "image_checkpoint": image.source,
        "text_checkpoint": text.source,
        "image_test": args.image_root,
        "text_test": args.text_test,
    }

    about = report.section("About this report")
    about.blocks += [
        f"Command: {command}",
        f"Machine: {summary['machine']}.",
        f"Image model: {image.source}; test images: {args.image_root} ({len(image.data)}).",
        (
            f"Text model: {text.source}; test texts: {args.text_test} ({len(text.data)}"
            f"{'' if args.max_texts is None else f', the first {args.max_texts}'})."
        ),
        (
            "Both models run the same vit.encoder.Encoder class; only the front end differs. "
            "Every number below is in summary.json."
        ),
    ]

    # 1. Tokenisation
    section = report.section("1. Tokenisation")
    patch = image.model.patch_embed.patch_size
    view = image_tokenization(image.model.patch_embed.image_size, patch)
    summary["image_tokenization"] = view
    report.figure(
        section,
        figures.patch_grid(
            image.images[0],
            patch,
            f"{view['patches']} patches of {patch}x{patch} -> {view['sequence_length']} tokens with CLS",
        ),
        "tokens_image.png",
        f"Test image 0 ({image.class_names[int(image.data.labels[0])]}) cut into a {view['grid']}x{view['grid']} "
        f"grid; patch k becomes token k, after CLS (token 0). Sequence length {view['sequence_length']}; "
        f"each token carries {view['values_per_token']} pixel values ({patch}x{patch}x3).",
    )
    shown = {kind: tokenization(tok, args.sentence) for kind, tok in tokenizers.items()}
    if args.text_checkpoint:
        shown["checkpoint"] = tokenization(text.tokenizer, args.sentence)
    summary["text_tokenization"] = {
        "sentence": args.sentence,
        "tokenizer_texts": args.tokenizer_texts,
        **shown,
    }
    section.blocks.append(
        f'The sentence "{args.sentence}" through each tokenizer (trained on the first '
        f"{args.tokenizer_texts} texts of {args.text_train}; dashed border = [UNK]):"
    )
    section.blocks.append(
        Table(
            ["tokenizer", "vocabulary", "tokens (with [CLS], [SEP])", "special", "unknown", "ids"],
            [
                [
                    name,
                    str(v["vocab_size"]),
                    str(v["count"])
                    + (f" (cut at max_length {v['max_length']})" if v["truncated"] else ""),
                    str(sum(v["special"])),
                    str(v["unknown_count"]),
                    " ".join(map(str, v["ids"])),
                ]
                for name, v in shown.items()
            ],
        )
    )
    for name, v in shown.items():
        section.blocks.append(
            Tokens(v["tokens"], marked=v["unknown"], caption=f"{name}: {v['count']} tokens")
        )

    # 2. Side by side
    section = report.section("2. Side by side")
    costs = {
        name: cost_summary(side, args.batch_size, args.throughput_seconds)
        for name, side in (("image", image), ("text", text))
    }
    summary["side_by_side"] = costs
    ci, ct = costs["image"], costs["text"]
    unit = TOKEN_UNITS[text.tokenizer.kind]
    report.figure(
        section,
        figures.token_counts(ci["tokens_max"], np.array(ct["tokens"])),
        "token_counts.png",
        f"Tokens per test sample: fixed for images, one per {unit} for text.",
    )
    param = lambda c, k: f"{c['parameters'][k]:,}"
    section.blocks.append(
        Table(
            ["", "image (patch tokens)", f"text ({unit} tokens)"],
            [
                [
                    "tokens per sample, mean ± sd (min-max), CLS included",
                    f"{ci['tokens_mean']:.1f} ± {ci['tokens_std']:.1f} ({ci['tokens_min']}-{ci['tokens_max']})",
                    f"{ct['tokens_mean']:.1f} ± {ct['tokens_std']:.1f} ({ct['tokens_min']}-{ct['tokens_max']})",
                ],
                [
                    "what one token carries",
                    f"{view['values_per_token']} pixel values ({patch}x{patch}x3)",
                    f"one id out of {text.tokenizer.vocab_size:,}",
                ],
                ["front-end parameters", param(ci, "front_end"), param(ct, "front_end")],
                [
                    "CLS + positional parameters",
                    param(ci, "cls_and_positions"),
                    param(ct, "cls_and_positions"),
                ],
                ["shared-encoder parameters", param(ci, "encoder"), param(ct, "encoder")],
                [
                    "final norm + head parameters",
                    param(ci, "norm_and_head"),
                    param(ct, "norm_and_head"),
                ],
                [
                    "FLOPs per sample (forward)",
                    f"{ci['flops_per_sample'] / 1e6:,.2f} M",
                    f"{ct['flops_per_sample'] / 1e6:,.2f} M (at {ct['flops_sample_tokens']} tokens)",
                ],
                ["throughput, samples/s", _fmt(ci["samples_per_s"]), _fmt(ct["samples_per_s"])],
                ["throughput, tokens/s", _fmt(ci["tokens_per_s"], 0), _fmt(ct["tokens_per_s"], 0)],
                [
                    "test accuracy",
                    f"{100 * ci['test_accuracy']:.1f} % of {ci['test_samples']}",
                    f"{100 * ct['test_accuracy']:.1f} % of {ct['test_samples']}",
                ],
            ],
        )
    )
    section.blocks.append(
        f"Throughput: forward passes in batches of {args.batch_size} for at least "
        f"{args.throughput_seconds} s on this machine; text batches padded to their longest text."
    )

    # 3. Attention
    section = report.section("3. Attention")
    section.blocks.append(
        "CLS attention per layer (heads averaged) and attention rollout (Abnar & Zuidema "
        "2020), captured with vit.attention_maps.capture_attention while the model runs "
        "its fused attention."
    )
    image_examples = attention_examples(image, _spread_indices(image.data.labels, args.examples))
    g = image.model.patch_embed.grid_size
    report.figure(
        section,
        figures.image_attention(
            [image.images[e["index"]] for e in image_examples],
            np.array([e["cls_attention"] for e in image_examples]).reshape(
                len(image_examples), -1, g, g
            ),
            np.array([e["rollout"] for e in image_examples]).reshape(-1, g, g),
            [f"#{e['index']} {e['label']}\npred. {e['predicted']}" for e in image_examples],
        ),
        "attention_images.png",
        "CLS attention over the patches, per layer, and the rollout.",
    )
    text_examples = attention_examples(text, _short_text_indices(text, args.examples))
    for n, e in enumerate(text_examples):
        tokens = e["tokens"][1:]  # CLS's attention to the other tokens; [CLS] itself left out
        rollout = np.array(e["rollout"])
        report.figure(
            section,
            figures.text_attention(
                tokens,
                np.array(e["cls_attention"]),
                rollout,
                f"Text #{e['index']} ({e['label']}, predicted {e['predicted']}): CLS attention",
            ),
            f"attention_text_{n}.png",
            "CLS attention over the other tokens per layer (heads averaged), and the rollout.",
        )
        section.blocks.append(
            Tokens(
                tokens,
                weights=list(rollout / max(rollout.max(), 1e-9)),
                caption=f"Text #{e['index']}: rollout, darker = more attention",
            )
        )
    summary["attention"] = {"image": image_examples, "text": text_examples}

    # 4. Positional probes
    section = report.section("4. Positional probes")
    section.blocks.append(
        "Unchanged: the test set as it is. Tokens shuffled: each sample's patches moved "
        "to random places in the image, or its tokens between [CLS] and [SEP] put in a "
        "random order. Positions removed: the tokens' learned positional embeddings "
        "set to zero (CLS keeps its own)."
    )
    probes = {
        "image": positional_probes(image.model, image.data, args.seed),
        "text": positional_probes(text.model, text.data, args.seed),
    }
    summary["positional_probes"] = probes
    report.figure(
        section,
        figures.probes(probes),
        "probes.png",
        "Test accuracy as trained, with each sample's tokens shuffled, and with the tokens' "
        "positional embeddings set to zero.",
    )
    section.blocks.append(
        Table(
            [
                "model",
                "unchanged",
                "tokens shuffled",
                "positions removed",
                "drop when shuffled (points)",
            ],
            [
                [
                    name,
                    f"{100 * p['accuracy']:.1f} %",
                    f"{100 * p['shuffled']:.1f} %",
                    f"{100 * p['no_positions']:.1f} %",
                    f"{100 * (p['accuracy'] - p['shuffled']):.1f}",
                ]
                for name, p in probes.items()
            ],
        )
    )

    # 5. Positional embeddings
    section = report.section("5. Learned positional embeddings")
    similarity = {
        "image": position_similarity_summary(image.model),
        "text": position_similarity_summary(text.model),
    }
    summary["positional_embeddings"] = {
        **similarity,
        "image_similarity": figures.cosine_similarity(image.model.pos_embed[0, 1:])
        .round(4)
        .tolist(),
        "text_similarity": figures.cosine_similarity(text.model.pos_embed[0, 1:]).round(4).tolist(),
    }
    report.figure(
        section,
        figures.image_position_similarity(image.model.pos_embed[0, 1:], g),
        "positions_image.png",
        "Tile (r, c) shows the cosine similarity of patch (r, c)'s "
        "position embedding to every other patch's.",
    )
    report.figure(
        section,
        figures.text_position_similarity(text.model.pos_embed[0, 1:]),
        "positions_text.png",
        "Cosine similarity of text positions 1..T to each other.",
    )
    section.blocks.append(
        Table(
            ["model", "neighbouring positions", "all pairs"],
            [
                [name, f"{s['neighbour_mean']:.3f}", f"{s['all_pairs_mean']:.3f}"]
                for name, s in similarity.items()
            ],
        )
    )

    # 6. Matched budget
    section = report.section("6. Matched-budget experiment")
    if matched is None:
        matched = run_matched(
            Path(args.image_root_train or args.image_root),
            Path(args.text_train).parent,
            Budget(variant=args.variant, steps=args.matched_steps, seed=args.seed),
            text_train_limit=args.matched_text_train,
            image_option="--image-root-train" if args.image_root_train else "--image-root",
        )
    summary["matched_budget"] = matched
    if args.matched_results:
        note = f" Results read from {args.matched_results}, written by: {matched.get('command', 'unknown')}."
    else:
        note = (
            " A quick run with few steps on the data above, so that the report stays fast; run "
            "`python -m vit.compare matched` with more steps and the full data sets for a real "
            "comparison and pass its matched.json with --matched-results."
        )
    section.blocks += matched_blocks(matched, note)

    summary["seconds"] = time.perf_counter() - started
    (out / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    report.write_html()
    report.write_markdown()
    return summary


def matched_blocks(matched: dict[str, Any], note: str = "") -> list[str | Table]:
    """The matched-budget table and what it was run on, followed by ``note``."""
    b = matched["budget"]
    rows = matched["rows"]
    limit = matched["text_train_limit"]
    return [
        (
            f"Same encoder ({b['variant']}), {b['tokens']} tokens + CLS per sample (text cut or padded to it), "
            f"AdamW lr {b['lr']} wd {b['weight_decay']}, warmup {b['warmup_fraction']:.0%} then cosine, "
            f"{b['steps']} steps of {b['batch_size']}, no augmentation, seed {b['seed']}. "
            f"Images: {matched['image_root']}; texts: {matched['text_root']} "
            f"({'all' if limit is None else f'the first {limit:,}'} training texts, {matched['tokenizer']} "
            f"tokenizer).{note}"
        ),
        Table(
            [
                "modality",
                "train / test samples",
                "tokens computed (unpadded mean)",
                "encoder params",
                "all params",
                "train time",
                "final train loss",
                "test accuracy",
                "tokens shuffled",
                "positions removed",
                "majority class",
            ],
            [
                [
                    r["modality"],
                    f"{r['train_samples']:,} / {r['test_samples']:,}",
                    f"{r['tokens_per_sample']} ({r['unpadded_tokens_mean']:.1f})",
                    f"{r['encoder_parameters']:,}",
                    f"{r['total_parameters']:,}",
                    f"{r['train_seconds']:.0f} s",
                    f"{r['final_train_loss']:.3f}",
                    *(
                        f"{100 * r[k]:.1f} %"
                        for k in (
                            "test_accuracy",
                            "shuffled_accuracy",
                            "no_positions_accuracy",
                            "majority_class_accuracy",
                        )
                    ),
                ]
                for r in rows
            ],
        ),
    ]


def print_tokens(args: argparse.Namespace) -> None:
    """The terminal view: how one image and one sentence become tokens."""
    if args.image is not None:
        array = load_image(args.image, args.image_size)
        view = image_tokenization(args.image_size, args.patch_size)
        print(
            f"image {args.image}, resized to {array.shape[1]}x{array.shape[0]} pixels, patches of "
            f"{args.patch_size}x{args.patch_size} -> {view['grid']}x{view['grid']} grid = {view['patches']} "
            f"patch tokens + CLS = {view['sequence_length']} tokens, {view['values_per_token']} values each"
        )
        for row in range(view["grid"]):
            print(
                "  " + " ".join(f"{row * view['grid'] + col + 1:4d}" for col in range(view["grid"]))
            )
    if args.text is not None:
        table = TextTable(Path(args.text_train), "sentence", "label", column_options=None)
        for kind, tokenizer in train_tokenizers(table.texts[: args.tokenizer_texts]).items():
            v = tokenization(tokenizer, args.text)
            shown = " ".join(f">>{t}<<" if u else t for t, u in zip(v["tokens"], v["unknown"]))
            cut = f" (cut at max_length {v['max_length']})" if v["truncated"] else ""
            print(
                f"\n{kind} (vocabulary {v['vocab_size']}): {v['count']} tokens{cut}, "
                f"{sum(v['special'])} special, {v['unknown_count']} unknown (marked >> <<)"
            )
            print(f"  tokens: {shown}")
            print(f"  ids:    {' '.join(map(str, v['ids']))}")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m vit.compare", description=__doc__.split("\n")[0])
    commands = top.add_subparsers(dest="command")
    report = commands.add_parser("report", help="write the full report (the default command)")
    report.add_argument(
        "--image-checkpoint", help="a .ckpt or bundle of an image model (default: fresh)"
    )
    report.add_argument(
        "--text-checkpoint", help="a .ckpt or bundle of a text model (default: fresh)"
    )
    report.add_argument("--out", default="runs/compare", help="output folder")
    report.add_argument(
        "--image-root", default="data/cifar10-sample", help="image folder with test/"
    )
    report.add_argument(
        "--image-root-train", help="images for the matched experiment (default --image-root)"
    )
    report.add_argument(
        "--text-train", default="data/sst2/train.tsv", help="texts the tokenizers learn from"
    )
    report.add_argument("--text-test", default="data/sst2/test.tsv", help="labelled test texts")
    report.add_argument(
        "--max-texts", type=positive_int, default=None, help="use only the first N test texts"
    )
    report.add_argument(
        "--tokenizer-texts", type=positive_int, default=5000, help="training texts per tokenizer"
    )
    report.add_argument("--sentence", default=DEFAULT_SENTENCE, help="the sentence shown tokenised")
    report.add_argument(
        "--variant", default="nano", choices=list(VARIANTS),
        help="encoder size of freshly initialised models",
    )
    report.add_argument(
        "--examples", type=positive_int, default=3, help="images and texts in the attention section"
    )
    report.add_argument(
        "--batch-size", type=positive_int, default=64, help="batch size of the throughput runs"
    )
    report.add_argument(
        "--throughput-seconds", type=positive_float, default=1.0, help="seconds per throughput run"
    )
    report.add_argument(
        "--matched-steps", type=positive_int, default=20, help="steps of the quick matched run"
    )
    report.add_argument(
        "--matched-text-train", type=positive_int, default=2000, help="training texts of that run"
    )
    report.add_argument("--matched-results", help="a matched.json from `matched` to show instead")
    report.add_argument("--seed", type=int, default=0)
    report.add_argument(
        "--threads", type=positive_int, help="CPU threads for torch (default: torch's choice)"
    )

    tokens = commands.add_parser(
        "tokens", help="print how one image and one sentence are tokenised"
    )
    tokens.add_argument("--image", help="an image file")
    tokens.add_argument("--text", help="a sentence")
    tokens.add_argument("--image-size", type=positive_int, default=32)
    tokens.add_argument("--patch-size", type=positive_int, default=4)
    tokens.add_argument(
        "--text-train", default="data/sst2/train.tsv", help="texts the tokenizers learn from"
    )
    tokens.add_argument(
        "--tokenizer-texts", type=positive_int, default=5000, help="training texts per tokenizer"
    )

    matched = commands.add_parser("matched", help="run the matched-budget experiment alone")
    matched.add_argument(
        "--image-root",
        default="data/cifar10-sample",
        help="image folder or CIFAR-10 (e.g. ../shared/data/cifar10-jpeg)",
    )
    matched.add_argument(
        "--text-root", default="data/sst2", help="folder with train.tsv and test.tsv"
    )
    matched.add_argument(
        "--text-train-limit", type=non_negative_int, default=5000, help="training texts (0: all)"
    )
    matched.add_argument("--out", default="runs/compare", help="writes matched.json here")
    matched.add_argument(
        "--save-models",
        action="store_true",
        help="also write both trained models as bundles under OUT/models/ (image/, text/)",
    )
    matched.add_argument(
        "--threads", type=positive_int, help="CPU threads for torch (default: torch's choice)"
    )
    checked = {"tokens": positive_int, "steps": positive_int, "batch_size": positive_int,
               "lr": positive_float}
    for field, default in asdict(Budget()).items():
        matched.add_argument(
            f"--{field.replace('_', '-')}", type=checked.get(field, type(default)), default=default,
            choices=list(VARIANTS) if field == "variant" else None,
        )
    return top


def output_folder(path: Path) -> Path:
    """``path`` made (with its parents) and checked writable, before any work is spent."""
    if not writable_folder(path):
        raise ConfigError(f"--out {path}: cannot make the folder or write in it; pass a folder "
                          f"path that can be written.")
    return path


def read_matched_results(path: Path) -> dict[str, Any]:
    """A ``matched.json`` written by ``python -m vit.compare matched``, checked by laying out
    its table once."""
    try:
        matched = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"--matched-results {path}: cannot read it ({err}).") from None
    try:
        matched_blocks(matched)
    except (KeyError, TypeError, ValueError) as err:
        problem = f"it lacks {err}" if isinstance(err, KeyError) else str(err)
        raise ConfigError(
            f"--matched-results {path} is not a matched.json ({problem}); pass the one "
            f"`python -m vit.compare matched` writes."
        ) from None
    return matched


def check_sentence(option: str, text: str) -> None:
    """Refuse a sentence the tokenizers cannot take, before any work begins."""
    if is_blank(text):
        raise ConfigError(
            f'{option} {text!r} is empty once whitespace and control characters are removed: '
            f'pass a sentence, e.g. {option} "a gripping film".'
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(
            f"{option} holds bytes that are not UTF-8 ({text!r:.60}): pass it as UTF-8 text."
        ) from None


def run(argv: list[str] | None = None) -> int:
    """``main`` as a program: a user's mistake (a missing checkpoint, data or file) is one line
    on stderr and exit status 2."""
    try:
        main(argv)
    except (CheckpointError, DataNotFoundError, ConfigError, ImageDecodeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> None:
    """Run a subcommand (``argv`` instead of ``sys.argv[1:]`` when given)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("report", "tokens", "matched", "-h", "--help"):
        argv = ["report", *argv]
    args = parser().parse_args(argv)
    command = "python -m vit.compare " + shlex.join(argv)
    keep_freed_memory()
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    if args.command == "tokens":
        if args.image is None and args.text is None:
            raise SystemExit('tokens: pass --image FILE, --text "..." or both.')
        if args.text is not None:
            check_sentence("--text", args.text)
        if args.image is not None and args.image_size % args.patch_size:
            raise ConfigError(
                f"--patch-size {args.patch_size} does not tile --image-size {args.image_size} "
                f"images: choose one of {divisors_text(args.image_size)}."
            )
        print_tokens(args)
    elif args.command == "matched":
        out = output_folder(Path(args.out))
        budget = Budget(**{f: getattr(args, f) for f in asdict(Budget())})
        result = run_matched(
            Path(args.image_root),
            Path(args.text_root),
            budget,
            text_train_limit=args.text_train_limit or None,
            save_dir=out / "models" if args.save_models else None,
        )
        result["command"], result["machine"] = command, _machine()
        (out / "matched.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
        blocks = matched_blocks(result)
        print(blocks[0])
        print("\n".join(Report._markdown_block(blocks[1])))
        print(f"\nwrote {out / 'matched.json'}")
    else:
        check_sentence("--sentence", args.sentence)
        summary = build_report(args, command)
        print(
            f"wrote {Path(args.out) / 'report.html'}, report.md, summary.json and the figures "
            f"in {summary['seconds']:.0f} s"
        )


if __name__ == "__main__":
    sys.exit(run())
