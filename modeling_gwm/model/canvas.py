"""The canvas: how a window of heterogeneous series becomes a sequence of d_model vectors, and back.

A window holds T time steps of F fields. Position (t, f) is flattened time-major to n = t * F + f, so N = T * F.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .configuration_gwm import RESIDUAL_BASELINES  # the one list of baseline names


def sinusoidal_encoding(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Fixed sin/cos encoding of integer positions: (N,) -> (N, dim). No parameters, any length."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=positions.device, dtype=torch.float32) / half)
    angles = positions.float()[:, None] * freqs[None, :]  # (N, half)
    encoding = torch.cat([angles.sin(), angles.cos()], dim=-1)
    if dim % 2:
        encoding = nn.functional.pad(encoding, (0, 1))
    return encoding


SCALE_FLOOR = 0.1  # smallest window scale, in training stds: a near-constant context does not blow values up


def window_scale(values: torch.Tensor, visible: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Location and scale of each (sample, field) from its VISIBLE positions only: values, visible (B, T, F) ->
    loc, scale (B, 1, F).

    The values arrive normalised by the adapter's training statistics, so scale 1 is one training std: a context
    with no observation (loc 0), a single one or a constant field (loc = its value) gets scale 1, and any other
    scale is floored at `SCALE_FLOOR` so that nothing is ever divided by zero.
    """
    visible = visible.bool()
    x = torch.where(visible, values.float(), torch.zeros((), device=values.device))  # (B, T, F)
    count = visible.sum(dim=1, keepdim=True).float()  # (B, 1, F)
    ones, zeros = torch.ones_like(count), torch.zeros_like(count)
    if scheme == "none":
        return zeros, ones
    mean = x.sum(dim=1, keepdim=True) / count.clamp_min(1.0)  # (B, 1, F)
    if scheme == "mean_abs":
        spread = x.abs().sum(dim=1, keepdim=True) / count.clamp_min(1.0)
        loc = zeros
    else:
        var = ((x - mean) ** 2 * visible).sum(dim=1, keepdim=True) / count.clamp_min(1.0)
        spread = var.sqrt()
        if scheme == "instance":
            loc = mean
        elif scheme == "last_value":
            steps = torch.arange(values.size(1), device=values.device).view(1, -1, 1)
            last = torch.where(visible, steps, -1).max(dim=1, keepdim=True).values.clamp_min(0)  # (B, 1, F)
            loc = x.gather(1, last)
        else:
            raise ValueError(f"unknown window scaling {scheme!r}")
    degenerate = (count < 2) | (spread < 1e-6)
    scale = torch.where(degenerate, ones, spread.clamp_min(SCALE_FLOOR))
    loc = torch.where(count > 0, loc, zeros)
    return loc, scale


# season length in grid steps by the grid's pandas offset (its name without anchor); anything else has no season here
SEASON_PERIODS = {"MS": 12, "ME": 12, "M": 12, "QS": 4, "QE": 4, "Q": 4, "W": 52, "D": 7, "B": 5, "h": 24, "H": 24}


def season_period(frequency: str | None) -> int:
    """Steps per season of a grid frequency ("MS" -> 12, "QS" -> 4, "D" -> 7); 0 for none known (yearly, "2MS")."""
    if not frequency:
        return 0
    import pandas as pd

    offset = pd.tseries.frequencies.to_offset(frequency)
    return SEASON_PERIODS.get(offset.rule_code.split("-")[0], 0) if offset.n == 1 else 0


def seasonal_lag(values: torch.Tensor, visible: torch.Tensor, period: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For every position, the most recent VISIBLE value of its field k * period steps earlier (k = 1, 2, ...):
    values, visible (B, T, F) -> lag (B, T, F) (0 where none), has_lag (B, T, F) bool."""
    lag, has, _ = _seasonal_lag_and_shift(values, visible, period)
    return lag, has


def _seasonal_lag_and_shift(values: torch.Tensor, visible: torch.Tensor, period: int):
    """`seasonal_lag` plus the shift (k * period steps, 0 where none) each lag was taken from."""
    lag, has = torch.zeros_like(values), torch.zeros_like(visible, dtype=torch.bool)
    shifts = torch.zeros_like(values)
    steps = values.size(1)
    for shift in range(period, steps, period) if period > 0 else ():
        earlier_visible = nn.functional.pad(visible[:, :-shift], (0, 0, shift, 0))  # (B, T, F), False for t < shift
        earlier = nn.functional.pad(values[:, :-shift], (0, 0, shift, 0))
        take = earlier_visible.bool() & ~has
        lag, has = torch.where(take, earlier, lag), has | take
        shifts = torch.where(take, float(shift), shifts)
    return lag, has, shifts


DRIFT_DAMPING = 0.9  # per-step damping of "seasonal_damped_drift"'s drift beyond the context (ETS's phi)
STATS_CLIP = 4.0  # the window statistics the codec may see are clipped to [-4, 4]


def last_visible(values: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """The last VISIBLE value of each (sample, field): values, visible (B, T, F) -> (B, 1, F) (0 where none)."""
    steps = torch.arange(values.size(1), device=values.device).view(1, -1, 1)
    last = torch.where(visible.bool(), steps, -1).max(dim=1, keepdim=True).values  # (B, 1, F)
    found = values.gather(1, last.clamp_min(0))
    return torch.where(last >= 0, found, torch.zeros_like(found))


def context_baseline(values: torch.Tensor, visible: torch.Tensor, scheme: str, period: int) -> torch.Tensor:
    """A forecast of every position from the VISIBLE positions only, what the value head adds its residual to:
    values, visible (B, T, F) -> (B, T, F), in the units of `values`.

    `"none"`: 0. `"last_value"`: the last visible value. `"seasonal_naive"`: the latest visible value whole seasons
    earlier (the last visible value where there is none, and for a grid without a season). `"seasonal_drift"`:
    seasonal-naive plus the drift times the steps it reaches back; the drift is the mean difference between visible
    values one season (one step without a season) apart, per step, so a trend continues and a season repeats.
    `"seasonal_damped_drift"`: the same, but the steps beyond the field's last visible position are damped as in
    ETS's damped trend: at lead h the drift counts `DRIFT_DAMPING + ... + DRIFT_DAMPING**h` steps (at most
    `DRIFT_DAMPING / (1 - DRIFT_DAMPING)`, 9) instead of h, while the steps between the lag and the last visible
    value (observed, not extrapolated) count in full. A cycle's slope is then not carried on linearly.
    """
    if scheme == "none":
        return torch.zeros_like(values)
    visible = visible.bool()
    x = torch.where(visible, values.float(), torch.zeros((), device=values.device))
    last = last_visible(x, visible)  # (B, 1, F)
    if scheme == "last_value":
        return last.expand_as(x)
    if scheme not in RESIDUAL_BASELINES:
        raise ValueError(f"unknown residual baseline {scheme!r}")
    step = period if period > 0 else 1
    lag, has, shifts = _seasonal_lag_and_shift(x, visible, step)
    baseline = torch.where(has, lag, last)
    if scheme in ("seasonal_drift", "seasonal_damped_drift") and x.size(1) > step:
        pair = visible[:, step:] & visible[:, :-step]  # (B, T - step, F)
        differences = torch.where(pair, x[:, step:] - x[:, :-step], torch.zeros((), device=x.device))
        drift = differences.sum(dim=1, keepdim=True) / pair.sum(dim=1, keepdim=True).clamp_min(1) / step  # (B,1,F)
        if scheme == "seasonal_damped_drift":
            shifts = _damped_shifts(shifts, visible)
        baseline = baseline + torch.where(has, drift * shifts, torch.zeros_like(baseline))
    return baseline


def _damped_shifts(shifts: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """The steps the drift is added for, with the lead h beyond each field's last visible position (B, 1, F) counted
    as `sum_{i=1..h} DRIFT_DAMPING**i`: shifts, visible (B, T, F) -> (B, T, F). Positions up to the last visible one
    (lead 0) keep their shift."""
    steps = torch.arange(visible.size(1), device=visible.device).view(1, -1, 1)
    last = torch.where(visible, steps, -1).max(dim=1, keepdim=True).values  # (B, 1, F)
    lead = (steps - last).clamp_min(0).to(shifts.dtype)  # (B, T, F)
    phi = DRIFT_DAMPING
    damped = phi * (1 - phi ** lead) / (1 - phi)
    return shifts - lead + damped


def window_statistics(scaled: torch.Tensor, visible: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """What the codec may know of a window's statistics, scale-free and bounded: the log of its scale (in training
    stds) and the mean of its visible context in the window's own scaled units, each clipped to +-`STATS_CLIP`.
    Never a location in global units: a level far outside the training range looks like any other.
    scaled, visible (B, T, F), scale (B, 1, F) -> (B, F, 2)."""
    visible = visible.bool()
    count = visible.sum(dim=1).clamp_min(1)  # (B, F)
    mean = torch.where(visible, scaled, torch.zeros((), device=scaled.device)).sum(dim=1) / count
    return torch.stack([scale[:, 0].log(), mean], dim=-1).clamp(-STATS_CLIP, STATS_CLIP)


class FieldCodec(nn.Module):
    """Values in, embeddings out (and the value head back).

    Position (t, f) gets `value_encoder(x) + field_embedding[slot(f)] (+ stats_encoder(loc, log scale))`; a
    position that is absent or hidden for prediction gets the learned `mask_embedding` instead of the value part.
    The value head predicts `n_quantiles` values per position. Field slots are assigned by name in the adapter's
    field list, which is what lets adapters with different fields merge.
    """

    def __init__(self, max_fields: int, d_model: int, n_quantiles: int = 1, stats_input: bool = False,
                 lag_input: bool = False, residual: bool = False):
        super().__init__()
        self.value_encoder = nn.Sequential(nn.Linear(1, d_model), nn.GELU(), nn.Linear(d_model, d_model))
        self.field_embedding = nn.Embedding(max_fields, d_model)
        self.mask_embedding = nn.Parameter(torch.zeros(d_model))
        self.value_head = nn.Linear(d_model, n_quantiles)
        nn.init.normal_(self.field_embedding.weight, std=0.02)
        nn.init.normal_(self.mask_embedding, std=0.02)
        if residual:  # the head predicts a residual over a baseline: zero at init, so the model starts as that baseline
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
        # the window's log-scale and context mean (scale-free, bounded): zero-initialised, as if absent at first
        self.stats_encoder = nn.Linear(2, d_model) if stats_input else None
        if self.stats_encoder is not None:
            nn.init.zeros_(self.stats_encoder.weight)
            nn.init.zeros_(self.stats_encoder.bias)
        # the seasonal lag (value, has-lag flag), zero-initialised likewise
        self.lag_encoder = nn.Linear(2, d_model) if lag_input else None
        if self.lag_encoder is not None:
            nn.init.zeros_(self.lag_encoder.weight)
            nn.init.zeros_(self.lag_encoder.bias)

    def encode(self, values: torch.Tensor, visible: torch.Tensor, field_ids: torch.Tensor,
               window_stats: torch.Tensor | None = None, lag: tuple[torch.Tensor, torch.Tensor] | None = None
               ) -> torch.Tensor:
        # values, visible: (B, T, F); field_ids: (F,) or (B, F) codec slots; window_stats: (B, F, 2);
        # lag: (B, T, F) seasonal-lag values and (B, T, F) bool has-lag
        batch, steps, n_fields = values.shape
        value_part = self.value_encoder(values.float().unsqueeze(-1))  # (B, T, F, D)
        value_part = torch.where(visible.unsqueeze(-1), value_part, self.mask_embedding)  # (B, T, F, D)
        field_part = self.field_embedding(field_ids)  # (F, D) or (B, F, D)
        if field_part.dim() == 3:
            field_part = field_part.unsqueeze(1)  # (B, 1, F, D)
        if self.stats_encoder is not None and window_stats is not None:
            field_part = field_part + self.stats_encoder(window_stats.float()).unsqueeze(1)  # (B, 1, F, D)
        if self.lag_encoder is not None and lag is not None:
            lag_values, has_lag = lag
            lag_in = torch.stack([torch.where(has_lag, lag_values, 0.0), has_lag.float()], dim=-1)  # (B, T, F, 2)
            value_part = value_part + self.lag_encoder(lag_in.float())  # (B, T, F, D)
        return (value_part + field_part).reshape(batch, steps * n_fields, -1)  # (B, N, D)

    def decode(self, hidden: torch.Tensor, steps: int) -> torch.Tensor:
        # hidden: (B, N, D) -> quantiles (B, T, F, Q)
        out = self.value_head(hidden)  # (B, N, Q)
        return out.reshape(hidden.size(0), steps, -1, out.size(-1))


def pinball_loss(quantiles: torch.Tensor, values: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Quantile (pinball) loss per position, averaged over levels: quantiles (..., Q), values (...), levels (Q,)
    -> (...). For level tau and error e = y - q it is tau * e when e >= 0 and (tau - 1) * e otherwise."""
    error = values.unsqueeze(-1) - quantiles  # (..., Q)
    return torch.maximum(levels * error, (levels - 1) * error).mean(dim=-1)
