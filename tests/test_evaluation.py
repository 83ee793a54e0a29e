"""Scoring against baselines: MASE, WQL and the geometric-mean aggregate on hand-checked numbers; statsforecast's
baselines and quantiles when it is installed, one clear line when it is not; `gwm evaluate` on a real saved adapter."""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import pandas as pd
import peft
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from modeling_gwm import GWMModel, LoopConfig  # noqa: E402
from modeling_gwm.commands import main  # noqa: E402
from modeling_gwm.forecasting.evaluation import (  # noqa: E402
    NAIVE_METHODS,
    check_methods,
    error_metrics,
    evaluate,
    format_evaluation,
    has_statsforecast,
    relative_scores,
    seasonal_naive_forecast,
    statistical_forecasts,
    weighted_quantile_loss,
)
from modeling_gwm.model.base import TINY_BASE_PATH  # noqa: E402
from modeling_gwm.model.configuration_gwm import DEFAULT_QUANTILE_LEVELS as QUANTILE_LEVELS  # noqa: E402
from modeling_gwm.tabular import DataError  # noqa: E402

FIELDS = [{"name": "demo.sales", "mean": 100.0, "std": 20.0, "transform": "none", "unit": "units"}]


def _seasonal(steps: int) -> np.ndarray:
    """A trending monthly series with a yearly cycle (no noise: every baseline's numbers are reproducible)."""
    t = np.arange(steps)
    return 100.0 + 0.5 * t + 10.0 * np.sin(2 * np.pi * t / 12)


@pytest.fixture(scope="module")
def model():
    base = GWMModel.from_pretrained(TINY_BASE_PATH, d_model=16, context_len=12, horizon=3)
    return peft.get_peft_model(base, LoopConfig(n_loops=1, fields=FIELDS), adapter_name="node")


@pytest.fixture(scope="module")
def csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "sales.csv"
    pd.DataFrame({"date": pd.date_range("2000-01-01", periods=48, freq="MS").strftime("%Y-%m-%d"),
                  "demo.sales": _seasonal(48)}).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def adapter(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(folder)
    return folder / "node" if (folder / "node").is_dir() else folder


@pytest.fixture
def no_statsforecast(monkeypatch):
    """statsforecast (a third-party extra) made unimportable, as on a machine without `.[eval]`."""
    monkeypatch.setitem(sys.modules, "statsforecast", None)


# ---------------------------------------------------------------------------------------------------- metrics
def test_mase_divides_by_the_in_sample_seasonal_naive_error():
    train = np.array([1.0, 2.0, 4.0, 3.0, 5.0, 6.0])  # lag-2 differences 3, 1, 1, 3: scale 2
    scores = error_metrics(np.array([7.0, 4.0]), np.array([5.0, 5.0]), train, season=2)  # errors 2, 1: MAE 1.5
    assert scores == pytest.approx({"mae": 1.5, "rmse": math.sqrt(2.5), "mase": 0.75})
    assert math.isnan(error_metrics(np.array([1.0]), np.array([1.0]), np.ones(5))["mase"])  # flat history: no scale


def test_wql_hand_checked():
    actual = np.array([2.0, 4.0, np.nan])  # the missing step is not scored
    quantiles = np.array([[1.0, 2.0, 3.0], [5.0, 4.0, 6.0], [0.0, 0.0, 0.0]])  # (H, Q) at q 0.1, 0.5, 0.9
    # q0.1: pinball 0.1 + 0.9 = 1.0; q0.5: 0; q0.9: 0.1 + 0.2 = 0.3; each * 2 / sum|y| (6), then the mean
    expected = (2 * 1.0 / 6 + 0.0 + 2 * 0.3 / 6) / 3
    assert weighted_quantile_loss(actual, quantiles, (0.1, 0.5, 0.9)) == pytest.approx(expected)
    # a point forecast as every quantile: the WQL is the weighted absolute error sum |e| / sum |y|
    point = np.array([[3.0] * 3, [3.0] * 3])
    assert weighted_quantile_loss(actual[:2], point, (0.1, 0.5, 0.9)) == pytest.approx(2 / 6)
    assert math.isnan(weighted_quantile_loss(np.zeros(2), point, (0.1, 0.5, 0.9)))


def test_utilsforecast_losses_are_our_definitions_on_a_hand_computed_toy_series():
    """utilsforecast.losses itself (what error_metrics and weighted_quantile_loss call) against numbers worked by hand:
    MASE's in-sample scale at lag 2 leaves out the differences that touch a gap; scaled_crps is Chronos' WQL."""
    from utilsforecast import losses

    train = pd.DataFrame({"unique_id": "s", "ds": range(6), "y": [1.0, 2.0, np.nan, 3.0, 5.0, 6.0]})
    # lag-2 differences: 3 - 2 = 1 and 6 - 3 = 3 (the two touching the gap are left out): scale 2
    test = pd.DataFrame({"unique_id": "s", "ds": [6, 7], "y": [7.0, 4.0], "f": [5.0, 5.0],  # errors 2, -1
                         "q9": [8.0, 6.0], "q1": [4.0, 3.0]})  # the 0.9 and 0.1 quantiles
    assert losses.mae(test, ["f"])["f"].iloc[0] == pytest.approx(1.5)
    assert losses.rmse(test, ["f"])["f"].iloc[0] == pytest.approx(math.sqrt((4 + 1) / 2))
    assert losses.mase(test, ["f"], 2, train)["f"].iloc[0] == pytest.approx(1.5 / 2)
    # pinball at 0.1: 0.1 * (7 - 4) + 0.1 * (4 - 3) = 0.4; at 0.9: 0.1 * (8 - 7) + 0.1 * (6 - 4) = 0.3; sum |y| = 11
    expected_wql = (2 * 0.4 / 11 + 2 * 0.3 / 11) / 2
    crps = losses.scaled_crps(test, {"f": ["q9", "q1"]}, np.array([0.9, 0.1]))["f"].iloc[0]
    assert crps == pytest.approx(expected_wql, rel=1e-12)
    # and the same through our wrappers, which drop unobserved steps before handing the series over
    scores = error_metrics(np.array([7.0, 4.0, np.nan]), np.array([5.0, 5.0, 0.0]), train["y"].to_numpy(), season=2)
    assert scores == pytest.approx({"mae": 1.5, "rmse": math.sqrt(2.5), "mase": 0.75})
    assert weighted_quantile_loss(np.array([7.0, 4.0, np.nan]), np.array([[4.0, 8.0], [3.0, 6.0], [0.0, 0.0]]),
                                  (0.1, 0.9)) == pytest.approx(expected_wql, rel=1e-12)
    # where utilsforecast gives inf (a flat history) or scores a missing forecast as absent, ours says NaN
    assert math.isinf(losses.mase(test, ["f"], 1, train.assign(y=1.0))["f"].iloc[0])
    assert math.isnan(error_metrics(np.array([7.0, 4.0]), np.array([5.0, 5.0]), np.ones(6))["mase"])
    assert math.isnan(error_metrics(np.array([7.0, 4.0]), np.array([5.0, np.nan]), train["y"].to_numpy())["mae"])


def test_aggregate_is_the_geometric_mean_relative_to_seasonal_naive():
    fields = {
        "a": {"unit": None, "model": {"mase": 0.5}, "naive": {"mase": 2.0}, "seasonal_naive": {"mase": 1.0}},
        "b": {"unit": None, "model": {"mase": 1.0}, "naive": {"mase": 1.0}, "seasonal_naive": {"mase": 0.5}},
        "c": {"unit": None, "model": {"mase": 0.5}, "naive": {"mase": 2.0}},  # no season: relative to naive
        "d": {"unit": None, "model": {"mase": math.nan}, "naive": {"mase": 1.0}},  # not finite: left out
    }
    scores = relative_scores(fields, "mase")
    assert scores["model"] == pytest.approx((0.5 * 2.0 * 0.25) ** (1 / 3))
    assert scores["naive"] == pytest.approx((2.0 * 2.0 * 1.0 * 1.0) ** (1 / 4))
    assert scores["seasonal_naive"] == pytest.approx(1.0)
    assert relative_scores(fields, "wql") == {"model": None, "naive": None, "seasonal_naive": None}


# ---------------------------------------------------------------------------------------------------- baselines
def test_statsforecast_baselines_give_quantiles_around_their_point():
    pytest.importorskip("statsforecast", reason='AutoETS / AutoARIMA need pip install -e ".[eval]"')
    y = _seasonal(48)
    out = statistical_forecasts(y, 6, 12, ("naive", "seasonal_naive", "auto_ets", "auto_arima"))
    assert set(out) == {"naive", "seasonal_naive", "auto_ets", "auto_arima"}
    point, quantiles = out["seasonal_naive"]
    np.testing.assert_allclose(point, seasonal_naive_forecast(y, 6, 12))  # statsforecast's and ours agree
    np.testing.assert_allclose(quantiles[:, QUANTILE_LEVELS.index(0.5)], point)  # the median is the point
    for method, (_, quantiles) in out.items():
        assert quantiles.shape == (6, len(QUANTILE_LEVELS)), method
        assert np.all(np.diff(quantiles, axis=1) >= -1e-9), method  # non-decreasing in the level
    # lo-80 / hi-80 are the 0.1 / 0.9 quantiles of a normal interval: symmetric about the point
    point, quantiles = out["naive"]
    np.testing.assert_allclose(point - quantiles[:, 0], quantiles[:, -1] - point)


def test_statsforecast_naive_baselines_match_the_core_fallback_on_a_gappy_series(model, csv, monkeypatch):
    """With statsforecast the naive baselines are its Naive / SeasonalNaive (with quantiles); without it, ours (points
    only). A gap in the last season: both forward-fill it on the grid, so a season stays twelve months."""
    pytest.importorskip("statsforecast", reason='statsforecast comes with pip install -e ".[eval]"')
    frame = pd.read_csv(csv)
    frame.loc[[20, 31, 33], "demo.sales"] = np.nan  # training part: the first 36 months
    theirs = evaluate(model, frame, 12, methods=["naive", "seasonal_naive"])
    monkeypatch.setitem(sys.modules, "statsforecast", None)
    ours = evaluate(model, frame, 12, methods=["naive", "seasonal_naive"])
    y = frame["demo.sales"].to_numpy()
    np.testing.assert_allclose(ours["baseline_predictions"]["naive"]["demo.sales"], np.full(12, y[35]))
    np.testing.assert_allclose(ours["baseline_predictions"]["seasonal_naive"]["demo.sales"],
                               [*y[24:31], y[30], y[32], y[32], y[34], y[35]])  # 31 and 33 forward-filled
    for method in ("naive", "seasonal_naive"):
        np.testing.assert_allclose(theirs["baseline_predictions"][method], ours["baseline_predictions"][method])
        mine, stats = ours["fields"]["demo.sales"][method], theirs["fields"]["demo.sales"][method]
        assert {k: stats[k] for k in ("mae", "rmse", "mase")} == pytest.approx({k: mine[k] for k in ("mae", "rmse",
                                                                                                     "mase")})
        assert math.isfinite(stats["wql"]) and math.isnan(mine["wql"])  # only statsforecast's have intervals
    with pytest.raises(DataError, match=r"seasonal naive needs at least one season \(12 steps\)"):
        seasonal_naive_forecast(np.arange(8.0), 3, 12)
    monkeypatch.undo()
    with pytest.raises(DataError, match=r"seasonal naive needs at least one season \(12 steps\)"):
        statistical_forecasts(np.arange(8.0), 3, 12, ("seasonal_naive",))


def test_evaluate_scores_every_method_with_quantiles(model, csv):
    pytest.importorskip("statsforecast", reason='AutoETS / AutoARIMA need pip install -e ".[eval]"')
    result = evaluate(model, pd.read_csv(csv), 12)
    sales = result["fields"]["demo.sales"]
    assert set(sales) == {"unit", "model", "naive", "seasonal_naive", "auto_ets", "auto_arima", "auto_theta"}
    assert all(math.isfinite(sales[m]["wql"]) for m in ("model", "naive", "seasonal_naive", "auto_ets", "auto_arima",
                                                        "auto_theta"))
    # a noiseless trend + season: ETS forecasts it far better than the seasonal-naive copy of last year
    assert sales["auto_ets"]["mase"] < 0.5 * sales["seasonal_naive"]["mase"]
    assert result["aggregate"]["mase"]["seasonal_naive"] == pytest.approx(1.0)
    assert result["aggregate"]["mase"]["auto_ets"] == pytest.approx(
        sales["auto_ets"]["mase"] / sales["seasonal_naive"]["mase"])
    assert result["note"] is None


def test_without_statsforecast_evaluate_scores_the_naive_methods_and_says_why(model, csv, no_statsforecast, caplog):
    assert not has_statsforecast()
    assert check_methods(None) == NAIVE_METHODS
    with caplog.at_level("WARNING", logger="modeling_gwm.forecasting.evaluation"):
        result = evaluate(model, pd.read_csv(csv), 12)
    assert set(result["fields"]["demo.sales"]) == {"unit", "model", "naive", "seasonal_naive"}
    assert 'pip install -e ".[eval]"' in result["note"] and 'pip install -e ".[eval]"' in caplog.text
    assert result["note"] in format_evaluation(result)
    with pytest.raises(ValueError, match=r'auto_theta need statsforecast: pip install -e "\.\[eval\]"'):
        evaluate(model, pd.read_csv(csv), 12, methods=["naive", "auto_arima"])


def test_model_wql_comes_from_its_quantiles_at_the_asked_levels(model, csv):
    frame = pd.read_csv(csv)
    result = evaluate(model, frame, 12, methods=["naive"], quantile_levels=[0.9, 0.1])
    assert result["quantile_levels"] == [0.1, 0.9]
    truth = frame["demo.sales"].to_numpy()[-12:]
    band = result["quantiles"]["demo.sales"][[0.1, 0.9]].to_numpy()  # (12, 2) in the data's units
    assert result["fields"]["demo.sales"]["model"]["wql"] == pytest.approx(
        weighted_quantile_loss(truth, band, (0.1, 0.9)))
    np.testing.assert_allclose(result["predictions"]["demo.sales"], result["quantiles"]["demo.sales", 0.5])
    with pytest.raises(ValueError, match=r"unknown quantile level\(s\) \[0.25\]"):
        evaluate(model, frame, 12, quantile_levels=[0.25])


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match=r"unknown method\(s\) \['prophet'\]; choose from"):
        check_methods(["naive", "prophet"])


# ---------------------------------------------------------------------------------------------------- gwm evaluate
def test_cli_prints_mase_wql_and_the_aggregate(adapter, csv, tmp_path, capsys):
    out = tmp_path / "eval.json"
    code = main(["evaluate", "--base", str(TINY_BASE_PATH), "--adapter", str(adapter), "--data", str(csv),
                 "--holdout", "12", "--methods", "naive,seasonal_naive", "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "| field | unit | method | MAE | RMSE | MASE | WQL |" in printed
    assert "| demo.sales | units | seasonal_naive |" in printed and "auto_ets" not in printed
    assert "Geometric mean over fields relative to seasonal_naive" in printed
    written = json.loads(out.read_text())
    assert written["methods"] == ["model", "naive", "seasonal_naive"]
    assert written["aggregate"]["mase"]["seasonal_naive"] == pytest.approx(1.0)
    assert written["quantile_levels"] == list(QUANTILE_LEVELS) and written["fields"]["demo.sales"]["model"]["wql"] > 0


@pytest.mark.parametrize("methods, message", [
    ("naive,auto_ets", 'auto_ets, auto_arima and auto_theta need statsforecast: pip install -e ".[eval]"'),
    ("naive,theta", "unknown method(s) ['theta']"),
])
def test_cli_method_errors_are_one_line_exit_2(adapter, csv, capsys, no_statsforecast, methods, message):
    code = main(["evaluate", "--base", str(TINY_BASE_PATH), "--adapter", str(adapter), "--data", str(csv),
                 "--holdout", "12", "--methods", methods])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("gwm evaluate: error: ") and message in err and "\n" not in err, err


def test_evaluate_warns_when_the_holdout_overlaps_the_training_span_and_returns_baseline_forecasts(caplog):
    frame = pd.DataFrame({"date": pd.date_range("2000-01-01", periods=48, freq="MS"), "demo.sales": _seasonal(48)})
    for last, overlaps in (("2003-12-01", True), ("2003-06-01", False)):  # the hold-out: 2003-07 .. 2003-12
        fields = [{**FIELDS[0], "span": ["2000-01-01", last]},  # a field not in the data never warns
                  {"name": "demo.other", "mean": 0.0, "std": 1.0, "transform": "none",
                   "span": ["2000-01-01", "2009-01-01"]}]
        base = GWMModel.from_pretrained(TINY_BASE_PATH, d_model=16, context_len=12, horizon=3)
        model = peft.get_peft_model(base, LoopConfig(n_loops=1, fields=fields))
        caplog.clear()
        result = evaluate(model, frame, 6, methods=["naive", "seasonal_naive"])
        assert set(result["overlap"]) == ({"demo.sales"} if overlaps else set())
        said = "overlaps the adapter's training span"
        assert (said in format_evaluation(result)) is overlaps and (said in caplog.text) is overlaps
    predicted = result["baseline_predictions"]  # what the plot draws next to the model
    assert set(predicted) == {"naive", "seasonal_naive"} and predicted["naive"].shape == (6, 1)
    np.testing.assert_allclose(predicted["seasonal_naive"]["demo.sales"], _seasonal(48)[30:36])
