"""Attention weights read out of a model, and attention rollout across its layers.

``capture_attention`` hooks every ``Attention`` module of a model for the duration of a
``with`` block: each call recomputes its softmax(QK^T / sqrt(d)) weights from the module's
own input and projection, while the module itself keeps running its fused attention
(``scaled_dot_product_attention``, or ``vit.cpu_attention``'s kernel). Outside the block no
hook exists, so training and inference pay nothing. ``attention_rollout`` is Abnar & Zuidema
(2020), "Quantifying Attention Flow in Transformers": head-averaged weights plus the residual
identity, renormalised and multiplied from the first layer to the last.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from einops import rearrange
from torch import nn

from vit.attention import Attention


def attention_weights(
    module: Attention, x: torch.Tensor, padding_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The (B, heads, N, N) softmax weights ``module`` applies to the (B, N, D) tokens ``x``."""
    q, k, _ = rearrange(
        module.qkv(x), "b n (three h d) -> three b h n d", three=3, h=module.num_heads
    )
    scores = (q @ k.transpose(-2, -1)) * module.head_dim**-0.5  # (B, h, N, N)
    if padding_mask is not None:
        scores = scores.masked_fill(rearrange(padding_mask, "b n -> b 1 1 n"), float("-inf"))
    return scores.softmax(dim=-1)


@contextmanager
def capture_attention(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect each ``Attention`` call's (B, heads, N, N) weights, in call order, while active.

    Example::

        with capture_attention(model) as maps:
            model(images)
        maps[0]  # the first block's weights
    """
    maps: list[torch.Tensor] = []

    def hook(module: Attention, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
        x = args[0]
        padding_mask = args[1] if len(args) > 1 else kwargs.get("padding_mask")
        with torch.no_grad():
            maps.append(attention_weights(module, x, padding_mask).detach())

    handles = [
        m.register_forward_hook(hook, with_kwargs=True)
        for m in model.modules()
        if isinstance(m, Attention)
    ]
    if not handles:
        raise ValueError(
            f"{type(model).__name__} holds no vit.attention.Attention module to capture."
        )
    try:
        yield maps
    finally:
        for handle in handles:
            handle.remove()


def attention_rollout(maps: list[torch.Tensor]) -> torch.Tensor:
    """(B, N, N) rollout of per-layer (B, heads, N, N) weights; row 0 is CLS's attention flow."""
    rollout = None
    for weights in maps:
        mixed = weights.mean(dim=1)  # (B, N, N): heads averaged
        mixed = mixed + torch.eye(mixed.shape[-1], dtype=mixed.dtype, device=mixed.device)
        mixed = mixed / mixed.sum(dim=-1, keepdim=True)
        rollout = mixed if rollout is None else mixed @ rollout
    if rollout is None:
        raise ValueError("no attention maps to roll out: run the model inside capture_attention.")
    return rollout
