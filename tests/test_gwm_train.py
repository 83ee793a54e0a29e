"""`gwm train` and the commands around it: impute, push --dry_run, make-tiny-base, and accelerate launches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "configuration" / "data"
ENSO = DATA / "elnino_nino12_monthly.csv"
MAP = "sst=climate.enso.nino12_sst"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
ENV.pop("GWM_DEBUG", None)

CURRICULUM = {
    "model": {"base": str(REPO / "configuration" / "tiny-cogvideox"), "d_model": 16, "seed": 0},
    "defaults": {"steps": 2, "batch_size": 4, "context_len": 12, "horizon": 3, "n_loops": 1, "eval_windows": 4},
    "sources": {"enso": {"path": str(ENSO), "frequency": "MS",
                         "fields": {"climate.enso.nino12_sst": {"column": "sst", "unit": "degC"}}}},
    "nodes": [{"name": "enso", "sources": ["enso"]}],
}


def gwm(*args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "modeling_gwm.commands", *map(str, args)], capture_output=True,
                          text=True, env=ENV, cwd=cwd, timeout=300)


def one_error_line(done: subprocess.CompletedProcess, command: str) -> str:
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"gwm {command}: error: "), done.stderr[-2000:]
    return last


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """`gwm train` with --steps raising the curriculum's 2 steps to 3."""
    folder = tmp_path_factory.mktemp("gwm_train")
    (folder / "enso.yaml").write_text(yaml.safe_dump(CURRICULUM))
    done = gwm("train", "--config", "enso.yaml", "--output_dir", "run", "--steps", "3", cwd=folder)
    assert done.returncode == 0, done.stderr[-2000:]
    return folder / "run"


def test_gwm_train_runs_the_curriculum_and_steps_raises_a_nodes_count(run):
    metrics = json.loads((run / "enso" / "metrics.json").read_text())
    assert metrics["steps"] == 3 and (run / "final" / "COMPLETE").is_file()


def test_resume_with_another_steps_is_refused_naming_it(run):
    done = gwm("train", "--config", "enso.yaml", "--output_dir", "run", "--resume", "--steps", "4", cwd=run.parent)
    assert "steps 3 -> 4" in one_error_line(done, "train")
    done = gwm("train", "--config", "enso.yaml", "--output_dir", "run", "--resume", "--steps", "3", cwd=run.parent)
    assert done.returncode == 0, done.stderr[-2000:]  # the same settings: nothing to do


def test_gwm_train_errors_are_one_line_exit_2(tmp_path):
    done = gwm("train", "--config", tmp_path / "missing.yaml", "--output_dir", tmp_path / "out")
    assert one_error_line(done, "train") and "missing.yaml" in done.stderr
    assert not (tmp_path / "out").exists()


def test_impute_fills_the_gaps_and_keeps_observed_values(run, tmp_path):
    table = pd.read_csv(ENSO)
    gappy = table.copy()
    gappy.loc[[100, 101, 300], "sst"] = np.nan
    gappy = gappy.drop(index=[200])  # a missing step too
    gappy.to_csv(tmp_path / "gappy.csv", index=False)
    done = gwm("impute", "--adapter", run / "final", "--data", tmp_path / "gappy.csv", "--columns", MAP,
               "--out", tmp_path / "filled.csv")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "filled 4 missing value(s)" in done.stdout
    filled = pd.read_csv(tmp_path / "filled.csv")
    assert list(filled.columns) == ["date", "climate.enso.nino12_sst"] and len(filled) == len(table)
    values = filled["climate.enso.nino12_sst"].to_numpy()
    gaps = values[[100, 101, 200, 300]]
    assert np.isfinite(values).all() and ((gaps > 15) & (gaps < 32)).all()  # degC
    observed = np.setdiff1d(np.arange(len(table)), [100, 101, 200, 300])
    np.testing.assert_allclose(values[observed], table["sst"].to_numpy()[observed], rtol=1e-6)


def test_impute_names_the_data_file_on_a_bad_column(run, tmp_path):
    done = gwm("impute", "--adapter", run / "final", "--data", ENSO, "--out", tmp_path / "filled.csv")
    assert "elnino_nino12_monthly.csv" in one_error_line(done, "impute") and "--columns" in done.stderr
    assert not (tmp_path / "filled.csv").exists()


def test_push_dry_run_prints_the_plan_and_uploads_nothing(run):
    done = gwm("push", run, "--dry_run")
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    paths = [line.split()[-1] for line in lines[:-1]]
    assert {"README.md", "dag.json", "loss_curves.png", "enso/adapter_model.safetensors",
            "final/adapter_config.json"} <= set(paths)
    assert lines[-1].startswith(f"{len(paths)} files,") and "nothing uploaded" in lines[-1]
    size = int(lines[paths.index("enso/adapter_model.safetensors")].split()[0].replace(",", ""))
    assert size == (run / "enso" / "adapter_model.safetensors").stat().st_size
    assert "hub_model_id" in one_error_line(gwm("push", run), "push")  # a real push needs the repo id


def test_make_tiny_base_refuses_a_folder_holding_a_checkpoint(tmp_path):
    (tmp_path / "base" / "transformer").mkdir(parents=True)
    assert "already holds a checkpoint" in one_error_line(gwm("make-tiny-base", tmp_path / "base"), "make-tiny-base")


ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "-q"]


def test_default_launch_config_silences_accelerates_defaults_warning():
    done = subprocess.run([*ACCELERATE, "--config_file", str(REPO / "configuration" / "accelerate" / "default.yaml"),
                           str(REPO / "training" / "dag_train.py"), "--dry_run"], capture_output=True, text=True,
                          env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "values were not passed" not in done.stderr and "macro" in done.stdout


def test_two_processes_asked_without_multi_gpu_say_that_one_runs():
    done = subprocess.run([*ACCELERATE, "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                           "--dynamo_backend", "no", str(REPO / "training" / "dag_train.py"), "--dry_run"],
                          capture_output=True, text=True, env={**ENV, "CUDA_VISIBLE_DEVICES": ""}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    warnings = [line for line in done.stderr.splitlines() if "started one" in line]
    assert len(warnings) == 1 and "cpu_2proc.yaml" in warnings[0], done.stderr[-2000:]
