"""Which canvas positions are hidden from the input and predicted during training."""

from __future__ import annotations

import torch


def sample_target_mask(presence: torch.Tensor, horizon: int, random_fraction: float, forecast_probability: float = 0.5,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Per sample, either "forecast" (the last `horizon` steps of every field) or "random" (a fraction of positions).

    presence: (B, T, F) bool. Returns a (B, T, F) bool mask; the loss is taken where mask AND presence, so absent
    positions are never targets. Deterministic for a given generator state.
    """
    if presence.dim() != 3:
        raise ValueError(f"presence must be (B, T, F), got shape {tuple(presence.shape)}")
    batch, steps, _ = presence.shape
    if not 0 <= horizon < steps:
        raise ValueError(f"horizon must be in [0, {steps}) for windows of {steps} steps, got {horizon}")
    if not 0.0 <= random_fraction <= 1.0 or not 0.0 <= forecast_probability <= 1.0:
        raise ValueError(f"random_fraction and forecast_probability must be in [0, 1], got {random_fraction}, "
                         f"{forecast_probability}")
    device = presence.device
    is_forecast = torch.rand(batch, generator=generator) < forecast_probability  # (B,)
    forecast = torch.zeros(presence.shape, dtype=torch.bool)
    if horizon:
        forecast[:, steps - horizon:] = True
    random = torch.rand(presence.shape, generator=generator) < random_fraction  # (B, T, F)
    mask = torch.where(is_forecast[:, None, None], forecast, random)
    return mask.to(device)
