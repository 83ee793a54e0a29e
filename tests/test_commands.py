"""The `gwm` command line on a real trained run (a one-node curriculum trained by training/dag_train.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from modeling_gwm.commands import main

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "configuration" / "data"
ENSO = DATA / "elnino_nino12_monthly.csv"
MAP = "sst=climate.enso.nino12_sst"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
ENV.pop("GWM_DEBUG", None)

CURRICULUM = {
    "model": {"base": str(REPO / "configuration" / "tiny-cogvideox"), "d_model": 16, "seed": 0},
    "defaults": {"steps": 3, "batch_size": 4, "context_len": 12, "horizon": 3, "n_loops": 2, "eval_windows": 4},
    "sources": {"enso": {"path": str(ENSO), "frequency": "MS",
                         "fields": {"climate.enso.nino12_sst": {"column": "sst", "unit": "degC"}}},
                "co2": {"path": str(DATA / "co2_mauna_loa_monthly.csv"), "frequency": "MS",
                        "fields": {"climate.co2.mauna_loa": {"column": "co2", "transform": "log", "unit": "ppm"}}}},
    "nodes": [{"name": "climate", "sources": ["enso", "co2"]}],
}


def gwm(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "modeling_gwm.commands", *map(str, args)], capture_output=True,
                          text=True, env=ENV, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("gwm_cli")
    config = folder / "climate.yaml"
    config.write_text(yaml.safe_dump(CURRICULUM))
    out = folder / "run"
    done = subprocess.run([sys.executable, str(REPO / "training" / "dag_train.py"), "--config", str(config),
                           "--output_dir", str(out)], capture_output=True, text=True, env=ENV, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "final" / "adapter_model.safetensors").is_file()
    # the node's grid travels with each field: forecasting puts a history on the grid it was trained on
    assert {f["frequency"] for f in json.loads((out / "final" / "adapter_config.json").read_text())["fields"]} == {"MS"}
    return out


def test_forecast_writes_raw_unit_csv_and_plot(run, tmp_path):
    done = gwm("forecast", "--adapter", run / "final", "--data", ENSO, "--columns", MAP, "--prediction_length", 7,
               "--out", tmp_path / "preds.csv", "--plot", tmp_path / "preds.png")
    assert done.returncode == 0, done.stderr
    preds = pd.read_csv(tmp_path / "preds.csv", parse_dates=["date"])
    assert list(preds.columns) == ["date", "climate.enso.nino12_sst"]
    last = pd.read_csv(ENSO, parse_dates=["date"])["date"].max()
    assert list(preds["date"]) == list(pd.date_range(last + pd.offsets.MonthBegin(), periods=7, freq="MS"))
    assert preds["climate.enso.nino12_sst"].between(15.0, 32.0).all()  # degrees Celsius, not normalised units
    assert (tmp_path / "preds.png").read_bytes()[:4] == b"\x89PNG"


def test_evaluate_prints_table_and_writes_json(run, tmp_path):
    done = gwm("evaluate", "--adapter", run / "climate", "--data", ENSO, "--columns", MAP, "--holdout", 12,
               "--json", tmp_path / "eval.json")
    assert done.returncode == 0, done.stderr
    assert "| climate.enso.nino12_sst | degC | seasonal_naive |" in done.stdout
    scores = json.loads((tmp_path / "eval.json").read_text())
    assert scores["holdout"] == 12 and scores["season"] == 12
    sst = scores["fields"]["climate.enso.nino12_sst"]
    assert {"unit", "model", "naive", "seasonal_naive"} <= set(sst)
    assert all(sst[m]["mae"] > 0 and sst[m]["rmse"] >= sst[m]["mae"] for m in ("model", "naive", "seasonal_naive"))


def test_dag_shows_plan_and_mermaid():
    done = gwm("dag", "--config", REPO / "configuration" / "curricula" / "demo.yaml")
    assert done.returncode == 0, done.stderr
    assert "world_solar [fork] from copy of world" in done.stdout
    assert "```mermaid\ngraph TD" in done.stdout


def test_params_prints_the_budget_table():
    pytest.importorskip("modeling_gwm.model.budget")
    done = gwm("params", "--base", REPO / "configuration" / "tiny-cogvideox", "--d_model", 16, "--n_loops", 2)
    assert done.returncode == 0, done.stderr
    assert "|" in done.stdout


def test_plot_losses(run, tmp_path):
    assert main(["plot-losses", str(run), "--out", str(tmp_path / "losses.png")]) == 0
    assert (tmp_path / "losses.png").read_bytes()[:4] == b"\x89PNG"


def test_help_has_an_example(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--help"])
    assert exit_info.value.code == 0 and "example:\n  gwm evaluate --adapter" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------- bad input
def _csv(tmp_path: Path, name: str, frame: pd.DataFrame) -> Path:
    path = tmp_path / name
    frame.to_csv(path, index=False)
    return path


def _enso(rows: int | None = None) -> pd.DataFrame:
    frame = pd.read_csv(ENSO)
    return frame if rows is None else frame.iloc[:rows]


BAD = {
    "unknown field": (lambda t, r: ["forecast", "--data", ENSO, "--horizon", 3], "unknown field(s) ['sst']"),
    "unknown mapped field": (lambda t, r: ["forecast", "--data", ENSO, "--columns", "sst=ocean.sst", "--horizon", 3],
                             "unknown field(s) ['ocean.sst']"),
    "non-numeric": (lambda t, r: ["forecast", "--data", _csv(t, "text.csv", _enso().assign(sst="warm")),
                                  "--columns", MAP, "--horizon", 3], "column 'climate.enso.nino12_sst' is not numeric"),
    "short history": (lambda t, r: ["forecast", "--data", _csv(t, "short.csv", _enso(5)), "--columns", MAP,
                                    "--horizon", 3], "needs at least 9"),
    "zero horizon": (lambda t, r: ["forecast", "--data", ENSO, "--columns", MAP, "--horizon", 0],
                     "prediction_length must be a positive"),
    "negative holdout": (lambda t, r: ["evaluate", "--data", ENSO, "--columns", MAP, "--holdout", -2],
                         "holdout must be a positive"),
    "holdout too long": (lambda t, r: ["evaluate", "--data", _csv(t, "s.csv", _enso(20)), "--columns", MAP,
                                       "--holdout", 15], "leaves 5"),
    "bad columns syntax": (lambda t, r: ["forecast", "--data", ENSO, "--columns", "sst", "--horizon", 3],
                           "--columns expects RAW=FIELD"),
    "output folder missing": (lambda t, r: ["forecast", "--data", ENSO, "--columns", MAP, "--horizon", 3,
                                            "--out", t / "nope" / "p.csv"], "does not exist"),
    "missing data file": (lambda t, r: ["forecast", "--data", t / "nope.csv", "--horizon", 3], "data file not found"),
    "missing curriculum": (lambda t, r: ["dag", "--config", t / "missing.yaml"], "missing.yaml"),
    "not a run folder": (lambda t, r: ["plot-losses", t], "no dag.json"),
    "params without a base": (lambda t, r: ["params"], "exactly one of --base"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exits_2_with_one_line(run, tmp_path, capsys, case):
    make, message = BAD[case]
    argv = [str(a) for a in make(tmp_path, run)]
    if argv[0] in ("forecast", "evaluate"):
        argv[1:1] = ["--adapter", str(run / "final")]
    if argv[0] == "forecast" and "--out" not in argv:
        argv += ["--out", str(tmp_path / "p.csv")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"gwm {argv[0]}: error: ") and message in err and "\n" not in err, err


@pytest.mark.parametrize("argv, message", [
    (["forecast", "--adapter", "{tmp}/not_an_adapter", "--data", str(ENSO), "--horizon", "3", "--out", "x.csv"],
     "not_an_adapter"),
    (["push", "{run}", "--hub_model_id", "someone/gwm-demo"], "gwm push {run} --hub_model_id someone/gwm-demo"),
])
def test_bad_input_in_a_subprocess_has_no_traceback(run, tmp_path, argv, message):
    argv = [a.format(tmp=tmp_path, run=run) for a in argv]
    done = gwm(*argv, cwd=tmp_path)
    assert done.returncode == 2
    err = done.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith(f"gwm {argv[0]}: error: ") and message.format(run=run) in err, err


# ---------------------------------------------------------------------------------------------------- quantiles
def test_forecast_quantiles_writes_field_at_level_columns(run, tmp_path):
    assert main(["forecast", "--adapter", str(run / "final"), "--data", str(ENSO), "--columns", MAP, "--horizon", "4",
                 "--quantiles", "0.1", "0.5", "0.9", "--out", str(tmp_path / "q.csv"),
                 "--plot", str(tmp_path / "q.png")]) == 0
    table = pd.read_csv(tmp_path / "q.csv", index_col="date")
    name = "climate.enso.nino12_sst"
    assert list(table.columns) == [f"{name}@0.1", f"{name}@0.5", f"{name}@0.9"]
    assert (table[f"{name}@0.1"] <= table[f"{name}@0.5"]).all() and (table[f"{name}@0.5"] <= table[f"{name}@0.9"]).all()
    assert table[f"{name}@0.5"].between(15.0, 32.0).all()  # degrees Celsius
    assert main(["forecast", "--adapter", str(run / "final"), "--data", str(ENSO), "--columns", MAP, "--horizon", "2",
                 "--quantiles", "--out", str(tmp_path / "all.csv")]) == 0
    assert pd.read_csv(tmp_path / "all.csv", index_col="date").shape == (2, 9)  # every trained level


def test_unknown_quantile_level_and_old_adapter_exit_2_with_one_line(run, tmp_path, capsys):
    argv = ["forecast", "--adapter", str(run / "final"), "--data", str(ENSO), "--columns", MAP, "--horizon", "2",
            "--out", str(tmp_path / "p.csv")]
    assert main([*argv, "--quantiles", "0.25"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown quantile level(s) [0.25]: this adapter predicts [0.1," in err and "\n" not in err, err
    old = tmp_path / "old"
    old.mkdir()
    config = json.loads((run / "final" / "adapter_config.json").read_text())
    del config["format_version"]
    (old / "adapter_config.json").write_text(json.dumps(config))
    (old / "adapter_model.safetensors").write_bytes((run / "final" / "adapter_model.safetensors").read_bytes())
    argv[2] = str(old)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gwm forecast: error: ") and "needs retraining" in err and "\n" not in err, err
