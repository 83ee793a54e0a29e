"""Data sources -> aligned, normalised windows: the behaviours issue 3 promises, on small files in tmp_path."""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from modeling_gwm.model.data import (
    DataSource,
    FieldStats,
    build_node_data,
    collate_canvas,
    load_sources,
)
from modeling_gwm.tabular import (
    TRANSFORMS,
    DataError,
    denormalize,
    infer_frequency,
    invert_transform,
    normalize,
)

DATA = Path(__file__).resolve().parent.parent / "configuration" / "data"


def write_csv(folder: Path, name: str, frame: pd.DataFrame) -> Path:
    path = folder / name
    frame.to_csv(path, index=False)
    return path


def monthly(n: int, start: str = "2000-01-01", **columns) -> pd.DataFrame:
    return pd.DataFrame({"date": pd.date_range(start, periods=n, freq="MS").strftime("%Y-%m-%d"), **columns})


def source(name: str, path: Path, fields: dict, frequency: str | None = "MS", **extra) -> DataSource:
    return DataSource.from_dict(name, {"path": str(path), "time_column": "date", "frequency": frequency,
                                       "fields": fields, **extra})


# ---------------------------------------------------------------------------------------------------- statistics
def test_stats_come_from_the_training_part_only_and_ignore_an_outlier_in_the_validation_tail(tmp_path):
    values = np.arange(1.0, 51.0)
    values[-1] = 1e9  # inside the held-out last 20 %
    path = write_csv(tmp_path, "s.csv", monthly(50, a=values))
    data = build_node_data([source("s", path, {"x": "a"})], None, context_len=6, val_fraction=0.2)

    stats = data.stats["x"]
    assert stats.mean == pytest.approx(np.mean(np.arange(1.0, 41.0)))
    assert stats.std == pytest.approx(np.std(np.arange(1.0, 41.0)))
    train_values = data.train.values[data.train.presence]
    assert train_values.max() == pytest.approx((40 - stats.mean) / stats.std)  # nothing of the tail in training
    assert int(data.train.presence.sum()) == 40
    assert int(data.val.holdout.sum()) == 10
    assert data.val.values.max() == pytest.approx((1e9 - stats.mean) / stats.std)  # ...but validation scores it


def test_a_constant_series_gets_std_one_and_stats_round_trip_through_json(tmp_path):
    path = write_csv(tmp_path, "s.csv", monthly(12, a=[3.5] * 12))
    data = build_node_data([source("s", path, {"x": {"column": "a", "unit": "kg"}})], None, context_len=4)

    stats = data.stats["x"]
    assert (stats.mean, stats.std, stats.unit) == (3.5, 1.0, "kg")
    assert FieldStats.from_dict(json.loads(json.dumps(stats.to_dict()))) == stats
    assert all(type(v) in (str, float, type(None)) for v in stats.to_dict().values())


# ---------------------------------------------------------------------------------------------------- windows
def test_windows_and_presence_follow_a_hand_made_frame_with_gaps(tmp_path):
    days = [f"2020-01-{d:02d}" for d in (1, 2, 3, 5, 6, 7, 8, 9, 10)]  # no row at all for the 4th
    a = [1, None, 3, 5, 6, 7, 8, 9, 10]  # a is also missing on the 2nd
    b = [10, 20, 30, 50, 60, None, 80, 90, 100]  # b is also missing on the 7th
    path = write_csv(tmp_path, "gaps.csv", pd.DataFrame({"date": days, "a": a, "b": b}))
    data = build_node_data([source("gaps", path, {"x.a": "a", "x.b": "b"}, frequency="D")], None, context_len=4)

    assert data.frequency == "D" and len(data.index) == 10 and data.field_names == ["x.a", "x.b"]
    observed = np.array([[1, 1], [0, 1], [1, 1], [0, 0], [1, 1], [1, 1], [1, 0], [1, 1], [1, 1], [1, 1]], bool)
    held_out = np.zeros((10, 2), bool)
    held_out[8:] = True  # 8 observations each: the last round(0.2 * 8) = 2, the 9th and 10th
    np.testing.assert_array_equal(data.val.presence.numpy(), observed)
    np.testing.assert_array_equal(data.val.holdout.numpy(), held_out)
    np.testing.assert_array_equal(data.train.presence.numpy(), observed & ~held_out)

    train_a = np.array([1, 3, 5, 6, 7, 8], float)
    assert data.stats["x.a"].mean == pytest.approx(train_a.mean())
    assert data.stats["x.a"].std == pytest.approx(train_a.std())
    assert len(data.train) == 7 and list(data.val.starts) == [5, 6]  # windows of 4 over 10 days

    first = data.train[0]  # days 1-4
    assert first["values"].dtype == torch.float32 and first["presence"].dtype == torch.bool
    expected_a = [(1 - train_a.mean()) / train_a.std(), 0.0, (3 - train_a.mean()) / train_a.std(), 0.0]
    np.testing.assert_allclose(first["values"][:, 0].numpy(), expected_a, rtol=1e-6)
    assert first["presence"][:, 1].tolist() == [True, True, True, False]
    assert first["values"][3].tolist() == [0.0, 0.0]  # absent -> 0.0, never NaN
    assert not any(torch.isnan(data.train[i]["values"]).any() for i in range(len(data.train)))


def test_windows_with_no_present_value_are_dropped(tmp_path):
    dates = list(pd.date_range("2000-01-01", periods=24, freq="MS")) + list(
        pd.date_range("2005-01-01", periods=24, freq="MS"))  # a three-year hole in the middle
    frame = pd.DataFrame({"date": [d.strftime("%Y-%m-%d") for d in dates], "a": np.arange(48.0)})
    data = build_node_data([source("s", write_csv(tmp_path, "s.csv", frame), {"x": "a"})], None, context_len=6)

    assert len(data.index) == 84
    # training rows are 0-23 and 60-73 (the last 10 observations are validation): starts 0-23 and 55-73 remain
    assert list(data.train.starts) == list(range(0, 24)) + list(range(55, 74))
    assert all(data.train[i]["presence"].any() for i in range(len(data.train)))


def test_stride_spaces_windows_and_always_keeps_the_newest_window(tmp_path):
    path = write_csv(tmp_path, "s.csv", monthly(31, a=np.arange(31.0)))  # the last 6 are validation
    data = build_node_data([source("s", path, {"x": "a"})], None, context_len=6, stride=4)
    assert list(data.train.starts) == [0, 4, 8, 12, 16, 20, 24]  # 25 (the newest) holds only validation
    assert list(data.val.starts) == [20, 24, 25]


def test_two_sources_with_different_frequencies_and_ranges_share_one_monthly_grid(tmp_path):
    months = write_csv(tmp_path, "m.csv", monthly(12, a=np.arange(1.0, 13.0)))  # 2000-01 .. 2000-12
    mid_quarters = pd.DataFrame({"date": ["2000-08-15", "2000-11-15", "2001-02-15", "2001-05-15"],
                                 "b": [1.0, 2.0, 3.0, 4.0]})  # 2000-Q3 .. 2001-Q2, dated mid-quarter
    quarters = write_csv(tmp_path, "q.csv", mid_quarters)
    data = build_node_data([source("m", months, {"m.a": "a"}), source("q", quarters, {"q.b": "b"}, "QS")], None,
                           context_len=4)

    assert data.frequency == "MS"
    assert list(data.index) == list(pd.date_range("2000-01-01", "2001-04-01", freq="MS"))
    presence = data.val.presence.numpy()  # (16, 2) everything observed
    assert np.flatnonzero(presence[:, 0]).tolist() == list(range(12))
    assert np.flatnonzero(presence[:, 1]).tolist() == [6, 9, 12, 15]  # each quarter at its first month
    assert data.date_range == {"m.a": ("2000-01-01", "2000-12-01"), "q.b": ("2000-07-01", "2001-04-01")}


def test_observations_finer_than_the_declared_frequency_are_averaged_per_period(tmp_path):
    days = pd.date_range("2000-01-01", "2000-06-30", freq="D")
    frame = pd.DataFrame({"date": days.strftime("%Y-%m-%d"), "a": days.month.astype(float)})
    data = build_node_data([source("s", write_csv(tmp_path, "d.csv", frame), {"x": "a"})], None, context_len=3)
    assert len(data.index) == 6
    raw = denormalize(data.val.values[:, 0].numpy(), data.stats["x"])
    np.testing.assert_allclose(raw, [1, 2, 3, 4, 5, 6], rtol=1e-5)


def test_fields_selects_and_orders_the_canvas_columns(tmp_path):
    path = write_csv(tmp_path, "s.csv", monthly(12, a=np.arange(12.0), b=np.arange(12.0) * 2, c=np.ones(12)))
    src = source("s", path, {"x.a": "a", "x.b": "b", "x.c": "c"})
    data = build_node_data([src], ["x.b", "x.a"], context_len=4)
    assert data.field_names == ["x.b", "x.a"] and set(data.stats) == {"x.a", "x.b"}
    assert data.train[0]["values"].shape == (4, 2)


def test_collate_stacks_windows_into_a_batch(tmp_path):
    path = write_csv(tmp_path, "s.csv", monthly(20, a=np.arange(20.0), b=np.arange(20.0)))
    data = build_node_data([source("s", path, {"x": "a", "y": "b"})], None, context_len=5)
    batch = collate_canvas([data.train[i] for i in range(3)])
    assert set(batch) == {"values", "presence"}
    assert batch["values"].shape == (3, 5, 2) and batch["presence"].dtype == torch.bool
    assert torch.equal(batch["values"][1], data.train[1]["values"])
    assert set(collate_canvas([data.val[0], data.val[1]])) == {"values", "presence", "holdout"}


# ---------------------------------------------------------------------------------------------------- formats
@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_a_parquet_or_jsonl_source_gives_the_same_batches_as_the_csv(tmp_path, fmt):
    frame = monthly(30, a=np.linspace(1, 3, 30), b=np.where(np.arange(30) % 4 == 0, np.nan, np.arange(30.0)))
    csv = write_csv(tmp_path, "s.csv", frame)
    other = tmp_path / f"s.{fmt}"
    if fmt == "parquet":
        frame.assign(date=pd.to_datetime(frame["date"])).to_parquet(other)  # a real timestamp column this time
    else:
        rows = frame.astype(object).where(frame.notna(), None).to_dict("records")
        other.write_text("".join(json.dumps(row) + "\n" for row in rows))  # repr floats: exact
    fields = {"x.a": {"column": "a", "transform": "log"}, "x.b": {"column": "b", "transform": "diff"}}
    from_csv = build_node_data([source("s", csv, fields)], None, context_len=6)
    from_other = build_node_data([source("s", other, fields)], None, context_len=6)

    assert from_csv.stats == from_other.stats
    for split in ("train", "val"):
        left, right = getattr(from_csv, split), getattr(from_other, split)
        assert len(left) == len(right)
        for key, value in collate_canvas([left[i] for i in range(len(left))]).items():
            assert torch.equal(value, collate_canvas([right[i] for i in range(len(right))])[key])


def test_whole_years_in_a_numeric_time_column_are_read_as_years(tmp_path):
    frame = pd.DataFrame({"year": np.arange(1900, 1930), "a": np.arange(30.0)})
    path = write_csv(tmp_path, "y.csv", frame)
    data = build_node_data([DataSource("s", {"x": "a"}, path=str(path), time_column="year", frequency="YS")],
                           None, context_len=5)
    assert data.index[0] == pd.Timestamp("1900-01-01") and data.frequency == "YS"


# ---------------------------------------------------------------------------------------------------- transforms
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_transforms_round_trip_from_the_canvas_back_to_the_raw_values(tmp_path, transform):
    rng = np.random.default_rng(0)
    raw = 100 * np.exp(np.cumsum(rng.normal(0, 0.05, 40)))  # positive, so every transform applies
    path = write_csv(tmp_path, "s.csv", monthly(40, a=raw))
    data = build_node_data([source("s", path, {"x": {"column": "a", "transform": transform}})], None, context_len=6)

    stats = data.stats["x"]
    canvas = data.val.values[:, 0].numpy()[data.val.presence[:, 0].numpy()]  # normalised, every observation
    def to_data_units(values, last_raw=None):
        return invert_transform(denormalize(values, stats), stats.transform, last_raw)

    if transform in ("none", "log"):
        np.testing.assert_allclose(to_data_units(canvas), raw, rtol=1e-5)
    else:  # changes start at the 2nd observation and accumulate from the last raw value before them
        np.testing.assert_allclose(to_data_units(canvas, last_raw=raw[0]), raw[1:], rtol=1e-4)
        tail = 8  # a forecast of the last 8 steps, inverted from the value just before them
        np.testing.assert_allclose(to_data_units(canvas[-tail:], last_raw=raw[-tail - 1]), raw[-tail:], rtol=1e-5)
    np.testing.assert_allclose(normalize(denormalize(canvas, stats), stats), canvas, rtol=1e-6, atol=1e-9)


def test_change_transforms_refuse_to_invert_without_the_last_raw_value():
    with pytest.raises(ValueError, match="last_raw"):
        invert_transform(np.zeros(3), "pct_change")
    np.testing.assert_allclose(invert_transform(np.array([0.1, 0.1]), "pct_change", 100.0), [110.0, 121.0])


# ---------------------------------------------------------------------------------------------------- declarations
def test_sources_round_trip_through_their_yaml_form_and_accept_bare_column_names(tmp_path):
    path = write_csv(tmp_path, "s.csv", monthly(12, a=np.arange(12.0)))
    src = DataSource.from_dict("s", {"path": "s.csv", "time_column": "date", "frequency": "MS",
                                     "fields": {"x.a": "a", "x.b": {"column": "a", "transform": "diff"}}}, tmp_path)
    assert src.path == str(path) and src.fields["x.a"].column == "a" and src.fields["x.a"].transform == "none"
    assert DataSource.from_dict("s", src.to_dict()) == src
    hub = DataSource.from_dict("h", {"dataset": "user/name", "config": "c", "fields": {"x": "a"}})
    assert hub.split == "train" and DataSource.from_dict("h", hub.to_dict()) == hub


def test_relative_paths_resolve_against_the_yaml_folder_then_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "conf").mkdir()
    (tmp_path / "data").mkdir()
    write_csv(tmp_path / "conf", "near.csv", monthly(3, a=[1, 2, 3]))
    write_csv(tmp_path / "data", "far.csv", monthly(3, a=[1, 2, 3]))
    monkeypatch.chdir(tmp_path)
    spec = {"time_column": "date", "fields": {"x": "a"}}
    assert DataSource.from_dict("s", {**spec, "path": "near.csv"}, tmp_path / "conf").path == str(
        tmp_path / "conf" / "near.csv")
    assert DataSource.from_dict("s", {**spec, "path": "data/far.csv"}, tmp_path / "conf").path == str(
        tmp_path / "data" / "far.csv")
    missing = DataSource.from_dict("s", {**spec, "path": "gone.csv"}, tmp_path / "conf")
    with pytest.raises(DataError, match=f"source 's': file not found: {tmp_path / 'conf' / 'gone.csv'}"):
        missing.read()


def test_nan_and_inf_are_missing_and_reported_once_per_source(tmp_path, caplog):
    frame = monthly(12, a=["1", "", "3", "inf", "5", "6", "7", "8", "9", "10", "11", "12"],
                    b=[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, float("nan")])
    path = write_csv(tmp_path, "s.csv", frame)
    with caplog.at_level(logging.WARNING, logger="modeling_gwm.model.data"):
        data = build_node_data([source("s", path, {"x": "a", "y": "b"})], None, context_len=4)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "source 's': 3 NaN/inf value(s) treated as missing (a: 2, b: 1)" in warnings[0].getMessage()
    assert data.val.presence[:, 0].tolist() == [True, False, True, False] + [True] * 8


# ---------------------------------------------------------------------------------------------------- bad data
def _good(tmp_path: Path, **columns) -> Path:
    return write_csv(tmp_path, "s.csv", monthly(12, **(columns or {"a": np.arange(1.0, 13.0)})))


BAD = {
    "missing column": (lambda p: [source("s", _good(p), {"x": "nope"})],
                       [r"source 's', column 'nope'", r"available columns are \['date', 'a'\]"]),
    "non-numeric column": (lambda p: [source("s", _good(p, a=["1", "2", "three"] + ["4"] * 9), {"x": "a"})],
                           [r"source 's', column 'a': not numeric", "'three'"]),
    "all-NaN field": (lambda p: [source("s", _good(p, a=[None] * 12, b=range(12)), {"x": "a"})],
                      [r"source 's', column 'a': field 'x' is all NaN"]),
    "too short": (lambda p: [source("s", _good(p), {"x": "a"})],
                  [r"source 's', column 'a': field 'x' has 12 observation\(s\)", "at least 24"]),
    "unknown transform": (lambda p: [source("s", _good(p), {"x": {"column": "a", "transform": "sqrt"}})],
                          [r"source 's', column 'a': unknown transform 'sqrt'",
                           "valid transforms are none, log, diff, pct_change, log_return"]),
    "field in two sources": (lambda p: [source("s", _good(p), {"x": "a"}),
                                        source("t", write_csv(p, "t.csv", monthly(12, b=range(12))), {"x": "b"})],
                             [r"field 'x' is declared twice: source 's' \(column 'a'\) and source 't' \(column 'b'\)"]),
    "source given twice": (lambda p: [source("s", _good(p), {"x": "a"}), source("s", _good(p), {"y": "a"})],
                           [r"source\(s\) \['s'\] given twice to one node"]),
    "time not parseable": (lambda p: [source("s", write_csv(p, "s.csv", pd.DataFrame(
                               {"date": ["2000-01-01", "soon"] + ["2000-02-01"] * 10, "a": range(12)})), {"x": "a"})],
                           [r"source 's', column 'date': time values are not parseable dates"]),
    "time not numeric years": (lambda p: [DataSource("s", {"x": "a"}, path=str(write_csv(p, "s.csv", pd.DataFrame(
                                   {"t": np.arange(12) + 0.5, "a": range(12)}))), time_column="t")],
                               [r"source 's', column 't': numeric time values \(e.g. 0.5\) are not dates"]),
    "missing time column": (lambda p: [DataSource("s", {"x": "a"}, path=str(_good(p)), time_column="when")],
                            [r"source 's', column 'when': no such time column", r"\['date', 'a'\]"]),
    "missing file": (lambda p: [source("s", p / "nowhere.csv", {"x": "a"})],
                     [r"source 's': file not found: .*nowhere\.csv"]),
    "log of non-positive": (lambda p: [source("s", _good(p, a=np.arange(12.0)), {"x": {"column": "a",
                                                                                        "transform": "log"}})],
                            [r"source 's', column 'a': transform 'log' needs positive values, found 0.0"]),
    "pct_change of zero": (lambda p: [source("s", _good(p, a=[1, 0] + [1] * 10), {"x": {"column": "a",
                                                                                       "transform": "pct_change"}})],
                           [r"source 's', column 'a': transform 'pct_change' divides by the previous value"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_data_is_one_clear_error_naming_source_and_column(tmp_path, case):
    make, patterns = BAD[case]
    with pytest.raises(DataError) as info:
        build_node_data(make(tmp_path), None, context_len=24 if case == "too short" else 4)
    message = str(info.value)
    assert "\n" not in message
    for pattern in patterns:
        assert re.search(pattern, message), (pattern, message)


def test_two_columns_mapped_to_one_field_in_a_yaml_source_is_an_error(tmp_path):
    _good(tmp_path, a=range(12), b=range(12))
    path = tmp_path / "sources.yaml"
    path.write_text("sources:\n  s:\n    path: s.csv\n    fields:\n      x: a\n      x: {column: b}\n")
    with pytest.raises(DataError, match=r"source 's': columns 'a' and 'b' are both mapped to field 'x' \(line 6\)"):
        load_sources(path)


# ---------------------------------------------------------------------------------------------------- shipped data
def test_the_shipped_sources_load_and_yield_mixed_frequency_windows():
    sources = load_sources(DATA / "sources.yaml")
    assert set(sources) == {"us_macro", "co2", "enso", "sunspots"}
    data = build_node_data(list(sources.values()), None, context_len=24)

    assert data.frequency == "MS" and len(data.field_names) == 7
    assert len(data.train) > 1000 and len(data.val) > 100
    batch = collate_canvas([data.train[i] for i in range(0, len(data.train), 97)])
    assert batch["values"].shape[1:] == (24, 7) and torch.isfinite(batch["values"]).all()
    observed = data.val.presence.numpy().mean(axis=0)  # share of grid steps each field is observed at
    by_name = dict(zip(data.field_names, observed))
    assert by_name["macro.us.unemployment"] < by_name["climate.enso.nino12_sst"]  # quarterly vs monthly
    assert by_name["solar.sunspots.yearly"] == pytest.approx(309 / len(data.index))  # one step in twelve
    for name, stats in data.stats.items():
        assert math.isfinite(stats.mean) and stats.std > 0, name


@pytest.mark.parametrize("name", ["us_macro_quarterly", "co2_mauna_loa_monthly", "elnino_nino12_monthly",
                                  "sunspots_yearly"])
def test_the_shipped_csvs_have_iso_dates_in_order(name):
    frame = pd.read_csv(DATA / f"{name}.csv")
    dates = pd.to_datetime(frame["date"], format="%Y-%m-%d")
    assert dates.is_monotonic_increasing and not dates.duplicated().any()
    assert frame.drop(columns="date").notna().all().all()


def test_frequency_is_inferred_across_gaps_by_a_vote_of_consecutive_triples():
    """pd.infer_freq answers None as soon as one step is missing; the vote of three-step windows does not."""
    months = pd.date_range("2000-01-01", periods=40, freq="MS")
    assert infer_frequency(months) == "MS" and infer_frequency(months.delete([5, 6, 20])) == "MS"
    assert pd.infer_freq(months.delete([5, 6, 20])) is None
    quarters = pd.date_range("2000-01-01", periods=20, freq="QS")
    # pandas 2 names it QS-OCT, pandas 3 QS-JAN: the same quarter starts either way
    assert pd.date_range(quarters[0], periods=20, freq=infer_frequency(quarters.delete([3, 9]))).equals(quarters)
    assert infer_frequency(pd.date_range("2000-01-02", periods=30, freq="W-SUN").delete([4, 5, 11])) == "W-SUN"
    assert infer_frequency(months[:2]) is None  # too short to say
    irregular = pd.Timestamp("2000-01-01") + pd.to_timedelta(np.cumsum(np.arange(1, 12)), unit="D")
    assert infer_frequency(pd.DatetimeIndex(irregular)) is None  # no two steps alike: no frequency
