"""The canvas: how a window of heterogeneous series becomes a sequence of d_model vectors, and back.

A window holds T time steps of F fields. Position (t, f) is flattened time-major to n = t * F + f, so N = T * F.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def sinusoidal_encoding(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Fixed sin/cos encoding of integer positions: (N,) -> (N, dim). No parameters, any length."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=positions.device, dtype=torch.float32) / half)
    angles = positions.float()[:, None] * freqs[None, :]  # (N, half)
    encoding = torch.cat([angles.sin(), angles.cos()], dim=-1)
    if dim % 2:
        encoding = nn.functional.pad(encoding, (0, 1))
    return encoding


class FieldCodec(nn.Module):
    """Values in, embeddings out (and the value head back).

    Position (t, f) gets `value_encoder(x) + field_embedding[slot(f)]`; a position that is absent or hidden for
    prediction gets the learned `mask_embedding` instead of the value part. Field slots are assigned by name in the
    adapter's field list, which is what lets adapters with different fields merge.
    """

    def __init__(self, max_fields: int, d_model: int):
        super().__init__()
        self.value_encoder = nn.Sequential(nn.Linear(1, d_model), nn.GELU(), nn.Linear(d_model, d_model))
        self.field_embedding = nn.Embedding(max_fields, d_model)
        self.mask_embedding = nn.Parameter(torch.zeros(d_model))
        self.value_head = nn.Linear(d_model, 1)
        nn.init.normal_(self.field_embedding.weight, std=0.02)
        nn.init.normal_(self.mask_embedding, std=0.02)

    def encode(self, values: torch.Tensor, visible: torch.Tensor, field_ids: torch.Tensor) -> torch.Tensor:
        # values, visible: (B, T, F); field_ids: (F,) or (B, F) codec slots
        batch, steps, n_fields = values.shape
        value_part = self.value_encoder(values.float().unsqueeze(-1))  # (B, T, F, D)
        value_part = torch.where(visible.unsqueeze(-1), value_part, self.mask_embedding)  # (B, T, F, D)
        field_part = self.field_embedding(field_ids)  # (F, D) or (B, F, D)
        if field_part.dim() == 3:
            field_part = field_part.unsqueeze(1)  # (B, 1, F, D)
        return (value_part + field_part).reshape(batch, steps * n_fields, -1)  # (B, N, D)

    def decode(self, hidden: torch.Tensor, steps: int) -> torch.Tensor:
        # hidden: (B, N, D) -> predictions (B, T, F)
        return self.value_head(hidden).squeeze(-1).reshape(hidden.size(0), steps, -1)


def masked_mse(predictions: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the positions where `mask` holds (hidden for prediction AND observed)."""
    mask = mask.to(predictions.dtype)
    return ((predictions - values) ** 2 * mask).sum() / mask.sum().clamp_min(1.0)
