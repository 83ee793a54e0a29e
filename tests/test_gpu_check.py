"""scripts/gpu_check.sh --cpu: the GPU check's every step at tiny sizes on the CPU, into a temporary folder."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gpu_check.sh"


@pytest.mark.slow
def test_gpu_check_cpu_smoke_runs_every_step_into_its_output_folder(tmp_path):
    results = REPO / "benchmarks" / "results"
    before = sorted(p.relative_to(results) for p in results.rglob("*"))
    env = {k: v for k, v in os.environ.items() if k not in ("GWM_GPU_CHECK_OUT", "GWM_WHEELS", "PYTHONPATH")}
    done = subprocess.run(["bash", str(SCRIPT), "--cpu", "--out", str(tmp_path / "out")], capture_output=True,
                          text=True, env={**env, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["passed"] and summary["gpu"] is None and summary["check"] == "scripts/gpu_check.sh --cpu"
    assert [s["step"] for s in summary["steps"]] == ["cuda_tests", "bench_width", "bench_packed", "demo", "forecast",
                                                     "evaluate"]
    assert all((out / f"{s['step']}.log").is_file() for s in summary["steps"])
    assert "skipped" in (out / "cuda_tests.log").read_text()  # no CUDA here: every CUDA test skipped with its reason
    width = summary["bench"]["gpu_width"]
    assert [(r["positions"], r["checkpointing"]) for r in width] == [
        (p, m) for p in (16, 32) for m in ("none", "loop", "application")]
    assert [(r["batch_size"], r["checkpointing"]) for r in summary["bench"]["gpu_width_packed"]] == [(2, "none")]
    assert set(summary["demo_val_loss"]) == {"macro", "climate", "world", "world_solar"}
    assert json.loads((out / "demo_dag.json").read_text())["nodes"]["world"]["status"] == "done"
    forecast = pd.read_csv(out / "forecast.csv")
    assert len(forecast) == 24 and forecast["climate.enso.nino12_sst"].notna().all()
    assert summary["evaluate"] is not None
    assert sorted(p.relative_to(results) for p in results.rglob("*")) == before  # nothing written into the repo
