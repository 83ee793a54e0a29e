"""Target masks: forecast hides the last `horizon` steps, random hides a share of present positions."""

from __future__ import annotations

import pytest
import torch

from modeling_gwm.training.masking import sample_target_mask


def gappy_presence(batch: int = 8, steps: int = 12, fields: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, steps, fields, generator=torch.Generator().manual_seed(seed)) < 0.7  # (B, T, F)


def test_the_same_generator_seed_gives_the_same_mask_and_another_seed_another():
    presence = gappy_presence()
    first = sample_target_mask(presence, 3, 0.3, generator=torch.Generator().manual_seed(7))
    again = sample_target_mask(presence, 3, 0.3, generator=torch.Generator().manual_seed(7))
    other = sample_target_mask(presence, 3, 0.3, generator=torch.Generator().manual_seed(8))
    assert first.dtype == torch.bool and first.shape == presence.shape
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_forecast_masks_exactly_the_last_horizon_steps_of_every_field_present_or_not():
    presence = gappy_presence()
    mask = sample_target_mask(presence, 4, 0.3, forecast_probability=1.0, generator=torch.Generator().manual_seed(0))
    assert mask[:, -4:].all()  # absent positions too: the loss takes mask & presence
    assert not mask[:, :-4].any()


def test_random_masks_the_given_share_of_present_positions_only():
    presence = gappy_presence(batch=16)
    mask = sample_target_mask(presence, 4, 0.25, forecast_probability=0.0, generator=torch.Generator().manual_seed(0))
    assert not (mask & ~presence).any()
    n_present = presence.flatten(1).sum(dim=1)
    assert mask.flatten(1).sum(dim=1).tolist() == (n_present.double() * 0.25).round().long().tolist()


def test_random_masks_at_least_one_position_and_nothing_in_an_empty_window():
    presence = torch.zeros(2, 6, 2, dtype=torch.bool)
    presence[0, 2, 1] = True  # one observation in the first window, none in the second
    mask = sample_target_mask(presence, 2, 0.1, forecast_probability=0.0, generator=torch.Generator().manual_seed(0))
    assert mask[0].sum() == 1 and mask[0, 2, 1]
    assert not mask[1].any()


def test_each_sample_draws_its_own_task_at_the_forecast_probability():
    presence = torch.ones(2000, 8, 2, dtype=torch.bool)
    mask = sample_target_mask(presence, 2, 0.5, forecast_probability=0.3, generator=torch.Generator().manual_seed(0))
    is_forecast = mask[:, -2:].all(dim=(1, 2)) & ~mask[:, :-2].any(dim=(1, 2))
    assert 0.25 < is_forecast.float().mean() < 0.35
    assert (mask[~is_forecast].flatten(1).sum(dim=1) == 8).all()  # half of the 16 positions


@pytest.mark.parametrize("kwargs, message", [
    ({"horizon": 0}, r"horizon must be an integer in \[1, 6\)"),
    ({"horizon": 6}, r"horizon must be an integer in \[1, 6\)"),
    ({"horizon": 2.0}, r"horizon must be an integer"),
    ({"random_fraction": 1.5}, r"random_fraction must be a number in \[0, 1\], got 1.5"),
    ({"forecast_probability": -0.1}, r"forecast_probability must be a number in \[0, 1\]"),
    ({"presence": torch.ones(6, 2, dtype=torch.bool)}, r"presence must be a \(B, T, F\) bool tensor, got \(6, 2\)"),
    ({"presence": torch.ones(1, 6, 2)}, r"presence must be a \(B, T, F\) bool tensor.*torch.float32"),
])
def test_bad_arguments_are_clear_errors(kwargs, message):
    arguments = {"presence": torch.ones(1, 6, 2, dtype=torch.bool), "horizon": 2, "random_fraction": 0.2} | kwargs
    with pytest.raises(ValueError, match=message):
        sample_target_mask(**arguments)
