"""A node's grid, seen and kept: a join of a weekly and a quarterly source trains on the weekly grid, says so in
`gwm dag` and its card, and forecasts the quarterly field on its own calendar (quarter starts) for any horizon."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from modeling_gwm import GWMModel  # noqa: E402
from modeling_gwm.commands import main  # noqa: E402
from modeling_gwm.forecasting.evaluation import evaluate  # noqa: E402
from modeling_gwm.tabular import DataError  # noqa: E402
from modeling_gwm.training.curriculum import load_curriculum  # noqa: E402
from modeling_gwm.training.trainer import DAGCurriculumTrainer  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MACRO = REPO / "configuration" / "data" / "us_macro_quarterly.csv"
UNEMP = "macro.us.unemployment"
LEVEL = "demo.weekly_level"
CONTEXT, HORIZON = 32, 8


def _weekly() -> pd.DataFrame:
    """A weekly (W-SAT) series over the quarterly data's last 12 years."""
    dates = pd.date_range("1997-07-05", "2009-09-26", freq="W-SAT")
    return pd.DataFrame({"date": dates, "level": 10.0 + np.sin(np.arange(len(dates)) / 8.0)})


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("grids")
    _weekly().to_csv(folder / "weekly.csv", index=False)
    spec = {
        "model": {"base": str(REPO / "configuration" / "tiny-cogvideox"), "d_model": 16, "seed": 0},
        "defaults": {"steps": 2, "batch_size": 4, "context_len": CONTEXT, "horizon": HORIZON, "n_loops": 1,
                     "eval_windows": 4, "eval_every": 2, "checkpoint_every": 2},
        "sources": {"weekly": {"path": str(folder / "weekly.csv"), "frequency": "W-SAT",
                               "fields": {LEVEL: {"column": "level", "unit": "m"}}},
                    "us_macro": {"path": str(MACRO), "frequency": "QS", "fields": {UNEMP: {"column": "unemp"}}}},
        "nodes": [{"name": "weekly", "sources": ["weekly"]},
                  {"name": "macro", "sources": ["us_macro"]},
                  {"name": "both", "parents": ["weekly", "macro"], "sources": ["weekly", "us_macro"]}],
    }
    config = folder / "grids.yaml"
    config.write_text(yaml.safe_dump(spec, sort_keys=False))
    out = folder / "out"
    lines: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())
    trainer_log = logging.getLogger("modeling_gwm.training.trainer")
    trainer_log.addHandler(handler)
    level, trainer_log.level = trainer_log.level, logging.INFO
    try:
        DAGCurriculumTrainer(curriculum=load_curriculum(config), output_dir=str(out), device="cpu").run()
    finally:
        trainer_log.removeHandler(handler)
        trainer_log.setLevel(level)
    return {"config": config, "out": out, "folder": folder, "log": lines}


@pytest.fixture(scope="module")
def join(run):
    return GWMModel.from_pretrained(str(REPO / "configuration" / "tiny-cogvideox"), str(run["out"] / "both"))


def _quarters() -> pd.DataFrame:
    return pd.read_csv(MACRO, parse_dates=["date"])[["date", "unemp"]].rename(columns={"unemp": UNEMP})


def test_each_field_records_the_grid_and_its_own_frequency(run):
    fields = {f["name"]: f for f in json.loads((run["out"] / "both" / "adapter_config.json").read_text())["fields"]}
    assert {n: (f["frequency"], f["own_frequency"]) for n, f in fields.items()} == {
        LEVEL: ("W-SAT", "W-SAT"), UNEMP: ("W-SAT", "QS")}
    macro = json.loads((run["out"] / "macro" / "adapter_config.json").read_text())["fields"]
    assert [(f["frequency"], f["own_frequency"]) for f in macro] == [("QS", "QS")]


def test_gwm_dag_prints_each_nodes_grid(run, capsys):
    assert main(["dag", "--config", str(run["config"])]) == 0
    plan = capsys.readouterr().out
    assert "    grid W-SAT\n" in plan and "    grid QS\n" in plan
    assert "grid W-SAT (finest of: weekly W-SAT, us_macro QS); coarser sources are forecast on their own calendar" \
        in plan


def test_the_training_log_names_each_nodes_grid(run):
    assert any("node macro [root]: training steps 1-2 on grid QS," in line for line in run["log"]), run["log"]
    assert any("node both [join]: training steps 1-2 on grid W-SAT (finest of: weekly W-SAT, us_macro QS)," in line
               for line in run["log"]), run["log"]


def test_the_card_states_the_grid_and_each_fields_own_frequency(run):
    card = (run["out"] / "both" / "README.md").read_text()
    assert "Grid: **W-SAT**" in card and f"(`{UNEMP}`)" in card
    assert f"`{UNEMP}` | — | QS |" in card and f"`{LEVEL}` | m | W-SAT |" in card
    index = (run["out"] / "README.md").read_text()  # the run's card: each node's grid in its table
    assert "| fields | grid |" in index and "| 1 | QS |" in index and "| 2 | W-SAT |" in index


@pytest.mark.parametrize("length", [1, 3, 8])
def test_a_quarterly_field_is_forecast_at_quarter_starts_for_any_length(join, length):
    history = _quarters()
    out = join.forecast(history, prediction_length=length)
    expected = pd.date_range(history["date"].max() + pd.offsets.QuarterBegin(startingMonth=1), periods=length,
                             freq="QS")
    assert list(out.index) == list(expected) and list(out.columns) == [UNEMP]
    assert out[UNEMP].notna().all()
    series = join.forecast(history.set_index("date")[UNEMP], prediction_length=length, field=UNEMP, freq="QS")
    pd.testing.assert_frame_equal(series, out, check_names=False)


def test_field_picks_the_quarterly_field_of_a_mixed_table(join):
    weekly = _weekly().rename(columns={"level": LEVEL})
    mixed = pd.concat([_quarters(), weekly], ignore_index=True).sort_values("date")
    on_grid = join.forecast(mixed, prediction_length=20)  # both fields: the weekly grid, NaN between quarters
    assert on_grid.index.freqstr == "W-SAT" and on_grid[UNEMP].notna().sum() == 1
    out = join.forecast_quantiles(mixed, prediction_length=8, field=UNEMP, quantile_levels=[0.1, 0.5, 0.9])
    assert list(out.index) == list(pd.date_range("2009-10-01", periods=8, freq="QS"))
    assert out.notna().all().all() and (out[UNEMP, 0.1] <= out[UNEMP, 0.9]).all()
    # 2009-10-01 falls in the table's last week: forecast first, inside the history; 2010-01-01 is the grid's quarter
    assert on_grid[UNEMP].dropna().index[0] == pd.Timestamp("2009-12-26")  # the W-SAT step holding 2010-01-01
    assert out[UNEMP, 0.5].iloc[1] == pytest.approx(on_grid[UNEMP].dropna().iloc[0])


def test_freq_must_be_the_grid_or_the_fields_own(join):
    same = join.forecast(_quarters(), prediction_length=2, freq="QS-OCT")  # the same quarter starts as QS
    assert list(same.index) == list(pd.date_range("2009-10-01", periods=2, freq="QS"))
    with pytest.raises(DataError, match=r"freq 'MS' differs from the 'W-SAT' grid .* own frequency 'QS'"):
        join.forecast(_quarters(), prediction_length=2, freq="MS")


def test_gwm_forecast_of_the_quarterly_field_gives_quarters(run, tmp_path, capsys):
    argv = ["forecast", "--adapter", str(run["out"] / "both"), "--data", str(MACRO), "--columns", f"unemp={UNEMP}",
            "--horizon", "8", "--out", str(tmp_path / "q.csv")]
    assert main([*argv, "--freq", "QS"]) == 0
    table = pd.read_csv(tmp_path / "q.csv", parse_dates=["date"])
    assert list(table["date"]) == list(pd.date_range("2009-10-01", periods=8, freq="QS"))
    assert table[UNEMP].notna().all()
    capsys.readouterr()
    assert main([*argv, "--freq", "MS"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gwm forecast: error: ") and "differs from the 'W-SAT' grid" in err and "\n" not in err


def test_gwm_forecast_field_forecasts_one_field_of_a_table(run, tmp_path):
    data = tmp_path / "mixed.csv"
    weekly = _weekly().rename(columns={"level": LEVEL})
    pd.concat([_quarters(), weekly], ignore_index=True).sort_values("date").to_csv(data, index=False)
    assert main(["forecast", "--adapter", str(run["out"] / "both"), "--data", str(data), "--field", UNEMP,
                 "--prediction_length", "3", "--out", str(tmp_path / "f.csv")]) == 0
    table = pd.read_csv(tmp_path / "f.csv", parse_dates=["date"])
    assert list(table.columns) == ["date", UNEMP]
    assert list(table["date"]) == list(pd.date_range("2009-10-01", periods=3, freq="QS"))


def test_predict_df_puts_each_row_on_its_fields_calendar(join):
    quarters = _quarters().rename(columns={"date": "timestamp"})
    weekly = _weekly().rename(columns={"date": "timestamp", "level": LEVEL})
    df = pd.concat([quarters.assign(item_id="q"), quarters.iloc[:-2].assign(item_id="early"),
                    weekly.assign(item_id="w")], ignore_index=True)
    out = join.predict_df(df, prediction_length=5)
    for item, last in (("q", "2009-07-01"), ("early", "2009-01-01")):
        rows = out[(out["item_id"] == item) & (out["target_name"] == UNEMP)]
        assert list(rows["timestamp"]) == list(pd.date_range(pd.Timestamp(last) + pd.offsets.QuarterBegin(
            startingMonth=1), periods=5, freq="QS"))
        assert rows["predictions"].notna().all()
        alone = join.forecast(quarters[quarters["timestamp"] <= last].drop(columns="timestamp").set_index(
            quarters["timestamp"][quarters["timestamp"] <= last]), prediction_length=5)
        np.testing.assert_allclose(rows["predictions"], alone[UNEMP], rtol=1e-4)
    rows = out[(out["item_id"] == "w") & (out["target_name"] == LEVEL)]
    assert list(rows["timestamp"]) == list(pd.date_range("2009-10-03", periods=5, freq="W-SAT"))


def test_predict_df_forecasts_a_quarter_due_inside_a_mixed_item(join):
    mixed = _quarters().merge(_weekly().rename(columns={"level": LEVEL}), on="date", how="outer")  # one row a date
    out = join.predict_df(mixed.assign(item_id="m"), timestamp_column="date", prediction_length=3)
    rows = out[out["target_name"] == UNEMP]  # the weekly field ends 2009-09-26, the quarterly one 2009-07-01
    assert list(rows["date"]) == list(pd.date_range("2009-10-01", periods=3, freq="QS"))
    alone = join.forecast(mixed.sort_values("date"), prediction_length=3, field=UNEMP)
    np.testing.assert_allclose(rows["predictions"], alone[UNEMP], rtol=1e-4)
    weekly = out[out["target_name"] == LEVEL]
    assert list(weekly["date"]) == list(pd.date_range("2009-10-03", periods=3, freq="W-SAT"))


def test_a_merge_of_a_weekly_and_a_quarterly_adapter_is_on_the_weekly_grid(run, caplog):
    base = str(REPO / "configuration" / "tiny-cogvideox")
    model = GWMModel.from_pretrained(base, str(run["out"] / "macro"), adapter_name="macro")
    model.load_adapter(str(run["out"] / "weekly"), adapter_name="weekly")
    with caplog.at_level(logging.WARNING):
        model.add_weighted_adapter(["macro", "weekly"], [0.5, 0.5], "merged")
    assert "different grids (macro QS, weekly W-SAT); 'merged' is on the finest, W-SAT" in caplog.text
    fields = {f["name"]: f for f in model.peft_config["merged"].fields}
    assert {n: (f["frequency"], f["own_frequency"]) for n, f in fields.items()} == {
        UNEMP: ("W-SAT", "QS"), LEVEL: ("W-SAT", "W-SAT")}
    model.set_adapter("merged")
    out = model.forecast(_quarters(), prediction_length=4)
    assert list(out.index) == list(pd.date_range("2009-10-01", periods=4, freq="QS"))


def _adapter_copy(run, tmp_path, edit) -> Path:
    folder = tmp_path / "adapter"
    folder.mkdir()
    config = json.loads((run["out"] / "both" / "adapter_config.json").read_text())
    for entry in config["fields"]:
        edit(entry)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    (folder / "adapter_model.safetensors").write_bytes((run["out"] / "both" / "adapter_model.safetensors").read_bytes())
    return folder


def test_an_adapter_without_own_frequencies_keeps_the_grid(run, tmp_path):
    folder = _adapter_copy(run, tmp_path, lambda entry: entry.pop("own_frequency"))
    old = GWMModel.from_pretrained(str(REPO / "configuration" / "tiny-cogvideox"), str(folder))
    out = old.forecast(_quarters(), prediction_length=30)  # weekly steps; the quarter every 13 of them
    assert out.index.freqstr == "W-SAT" and len(out) == 30 and 2 <= out[UNEMP].notna().sum() <= 3


def test_a_bad_own_frequency_is_refused_in_one_line(run, tmp_path, capsys):
    folder = _adapter_copy(run, tmp_path, lambda entry: entry.update(own_frequency="bogus"))
    assert main(["forecast", "--adapter", str(folder), "--data", str(MACRO), "--columns", f"unemp={UNEMP}",
                 "--horizon", "2", "--out", str(tmp_path / "p.csv")]) == 2
    err = capsys.readouterr().err.strip()
    assert "own_frequency: frequency 'bogus'" in err and "\n" not in err, err


def test_impute_fills_a_quarterly_field_at_the_weeks_holding_its_quarters(join):
    history = _quarters()
    gaps = history.index[-12:-2:3]  # three quarters missing near the end
    filled = join.impute(history.drop(index=gaps))
    weeks = filled[UNEMP].dropna().index
    assert len(weeks) == len(history)  # every quarter present again, no week in between filled
    holding = pd.DatetimeIndex([w for w in weeks if any(0 <= (d - w).days < 7 for d in history["date"])])
    assert len(holding) == len(weeks)


def test_evaluate_holds_out_the_quarterly_fields_last_quarters(join, monkeypatch):
    history = _quarters()
    result = evaluate(join, history, 4, methods=["naive", "seasonal_naive"])
    quarters = pd.DatetimeIndex(history["date"].iloc[-4:])
    assert (result["frequency"], result["season"], result["holdout"]) == ("QS", 4, 4)
    for frame in (result["actuals"], result["predictions"], result["quantiles"],
                  *result["baseline_predictions"].values()):
        assert list(frame.index) == list(quarters)
    np.testing.assert_allclose(result["actuals"][UNEMP], history[UNEMP].iloc[-4:])
    assert list(result["history"].index) == list(pd.DatetimeIndex(history["date"].iloc[:-4]))
    np.testing.assert_allclose(result["baseline_predictions"]["naive"][UNEMP], history[UNEMP].iloc[-5])
    np.testing.assert_allclose(result["baseline_predictions"]["seasonal_naive"][UNEMP], history[UNEMP].iloc[-8:-4])
    scores = result["fields"][UNEMP]
    assert all(np.isfinite(scores[m][k]) for m in ("model", "naive", "seasonal_naive") for k in ("mae", "mase"))
    assert scores["naive"]["mae"] == pytest.approx(np.mean(np.abs(history[UNEMP].iloc[-4:] - history[UNEMP].iloc[-5])))
    monkeypatch.setitem(sys.modules, "statsforecast", None)  # the core install's naive baselines: the same quarters
    core = evaluate(join, history, 4, methods=["naive", "seasonal_naive"])["baseline_predictions"]
    for method in ("naive", "seasonal_naive"):
        pd.testing.assert_frame_equal(core[method], result["baseline_predictions"][method])
    monkeypatch.undo()
    # the model's hold-out forecast is the forecast of those quarters from the quarters before
    alone = join.forecast(history.iloc[:-4], prediction_length=4)
    np.testing.assert_allclose(result["predictions"][UNEMP], alone[UNEMP], rtol=1e-4)
    # field= of a mixed table: the same quarters held out, the weekly field as context up to the first of them
    weekly = _weekly().rename(columns={"level": LEVEL})
    mixed = pd.concat([history, weekly], ignore_index=True).sort_values("date")
    picked = evaluate(join, mixed, 4, field=UNEMP, methods=["naive"])
    assert list(picked["actuals"].index) == list(quarters) and list(picked["fields"]) == [UNEMP]
    on_grid = evaluate(join, mixed, 4, methods=["naive"])  # both fields: 4 weeks of the grid
    assert on_grid["frequency"] == "W-SAT" and list(on_grid["actuals"].index) == list(weekly["date"].iloc[-4:])


def test_gwm_evaluate_of_the_quarterly_field_prints_a_table_of_quarters(run, capsys):
    argv = ["evaluate", "--adapter", str(run["out"] / "both"), "--data", str(MACRO), "--columns", f"unemp={UNEMP}",
            "--methods", "naive,seasonal_naive"]
    assert main([*argv, "--holdout", "4"]) == 0
    printed = capsys.readouterr().out
    assert "Hold-out: last 4 steps (QS); MASE scaled by the in-sample seasonal naive error (lag 4)" in printed
    assert f"| {UNEMP} |  | seasonal_naive |" in printed
    assert main([*argv, "--holdout", str(len(_quarters()))]) == 2  # counted in quarters, not in weeks
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"gwm evaluate: error: {MACRO}: the data has {len(_quarters())} QS steps") and \
        "\n" not in err, err


def test_a_forecast_too_long_on_the_grid_quotes_the_quarters_asked(join):
    with pytest.raises(ValueError, match=r"prediction_length 800 takes \d+ steps of the adapter's 'W-SAT' grid"):
        join.forecast(_quarters(), prediction_length=800)
