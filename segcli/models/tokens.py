"""Variable-length token sets, batched: the machinery DToP (ch. 5) and EQD (4.2.2) share.

Images of a batch keep different numbers of tokens. We pack each image's kept tokens to the
front of a ``[B, M, C]`` tensor (M = the largest kept count in the batch) with a padding mask,
run blocks on that with ``key_padding_mask`` (padded keys get no attention weight, so real
tokens see exactly the attention they would see alone), and scatter results back by index.
Decision (measured by ``benchmarks/dtop_speed.py``): padding to the batch maximum rather than packing all
images into one sequence with a block-diagonal mask, since SDPA's cost is then B·M² instead of
(ΣN)², and M is close to every image's count once easy regions exit.
"""
from __future__ import annotations

import torch


def select_tokens(tokens: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pack kept tokens.

    ``tokens`` [B, N, C], ``keep`` [B, N] bool -> ``packed`` [B, M, C], ``index`` [B, M] (positions
    in N; padding points at a kept token of the same image, or 0), ``pad_mask`` [B, M] (True = padding).
    Kept tokens stay in their original order.
    """
    batch, num, channels = tokens.shape
    counts = keep.sum(1)  # [B]
    longest = int(counts.max()) if batch else 0
    # stable sort: kept tokens first, in their original order
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :longest]  # [B, M]
    pad_mask = torch.arange(longest, device=tokens.device)[None, :] >= counts[:, None]  # [B, M]
    index = torch.where(pad_mask, order[:, :1].expand(-1, longest), order)
    packed = torch.gather(tokens, 1, index[..., None].expand(-1, -1, channels))  # [B, M, C]
    return packed, index, pad_mask


def scatter_tokens(dest: torch.Tensor, packed: torch.Tensor, index: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
    """Write ``packed`` [B, M, C] rows into a copy of ``dest`` [B, N, C] at ``index`` (padding skipped)."""
    batch, num, channels = dest.shape
    spare = torch.cat([dest, dest.new_zeros(batch, 1, channels)], 1)  # [B, N+1, C]; slot N takes the padding
    target = torch.where(pad_mask, torch.full_like(index, num), index)  # [B, M]
    spare = spare.scatter(1, target[..., None].expand(-1, -1, channels), packed)
    return spare[:, :num]
