"""GWMPipeline: one batched core under every forecast, on the tiny CogVideoX base with a trained, calibrated join
adapter (a monthly field and two quarterly ones on a monthly grid)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from _tiny import DATA, TINY_BASE, tiny_curriculum, write_curriculum
from peft import PeftModel

from modeling_gwm import DAGCurriculumTrainer, GWMModel
from modeling_gwm.forecasting.pipeline import GWMPipeline
from modeling_gwm.tabular import DataError
from modeling_gwm.training.curriculum import load_curriculum

CO2, UNEMP = "climate.co2.mauna_loa", "macro.us.unemployment"


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> str:
    """The tiny DAG's join `world` (co2 monthly, two quarterly macro fields), trained and calibrated."""
    tmp = tmp_path_factory.mktemp("pipeline")
    spec = tiny_curriculum(steps=4, checkpoint_every=100)
    spec["nodes"] = spec["nodes"][:3]  # macro, climate, world
    spec["defaults"].update(calibrate_quantiles=True, eval_every=4)
    DAGCurriculumTrainer(curriculum=load_curriculum(write_curriculum(tmp, spec)), output_dir=str(tmp / "out"),
                         device="cpu", write_cards=False).run()
    return str(tmp / "out" / "world")


@pytest.fixture(scope="module")
def pipeline(adapter) -> GWMPipeline:
    return GWMPipeline.from_pretrained(TINY_BASE, adapter)


def _co2() -> pd.DataFrame:
    return pd.read_csv(DATA / "co2_mauna_loa_monthly.csv", parse_dates=["date"]).rename(columns={"co2": CO2})


def _mixed() -> pd.DataFrame:
    """co2 monthly and unemployment quarterly in one table on the monthly grid."""
    macro = pd.read_csv(DATA / "us_macro_quarterly.csv", parse_dates=["date"])[["date", "unemp"]]
    return _co2().merge(macro.rename(columns={"unemp": UNEMP}), on="date", how="outer").sort_values("date")


def _contexts() -> list:
    """Histories of different lengths, end dates and fields: tables, one on the quarterly field's own calendar."""
    co2, mixed = _co2(), _mixed()
    quarters = mixed[[UNEMP, "date"]].dropna()
    return [co2.iloc[100:140], mixed[(mixed["date"] >= "1985-01-01") & (mixed["date"] < "1991-03-01")],
            co2.iloc[300:327], quarters[quarters["date"] < "1999-01-01"].iloc[-30:]]


def test_from_pretrained_wraps_the_model_gwmmodel_loads(pipeline, adapter):
    assert isinstance(pipeline.model, PeftModel)
    assert list(pipeline.spec.fields) == [UNEMP, "macro.us.inflation", CO2]
    model = GWMModel.from_pretrained(TINY_BASE, adapter)
    history = _co2().iloc[-50:]
    pd.testing.assert_frame_equal(pipeline.forecast_quantiles(history, 7), model.forecast_quantiles(history, 7))
    pd.testing.assert_frame_equal(GWMPipeline(model).forecast(history, 7), model.forecast(history, 7))
    assert pipeline.spec.quantile_scales  # the calibrated band is the one forecast


def test_predict_quantiles_of_a_batch_equal_one_forecast_per_history(pipeline, monkeypatch):
    from modeling_gwm.forecasting import pipeline as module

    calls, inner = [], module.predict_windows
    monkeypatch.setattr(module, "predict_windows", lambda *a, **k: calls.append(1) or inner(*a, **k))
    contexts = _contexts()
    batch = pipeline.predict_quantiles(contexts, prediction_length=9, quantile_levels=[0.1, 0.5, 0.9])
    batched_calls = len(calls)
    assert len(batch) == len(contexts)
    calls.clear()
    for context, got in zip(contexts, batch):
        alone = pipeline.forecast_quantiles(context, 9, quantile_levels=[0.1, 0.5, 0.9])
        assert list(got.columns) == list(alone.columns) and got.index.equals(alone.index)
        assert got.attrs["units"] == alone.attrs["units"]
        np.testing.assert_allclose(got.to_numpy(), alone.to_numpy(), rtol=1e-5, atol=1e-6, equal_nan=True)
    assert batched_calls < len(calls)  # the histories' windows shared forward passes
    # the quarterly history is forecast on its own calendar: 9 quarter starts after its last quarter
    assert list(batch[3].index) == list(pd.date_range("1999-01-01", periods=9, freq="QS"))
    assert np.isfinite(batch[3].to_numpy()).all()
    # the mixed table stays on the monthly grid: the quarterly field NaN between its quarters
    assert batch[1][UNEMP, 0.5].notna().sum() == 3 and batch[1][CO2, 0.5].notna().all()


def test_a_2d_array_is_one_single_series_per_row(pipeline):
    values = _co2()[CO2].to_numpy()
    rows = np.stack([values[-40:], values[-80:-40]])  # (2, 40)
    as_rows = pipeline.predict_quantiles(rows, 5, field=CO2)
    as_list = pipeline.predict_quantiles([rows[0], rows[1]], 5, field=CO2)
    for a, b in zip(as_rows, as_list):
        pd.testing.assert_frame_equal(a, b)
    assert as_rows[0].shape == (5, 9) and list(as_rows[0].index) == list(range(40, 45))


def test_predict_df_equals_one_forecast_quantiles_per_item(pipeline):
    co2 = _co2()
    long = pd.concat([co2.iloc[i * 50:i * 50 + 30 + 7 * i].assign(item_id=f"s{i}") for i in range(3)])
    out = pipeline.predict_df(long.rename(columns={"date": "timestamp"}), prediction_length=6)
    for name, history in long.groupby("item_id"):
        alone = pipeline.forecast_quantiles(history.drop(columns="item_id"), 6)
        rows = out[out["item_id"] == name]
        assert list(rows["timestamp"]) == list(alone.index)
        for level in pipeline.spec.quantile_levels:
            np.testing.assert_allclose(rows[str(level)], alone[CO2, level], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("contexts", "kwargs", "error", "message"), [
    (lambda: _co2(), {}, DataError, r"contexts must be a non-empty list of histories .* got DataFrame$"),
    (lambda: [], {}, DataError, r"contexts must be a non-empty list"),
    (lambda: [_co2(), _co2().rename(columns={CO2: "co2"})], {}, DataError,
     r"^context 1: unknown field\(s\) \['co2'\]: this adapter knows"),
    (lambda: [_co2()], {"prediction_length": 0}, ValueError, r"^prediction_length must be a positive number"),
    (lambda: [_co2()], {"quantile_levels": [0.25]}, DataError, r"^unknown quantile level\(s\) \[0.25\]"),
    (lambda: [_co2().iloc[-5:], _co2()], {}, DataError, r"^the history has 5 steps; this adapter needs at least 10"),
])
def test_bad_input_is_one_clear_line(pipeline, contexts, kwargs, error, message):
    with pytest.raises(error, match=message) as caught:
        pipeline.predict_quantiles(contexts(), **kwargs)
    assert "\n" not in str(caught.value)
