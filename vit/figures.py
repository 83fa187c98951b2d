"""The figures of the patch-versus-text report, drawn with matplotlib.

Every figure has a title, labelled axes and a legend or colour bar. Maps use the perceptually
uniform ``magma`` and ``viridis`` colormaps, whose lightness rises monotonically, so they read
the same printed in greyscale; bars are told apart by hatching as well as colour.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

MAP = "magma"
SIMILARITY_MAP = "viridis"


def _subplots(rows: int = 1, cols: int = 1, **kwargs: Any) -> tuple[Figure, Any]:
    """A figure of its own (no pyplot state, no display backend) and its axes."""
    fig = Figure(figsize=kwargs.pop("figsize"))
    return fig, fig.subplots(rows, cols, **kwargs)


def _picture(image: torch.Tensor) -> np.ndarray:
    """(3, S, S) uint8 -> (S, S, 3) array for imshow."""
    return image.permute(1, 2, 0).numpy()


def patch_grid(image: torch.Tensor, patch_size: int, title: str) -> Figure:
    """The image cut into its numbered P x P patches, in the order they become tokens."""
    size = image.shape[-1]
    grid = size // patch_size
    fig, ax = _subplots(figsize=(5.2, 5.2))
    ax.imshow(_picture(image), extent=(0, size, size, 0), interpolation="nearest")
    for edge in range(0, size + 1, patch_size):
        ax.axhline(edge, color="white", linewidth=1.2)
        ax.axvline(edge, color="white", linewidth=1.2)
        ax.axhline(edge, color="black", linewidth=0.4)
        ax.axvline(edge, color="black", linewidth=0.4)
    for index in range(grid * grid):
        row, col = divmod(index, grid)
        ax.text(
            (col + 0.5) * patch_size,
            (row + 0.5) * patch_size,
            str(index + 1),
            ha="center",
            va="center",
            fontsize=max(5, 60 // grid),
            color="white",
            bbox={"boxstyle": "round,pad=0.1", "facecolor": "black", "alpha": 0.55, "linewidth": 0},
        )
    ax.set_title(title)
    ax.set_xlabel("pixel column")
    ax.set_ylabel("pixel row")
    fig.tight_layout()
    return fig


def token_counts(image_tokens: int, text_tokens: np.ndarray) -> Figure:
    """Histogram of tokens per sentence against the fixed number of tokens per image."""
    fig, ax = _subplots(figsize=(6.4, 3.6))
    top = max(int(text_tokens.max()), image_tokens) + 2
    ax.hist(
        text_tokens,
        bins=np.arange(0, top + 1),
        color="0.55",
        edgecolor="black",
        hatch="//",
        label=f"text (mean {text_tokens.mean():.1f}, sd {text_tokens.std():.1f})",
    )
    ax.axvline(
        image_tokens,
        color="black",
        linewidth=2,
        linestyle="--",
        label=f"image (always {image_tokens})",
    )
    ax.set_title("Tokens per test sample, CLS included")
    ax.set_xlabel("tokens the encoder sees")
    ax.set_ylabel("test samples")
    ax.legend(loc="upper center")
    fig.tight_layout()
    return fig


def image_attention(
    images: Sequence[torch.Tensor], cls_maps: np.ndarray, rollout: np.ndarray, titles: Sequence[str]
) -> Figure:
    """Per image: the picture, each layer's CLS attention (heads averaged), and the rollout.

    Args:
        images: (3, S, S) uint8 images.
        cls_maps: (K, layers, g, g) CLS-to-patch weights.
        rollout: (K, g, g) rollout of CLS onto the patches.
        titles: One caption per image.
    """
    num, layers = cls_maps.shape[:2]
    cols = layers + 2
    relative = np.concatenate(
        [cls_maps.reshape(num, layers, -1), rollout.reshape(num, 1, -1)], axis=1
    )
    relative = (
        relative / relative.sum(axis=-1, keepdims=True) * relative.shape[-1]
    )  # 1 = even spread
    top = max(2.0, float(relative.max()))
    fig, axes = _subplots(num, cols, figsize=(1.9 * cols + 0.8, 2.0 * num + 0.6), squeeze=False)
    grid = cls_maps.shape[-1]
    for k in range(num):
        size = images[k].shape[-1]
        extent = (0, size, size, 0)
        axes[k, 0].imshow(_picture(images[k]), extent=extent)
        for j in range(layers + 1):
            ax = axes[k, j + 1]
            ax.imshow(_picture(images[k]).mean(axis=2), cmap="gray", extent=extent)
            shown = ax.imshow(
                relative[k, j].reshape(grid, grid),
                cmap=MAP,
                alpha=0.7,
                vmin=0,
                vmax=top,
                extent=extent,
                interpolation="nearest",
            )
        for j, ax in enumerate(axes[k]):
            ax.set_xticks([])
            ax.set_yticks([])
            if k == 0:
                ax.set_title(
                    ["image", *(f"layer {i + 1}" for i in range(layers)), "rollout"][j], fontsize=9
                )
        axes[k, 0].set_ylabel(titles[k], fontsize=8)
    fig.suptitle("Where CLS attends in each image (heads averaged)")
    fig.colorbar(shown, ax=axes, fraction=0.03, label="attention / even spread (1 = uniform)")
    return fig


def text_attention(
    tokens: Sequence[str], cls_maps: np.ndarray, rollout: np.ndarray, title: str
) -> Figure:
    """One sentence: each layer's CLS attention over its tokens, and the rollout, as shaded rows.

    Args:
        tokens: The sentence's tokens after [CLS].
        cls_maps: (layers, T) weights of CLS onto those tokens.
        rollout: (T,) rollout of CLS onto those tokens.
        title: The figure's title.
    """
    rows = np.concatenate([cls_maps, rollout[None]], axis=0)
    labels = [f"layer {i + 1}" for i in range(len(cls_maps))] + ["rollout"]
    fig, ax = _subplots(figsize=(max(6.0, 0.42 * len(tokens) + 2), 0.42 * len(rows) + 1.8))
    shown = ax.imshow(rows, cmap=MAP, aspect="auto", vmin=0, vmax=max(float(rows.max()), 1e-9))
    ax.set_xticks(range(len(tokens)), tokens, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.set_xlabel("token")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=10)
    fig.colorbar(shown, ax=ax, label="attention weight")
    fig.tight_layout()
    return fig


def cosine_similarity(pos_embed: torch.Tensor) -> np.ndarray:
    """(N, N) cosine similarity between the rows of an (N, D) positional embedding."""
    unit = torch.nn.functional.normalize(pos_embed.detach().float(), dim=-1)
    return (unit @ unit.T).numpy()


def image_position_similarity(pos_embed: torch.Tensor, grid: int) -> Figure:
    """The ViT paper's figure: for each patch, a g x g tile of its similarity to every patch."""
    sim = cosine_similarity(pos_embed).reshape(grid, grid, grid, grid)
    gap = 1
    canvas = np.full((grid * (grid + gap), grid * (grid + gap)), np.nan)
    for r in range(grid):
        for c in range(grid):
            top, left = r * (grid + gap), c * (grid + gap)
            canvas[top : top + grid, left : left + grid] = sim[r, c]
    fig, ax = _subplots(figsize=(6.0, 5.4))
    shown = ax.imshow(canvas, cmap=SIMILARITY_MAP, vmin=-1, vmax=1, interpolation="nearest")
    ticks = [r * (grid + gap) + grid / 2 - 0.5 for r in range(grid)]
    ax.set_xticks(ticks, range(1, grid + 1))
    ax.set_yticks(ticks, range(1, grid + 1))
    ax.set_xlabel("input patch column")
    ax.set_ylabel("input patch row")
    ax.set_title("Image positions: cosine similarity", fontsize=11)
    fig.colorbar(shown, ax=ax, label="cosine similarity")
    fig.tight_layout()
    return fig


def text_position_similarity(pos_embed: torch.Tensor) -> Figure:
    """The (T, T) similarity of text positions: a band along the diagonal if order is learned."""
    fig, ax = _subplots(figsize=(5.6, 4.8))
    n = len(pos_embed)
    shown = ax.imshow(
        cosine_similarity(pos_embed),
        cmap=SIMILARITY_MAP,
        vmin=-1,
        vmax=1,
        interpolation="nearest",
        extent=(0.5, n + 0.5, n + 0.5, 0.5),
    )
    ax.set_xlabel("token position (1 = first after CLS)")
    ax.set_ylabel("token position")
    ax.set_title("Text positions: cosine similarity", fontsize=11)
    fig.colorbar(shown, ax=ax, label="cosine similarity")
    fig.tight_layout()
    return fig


def probes(results: dict[str, dict[str, float]]) -> Figure:
    """Grouped bars: accuracy as is, with tokens shuffled and without positions, per modality."""
    conditions = [
        ("accuracy", "unchanged", "0.2", ""),
        ("shuffled", "tokens shuffled", "0.55", "//"),
        ("no_positions", "positions removed", "0.85", "xx"),
    ]
    names = list(results)
    x = np.arange(len(names))
    width = 0.26
    fig, ax = _subplots(figsize=(6.0, 3.8))
    for i, (key, label, colour, hatch) in enumerate(conditions):
        values = [100 * results[name][key] for name in names]
        bars = ax.bar(
            x + (i - 1) * width,
            values,
            width,
            label=label,
            color=colour,
            edgecolor="black",
            hatch=hatch,
        )
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(x, names)
    ax.set_ylabel("test accuracy (%)")
    ax.set_xlabel("model")
    ax.set_ylim(0, 105)
    ax.set_title("How much each modality depends on token order")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return fig
