"""Every entry point on a CUDA device: the demo curriculum with bf16 mixed precision (join and final/ included), every
merge method, resume after a SIGKILL, forecast / evaluate / predict_df / impute and the CLI, a bare model's save and
load, CPU against CUDA forecasts, and compile_blocks. Each test is skipped where torch finds no CUDA device;
`scripts/gpu_check.sh` runs this file on a GPU machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import peft
import pytest
import torch
from _tiny import tiny_curriculum, write_curriculum
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from modeling_gwm import GWMModel, LoopConfig
from modeling_gwm.forecasting.evaluation import evaluate
from modeling_gwm.forecasting.pipeline import AdapterSpec
from modeling_gwm.model.merging import MERGE_METHODS, MergeSpec, merge_adapters
from modeling_gwm.training.curriculum import load_curriculum
from modeling_gwm.training.trainer import DAGCurriculumTrainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device (torch.cuda.is_available() is False); "
                                       "scripts/gpu_check.sh runs these on a GPU machine")

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "configuration" / "curricula" / "demo.yaml"
DATA = REPO / "configuration" / "data"
ENSO = DATA / "elnino_nino12_monthly.csv"
ENSO_FIELD = "climate.enso.nino12_sst"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "GWM_PROGRESS": "0"}
ENV.pop("GWM_CRASH_AT", None)
FIELDS = [{"name": f"x.{i}", "mean": 0.0, "std": 1.0, "transform": "none"} for i in range(3)]
# Resumed against uninterrupted, both on CUDA: CPU runs are bit-identical (tests/test_reliability.py); CUDA kernels
# may sum in another order from run to run. A resume that lost the optimizer state would be ~learning_rate (5e-3) off.
RESUME_TOLERANCE = 1e-3
# CUDA bf16 blocks against CPU fp32 ones: the largest quantile difference, in the field's training stds. The same
# comparison on the CPU (frozen_dtype bfloat16 against float32; the demo at 20 steps a node, El Nino, 18 steps, 9
# levels) gives 0.0021 (rms 0.0006); a device bug gives differences of order one.
BF16_TOLERANCE = 0.05


@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one AcceleratorState per process and refuses to change its mixed precision."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def _enso_history(rows: int | None = None) -> pd.DataFrame:
    frame = pd.read_csv(ENSO).rename(columns={"sst": ENSO_FIELD})
    return frame if rows is None else frame.iloc[:rows]


def _cuda_batch(seed: int = 0, batch: int = 2, steps: int = 6, fields: int = 3):
    g = torch.Generator().manual_seed(seed)  # drawn on the CPU, then moved: the same batch on every machine
    values = torch.randn(batch, steps, fields, generator=g)
    presence = torch.rand(batch, steps, fields, generator=g) > 0.1
    target = torch.zeros_like(presence)
    target[:, -2:] = True
    return values.cuda(), presence.cuda(), target.cuda()


def _train_on_cuda(peft_model, steps: int, seed: int) -> None:
    params = [p for p in peft_model.parameters() if p.requires_grad]
    assert params and all(p.is_cuda and p.dtype == torch.float32 for p in params)
    optimizer = torch.optim.AdamW(params, lr=0.05, fused=True)
    values, presence, target = _cuda_batch(seed)
    for _ in range(steps):
        optimizer.zero_grad()
        peft_model(values, presence, target_mask=target).loss.backward()
        optimizer.step()


# ---------------------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    """The shipped demo curriculum on CUDA under bf16 mixed precision, 3 steps a node (roots, join, fork, final/)."""
    AcceleratorState._reset_state(reset_partial_state=True)
    out = tmp_path_factory.mktemp("demo_cuda") / "out"
    trainer = DAGCurriculumTrainer(curriculum=load_curriculum(DEMO), output_dir=str(out), max_steps=3,
                                   mixed_precision="bf16")
    assert trainer.accelerator.device.type == "cuda"
    dag = trainer.run()
    model = trainer.model
    assert next(model.proj_in.parameters()).is_cuda
    assert next(model.transformer_blocks.parameters()).dtype == torch.bfloat16  # frozen_dtype auto on CUDA
    assert {name: entry["status"] for name, entry in dag["nodes"].items()} == {
        "macro": "done", "climate": "done", "world": "done", "world_solar": "done"}
    AcceleratorState._reset_state(reset_partial_state=True)
    return out


def test_demo_curriculum_trains_on_cuda_in_bf16_through_the_join_to_final(demo_run):
    for node in ("macro", "climate", "world", "world_solar", "final"):
        adapter = load_file(demo_run / node / "adapter_model.safetensors")
        assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in adapter.values()), node
    metrics = json.loads((demo_run / "world" / "metrics.json").read_text())
    assert metrics["settings"]["mixed_precision"] == "bf16" and metrics["steps"] == 3
    assert all(np.isfinite([metrics["val_loss_start"], metrics["val_loss_end"], metrics["train_loss_end"]]))
    retention = json.loads((demo_run / "dag.json").read_text())["nodes"]["world"]["retention"]
    assert set(retention) == {"macro", "climate"}
    assert all(np.isfinite(r["merged_val_loss"]) for r in retention.values())
    final = load_file(demo_run / "final" / "adapter_model.safetensors")
    sink = load_file(demo_run / "world_solar" / "adapter_model.safetensors")
    assert all(torch.equal(final[k], sink[k]) for k in sink)
    assert (demo_run / "world" / "README.md").is_file()  # the card and plot were written too


def test_every_merge_method_on_cuda_matches_the_cpu_merge(tiny_base):
    model = GWMModel.from_pretrained(tiny_base, d_model=16, device="cuda")
    peft_model = peft.get_peft_model(model, LoopConfig(n_loops=2, fields=FIELDS[:2]), adapter_name="a")
    peft_model.add_adapter("b", LoopConfig(n_loops=2, fields=FIELDS[1:]))
    peft_model.add_adapter("init", LoopConfig(n_loops=2, fields=FIELDS[:2]))
    _train_on_cuda(peft_model, steps=2, seed=1)
    peft_model.set_adapter("b")
    _train_on_cuda(peft_model, steps=2, seed=2)
    states = {n: peft.get_peft_model_state_dict(peft_model, adapter_name=n) for n in ("a", "b", "init")}
    assert all(t.is_cuda for state in states.values() for t in state.values())
    names = [[f["name"] for f in FIELDS[:2]], [f["name"] for f in FIELDS[1:]]]
    child = [f["name"] for f in FIELDS]
    for method in MERGE_METHODS:
        cuda_rng = torch.cuda.get_rng_state()
        spec = MergeSpec(method, [0.6, 0.4])
        expected = merge_adapters([{k: v.cpu() for k, v in states[n].items()} for n in ("a", "b")], names, child,
                                  {k: v.cpu() for k, v in states["init"].items()}, spec=spec, seed=1)
        # the trainer's join: parents read from files onto the CPU, the seeded init from the model on CUDA
        mixed = merge_adapters([{k: v.cpu() for k, v in states[n].items()} for n in ("a", "b")], names, child,
                               states["init"], spec=spec, seed=1)
        assert all(torch.equal(mixed[k], expected[k]) for k in expected), method
        peft_model.base_model.add_weighted_adapter(["a", "b"], [0.6, 0.4], f"m_{method}", combination_type=method,
                                                   init="init", seed=1)
        assert torch.equal(torch.cuda.get_rng_state(), cuda_rng), method  # DARE drew from the CPU generator only
        merged = peft.get_peft_model_state_dict(peft_model, adapter_name=f"m_{method}")
        assert all(merged[k].is_cuda and torch.equal(merged[k].cpu(), expected[k]) for k in expected), method
        peft_model.set_adapter(f"m_{method}")
        values, presence, target = _cuda_batch(seed=3)
        with torch.no_grad():
            assert torch.isfinite(peft_model(values, presence, target_mask=target).quantiles).all(), method


def _dag_train(config: Path, out: Path, *extra: str, crash_at: str | None = None) -> subprocess.CompletedProcess:
    env = {**ENV, **({"GWM_CRASH_AT": crash_at} if crash_at else {})}
    return subprocess.run([sys.executable, str(REPO / "training" / "dag_train.py"), "--config", str(config),
                           "--output_dir", str(out), "--mixed_precision", "bf16", *extra],
                          capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
def test_resume_after_a_kill_on_cuda_continues_from_the_checkpoint(tmp_path):
    config = write_curriculum(tmp_path, tiny_curriculum(steps=4, checkpoint_every=2))
    reference = _dag_train(config, tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-3000:]
    killed = _dag_train(config, tmp_path / "crashed", crash_at="step:world:3")  # the join, after its checkpoint
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    state = json.loads((tmp_path / "crashed" / "world" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 2 and (tmp_path / "crashed" / "world" / "checkpoint" / "optimizer.safetensors").is_file()
    resumed = _dag_train(config, tmp_path / "crashed", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from step 2" in resumed.stderr
    for node in ("macro", "climate", "world", "ocean", "final"):
        ours = load_file(tmp_path / "crashed" / node / "adapter_model.safetensors")
        theirs = load_file(tmp_path / "reference" / node / "adapter_model.safetensors")
        worst = max(float((ours[k] - theirs[k]).abs().max()) for k in theirs)
        assert worst <= RESUME_TOLERANCE, (node, worst)
    ours, theirs = (json.loads((tmp_path / d / "world" / "metrics.json").read_text())
                    for d in ("crashed", "reference"))
    assert [h["step"] for h in ours["history"]] == [1, 2, 3, 4]
    np.testing.assert_allclose([h["train_loss"] for h in ours["history"]],
                               [h["train_loss"] for h in theirs["history"]], rtol=1e-3)


# ---------------------------------------------------------------------------------------------------- inference
@pytest.fixture(scope="module")
def cuda_model(demo_run):
    model = GWMModel.from_pretrained(demo_run / "final", device="cuda")
    assert all(p.is_cuda for p in model.parameters())
    return model


def test_forecast_and_quantiles_on_cuda(cuda_model):
    history = _enso_history()
    preds = cuda_model.forecast(history, horizon=24)  # longer than the adapter's horizon: rolled out
    assert preds.shape == (24, 1) and np.isfinite(preds.to_numpy()).all()
    bands = cuda_model.forecast_quantiles(history, horizon=6, quantile_levels=[0.1, 0.5, 0.9])
    assert (bands[ENSO_FIELD, 0.1] <= bands[ENSO_FIELD, 0.9]).all()
    np.testing.assert_allclose(bands.xs(0.5, axis=1, level="level").to_numpy(),
                               cuda_model.forecast(history, horizon=6).to_numpy(), rtol=1e-4)


def test_evaluate_on_cuda(cuda_model):
    result = evaluate(cuda_model, _enso_history(), holdout=12, methods=["naive", "seasonal_naive"])
    assert np.isfinite(result["predictions"].to_numpy()).all()
    assert np.isfinite(result["quantiles"].to_numpy()).all()


def test_predict_df_on_cuda(cuda_model):
    history = _enso_history()
    frames = [history.iloc[start:start + 120].assign(item_id=f"item{start}") for start in (0, 60, 200)]
    df = pd.concat(frames).rename(columns={"date": "timestamp"})
    df["timestamp"] = pd.to_datetime(df["timestamp"])
    out = cuda_model.predict_df(df, target=ENSO_FIELD, prediction_length=6)
    assert len(out) == 3 * 6 and np.isfinite(out["predictions"].to_numpy()).all()


def test_impute_on_cuda(cuda_model):
    history = _enso_history(240)
    holes = history.copy()
    holes.loc[[30, 31, 100, 177], ENSO_FIELD] = np.nan
    filled = cuda_model.impute(holes)
    assert not filled[ENSO_FIELD].isna().any()
    kept = ~holes[ENSO_FIELD].isna().to_numpy()
    np.testing.assert_array_equal(filled[ENSO_FIELD].to_numpy()[kept], holes[ENSO_FIELD].to_numpy()[kept])


@pytest.mark.slow
@pytest.mark.parametrize("command", ["forecast", "evaluate"])
def test_cli_runs_on_cuda(demo_run, tmp_path, command):
    argv = [sys.executable, "-m", "modeling_gwm.commands", command, "--adapter", str(demo_run / "final"),
            "--data", str(ENSO), "--columns", f"sst={ENSO_FIELD}", "--device", "cuda"]
    argv += (["--horizon", "12", "--out", str(tmp_path / "p.csv")] if command == "forecast" else
             ["--holdout", "12", "--methods", "naive", "--json", str(tmp_path / "e.json")])
    done = subprocess.run(argv, capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    if command == "forecast":
        assert np.isfinite(pd.read_csv(tmp_path / "p.csv")[ENSO_FIELD].to_numpy()).all()


# ---------------------------------------------------------------------------------------------------- models
def test_bare_model_saves_and_loads_on_cuda(tiny_base, tmp_path):
    model = GWMModel.from_pretrained(tiny_base, d_model=16, device="cuda")
    with torch.no_grad():
        model.proj_in.weight.add_(0.01)  # something that is not the seeded init
    model.save_pretrained(tmp_path / "saved")
    again = GWMModel.from_pretrained(tmp_path / "saved", device="cuda")
    assert all(p.is_cuda for p in again.parameters())
    ours, theirs = model.state_dict(), again.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    values, presence, target = _cuda_batch()
    with torch.no_grad():  # the same weights and inputs; kernels may pick other algorithms for other addresses
        torch.testing.assert_close(again.eval()(values, presence).quantiles, model.eval()(values, presence).quantiles,
                                   rtol=1e-5, atol=1e-5)


def test_cpu_and_cuda_forecasts_agree(demo_run):
    """fp32 blocks on both: the same forecast up to summation order; bf16 blocks on CUDA (the default there): within
    bf16's precision. In the field's training stds, over one adapter horizon and every quantile level."""
    adapter, history = demo_run / "final", _enso_history()
    cpu = GWMModel.from_pretrained(adapter, device="cpu")
    spec = AdapterSpec.from_model(cpu)
    std = spec.fields[ENSO_FIELD].std

    def quantiles(model) -> np.ndarray:
        return model.forecast_quantiles(history, horizon=spec.horizon).to_numpy() / std

    on_cpu = quantiles(cpu)
    fp32 = quantiles(GWMModel.from_pretrained(adapter, device="cuda", frozen_dtype="float32"))
    bf16 = quantiles(GWMModel.from_pretrained(adapter, device="cuda"))
    assert np.abs(fp32 - on_cpu).max() < BF16_TOLERANCE / 10  # attention kernels may use TF32 for fp32 inputs
    assert np.abs(bf16 - on_cpu).max() < BF16_TOLERANCE


# ---------------------------------------------------------------------------------------------------- compile
@pytest.mark.slow
def test_compiled_blocks_on_cuda_give_the_plain_blocks_outputs(tiny_base):
    plain = GWMModel.from_pretrained(tiny_base, d_model=16, device="cuda").eval()
    compiled = GWMModel.from_pretrained(tiny_base, d_model=16, device="cuda", compile_blocks=True).eval()
    assert all(getattr(b, "_gwm_compiled", False) for b in compiled.transformer_blocks)
    values, presence, target = _cuda_batch(batch=2, steps=12)
    with torch.no_grad():
        expected = plain(values, presence, target_mask=target).quantiles
        got = compiled(values, presence, target_mask=target).quantiles
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)  # bf16 blocks; the compiler may fuse differently
    peft_model = peft.get_peft_model(compiled.train(), LoopConfig(n_loops=2, fields=FIELDS), adapter_name="a")
    _train_on_cuda(peft_model, steps=2, seed=0)  # forward and backward through the compiled blocks
