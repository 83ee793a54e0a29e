"""predict_df: many series of a long-format frame forecast together, on the tiny CogVideoX base with a loop adapter."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import peft
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from modeling_gwm import GWMModel, LoopConfig  # noqa: E402
from modeling_gwm.forecasting.pipeline import AdapterSpec  # noqa: E402
from modeling_gwm.model.base import TINY_BASE_PATH  # noqa: E402
from modeling_gwm.tabular import DataError  # noqa: E402

FIELDS = [
    {"name": "demo.level", "mean": 10.0, "std": 2.0, "transform": "none", "unit": "degC", "frequency": "MS"},
    {"name": "demo.price", "mean": 4.0, "std": 0.5, "transform": "log", "unit": "USD", "frequency": "MS"},
    {"name": "demo.gdp", "mean": 0.01, "std": 0.005, "transform": "log_return", "unit": "bn USD", "frequency": "MS"},
]
CONTEXT, HORIZON = 12, 3


@pytest.fixture(scope="module")
def model():
    base = GWMModel.from_pretrained(TINY_BASE_PATH, d_model=32, context_len=CONTEXT, horizon=HORIZON)
    return peft.get_peft_model(base, LoopConfig(n_loops=2, fields=FIELDS), adapter_name="node")


def _item(name: str, steps: int, start: str, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "item_id": name,
        "timestamp": pd.date_range(start, periods=steps, freq="MS"),
        "demo.level": 10.0 + rng.normal(size=steps),
        "demo.price": np.exp(4.0 + 0.01 * np.arange(steps) + 0.05 * rng.normal(size=steps)),
        "demo.gdp": 100.0 * np.exp(0.01 * np.arange(steps)),
    })


def _items() -> pd.DataFrame:
    """Four items of different lengths and end dates, rows shuffled; one quarterly GDP, one without price, one with
    a gap and two rows in one month."""
    frames = [_item("b", 30, "2000-01-01", 0), _item("a", 14, "2003-05-01", 1), _item("c", 40, "1998-07-01", 2),
              _item("d", 25, "2001-02-01", 3)]
    frames[2].loc[frames[2].index % 3 != 1, "demo.gdp"] = np.nan  # GDP every third month
    frames[3]["demo.price"] = np.nan  # an item without this field at all
    frames[0] = frames[0].drop(index=[7, 8])  # two months absent from the time column
    extra = frames[0].iloc[[20]].assign(**{"demo.level": 3.0})
    extra["timestamp"] += pd.Timedelta(days=14)
    frames[0] = pd.concat([frames[0], extra])  # a second row in one month: averaged, as forecast does
    return pd.concat(frames, ignore_index=True).sample(frac=1.0, random_state=0)


def test_output_is_long_format_with_a_column_per_quantile(model):
    df = _items()
    out = model.predict_df(df, target="demo.level", prediction_length=7)
    levels = [str(q) for q in AdapterSpec.from_model(model).quantile_levels]
    assert levels == ["0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7", "0.8", "0.9"]
    assert list(out.columns) == ["item_id", "timestamp", "target_name", "predictions", *levels]
    assert list(out["item_id"].unique()) == list(df["item_id"].unique())  # items in order of first appearance
    assert len(out) == 4 * 7 and (out["target_name"] == "demo.level").all()
    for name, rows in out.groupby("item_id"):
        last = df.loc[df["item_id"] == name, "timestamp"].max()
        assert list(rows["timestamp"]) == list(pd.date_range(last, periods=8, freq="MS")[1:])
    assert np.isfinite(out["predictions"]).all()


def test_batched_forecasts_equal_one_forecast_per_item(model):
    df = _items()
    out = model.predict_df(df, prediction_length=8, batch_size=2)  # every field; several batches per round
    for name, history in df.groupby("item_id"):
        history = history.drop(columns="item_id")
        alone = model.forecast(history, 8, time_column="timestamp")
        quantiles = model.forecast_quantiles(history, 8, time_column="timestamp")
        rows = out[out["item_id"] == name]
        assert sorted(rows["target_name"].unique()) == sorted(alone.columns)  # "d" has no price rows
        for field in alone.columns:
            got = rows[rows["target_name"] == field]
            assert list(got["timestamp"]) == list(alone.index)
            np.testing.assert_allclose(got["predictions"], alone[field], rtol=1e-5, atol=1e-6, equal_nan=True)
            for level in (0.1, 0.5, 0.9):
                np.testing.assert_allclose(got[str(level)], quantiles[field, level], rtol=1e-5, atol=1e-6,
                                           equal_nan=True)
    # the quarterly field of "c" is due only at its own quarters, as forecast says
    assert out.loc[(out["item_id"] == "c") & (out["target_name"] == "demo.gdp"), "predictions"].notna().sum() == 3


def test_windows_of_all_items_share_one_forward_pass(model):
    calls = []
    handle = model.get_base_model().register_forward_hook(lambda module, args, kwargs_out: calls.append(1))
    try:
        df = pd.concat([_item(f"s{i}", 20 + i, "2000-01-01", i) for i in range(6)])
        model.predict_df(df, target=["demo.level"], prediction_length=HORIZON)
        assert len(calls) == 1
        calls.clear()
        model.predict_df(df, target=["demo.level"], prediction_length=3 * HORIZON, batch_size=4)
        assert len(calls) == 3 * 2  # three rollout chunks, each in two batches of at most 4 windows
    finally:
        handle.remove()


def test_quantiles_are_sorted_and_the_median_is_the_prediction(model):
    out = model.predict_df(_items(), target="demo.level", prediction_length=5)
    levels = list(out.columns[4:])
    assert all(np.diff([float(q) for q in levels]) > 0)
    quantiles = out[levels].to_numpy()
    assert np.all(np.diff(quantiles, axis=1) >= 0)
    np.testing.assert_allclose(out["predictions"], out["0.5"])
    picked = model.predict_df(_items(), target="demo.level", prediction_length=5, quantile_levels=[0.9, 0.1])
    assert list(picked.columns[4:]) == ["0.1", "0.9"]
    np.testing.assert_allclose(picked[["0.1", "0.9"]], out[["0.1", "0.9"]])


def test_a_target_mapping_names_columns_by_the_users_names(model):
    df = _items().rename(columns={"demo.level": "temperature"})[["item_id", "timestamp", "temperature"]]
    out = model.predict_df(df, target={"temperature": "demo.level"}, prediction_length=2)
    assert set(out["target_name"]) == {"temperature"} and len(out) == 8


def _bad(kind: str) -> tuple[pd.DataFrame, dict]:
    df = pd.concat([_item("a", 20, "2000-01-01", 0), _item("b", 20, "2001-01-01", 1)])[
        ["item_id", "timestamp", "demo.level"]]
    if kind == "no_id":
        return df.drop(columns="item_id"), {}
    if kind == "no_time":
        return df.rename(columns={"timestamp": "ds"}), {}
    if kind == "short":
        return pd.concat([df, _item("tiny", 4, "2000-01-01", 2)[df.columns]]), {}
    if kind == "levels":
        return df, {"quantile_levels": [0.5, 0.33]}
    if kind == "duplicates":
        return pd.concat([df, df.iloc[[3]]]), {}
    if kind == "text":
        return df.assign(**{"demo.level": df["demo.level"].astype(object).where(df.index != 5, "warm")}), {}
    if kind == "list_ids":
        return df.assign(item_id=[["a"]] * len(df)), {}
    if kind == "field":
        return df.rename(columns={"demo.level": "sst"}), {}
    return df, {"prediction_length": 0}


@pytest.mark.parametrize("kind, message", [
    ("no_id", "no id_column 'item_id' in the frame; columns are ['timestamp', 'demo.level']"),
    ("no_time", "no timestamp_column 'timestamp' in the frame; columns are ['item_id', 'ds', 'demo.level']"),
    ("short", "item 'tiny' has 4 steps on the 'MS' grid; this adapter needs at least 9 (context_len 12 - horizon 3)"),
    ("levels", "unknown quantile level(s) [0.33]: this adapter predicts [0.1, 0.2,"),
    ("duplicates", "1 duplicate (item_id, timestamp) row(s), e.g. item 'a' at 2000-04-01"),
    ("text", "column 'demo.level' is not numeric (e.g. 'warm')"),
    ("field", "unknown field(s) ['sst']: this adapter knows"),
    ("length", "prediction_length must be a positive number of steps, got 0"),
    ("list_ids", "column 'item_id': ids must be strings or numbers, got list ['a']"),
])
def test_bad_input_is_one_clear_line(model, kind, message):
    df, kwargs = _bad(kind)
    with pytest.raises(ValueError) as info:
        model.predict_df(df, **kwargs)
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    if kind != "length":
        assert isinstance(info.value, DataError)


def test_an_item_with_nothing_recent_is_named_and_a_stale_field_is_nan(model):
    df = pd.concat([_item(7, 30, "2000-01-01", 0), _item(8, 30, "2000-01-01", 1)])  # integer ids
    df.loc[(df["item_id"] == 8) & (df["timestamp"] >= "2001-01-01"), "demo.gdp"] = np.nan  # 18 steps stale
    out = model.predict_df(df, prediction_length=2)
    stale = out[(out["item_id"] == 8) & (out["target_name"] == "demo.gdp")]
    assert len(stale) == 2 and stale["predictions"].isna().all()
    assert out.drop(index=stale.index)["predictions"].notna().all()
    df.loc[(df["item_id"] == 8) & (df["timestamp"] >= "2001-01-01"), ["demo.level", "demo.price"]] = np.nan
    with pytest.raises(DataError, match="item 8: no field is observed in its last 12 steps"):
        model.predict_df(df, prediction_length=2)


def test_an_item_with_no_value_at_all_gets_no_rows(model):
    """As documented: the other items are forecast; the empty one is left out (and named in a warning)."""
    df = pd.concat([_item("a", 20, "2000-01-01", 0), _item("b", 20, "2001-01-01", 1), _item("c", 5, "2001-01-01", 2)])
    df.loc[df["item_id"] == "c", ["demo.level", "demo.price", "demo.gdp"]] = np.nan
    out = model.predict_df(df, prediction_length=2)
    assert sorted(out["item_id"].unique()) == ["a", "b"] and out["predictions"].notna().all()
    alone = model.predict_df(df[df["item_id"] != "c"], prediction_length=2)
    pd.testing.assert_frame_equal(out.reset_index(drop=True), alone.reset_index(drop=True))
    with pytest.raises(DataError, match="no item has a value"):
        model.predict_df(df[df["item_id"] == "c"], prediction_length=2)
