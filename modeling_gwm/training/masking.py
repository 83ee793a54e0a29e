"""Which canvas positions are hidden from the input and predicted during training.

Two tasks share one model: *forecast* (the last `horizon` steps of every field are hidden, the past is seen) and
*random* (a fraction of the observed positions is hidden anywhere in the window, i.e. imputation). Each sample of a
batch draws its task independently.
"""

from __future__ import annotations

import torch


def sample_target_mask(presence: torch.Tensor, horizon: int, random_fraction: float, forecast_probability: float = 0.5,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """The (B, T, F) bool target mask: positions hidden from the input and predicted.

    Per sample, with probability `forecast_probability` the last `horizon` steps of every field are masked
    ("forecast"), otherwise `random_fraction` of that sample's *present* positions (rounded, at least one when the
    fraction is positive and anything is present) are drawn uniformly without replacement ("random").

    The mask is returned raw: a forecast mask also covers absent positions of the last steps. The loss must be
    taken where `mask & presence` (the model does this): absent positions are never targets. Deterministic for a
    given `generator` state; the same number of random draws is made whatever the tasks drawn.

    Args:
        presence: (B, T, F) bool, True where the value was observed.
        horizon: steps hidden by a forecast mask, in [1, T).
        random_fraction: share of present positions hidden by a random mask, in [0, 1].
        forecast_probability: chance that a sample is a forecast, in [0, 1].
        generator: a CPU (or `presence`'s device) torch.Generator for reproducible masks.
    """
    if not isinstance(presence, torch.Tensor) or presence.dim() != 3 or presence.dtype != torch.bool:
        shape = tuple(presence.shape) if isinstance(presence, torch.Tensor) else type(presence).__name__
        raise ValueError(f"presence must be a (B, T, F) bool tensor, got {shape}"
                         + (f" of {presence.dtype}" if isinstance(presence, torch.Tensor) else ""))
    batch, steps, n_fields = presence.shape
    if isinstance(horizon, bool) or not isinstance(horizon, int) or not 1 <= horizon < steps:
        raise ValueError(f"horizon must be an integer in [1, {steps}) for windows of {steps} steps, got {horizon!r}")
    for name, value in (("random_fraction", random_fraction), ("forecast_probability", forecast_probability)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    draw_device = generator.device if generator is not None else presence.device
    is_forecast = torch.rand(batch, generator=generator, device=draw_device) < forecast_probability  # (B,)
    scores = torch.rand(batch, steps * n_fields, generator=generator, device=draw_device)  # (B, N)
    is_forecast, scores = is_forecast.to(presence.device), scores.to(presence.device)

    forecast = torch.zeros_like(presence)  # (B, T, F)
    forecast[:, steps - horizon:] = True

    flat_presence = presence.reshape(batch, -1)  # (B, N)
    scores = scores.masked_fill(~flat_presence, 2.0)  # absent positions sort last
    rank = scores.argsort(dim=1).argsort(dim=1)  # (B, N) rank of each position among the sample's positions
    n_present = flat_presence.sum(dim=1)  # (B,)
    n_random = (n_present.double() * random_fraction).round().long()  # (B,)
    if random_fraction > 0:
        n_random = torch.maximum(n_random, (n_present > 0).long())
    random = (rank < n_random[:, None]).reshape(batch, steps, n_fields)  # (B, T, F), only present positions

    return torch.where(is_forecast[:, None, None], forecast, random)
