"""Small reusable layers, composed by heads and wrappers (timm's ``layers/``).

* conv blocks (MMSegmentation's ConvModule conventions: no conv bias when a norm follows);
* the ATM attention and decoder layer (thesis 4.2.1, eqs. 4.1-4.2), used by the ATM head and by
  Shrunk's query upsampling.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvBNReLU(nn.Sequential):
    """Conv -> BatchNorm -> ReLU, 'same' padding for odd kernels."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, *, dilation: int = 1,
                 groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=dilation * (kernel_size // 2),
                              dilation=dilation, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU(inplace=True)


class SeparableConvBNReLU(nn.Sequential):
    """Depthwise k×k conv + BN + ReLU, then pointwise 1×1 conv + BN + ReLU (DeepLabV3+)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, *, dilation: int = 1):
        super().__init__()
        self.depthwise = ConvBNReLU(in_channels, in_channels, kernel_size, dilation=dilation, groups=in_channels)
        self.pointwise = ConvBNReLU(in_channels, out_channels, 1)


class MaskAttention(nn.Module):
    """Multi-head attention from ``queries`` to ``tokens`` (eqs. 4.1-4.2) with separate q/k/v
    projections (with bias) and an output projection; optionally also returns the similarity
    map ``QKᵀ/sqrt(d)`` averaged over heads, the ATM mask logits."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)  # [B, h, L, d]

    def forward(
        self,
        queries: torch.Tensor,
        tokens: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        return_similarity: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``queries`` [B, Q, D], ``tokens`` [B, N, D] -> (output [B, Q, D], similarity [B, Q, N] or None)."""
        q_flat, k_flat = self.q_proj(queries), self.k_proj(tokens)  # [B, Q, D], [B, N, D]
        q, k = self._heads(q_flat), self._heads(k_flat)  # [B, h, Q, d], [B, h, N, d]
        v = self._heads(self.v_proj(tokens))  # [B, h, N, d]
        dropout = self.dropout if self.training else 0.0
        similarity = None
        if return_similarity:
            # the heads' mean of q_h·k_h / sqrt(d) is q·k / (h sqrt(d)) over the full width: one
            # [Q, D] x [D, N] product instead of h per-head maps and their mean
            similarity = torch.matmul(q_flat, k_flat.transpose(-2, -1)) * (self.head_dim ** -0.5 / self.num_heads)  # [B, Q, N]
        attn_mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]  # [B, 1, 1, N]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)  # [B, h, Q, d]
        out = out.transpose(1, 2).flatten(2)  # [B, Q, D]
        return self.out_proj(out), similarity


class ATMDecoderLayer(nn.Module):
    """Post-norm decoder layer: (query self-attention) -> cross-attention -> ReLU FFN."""

    def __init__(self, dim: int, num_heads: int, ffn_ratio: int = 4, dropout: float = 0.1, self_attn: bool = False):
        super().__init__()
        self.self_attn = MaskAttention(dim, num_heads, dropout) if self_attn else None
        self.self_norm = nn.LayerNorm(dim) if self_attn else None
        self.cross_attn = MaskAttention(dim, num_heads, dropout)
        self.cross_norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_ratio * dim), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(ffn_ratio * dim, dim)
        )
        self.ffn_norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(
        self,
        queries: torch.Tensor,
        tokens: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        return_similarity: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``queries`` [B, Q, D], ``tokens`` [B, N, D] -> (queries [B, Q, D], similarity [B, Q, N] or None)."""
        if self.self_attn is not None:
            update, _ = self.self_attn(queries, queries)
            queries = self.self_norm(queries + self.drop(update))
        update, similarity = self.cross_attn(queries, tokens, key_padding_mask, return_similarity)
        queries = self.cross_norm(queries + self.drop(update))
        queries = self.ffn_norm(queries + self.drop(self.ffn(queries)))
        return queries, similarity
