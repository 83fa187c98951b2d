"""Multi-head self-attention, the one attention core shared by image and text models.

Vaswani et al. (2017), "Attention Is All You Need". Parameter names follow timm's
``timm.layers.Attention`` (``qkv``, ``proj``) so that state dicts line up.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vit import cpu_attention, cpu_linear


def _noisy_identity_factors(dim: int, alpha: float, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``left @ right == alpha * Z + beta * I`` for a random Z (uniform, variance 1 / dim).

    The factors come from the SVD (``left = U S^1/2``, ``right = S^1/2 V^T``), so the first
    k columns of ``left`` and rows of ``right`` give the best rank-k approximation.
    """
    bound = (3 / dim) ** 0.5
    target = alpha * torch.empty(dim, dim).uniform_(-bound, bound) + beta * torch.eye(dim)
    u, s, vh = torch.linalg.svd(target)
    root = s.sqrt()
    return u * root, root[:, None] * vh


class Attention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention``, or on the CPU for
    short unpadded sequences through this project's kernel (``vit.cpu_attention``).

    Args:
        dim: Token width.
        num_heads: Number of heads; must divide ``dim``.
        qkv_bias: Whether the fused query/key/value projection has a bias.
        attn_drop: Dropout on the attention weights.
        proj_drop: Dropout after the output projection.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(
                f"num_heads={num_heads} does not divide embed_dim={dim}: "
                f"choose num_heads among the divisors of {dim}."
            )
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = cpu_linear.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = cpu_linear.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    @torch.no_grad()
    def mimetic_init_(
        self,
        qk: tuple[float, float] = (0.7, 0.7),
        vo: tuple[float, float] = (0.4, 0.4),
    ) -> None:
        """Mimetic initialisation (Trockman & Kolter 2023, "Mimetic Initialization of
        Self-Attention Layers"): the weights of a trained ViT, imitated at step 0.

        Each head's ``W_q^T W_k`` becomes a rank-``head_dim`` part of ``a Z + b I`` with
        ``(a, b) = qk``, so a token attends to tokens like itself (and, through the positional
        embeddings, to its neighbours); ``W_proj W_v`` becomes ``a Z - b I`` with
        ``(a, b) = vo``. Biases are zeroed. Draws from torch's global generator.
        """
        dim, head_dim = self.proj.in_features, self.head_dim
        for head in range(self.num_heads):
            left, right = _noisy_identity_factors(dim, *qk)
            rows = slice(head * head_dim, (head + 1) * head_dim)
            self.qkv.weight[rows] = left[:, :head_dim].T  # W_q of this head
            self.qkv.weight[dim:][rows] = right[:head_dim]  # W_k of this head
        left, right = _noisy_identity_factors(dim, vo[0], -vo[1])
        self.qkv.weight[2 * dim:] = right  # W_v of every head
        self.proj.weight.copy_(left)
        for linear in (self.qkv, self.proj):
            if linear.bias is not None:
                linear.bias.zero_()

    def _split_heads(self, projected: torch.Tensor, parts: int) -> tuple[torch.Tensor, ...]:
        """(B, N, parts * D) -> ``parts`` views of shape (B, h, N, d).

        Splitting before moving the head axis, unlike timm's ``permute(2, 0, 3, 1, 4).unbind(0)``,
        lets the backward stack the gradients straight into the projection's (B, N, parts * D)
        layout instead of stacking them and copying the stack once more (a tenth of the
        training step of ``small`` on the CPU, ``benchmarks/RESULTS.md``).
        """
        b, n, _ = projected.shape
        split = projected.view(b, n, parts, self.num_heads, self.head_dim).unbind(2)
        return tuple(part.transpose(1, 2) for part in split)

    def forward(
        self,
        x: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        *,
        cls_only: bool = False,
    ) -> torch.Tensor:
        """Attend over ``x`` of shape (B, N, D).

        Args:
            x: Token sequence.
            padding_mask: Optional (B, N) bool tensor, True where a token is padding.
                Padding tokens are never attended to (they still produce outputs,
                which the caller ignores).
            cls_only: Compute the output of the first token only, (B, 1, D): every
                token is still a key and a value, but only token 0 queries.
        """
        dropout_p = self.attn_drop if self.training else 0.0
        if cls_only:  # rows [0, D) of the fused weight make queries, [D, 3D) keys and values
            dim = x.shape[-1]
            weight, bias = self.qkv.weight, self.qkv.bias
            q = cpu_linear.linear(x[:, :1], weight[:dim], None if bias is None else bias[:dim])
            kv = cpu_linear.linear(x, weight[dim:], None if bias is None else bias[dim:])
            if padding_mask is None and cpu_attention.usable(kv, dropout_p):
                out = cpu_attention.attention_of_queries(q, kv, self.num_heads)
                return self.proj_drop(self.proj(out))
            k, v = self._split_heads(kv, 2)
            (q,) = self._split_heads(q, 1)
        else:
            qkv = self.qkv(x)
            if padding_mask is None and cpu_attention.usable(qkv, dropout_p):
                return self.proj_drop(self.proj(cpu_attention.attention(qkv, self.num_heads)))
            q, k, v = self._split_heads(qkv, 3)
        attn_mask = None
        if padding_mask is not None:
            attn_mask = rearrange(~padding_mask, "b n -> b 1 1 n")  # True = may attend
        if q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.requires_grad:
            # The backward of torch's CPU attention kernel is several times slower in bfloat16
            # than in float32, even on CPUs with bf16 matrix units (forward and backward at batch
            # 32, 4 heads, 65 tokens, two threads: 24.5 ms against 4.9, benchmarks/RESULTS.md);
            # its forward alone is as fast in bf16, so inference stays in bf16.
            with torch.autocast("cpu", enabled=False):
                x = F.scaled_dot_product_attention(
                    q.float(), k.float(), v.float(), attn_mask=attn_mask, dropout_p=dropout_p
                ).to(q.dtype)
        else:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        x = rearrange(x, "b h n d -> b n (h d)")  # (B, N, D) from (B, h, N, d)
        return self.proj_drop(self.proj(x))
