"""Token classifiers: a front end, a CLS token, positions, the shared encoder and a head.

The image model is the Vision Transformer of Dosovitskiy et al. (2021); the text model puts
a token-embedding front end in front of the very same ``Encoder`` class. Parameter names
follow timm's ``VisionTransformer`` (``patch_embed``, ``cls_token``, ``pos_embed``,
``blocks``, ``norm``, ``head``), so timm's weights load into ``ImageClassifier`` unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from timm.layers import build_sincos2d_pos_embed
from torch import nn

from vit.embed import PatchEmbed, TokenEmbed, resample_pos_embed
from vit.encoder import Encoder


@dataclass(frozen=True)
class EncoderConfig:
    """The shape of the shared encoder."""

    embed_dim: int  # width of every token
    depth: int  # number of transformer blocks
    num_heads: int  # attention heads per block; divides embed_dim
    mlp_ratio: float  # MLP hidden width / embed_dim


# Named sizes, from published small-data ViT recipes (patch 4 on 32x32 images -> 64 tokens).
VARIANTS: dict[str, EncoderConfig] = {
    # A debugging size: seconds per epoch on the bundled sample.
    "nano": EncoderConfig(embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0),
    # CPU size, ~0.8 M parameters: ViT-Lite's width (Hassani et al. 2021, CCT) at depth 6.
    "tiny": EncoderConfig(embed_dim=128, depth=6, num_heads=4, mlp_ratio=2.0),
    # GPU size, ~2.7 M parameters: the plain ViT of Lee et al. (2021, SPT/LSA), 93.6 % on
    # CIFAR-10 in 100 epochs.
    "small": EncoderConfig(embed_dim=192, depth=9, num_heads=12, mlp_ratio=2.0),
    # ViT-Lite-7/4 of Hassani et al. (2021), ~3.7 M parameters.
    "lite7": EncoderConfig(embed_dim=256, depth=7, num_heads=4, mlp_ratio=2.0),
}


def encoder_config(
    variant: str,
    *,
    embed_dim: int | None = None,
    depth: int | None = None,
    num_heads: int | None = None,
    mlp_ratio: float | None = None,
) -> EncoderConfig:
    """The named variant's encoder shape, with any field given here overriding it."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}: choose one of {', '.join(VARIANTS)}.")
    overrides = dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio)
    return EncoderConfig(
        **{**asdict(VARIANTS[variant]), **{k: v for k, v in overrides.items() if v is not None}}
    )


class TokenClassifier(nn.Module):
    """CLS token + learned positions + shared encoder + final norm + linear head.

    Subclasses supply the front end through ``embed_tokens``; everything after it is
    this class's code, identical for images and text.

    Args:
        num_positions: Longest token sequence the front end produces (without CLS).
        num_classes: Number of output classes.
        encoder: Shape of the encoder.
        qkv_bias: Bias on the attention's query/key/value projection.
        drop_rate: Dropout on the embeddings and inside the blocks.
        attn_drop_rate: Dropout on the attention weights.
        drop_path_rate: Stochastic-depth rate of the last block.
    """

    def __init__(
        self,
        *,
        num_positions: int,
        num_classes: int,
        encoder: EncoderConfig,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        dim = encoder.embed_dim
        self.num_classes = num_classes
        self.encoder_config = encoder
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_positions, dim))
        self.pos_drop = nn.Dropout(drop_rate)
        self.blocks = Encoder(
            dim,
            encoder.depth,
            encoder.num_heads,
            mlp_ratio=encoder.mlp_ratio,
            qkv_bias=qkv_bias,
            drop=drop_rate,
            attn_drop=attn_drop_rate,
            drop_path_rate=drop_path_rate,
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def init_weights(self) -> None:
        """timm's ViT initialisation: truncated normal (std 0.02) for weights and positions."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.trunc_normal_(module.weight, std=0.02)

    def embed_tokens(
        self, inputs: torch.Tensor, padding_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Front end: inputs -> ((B, N, D) tokens, (B, N) padding mask or None)."""
        raise NotImplementedError

    def forward_features(
        self,
        inputs: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        *,
        cls_only: bool = False,
    ) -> torch.Tensor:
        """Encoded, normalised token sequence (B, 1 + N, D); position 0 is CLS.

        With ``cls_only``, (B, 1, D): the CLS output alone, computed without the last
        block's work on the other tokens (see ``Encoder.forward``).
        """
        tokens, padding_mask = self.embed_tokens(inputs, padding_mask)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        x = torch.cat([cls, tokens], dim=1)  # (B, 1 + N, D)
        x = self.pos_drop(x + self.position_embedding(x.shape[1]))
        if padding_mask is not None:
            padding_mask = nn.functional.pad(padding_mask, (1, 0), value=False)  # CLS is real
        x = self.blocks(x, padding_mask, cls_only=cls_only)
        return self.norm(x)

    def position_embedding(self, num_tokens: int) -> torch.Tensor:
        """The (1, num_tokens, D) positions added to a sequence of ``num_tokens`` (CLS included)."""
        return self.pos_embed[:, :num_tokens]

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Class logits (B, num_classes) from the CLS output."""
        return self.head(features[:, 0])

    def forward(
        self, inputs: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        # The head reads CLS alone, so the last block computes nothing else; timm's
        # VisionTransformer runs it over every token and discards all rows but one.
        return self.forward_head(self.forward_features(inputs, padding_mask, cls_only=True))


def mirror_averaged(
    forward: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor
) -> torch.Tensor:
    """The mean of ``forward``'s logits for (B, C, H, W) images and their mirror images, run as
    one batch of 2B: the test-time flip averaging of ``ImageClassifier(flip_average=True)``."""
    both = forward(torch.cat([images, images.flip(-1)]))
    return both.unflatten(0, (2, len(images))).mean(dim=0)


class ImageClassifier(TokenClassifier):
    """Vision Transformer: linear patch embedding in front of the shared encoder.

    Args:
        image_size: Side of the square input images.
        patch_size: Side of each square patch; divides ``image_size``.
        num_classes: Number of output classes.
        encoder: Shape of the encoder.
        in_chans: Colour channels.
        flip_average: In eval mode, return the mean logits of each image and its mirror
            image (test-time augmentation; twice the work, usually a little more accuracy).
        **kwargs: Dropout and bias options of ``TokenClassifier``.
    """

    def __init__(
        self,
        *,
        image_size: int,
        patch_size: int,
        num_classes: int,
        encoder: EncoderConfig,
        in_chans: int = 3,
        flip_average: bool = False,
        **kwargs: float | bool,
    ) -> None:
        patch_embed = PatchEmbed(image_size, patch_size, in_chans, encoder.embed_dim)
        super().__init__(
            num_positions=patch_embed.num_patches, num_classes=num_classes, encoder=encoder, **kwargs
        )
        self.patch_embed = patch_embed
        self.flip_average = flip_average
        self.init_weights()

    def forward(
        self, inputs: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if not self.flip_average or self.training:
            return super().forward(inputs, padding_mask)
        if padding_mask is not None:
            raise ValueError("flip averaging takes no padding mask: pass the images alone.")
        return mirror_averaged(super().forward, inputs)

    @torch.no_grad()
    def sincos_positions_(self) -> None:
        """Start the patch positions as fixed-form 2-D sine-cosine embeddings (they stay
        learnable): neighbouring patches get similar vectors, so attention that matches a
        token to tokens like itself (``Attention.mimetic_init_``) starts out local."""
        dim = self.pos_embed.shape[-1]
        if dim % 4:
            raise ValueError(f"2-D sine-cosine positions need a width divisible by 4, got {dim}.")
        grid = self.patch_embed.grid_size
        self.pos_embed[0, 1:] = build_sincos2d_pos_embed([grid, grid], dim)

    def embed_tokens(
        self, inputs: torch.Tensor, padding_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.patch_embed(inputs), padding_mask  # (B, N, D); images have no padding

    def position_embedding(self, num_tokens: int) -> torch.Tensor:
        """The learned positions, resampled bicubically to the patch grid of an image of
        another size (differentiable: a lower-resolution phase trains the same parameters)."""
        if num_tokens == self.pos_embed.shape[1]:
            return self.pos_embed
        return resample_pos_embed(self.pos_embed, round((num_tokens - 1) ** 0.5))


class TextClassifier(TokenClassifier):
    """Text transformer: token-embedding lookup in front of the shared encoder.

    Args:
        vocab_size: Size of the tokenizer's vocabulary.
        max_length: Longest token sequence, [CLS] included.
        pad_id: Id of [PAD]; positions holding it are masked out of attention.
        num_classes: Number of output classes.
        encoder: Shape of the encoder.
        **kwargs: Dropout and bias options of ``TokenClassifier``.
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        max_length: int,
        pad_id: int,
        num_classes: int,
        encoder: EncoderConfig,
        **kwargs: float | bool,
    ) -> None:
        # The tokenizer's [CLS] id becomes the learned cls_token, so positions = max_length - 1.
        super().__init__(
            num_positions=max_length - 1, num_classes=num_classes, encoder=encoder, **kwargs
        )
        self.max_length = max_length
        self.token_embed = TokenEmbed(vocab_size, encoder.embed_dim, pad_id)
        self.init_weights()

    def embed_tokens(
        self, inputs: torch.Tensor, padding_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        ids = inputs[:, 1:]  # (B, T - 1): drop the tokenizer's [CLS]; cls_token stands for it
        if ids.shape[1] > self.max_length - 1:
            raise ValueError(
                f"got {ids.shape[1] + 1} tokens but the model holds at most max_length="
                f"{self.max_length}: truncate the input to that length."
            )
        if padding_mask is None:
            padding_mask = ids == self.token_embed.pad_id
        else:
            padding_mask = padding_mask[:, 1:]
        return self.token_embed(ids), padding_mask


def build_model(
    data_spec: dict[str, Any],
    *,
    variant: str = "tiny",
    embed_dim: int | None = None,
    depth: int | None = None,
    num_heads: int | None = None,
    mlp_ratio: float | None = None,
    patch_size: int = 4,
    drop_rate: float = 0.0,
    attn_drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
    flip_average: bool = False,
) -> TokenClassifier:
    """The image or text classifier that ``data_spec`` (a data module's ``spec``) calls for."""
    encoder = encoder_config(
        variant, embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio
    )
    common = dict(
        num_classes=len(data_spec["class_names"]), encoder=encoder, drop_rate=drop_rate,
        attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate,
    )
    if data_spec["modality"] == "image":
        return ImageClassifier(
            image_size=data_spec["image_size"], patch_size=patch_size,
            flip_average=flip_average, **common,
        )
    if flip_average:
        raise ValueError("flip averaging mirrors images: a text model cannot use it.")
    if data_spec["modality"] == "text":
        return TextClassifier(
            vocab_size=data_spec["vocab_size"], max_length=data_spec["max_length"],
            pad_id=data_spec["pad_id"], **common,
        )
    raise ValueError(f"unknown modality {data_spec['modality']!r} in the data spec.")
