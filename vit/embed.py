"""Front ends that turn an input into a (B, N, D) token sequence.

``PatchEmbed`` is the linear patch embedding of Dosovitskiy et al. (2021): the image is cut
into P x P patches and each flattened patch is mapped by one linear layer. A ``Conv2d`` with
kernel = stride = P is exactly that map (and is what timm stores as ``patch_embed.proj``).
``TokenEmbed`` is the text counterpart: a lookup table from token id to vector.
"""

from __future__ import annotations

import torch
from einops import rearrange
from timm.layers import resample_abs_pos_embed
from torch import nn

from vit.errors import divisors_text


class PatchEmbed(nn.Module):
    """Cut (B, C, H, W) images into P x P patches and embed each one linearly.

    Images of another square size whose side is a multiple of P give a longer or shorter
    sequence (training at a lower resolution first, ``--data.low_res_size``).

    Args:
        image_size: Side of the square images the model is built for.
        patch_size: Side of each square patch; must divide ``image_size``.
        in_chans: Colour channels of the input.
        embed_dim: Width of each patch token.
    """

    def __init__(self, image_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        if image_size % patch_size != 0:
            raise ValueError(
                f"patch_size={patch_size} does not divide image_size={image_size}: "
                f"pick a patch size among the divisors of {image_size} "
                f"({divisors_text(image_size)})."
            )
        self.image_size = image_size
        self.patch_size = patch_size
        self.grid_size = image_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        if height != width or height % self.patch_size:
            raise ValueError(
                f"expected square images whose side is a multiple of patch_size="
                f"{self.patch_size} (built for {self.image_size}x{self.image_size}), got "
                f"{height}x{width}: resize the input to {self.image_size}x{self.image_size}."
            )
        x = self.proj(images)  # (B, D, H/P, W/P): one linear map per patch
        return rearrange(x, "b d gh gw -> b (gh gw) d")


class TokenEmbed(nn.Embedding):
    """Look up a vector for each token id of a (B, T) batch.

    Args:
        vocab_size: Number of ids in the tokenizer's vocabulary.
        embed_dim: Width of each token vector.
        pad_id: Id of the [PAD] token; the encoder never attends to it.
    """

    def __init__(self, vocab_size: int, embed_dim: int, pad_id: int) -> None:
        super().__init__(vocab_size, embed_dim)
        self.pad_id = pad_id


@torch.compiler.disable
def resample_pos_embed(pos_embed: torch.Tensor, grid_size: int) -> torch.Tensor:
    """Resize an image model's (1, 1 + g*g, D) positional embedding to a new patch grid.

    The CLS position is kept; the g x g grid is resampled bicubically, as timm does when
    weights trained at one image size are used at another. Always eagerly, outside
    ``torch.compile``'s graph: once a second image size makes the compiled model's shapes
    symbolic, torch cannot trace the backward of its antialiased bicubic resize (an internal
    assert in torch 2.14).
    """
    old_grid = round((pos_embed.shape[1] - 1) ** 0.5)
    if old_grid == grid_size:
        return pos_embed
    return resample_abs_pos_embed(
        pos_embed, new_size=[grid_size, grid_size], old_size=[old_grid, old_grid], num_prefix_tokens=1
    )
