"""Round-to-nearest weight quantization: int8 per output row, int4 in groups of INT4_GROUP_SIZE.

What `from_pretrained(..., quantization=...)` and the linear formats use; no data needed.
"""

from __future__ import annotations

import torch

INT4_GROUP_SIZE = 64
ROW_CHUNK = 256  # rows rounded at a time: fp32 temporaries stay in cache (3-4x faster) and small


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-row int8: w ~= q * scale."""
    q = torch.empty(weight.shape, dtype=torch.int8)
    scale = torch.empty(weight.shape[0])
    for rows in range(0, weight.shape[0], ROW_CHUNK):
        w = weight[rows:rows + ROW_CHUNK].float()
        s = (w.abs().amax(dim=1) / 127).clamp(min=1e-10)
        q[rows:rows + ROW_CHUNK] = torch.round(w / s[:, None]).clamp(-127, 127)
        scale[rows:rows + ROW_CHUNK] = s
    return q, scale


def int4_params(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric grid for groups w (..., group): (scale, zero) as stored (bf16), w ~= (q - 8) * scale + zero."""
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    scale = ((hi - lo) / 15).clamp(min=1e-10).to(torch.bfloat16)
    zero = (lo + scale.float() * 8).to(torch.bfloat16)
    return scale, zero


def int4_round(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """q in 0..15 for w (..., n) on the grid of scale, zero (...)."""
    s, z = scale.float()[..., None], zero.float()[..., None]
    return torch.round((w - z) / s + 8).clamp(0, 15)


def quantize_int4(weight: torch.Tensor, group_size: int = INT4_GROUP_SIZE):
    """Round-to-nearest int4 in groups along the input: (q (N, K) uint8 0..15, scale, zero (N, K / group))."""
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"int4 needs in_features ({k}) divisible by the group size {group_size}")
    q = torch.empty(n, k, dtype=torch.uint8)
    scale = torch.empty(n, k // group_size, dtype=torch.bfloat16)
    zero = torch.empty_like(scale)
    for rows in range(0, n, ROW_CHUNK):
        w = weight[rows:rows + ROW_CHUNK].float().view(-1, k // group_size, group_size)
        scale[rows:rows + ROW_CHUNK], zero[rows:rows + ROW_CHUNK] = int4_params(w)
        q[rows:rows + ROW_CHUNK] = int4_round(w, scale[rows:rows + ROW_CHUNK], zero[rows:rows + ROW_CHUNK]).view(-1, k)
    return q, scale, zero
