"""The benchmark scripts run at their smallest settings and write the figures they promise (no timing assertions)."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_step_bench_reports_step_floor_ratio(bench, tmp_path):
    out = tmp_path / "step.json"
    result = bench("bench_step").main(["--context_len", "3", "--fields", "2", "--rows", "40", "--horizon", "1",
                                       "--batch_size", "1", "--num_layers", "1", "--n_loops", "2", "--repeats", "1",
                                       "--warmup", "0", "--out", str(out)])
    written = json.loads(out.read_text())
    assert written["step_over_floor"] == pytest.approx(result["step_over_floor"])
    assert written["step_over_floor"] > 0 and written["floor_gflop"] > 0
    assert written["settings"]["block_applications"] == 2
    assert {"date", "cpu", "torch", "torch_threads", "command"} <= set(written["machine"])


def test_memory_child_measures_the_step_peak(bench):
    memory = bench("bench_memory")
    block = torch.empty(0)

    def allocate_4mib():
        nonlocal block
        block = torch.ones(2**20)  # 4 MiB of float32, alive after the call
    assert memory.torch_peak_bytes(allocate_4mib) >= 4 * 2**20
    measured = memory.child({"context_len": 3, "fields": 2, "rows": 40, "batch_size": 1, "n_loops": 2,
                             "num_layers": 1, "gradient_checkpointing": True, "threads": torch.get_num_threads()})
    assert measured["torch_peak_bytes"] > 0
    assert set(measured) == {"torch_peak_bytes", "rss_peak_bytes", "rss_model_bytes"}


def test_adapter_ops_at_2b_width_file_is_four_bytes_per_trainable_parameter(bench, tmp_path):
    out = tmp_path / "ops.json"
    bench("bench_adapter_ops").main(["--models", "2b", "--repeats", "1", "--switches", "2", "--parents", "2",
                                     "--methods", "linear", "--out", str(out)])
    written = json.loads(out.read_text())
    (row,) = written["models"]
    assert (row["blocks"], row["inner_dim"]) == (30, 1920)
    assert row["trainable_parameters"] == row["adapter_state_parameters"]
    assert 1.0 < row["file_over_4x_trainable"] < 1.01  # fp32 tensors plus the safetensors header
    assert {"save", "load", "attach", "switch"} <= set(row)
    assert [(m["parents"], m["method"]) for m in written["merges"]] == [(2, "linear")]


def test_dag_scaling_curricula_are_valid_and_compare_like_with_like(bench, tmp_path):
    import yaml

    from modeling_gwm.training.curriculum import load_curriculum

    scaling = bench("bench_dag_scaling")
    args = argparse.Namespace(steps=1, batch_size=4, context_len=12, n_loops=1, d_model=16)
    loaded = {}
    for label, nodes in (("two", scaling.two_nodes()), ("twelve", scaling.twelve_nodes())):
        path = tmp_path / f"{label}.yaml"
        path.write_text(yaml.safe_dump(scaling.curriculum(nodes, args, str(scaling.TINY_BASE))))
        loaded[label] = load_curriculum(path)
    two, twelve = loaded["two"], loaded["twelve"]
    assert (len(two.nodes), len(twelve.nodes)) == (2, 12)
    assert {n.kind for n in twelve.nodes} == {"root", "fork", "join"}
    widest = max(len(twelve.node_fields(n.name)) for n in twelve.nodes)
    assert all(len(two.node_fields(n.name)) == widest for n in two.nodes)


def test_gpu_width_bench_refuses_without_cuda_and_runs_narrow_on_cpu(bench, tmp_path):
    gpu = bench("bench_gpu_width")
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as exit_info:
            gpu.main([])
        assert exit_info.value.code == 2
    out = tmp_path / "gpu.json"
    gpu.main(["--device", "cpu", "--num_layers", "1", "--num_attention_heads", "1", "--positions", "16", "--fields",
              "2", "--n_loops", "1", "--repeats", "1", "--warmup", "0", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["positions"], r["checkpointing"]) for r in rows] == [(16, "none"), (16, "loop"), (16, "application")]
    assert all(r["positions_per_s"] > 0 and r["floor_flops"] > 0 and r["outside_frozen_share"] < 1 for r in rows)
    assert [r["recomputed_forwards"] for r in rows] == [0, 1, 1]  # n_loops 1: one recomputation either way


def test_init_geometry_reports_half_updates_at_init(bench, tmp_path):
    out = tmp_path / "init.json"
    result = bench("init_geometry").main(["--d_model", "16", "--n_loops", "2", "--steps", "4", "--fields", "2",
                                          "--out", str(out)])
    assert json.loads(out.read_text())["vs_bare_model"] == pytest.approx(result["vs_bare_model"])
    assert len(result["applications"]) == 2 * result["blocks"]  # n_loops applications of every block
    for row in result["applications"]:  # gates sigmoid(0) = 1/2: each loop step is half the block's update
        assert row["step"] == pytest.approx(row["update"] / 2) and row["update"] > 0
    assert result["vs_identity_backbone"] > 0 and result["vs_bare_model"] > 0


def test_forecast_bench_holds_out_the_tails_and_scores_gwm_against_the_baselines(bench, tmp_path):
    out = tmp_path / "forecast.json"
    bench("bench_forecast").main(["--smoke", "--output_dir", str(tmp_path / "run"), "--out", str(out)])
    written = json.loads(out.read_text())
    truncated = tmp_path / "run" / "truncated"
    for source, split in written["curriculum"]["sources"].items():  # training read only the truncated copies
        assert Path(split["path"]).parent == truncated, source
    air = written["summary"]["fields"]["transport.air.passengers"]
    assert air["model_mase"] > 0 and air["naive_mase"] > 0 and air["seasonal_naive_mase"] > 0
    assert air["gwm_baseline_mase"] > 0  # GWM's own untrained start is a method of its own
    aggregate = written["summary"]["aggregate"]
    assert aggregate["mase"]["seasonal_naive"] == pytest.approx(1.0) and aggregate["mase"]["model"] > 0
    assert 0.0 <= aggregate["gwm_beats"]["seasonal_naive"]["share"] <= 1.0
    assert aggregate["worst"]["model"]["series"] in written["series"]
    assert {"date", "cpu", "command"} <= set(written["machine"]) and written["wall_s"] > 0
    adapter = json.loads((tmp_path / "run" / "seed0" / "monthly" / "adapter_config.json").read_text())
    (field,) = adapter["fields"]  # the adapter records the span it trained on: all but the 18 held-out months
    assert field["span"] == ["1949-01-01", "1959-06-01"]


def test_forecast_bench_series_are_split_by_series_into_tuning_and_test(bench, tmp_path):
    import pandas as pd

    forecast = bench("bench_forecast")
    tuning, test = forecast.load_series("tuning"), forecast.load_series("test")
    assert len(tuning) + len(test) >= 40 and len({s["frequency"] for s in tuning + test}) >= 4
    assert not {s["name"] for s in tuning} & {s["name"] for s in test}  # no series in both
    assert {s["frequency"] for s in test} == {s["frequency"] for s in tuning}
    split = forecast.truncate(test, tmp_path)
    for entry in test:  # every test series ships with the repo and loses its whole hold-out
        full = pd.read_csv(BENCHMARKS.parent / entry["path"])
        trained = pd.read_csv(split[entry["name"]]["train"])
        holdout = forecast.HOLDOUT[entry["frequency"]]
        assert len(trained) == len(full) - holdout > 2 * holdout


def test_predict_df_bench_times_small_and_large_runs_and_splits_forward_time(bench, tmp_path):
    out = tmp_path / "predict_df.json"
    result = bench("bench_predict_df").main(["--smoke", "--out", str(out)])
    written = json.loads(out.read_text())
    assert written["ratio"] == pytest.approx(result["ratio"])
    assert (written["small"]["items"], written["large"]["items"]) == (2, 20)
    assert written["large"]["forward_gflop"] == pytest.approx(10 * written["small"]["forward_gflop"], rel=0.2)
    assert written["small"]["forward_calls_per_run"] == written["large"]["forward_calls_per_run"]  # batched
    assert {"date", "cpu", "torch", "torch_threads", "command"} <= set(written["machine"])
