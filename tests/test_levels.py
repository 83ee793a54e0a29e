"""No level leaks: a model trained on one range of levels forecasts a series far outside it from its context alone.

Each test trains a small GWM (tiny base, a few dozen Adam steps on noisy windows of a training stretch, values in the
training stretch's normalised units as the trainer gives them) and then forecasts a window whose level is three
times the training maximum: the first forecast step's median must stay within the context's last value +- a few
window scales, and the 10-90 % band must contain the noiseless continuation's first step.
"""

from __future__ import annotations

import math

import pytest
import torch

from modeling_gwm import GWMModel
from modeling_gwm.model.canvas import context_baseline, window_scale

STEPS, HORIZON = 36, 12


def _train(model: GWMModel, series: torch.Tensor, stop: int, steps: int = 60, seed: int = 0) -> None:
    """Adam on windows of series[:stop] (normalised by that stretch's mean and std), the last HORIZON hidden."""
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, stop - STEPS, (16,), generator=generator)
        values = torch.stack([series[s:s + STEPS] for s in starts]).unsqueeze(-1)  # (B, T, 1)
        presence = torch.ones_like(values, dtype=torch.bool)
        target = torch.zeros_like(presence)
        target[:, -HORIZON:] = True
        loss = model(values, presence, target_mask=target).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()


def _first_step(model: GWMModel, window: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """Quantiles of the first forecast step, the context's last value and the window's scale (normalised units)."""
    values = window.view(1, STEPS, 1)
    presence = torch.ones_like(values, dtype=torch.bool)
    target = torch.zeros_like(presence)
    target[:, -HORIZON:] = True
    with torch.no_grad():
        out = model(values, presence, target_mask=target)
    _, scale = window_scale(values, presence & ~target, model.config.window_scaling)
    return out.quantiles[0, STEPS - HORIZON, 0], float(values[0, STEPS - HORIZON - 1, 0]), float(scale)


def _check(model, clean: torch.Tensor, noisy: torch.Tensor, train_stop: int, start: int, mean, std) -> None:
    assert clean[start:start + STEPS].max() > 3 * clean[:train_stop].max()  # far outside the training range
    _train(model, (noisy - mean) / std, train_stop)
    quantiles, last, scale = _first_step(model, (clean[start:start + STEPS] - mean) / std)
    levels = model.config.quantile_levels
    median, low, high = (quantiles[levels.index(q)].item() for q in (0.5, 0.1, 0.9))
    truth = ((clean[start + STEPS - HORIZON] - mean) / std).item()  # the noiseless continuation's first step
    assert abs(median - last) <= 3 * scale, (median, last, scale)
    assert low <= truth <= high, (low, truth, high)


@pytest.mark.parametrize("stats_input", [False, True])
def test_a_trend_far_above_the_training_range_is_continued_from_its_context(stats_input, tiny_base):
    torch.manual_seed(0)
    t = torch.arange(1000, dtype=torch.float32)
    clean = 100.0 + t  # a smooth trend; trained on its first 200 steps (max 299), forecast near 900
    noisy = clean + torch.randn(1000)
    model = GWMModel.from_pretrained(tiny_base, d_model=16, window_stats_input=stats_input)
    stop = 200
    _check(model, clean, noisy, stop, start=800, mean=noisy[:stop].mean(), std=noisy[:stop].std())


@pytest.mark.parametrize("stats_input", [False, True])
def test_a_season_with_growing_amplitude_far_above_the_training_range_keeps_its_shape(stats_input, tiny_base):
    torch.manual_seed(0)
    t = torch.arange(1200, dtype=torch.float32)
    clean = 20.0 + 0.5 * t + (10.0 + 0.05 * t) * torch.sin(2 * math.pi * t / 12)  # amplitude grows with the level
    noisy = clean + 0.5 * torch.randn(1200)
    model = GWMModel.from_pretrained(tiny_base, d_model=16, window_stats_input=stats_input, seasonal_lag_input=True,
                                     season_period=12)
    stop = 240
    _check(model, clean, noisy, stop, start=1100, mean=noisy[:stop].mean(), std=noisy[:stop].std())


@pytest.mark.parametrize("baseline", ["seasonal_drift", "none"])
def test_no_input_reads_a_window_location_in_global_units(baseline, tiny_base):
    """Structural: whatever the weights, a window shifted by a constant is forecast shifted by that constant (the
    old statistics input fed the location itself, so a level outside the training range moved the forecast)."""
    model = GWMModel.from_pretrained(tiny_base, d_model=16, window_stats_input=True, seasonal_lag_input=True,
                                     season_period=4, residual_baseline=baseline).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.codec.parameters():  # as if trained: every input path, statistics included, counts
            parameter.add_(0.3 * torch.randn_like(parameter))
    values = torch.cumsum(torch.randn(2, STEPS, 2), dim=1)
    presence = torch.ones_like(values, dtype=torch.bool)
    target = torch.zeros_like(presence)
    target[:, -HORIZON:] = True
    with torch.no_grad():
        near = model(values, presence, target_mask=target).quantiles
        far = model(values + 40.0, presence, target_mask=target).quantiles  # 40 training stds above
    torch.testing.assert_close(far, near + 40.0, atol=1e-3, rtol=0)


def _untrained_forecast(tiny_base, baseline: str, series: torch.Tensor, context: int) -> torch.Tensor:
    """An untrained adapter's quantiles (T - context, Q) over the tail of `series` hidden after `context` steps."""
    model = GWMModel.from_pretrained(tiny_base, d_model=16, season_period=12, residual_baseline=baseline).eval()
    values = series.view(1, -1, 1)
    presence = torch.ones_like(values, dtype=torch.bool)
    target = torch.zeros_like(presence)
    target[:, context:] = True
    with torch.no_grad():
        return model(values, presence, target_mask=target).quantiles[0, context:, 0]


def test_the_damped_drift_keeps_a_cycle_longer_than_the_context_near_its_range(tiny_base):
    """A sine of period 130 steps on a monthly grid, 48 steps of context ending on its rise: an untrained adapter on
    seasonal_drift carries the rise on linearly over 18 steps, far above anything the context saw; on the damped
    drift it stays near the context's range (monthly sunspots' failure, in miniature)."""
    t = torch.arange(110, 110 + 48 + 18, dtype=torch.float32)
    series = torch.sin(2 * math.pi * t / 130)
    context = series[:48]
    spread = float(context.max() - context.min())

    def excess(baseline: str) -> float:
        forecast = _untrained_forecast(tiny_base, baseline, series, 48)
        return max(float(forecast.max() - context.max()), float(context.min() - forecast.min()))

    assert excess("seasonal_drift") > 0.45 * spread
    assert excess("seasonal_damped_drift") < 0.3 * spread


def test_an_untrained_adapter_forecasts_the_damped_drift_which_still_continues_a_line(tiny_base):
    line = 5.0 + 0.5 * torch.arange(60, dtype=torch.float32)  # context 48 steps, ends at 28.5
    quantiles = _untrained_forecast(tiny_base, "seasonal_damped_drift", line, 48)
    expected = context_baseline(line.view(1, -1, 1), (torch.arange(60) < 48).view(1, -1, 1),
                                "seasonal_damped_drift", 12)[0, 48:, 0]
    torch.testing.assert_close(quantiles, expected[:, None].expand_as(quantiles), atol=1e-4, rtol=0)
    steps = [0.5 * sum(0.9 ** i for i in range(1, h + 1)) for h in range(1, 13)]  # sum_{i<=h} phi^i of the drift
    torch.testing.assert_close(expected[:12], 28.5 + torch.tensor(steps), atol=1e-4, rtol=0)
    assert expected[0] > 28.5 + 0.4 and expected[-1] < 28.5 + 0.5 * 12  # continues the trend, damped
