"""The forecasting API as the ecosystem names it: prediction_length (horizon= a deprecated alias), a single series as
history, the time-column hint, the Hub's forward names, and a rolled-out band that widens with the lead time."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import peft
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from modeling_gwm import GWMModel, LoopConfig  # noqa: E402
from modeling_gwm.model.base import TINY_BASE_PATH  # noqa: E402
from modeling_gwm.tabular import DataError  # noqa: E402

CONTEXT, HORIZON = 12, 3
LEVEL = {"name": "demo.level", "mean": 10.0, "std": 2.0, "transform": "none", "unit": "degC"}
PRICE = {"name": "demo.price", "mean": 4.0, "std": 0.5, "transform": "log", "unit": "USD"}


def _model(fields: list[dict], **settings):
    torch.manual_seed(0)
    base = GWMModel.from_pretrained(TINY_BASE_PATH, d_model=32, context_len=CONTEXT, horizon=HORIZON, **settings)
    return peft.get_peft_model(base, LoopConfig(n_loops=2, fields=fields), adapter_name="node")


@pytest.fixture(scope="module")
def one_field():
    return _model([LEVEL])


@pytest.fixture(scope="module")
def two_fields():
    return _model([LEVEL, PRICE])


def _levels(steps: int = 30) -> np.ndarray:
    return 10.0 + np.sin(np.arange(steps) / 3.0)


def _frame(steps: int = 30) -> pd.DataFrame:
    return pd.DataFrame({"date": pd.date_range("2000-01-01", periods=steps, freq="MS"), "demo.level": _levels(steps)})


def test_prediction_length_is_the_name_and_horizon_a_deprecated_alias(one_field):
    named = one_field.forecast(_frame(), prediction_length=7)
    assert named.shape == (7, 1)
    with pytest.warns(FutureWarning, match="prediction_length"):
        old = one_field.forecast(_frame(), horizon=7)
    pd.testing.assert_frame_equal(named, old)
    with pytest.warns(FutureWarning):
        quantiles = one_field.forecast_quantiles(_frame(), horizon=7, quantile_levels=[0.5])
    np.testing.assert_allclose(quantiles.to_numpy()[:, 0], named.to_numpy()[:, 0])
    with pytest.raises(ValueError, match="not both"):
        one_field.forecast(_frame(), prediction_length=7, horizon=7)


def test_prediction_length_defaults_to_the_adapters_horizon(one_field):
    assert len(one_field.forecast(_frame())) == HORIZON


def test_methods_have_real_signatures():
    import inspect

    for name in ("forecast", "forecast_quantiles", "impute", "predict_df"):
        parameters = inspect.signature(getattr(GWMModel, name)).parameters
        assert not any(p.kind is p.VAR_KEYWORD for p in parameters.values()), name
        assert "see modeling_gwm" not in getattr(GWMModel, name).__doc__.splitlines()[0]
    assert "prediction_length" in inspect.signature(GWMModel.forecast).parameters


@pytest.mark.parametrize("kind", ["numpy", "series", "tensor", "column"])
def test_a_single_series_is_the_history_of_a_one_field_adapter(one_field, kind):
    values = _levels()
    history = {"numpy": values, "series": pd.Series(values, name="anything"), "tensor": torch.tensor(values),
               "column": values[:, None]}[kind]
    expected = one_field.forecast({"demo.level": values}, prediction_length=5)
    pd.testing.assert_frame_equal(one_field.forecast(history, prediction_length=5), expected)


def test_a_dated_series_keeps_its_dates(one_field):
    frame = _frame()
    series = frame.set_index("date")["demo.level"]
    out = one_field.forecast(series, prediction_length=4)
    assert list(out.index) == list(pd.date_range("2002-07-01", periods=4, freq="MS"))
    pd.testing.assert_frame_equal(out, one_field.forecast(frame, prediction_length=4))


def test_a_single_series_of_a_many_field_adapter_needs_its_field(two_fields):
    values = _levels()
    with pytest.raises(DataError, match=r"needs field= \(one of \['demo.level', 'demo.price'\]\)"):
        two_fields.forecast(values, prediction_length=4)
    out = two_fields.forecast(np.exp(4.0 + 0.01 * np.arange(30)), prediction_length=4, field="demo.price")
    assert list(out.columns) == ["demo.price"]
    filled = two_fields.impute(pd.Series([10.0, np.nan, *_levels(20)]), field="demo.level")
    assert filled["demo.level"].notna().all()
    with pytest.raises(DataError, match="unknown field 'demo.nope'"):
        two_fields.forecast(values, prediction_length=4, field="demo.nope")
    with pytest.raises(DataError, match=r"numpy array, pd.Series or tensor\), got list"):
        two_fields.forecast([1.0, 2.0, 3.0], prediction_length=4)
    with pytest.raises(DataError, match="must be 1-D"):
        two_fields.forecast(np.ones((30, 2)), prediction_length=4, field="demo.level")


def test_a_time_column_not_named_date_gets_the_hint(one_field):
    weekly = pd.DataFrame({"week": pd.date_range("2000-01-02", periods=30, freq="W"), "demo.level": _levels()})
    with pytest.raises(DataError) as info:
        one_field.forecast(weekly, prediction_length=3)
    assert "unknown field(s) ['week']" in str(info.value)
    assert "pass time_column='week'" in str(info.value)
    assert len(one_field.forecast(weekly, prediction_length=3, time_column="week")) == 3


def test_forward_takes_the_hub_time_series_names(one_field):
    model = one_field.get_base_model().eval()
    torch.manual_seed(1)
    past, future = torch.randn(2, 9, 1), torch.randn(2, HORIZON, 1)
    hub = model(past_values=past, future_values=future)
    values = torch.cat([past, future], dim=1)
    target = torch.zeros_like(values, dtype=torch.bool)
    target[:, 9:] = True
    ours = model(values=values, presence=torch.ones_like(target), target_mask=target)
    torch.testing.assert_close(hub.quantiles, ours.quantiles)
    torch.testing.assert_close(hub.loss, ours.loss)
    # no future: the config's horizon is predicted after the past; a missing past value is unobserved
    observed = torch.ones_like(past, dtype=torch.bool)
    observed[0, 2] = False
    ahead = model(past_values=past, past_observed_mask=observed)
    assert ahead.predictions.shape == (2, 9 + HORIZON, 1) and ahead.loss is not None
    with pytest.raises(ValueError, match="not both"):
        model(values=values, presence=target, past_values=past)


def test_rolled_out_band_widens_with_the_lead_time():
    # a plain value head: with a residual baseline an untrained adapter's band has no width at all
    one_field = _model([LEVEL], residual_baseline="none")
    quantiles = one_field.forecast_quantiles(_frame(), prediction_length=4 * HORIZON, quantile_levels=[0.1, 0.5, 0.9])
    width = (quantiles["demo.level", 0.9] - quantiles["demo.level", 0.1]).to_numpy()
    chunk_ends = width[HORIZON - 1::HORIZON]  # the last step of each chunk of the adapter's horizon
    chunk_starts = width[HORIZON::HORIZON]  # the first step of each later chunk
    assert np.all(chunk_starts >= chunk_ends[:-1] - 1e-9)  # no saw-tooth: a chunk starts no narrower than the last
    assert width[-1] > width[HORIZON - 1]  # wider at the end than after the first chunk
    # the median path is the feedback path of `forecast`
    np.testing.assert_allclose(quantiles["demo.level", 0.5], one_field.forecast(_frame(), 4 * HORIZON)["demo.level"])
