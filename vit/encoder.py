"""The transformer encoder: pre-norm blocks of attention and MLP with residuals.

Dosovitskiy et al. (2021), "An Image is Worth 16x16 Words". Block layout and names follow
timm's ``timm.models.vision_transformer.Block`` (``norm1``, ``attn``, ``drop_path1``,
``norm2``, ``mlp``, ``drop_path2``), so a timm state dict loads as it is.
"""

from __future__ import annotations

import torch
from timm.layers import DropPath
from torch import nn

from vit.attention import Attention
from vit.cpu_linear import Linear


class Mlp(nn.Module):
    """``fc2(gelu(fc1(x)))`` with dropout after each, as timm's ``timm.layers.Mlp`` (same
    parameter names), its two products through ``vit.cpu_linear.Linear``."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class Block(nn.Module):
    """``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``, each branch with drop path.

    Args:
        dim: Token width.
        num_heads: Attention heads.
        mlp_ratio: Hidden width of the MLP as a multiple of ``dim``.
        qkv_bias: Bias on the query/key/value projection.
        drop: Dropout after the attention projection and in the MLP.
        attn_drop: Dropout on the attention weights.
        drop_path: Probability of dropping each residual branch (stochastic depth).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(
            dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop
        )
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        *,
        cls_only: bool = False,
    ) -> torch.Tensor:
        """(B, N, D) tokens -> (B, N, D), or -> (B, 1, D) the first token's output if ``cls_only``."""
        attended = self.attn(self.norm1(x), padding_mask, cls_only=cls_only)
        x = (x[:, :1] if cls_only else x) + self.drop_path1(attended)
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x


class Encoder(nn.ModuleList):
    """``depth`` blocks applied in order; drop-path rates rise linearly with depth.

    A ``ModuleList`` so that its parameters are named ``blocks.<i>.*``, as in timm.

    Args:
        dim: Token width.
        depth: Number of blocks.
        num_heads: Attention heads per block.
        mlp_ratio: MLP hidden width as a multiple of ``dim``.
        qkv_bias: Bias on the query/key/value projections.
        drop: Dropout inside the blocks.
        attn_drop: Dropout on the attention weights.
        drop_path_rate: Stochastic-depth rate of the last block (rising linearly from 0 at
            the first, when there are several).
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        *,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        if depth < 1:
            raise ValueError(f"an encoder needs at least one block, got depth={depth}.")
        rates = torch.linspace(0, drop_path_rate, depth).tolist() if depth > 1 else [drop_path_rate]
        super().__init__(
            Block(
                dim,
                num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                drop=drop,
                attn_drop=attn_drop,
                drop_path=rate,
            )
            for rate in rates
        )

    def forward(
        self,
        x: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        *,
        cls_only: bool = False,
    ) -> torch.Tensor:
        """Run (B, N, D) tokens through every block; ``padding_mask`` is (B, N), True = pad.

        With ``cls_only`` the last block computes the first token's output alone, (B, 1, D):
        the same numbers as the full sequence's row 0, for about 3/4 of that block's
        matrix work less (its query, projection and MLP run on one token, not N).
        """
        for index, block in enumerate(self):
            x = block(x, padding_mask, cls_only=cls_only and index == len(self) - 1)
        return x
