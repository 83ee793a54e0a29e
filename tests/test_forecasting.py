"""Forecast, impute and evaluate in the data's own units, on the tiny CogVideoX base with a real loop adapter."""

from __future__ import annotations

import math
import os

import numpy as np
import pandas as pd
import peft
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from modeling_gwm import GWMModel, LoopConfig  # noqa: E402
from modeling_gwm.forecasting.evaluation import (  # noqa: E402
    default_season,
    error_metrics,
    evaluate,
    format_evaluation,
    naive_forecast,
    seasonal_naive_forecast,
)
from modeling_gwm.forecasting.pipeline import (  # noqa: E402
    AdapterSpec,
    forecast_quantiles,
    predict_windows,
    read_history,
)
from modeling_gwm.model.base import TINY_BASE_PATH  # noqa: E402
from modeling_gwm.plots import plot_forecast  # noqa: E402
from modeling_gwm.tabular import DataError  # noqa: E402

FIELDS = [
    {"name": "demo.level", "mean": 10.0, "std": 2.0, "transform": "none", "unit": "degC"},
    {"name": "demo.price", "mean": 4.0, "std": 0.5, "transform": "log", "unit": "USD"},
    {"name": "demo.gdp", "mean": 0.01, "std": 0.005, "transform": "log_return", "unit": "bn USD"},
]
CONTEXT, HORIZON = 12, 3


@pytest.fixture(scope="module")
def model():
    base = GWMModel.from_pretrained(TINY_BASE_PATH, d_model=32, context_len=CONTEXT, horizon=HORIZON)
    return peft.get_peft_model(base, LoopConfig(n_loops=2, fields=FIELDS), adapter_name="node")


def _history(steps: int = 30) -> pd.DataFrame:
    return pd.DataFrame({
        "date": pd.date_range("2000-01-01", periods=steps, freq="MS"),
        "demo.level": np.full(steps, 10.0),
        "demo.price": np.exp(4.0 + 0.01 * np.arange(steps)),
        "demo.gdp": 100.0 * np.exp(0.01 * np.arange(steps)),
    })


def test_adapter_spec_reads_fields_and_window_from_peft_and_bare_model(model):
    for view in (model, model.get_base_model()):
        spec = AdapterSpec.from_model(view)
        assert list(spec.fields) == [f["name"] for f in FIELDS]
        assert (spec.context_len, spec.horizon, spec.adapter_name) == (CONTEXT, HORIZON, "node")


def test_forecast_rolls_out_beyond_the_horizon_in_raw_units(model):
    history = _history()
    out = model.forecast(history, 10)
    assert out.shape == (10, 3)
    assert list(out.columns) == ["demo.level", "demo.price", "demo.gdp"]
    # the time index continues the monthly grid
    assert list(out.index) == list(pd.date_range("2002-07-01", periods=10, freq="MS"))
    assert np.isfinite(out.to_numpy()).all()
    # a field at its mean comes back within a few stds of it, in degC, not in normalised units
    assert np.all(np.abs(out["demo.level"] - 10.0) < 4 * 2.0)
    # log fields come back positive; a log-return field continues from the last raw value
    assert (out["demo.price"] > 0).all()
    last = history["demo.gdp"].iloc[-1]
    assert np.all(np.abs(np.log(out["demo.gdp"] / last)) < 10 * (0.01 + 4 * 0.005))
    assert out.attrs["units"]["demo.level"] == "degC"


def test_forecast_quantiles_columns_units_and_median(model):
    history = _history()
    out = forecast_quantiles(model, history, 5)
    levels = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    assert list(out.columns) == [(f["name"], q) for f in FIELDS for q in levels]
    assert out.columns.names == ["field", "level"]
    assert np.isfinite(out.to_numpy()).all()
    for name in ("demo.level", "demo.price", "demo.gdp"):  # sorted per step, in the data's units
        assert (np.diff(out[name].to_numpy(), axis=1) >= -1e-9).all()
    assert np.all(np.abs(out["demo.level", 0.5] - 10.0) < 4 * 2.0) and (out["demo.price"] > 0).all().all()
    median = out.xs(0.5, axis=1, level="level")
    point = model.forecast(history, 5)
    assert point.columns.name is None
    pd.testing.assert_frame_equal(median.rename_axis(columns=None), point)
    picked = model.forecast_quantiles(history, 5, quantile_levels=[0.9, 0.1])
    assert list(picked.columns) == [(f["name"], q) for f in FIELDS for q in (0.1, 0.9)]
    pd.testing.assert_frame_equal(picked, out.loc[:, picked.columns])


def test_forecast_plot_draws_the_10_90_band(model):
    import io

    from matplotlib.collections import PolyCollection
    from matplotlib.figure import Figure

    history = _history()
    quantiles = forecast_quantiles(model, history, 5)
    drawn = []
    original = Figure.savefig
    Figure.savefig = lambda fig, *a, **k: drawn.append(fig) or original(fig, *a, **k)
    try:
        buffer = io.BytesIO()
        plot_forecast(history.set_index("date"), quantiles.xs(0.5, axis=1, level="level"), buffer, quantiles=quantiles)
    finally:
        Figure.savefig = original
    assert buffer.getvalue()[:4] == b"\x89PNG"
    bands = [c for ax in drawn[0].axes for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 3  # one 10-90 % band per field


def test_forecast_quantiles_unknown_level_is_one_clear_error(model):
    with pytest.raises(DataError, match=r"unknown quantile level\(s\) \[0.25\]: this adapter predicts \[0.1, 0.2"):
        forecast_quantiles(model, _history(), 3, quantile_levels=[0.25, 0.5])


def test_predict_windows_batches_windows_of_any_level(model):
    rng = np.random.default_rng(0)
    values = rng.normal(size=(4, CONTEXT, 2))  # (B, T, S) normalised
    values[2] += 1000.0  # a window far outside the training range
    values[3, :5] = np.nan  # missing values
    target = np.zeros(values.shape, dtype=bool)
    target[:, -HORIZON:] = True
    out = predict_windows(model, values, [0, 1], target)
    assert out.shape == (4, CONTEXT, 2, 9) and np.isfinite(out).all()
    assert (np.diff(out, axis=-1) >= 0).all()
    assert np.all(np.abs(out[2, -HORIZON:] - 1000.0) < 50.0)  # scale-free: forecast near its own level
    one = predict_windows(model, values[1:2], [0, 1], target[1:2])
    np.testing.assert_allclose(out[1:2], one, atol=1e-5)  # batching does not mix windows


def test_an_adapter_without_format_version_is_refused(model, tmp_path):
    import json

    from modeling_gwm import AdapterLoadError

    model.save_pretrained(tmp_path)
    config_path = tmp_path / "node" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    assert config["format_version"] == 3
    assert config["gwm_config"]["quantile_levels"] == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    assert config["gwm_config"]["residual_baseline"] == "seasonal_damped_drift"
    GWMModel.from_pretrained(TINY_BASE_PATH, tmp_path / "node")  # loads
    for old in (None, 2):  # no version (before quantiles), 2 (global window locations, no residual baseline)
        if old is None:
            del config["format_version"]
        else:
            config["format_version"] = old
        config_path.write_text(json.dumps(config))
        with pytest.raises(AdapterLoadError, match="made by an older GWM and needs retraining") as info:
            GWMModel.from_pretrained(TINY_BASE_PATH, tmp_path / "node")
        assert "\n" not in str(info.value)


def test_forecast_accepts_a_subset_of_fields_as_dict_or_dataset(model):
    import datasets

    history = _history()[["date", "demo.level"]]
    from_dict = model.forecast({k: history[k].to_numpy() for k in history}, 4)
    from_dataset = model.forecast(datasets.Dataset.from_pandas(history), 4)
    assert list(from_dict.columns) == ["demo.level"]
    pd.testing.assert_frame_equal(from_dict, from_dataset)


def test_forecast_without_time_column_continues_the_step_index(model):
    out = model.forecast({"demo.level": np.linspace(8.0, 12.0, 20)}, 5)
    assert list(out.index) == [20, 21, 22, 23, 24]


@pytest.mark.parametrize("history, horizon, message", [
    (_history().assign(**{"demo.unknown": 1.0}), 3, "unknown field(s) ['demo.unknown']"),
    (_history().assign(**{"demo.level": "warm"}), 3, "column 'demo.level' is not numeric"),
    (_history(5), 3, "needs at least 9"),
    (_history(1), 3, "the history has 1 steps; this adapter needs at least 9"),  # not "cannot infer the frequency"
    (_history(), 0, "prediction_length must be a positive"),
])
def test_forecast_bad_input_is_one_clear_error(model, history, horizon, message):
    with pytest.raises(ValueError) as info:
        model.forecast(history, horizon)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def _quarterly_gdp(steps: int, phase: int = 0) -> pd.DataFrame:
    """A monthly level and a GDP observed every third month (rows phase, phase + 3, ...)."""
    history = _history(steps)
    history.loc[(history.index - phase) % 3 != 0, "demo.gdp"] = np.nan
    return history


def test_forecast_keeps_a_coarser_field_at_its_own_spacing(model):
    out = model.forecast(_quarterly_gdp(36), 12)  # GDP last observed at row 33: next due at rows 36, 39, 42, 45
    assert out["demo.level"].notna().all()
    assert list(np.flatnonzero(out["demo.gdp"].notna())) == [0, 3, 6, 9]
    # the next quarter (row 35) is due inside the history: predicted there, so the forecast continues from it
    out = model.forecast(_quarterly_gdp(36, phase=2), 9)
    assert list(np.flatnonzero(out["demo.gdp"].notna())) == [2, 5, 8]


def test_evaluate_scores_a_coarser_field_at_its_own_steps(model):
    history = _quarterly_gdp(40, phase=1)  # GDP at rows 1, 4, ..., 37; held out: rows 34..39 -> quarters 34, 37
    result = evaluate(model, history, 6)
    gdp = result["fields"]["demo.gdp"]
    actual = history["demo.gdp"].to_numpy()
    assert gdp["naive"]["mae"] == pytest.approx(np.mean(np.abs(actual[[34, 37]] - actual[31])))
    assert math.isfinite(gdp["model"]["mae"]) and math.isfinite(gdp["model"]["mase"])


def test_a_field_not_observed_in_the_last_window_is_not_forecast(model, caplog):
    history = _history(30)
    history.loc[12:, "demo.gdp"] = np.nan  # last seen 18 rows before the end; context_len is 12
    with caplog.at_level("WARNING", logger="modeling_gwm.forecasting.pipeline"):
        out = model.forecast(history, 4)
    assert out["demo.gdp"].isna().all() and out["demo.level"].notna().all()
    assert "['demo.gdp']" in caplog.text
    history.loc[12:, ["demo.level", "demo.price"]] = np.nan
    with pytest.raises(DataError, match="no field is observed in the last 12 steps"):
        model.forecast(history, 4)


def test_a_field_with_no_value_is_absent(model):
    out = model.forecast(_history().assign(**{"demo.gdp": np.nan}), 3)
    assert list(out.columns) == ["demo.level", "demo.price"]


def test_history_goes_on_the_recorded_training_grid():
    spec = AdapterSpec.from_config(LoopConfig(fields=[{**f, "frequency": "MS"} for f in FIELDS]))
    assert spec.frequency == "MS"
    quarterly = {"date": pd.date_range("2000-01-01", periods=8, freq="QS"), "demo.gdp": np.arange(1.0, 9.0)}
    frame, freq = read_history(quarterly, spec)
    assert freq == "MS" and len(frame) == 22 and frame["demo.gdp"].notna().sum() == 8
    with pytest.raises(DataError, match="differs from the 'MS' grid"):
        read_history(quarterly, spec, freq="QS")


def test_unknown_field_is_a_data_error(model):
    with pytest.raises(DataError, match="this adapter knows"):
        model.forecast({"sst": np.ones(20)}, 2)


def test_impute_fills_only_missing_values(model):
    history = _history()
    gappy = history.copy()
    gappy.loc[[3, 4, 20], "demo.level"] = np.nan
    gappy.loc[10, "demo.price"] = np.nan
    filled = model.impute(gappy)
    assert filled.shape == (30, 3)
    assert not filled[["demo.level", "demo.price"]].isna().any().any()
    observed = ~gappy.set_index("date").isna()
    np.testing.assert_allclose(filled[observed].to_numpy()[observed.to_numpy()],
                               gappy.set_index("date")[observed].to_numpy()[observed.to_numpy()])
    assert np.all(np.abs(filled["demo.level"].iloc[[3, 4, 20]] - 10.0) < 8.0)
    assert filled["demo.price"].iloc[10] > 0


def test_impute_fills_a_coarser_field_only_at_its_own_steps(model):
    history = _quarterly_gdp(30, phase=1)  # GDP at rows 1, 4, ..., 28
    history.loc[[10, 11, 13], "demo.gdp"] = np.nan  # rows 10 and 13 are quarters, 11 is between two
    history.loc[5, "demo.level"] = np.nan
    filled = model.impute(history)
    gdp = filled["demo.gdp"]
    assert list(np.flatnonzero(gdp.notna())) == list(range(1, 30, 3))  # every quarter, nothing in between
    assert np.isfinite(filled["demo.level"].iloc[5])


def test_impute_places_gappy_dates_on_the_grid(model):
    history = _history().drop(index=[5, 6])  # two months absent from the time column
    filled = model.impute(history)
    assert len(filled) == 30 and not filled["demo.level"].isna().any()


# ---------------------------------------------------------------------------------------------------- baselines
def test_naive_and_seasonal_naive_forecasts():
    train = np.array([1.0, 2.0, 3.0, 4.0, np.nan])
    np.testing.assert_array_equal(naive_forecast(train, 3), [4.0, 4.0, 4.0])
    np.testing.assert_array_equal(seasonal_naive_forecast([1.0, 2.0, 3.0, 4.0], 3, 2), [3.0, 4.0, 3.0])


def test_error_metrics_known_values():
    train = np.array([1.0, 2.0, 3.0, 4.0])
    actual = np.array([5.0, 7.0])
    naive = error_metrics(actual, naive_forecast(train, 2), train, season=1)  # errors 1, 3; scale 1
    assert naive == pytest.approx({"mae": 2.0, "rmse": math.sqrt(5.0), "mase": 2.0})
    seasonal = error_metrics(actual, seasonal_naive_forecast(train, 2, 2), train, season=2)  # errors 2, 3; scale 2
    assert seasonal == pytest.approx({"mae": 2.5, "rmse": math.sqrt(6.5), "mase": 1.25})
    # missing actuals are not scored
    assert error_metrics(np.array([5.0, np.nan]), np.array([4.0, 0.0]), train)["mae"] == 1.0


def test_default_season_follows_the_frequency():
    assert (default_season("MS"), default_season("QS-JAN"), default_season("YS"), default_season(None)) == \
        (12, 4, None, None)


def test_evaluate_scores_model_and_baselines_per_field(model, tmp_path):
    history = _history(40)
    result = evaluate(model, history, 6)
    assert result["season"] == 12 and result["holdout"] == 6
    assert set(result["fields"]) == {"demo.level", "demo.price", "demo.gdp"}
    level = result["fields"]["demo.level"]
    assert {"unit", "model", "naive", "seasonal_naive"} <= set(level)
    assert level["naive"]["mae"] == 0.0  # a constant series: the last value is exact
    price = result["fields"]["demo.price"]
    steps = np.arange(34, 40)
    expected = np.mean(np.abs(np.exp(4.0 + 0.01 * steps) - np.exp(4.0 + 0.01 * 33)))
    assert price["naive"]["mae"] == pytest.approx(expected)
    table = format_evaluation(result)
    assert "| demo.price | USD | seasonal_naive |" in table
    plot_forecast(result["history"], result["predictions"], tmp_path / "eval.png", actuals=result["actuals"])
    assert (tmp_path / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_rejects_a_holdout_that_leaves_too_little_history(model):
    with pytest.raises(DataError, match="holding out 25 leaves 5"):
        evaluate(model, _history(30), 25)
