"""Reliability: SIGKILL at named moments then --resume, node and dag.json locks, non-finite guards, safe loading,
secrets. Real training runs on the tiny base (no mocks); the crash chain runs in one subprocess that forks a real
`dag_train.py` process per run (benchmarks/crash_stress.py), so the heavy imports are paid once.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from modeling_gwm.run_folder import NodeBusyError, node_lock
from modeling_gwm.training.callbacks import FaultInjectionCallback
from modeling_gwm.training.curriculum import CurriculumError, load_curriculum
from modeling_gwm.training.trainer import DAGCurriculumTrainer, NonFiniteError, all_finite

REPO = Path(__file__).resolve().parent.parent
STRESS = REPO / "benchmarks" / "crash_stress.py"
_spec = importlib.util.spec_from_file_location("crash_stress", STRESS)
crash_stress = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(crash_stress)
sys.path.insert(0, str(REPO / "training"))
import dag_train  # noqa: E402

# Each kill is a different moment; they run in this order, each run resuming the previous one's output directory.
CRASH_MOMENTS = [
    ("step:a:1", []),  # during the first step, before any checkpoint
    ("checkpoint_mid:a:2", []),  # between the files of a step checkpoint
    ("checkpoint_written:a:2", []),  # right after a checkpoint
    ("step:a:3", []),  # during a step of a resumed node
    ("adapter_written:a", []),  # adapter files written, metrics and COMPLETE not yet
    ("before_complete:a", []),  # everything but the COMPLETE marker
    ("node_done:a", ["a"]),  # between nodes
    ("merge_done:j", ["a", "b"]),  # right after a join's merge
    ("checkpoint_mid:j:2", ["a", "b"]),
]
TOLERANCE = 1e-6  # measured: 0.0 (resumed runs are bit-identical on CPU)


def _curriculum(tmp_path: Path, steps: int = 4, checkpoint_every: int = 2) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(crash_stress.tiny_dag(steps, checkpoint_every), sort_keys=False))
    return path


def _errors(stderr: str) -> list[str]:
    """The error lines of a run's stderr (the rest is logging and progress bars); never a traceback."""
    assert "Traceback" not in stderr
    return [line for line in stderr.splitlines() if line.startswith("dag_train.py: error:")]


def test_sigkill_at_named_moments_then_resume_matches_uninterrupted(tmp_path):
    config = _curriculum(tmp_path)
    report_path = tmp_path / "report.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(STRESS), "--config", str(config), "--workdir", str(tmp_path / "w"),
                           "--report", str(report_path), "--crash_at", *[m for m, _ in CRASH_MOMENTS]],
                          env=env, capture_output=True, text=True, timeout=600)
    assert report_path.exists(), proc.stderr[-3000:] + (tmp_path / "w" / "runs.log").read_text()[-3000:]
    report = json.loads(report_path.read_text())
    assert report["reference_rc"] == 0
    for kill, (spec, complete) in zip(report["kills"], CRASH_MOMENTS, strict=True):
        assert kill["rc"] == -signal.SIGKILL, f"{spec}: the hook did not fire (exit {kill['rc']})"
        assert kill["problems"] == [], f"{spec}: {kill['problems']}"
        assert kill["complete"] == complete, spec  # e.g. before_complete:a leaves adapter + metrics, yet not complete
    assert report["final_rc"] == 0 and report["problems"] == []
    assert report["max_abs_diff"] <= TOLERANCE, report["max_abs_diff"]
    crashed, reference = tmp_path / "w" / "crashed", tmp_path / "w" / "reference"
    for node in ("a", "b", "j"):
        assert (crashed / node / "COMPLETE").exists() and not (crashed / node / "checkpoint").exists()
        assert (crashed / ".locks" / f"{node}.lock").exists()  # held by SIGKILLed runs, then taken by the resumes
        assert sorted(os.listdir(crashed / node)) == sorted(os.listdir(reference / node))  # no leftovers
        ours, theirs = (json.loads((d / node / "metrics.json").read_text()) for d in (crashed, reference))
        assert ours["history"] == theirs["history"] and ours["val_loss_end"] == theirs["val_loss_end"]
    dag = json.loads((crashed / "dag.json").read_text())
    assert {n: e["status"] for n, e in dag["nodes"].items()} == {"a": "done", "b": "done", "j": "done"}
    assert crash_stress.check_outputs(crashed / "final") == [] and (crashed / "final" / "adapter_config.json").exists()


# ---------------------------------------------------------------------------------------------------- locks
def test_node_lock_refuses_a_second_job_and_dies_with_its_holder(tmp_path):
    out = tmp_path / "out"
    with node_lock(out, "a"):
        with pytest.raises(NodeBusyError, match=rf"node 'a' is already being trained .* process {os.getpid()}"):
            with node_lock(out, "a"):
                pass
    pid = os.fork()
    if pid == 0:  # a job that takes the lock and is SIGKILLed while holding it
        with node_lock(out, "a"):
            os.kill(os.getpid(), signal.SIGKILL)
        os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == -signal.SIGKILL
    with node_lock(out, "a"):  # the OS released it: no stale lock
        pass


def test_second_job_for_the_same_node_refuses_with_one_line(tmp_path, capsys):
    config, out = _curriculum(tmp_path), tmp_path / "out"
    with node_lock(out, "a"):  # another live job is training node a
        rc = dag_train.main(["--config", str(config), "--output_dir", str(out), "--nodes", "a", "--max_steps", "1"])
    err = _errors(capsys.readouterr().err)
    assert rc == 2
    assert len(err) == 1 and "node 'a' is already being trained" in err[0] and str(out) in err[0], err
    assert not (out / "a" / "adapter_model.safetensors").exists()


def test_concurrent_dag_updates_for_different_nodes_are_all_kept(tmp_path):
    """Four processes update their own node in one dag.json 30 times each at once: no update may be lost."""
    curriculum = load_curriculum(_curriculum(tmp_path))
    trainer = DAGCurriculumTrainer(curriculum=curriculum, output_dir=str(tmp_path / "out"), write_cards=False)
    os.makedirs(trainer.output_dir)
    dag = trainer.plan.load_dag()
    children = []
    for index, node in enumerate(["a", "b", "j", "a"]):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                for i in range(30):
                    trainer.plan.update_dag(dag, node, **{f"writer{index}": i})
                code = 0
            finally:
                os._exit(code)
        children.append(pid)
    assert all(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0 for pid in children)
    nodes = json.loads((tmp_path / "out" / "dag.json").read_text())["nodes"]
    assert nodes["a"]["writer0"] == 29 and nodes["b"]["writer1"] == 29 and nodes["j"]["writer2"] == 29
    assert nodes["a"]["writer3"] == 29


# ---------------------------------------------------------------------------------------------------- non-finite
def test_nan_stops_the_node_keeps_its_checkpoint_and_resumes(tmp_path, capsys, monkeypatch):
    config, out = _curriculum(tmp_path), tmp_path / "out"
    argv = ["--config", str(config), "--output_dir", str(out), "--nodes", "a"]
    monkeypatch.setenv("GWM_INJECT_NAN", "a:3")
    assert dag_train.main(argv) == 2
    err = _errors(capsys.readouterr().err)
    assert len(err) == 1 and "node 'a'" in err[0] and "step 3" in err[0] and "checkpoint (step 2)" in err[0], err
    assert json.loads((out / "a" / "checkpoint" / "trainer_state.json").read_text())["step"] == 2
    assert not (out / "a" / "COMPLETE").exists()
    assert json.loads((out / "dag.json").read_text())["nodes"]["a"]["status"] == "failed"
    monkeypatch.delenv("GWM_INJECT_NAN")
    assert dag_train.main(argv + ["--resume"]) == 0
    metrics = json.loads((out / "a" / "metrics.json").read_text())
    assert (out / "a" / "COMPLETE").exists() and metrics["skipped_nonfinite_steps"] == 0 and metrics["steps"] == 4


def test_nan_step_skipped_and_counted(tmp_path):
    out = tmp_path / "out"
    trainer = DAGCurriculumTrainer(curriculum=load_curriculum(_curriculum(tmp_path)), output_dir=str(out),
                                   only_nodes=["a"], write_cards=False, nonfinite="skip",
                                   callbacks=[FaultInjectionCallback(nan_at="a:2")])
    trainer.run()
    metrics = json.loads((out / "a" / "metrics.json").read_text())
    assert metrics["skipped_nonfinite_steps"] == 1 and metrics["settings"]["nonfinite"] == "skip"
    assert [h["train_loss"] is None for h in metrics["history"]] == [False, True, False, False]
    adapter = load_file(out / "a" / "adapter_model.safetensors")
    assert all(bool(t.isfinite().all()) for t in adapter.values())


@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one AcceleratorState per process and refuses to change its mixed precision: start and leave
    these tests with a clean one."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def _fp16_trainer(tmp_path: Path, scaler, **kwargs) -> DAGCurriculumTrainer:
    """Node 'a' under fp16 autocast with a real GradScaler. accelerate makes the GradScaler only on GPU-like devices
    (on CPU `--mixed_precision fp16` is autocast alone), so the test hands it the CPU GradScaler torch provides, as
    `accelerator.scaler`, where accelerate keeps the GPU one: backward, optimizer step and guard then run the real
    fp16 code path."""
    trainer = DAGCurriculumTrainer(curriculum=load_curriculum(_curriculum(tmp_path)), output_dir=str(tmp_path / "o"),
                                   only_nodes=["a"], write_cards=False, mixed_precision="fp16", **kwargs)
    trainer.accelerator.scaler = scaler
    return trainer


class _OverflowOnce(torch.amp.GradScaler):
    """The CPU GradScaler whose first scaled loss overflows, as a fp16 backward at too high a scale does. (A huge
    init_scale alone does not overflow for sure: the pinball loss's gradients are bounded, and 2^127 times them can
    stay inside float32.)"""

    overflowed = False

    def scale(self, outputs):
        scaled = super().scale(outputs)
        if not self.overflowed:
            self.overflowed = True
            return scaled * float("inf")
        return scaled


def test_fp16_overflow_is_skipped_by_gradscaler_not_stopped_nor_counted(tmp_path, fresh_accelerator_state):
    """The first scaled backward pass overflows: GradScaler skips that step and backs off from 2^127 to 2^17; the
    node neither stops (default --nonfinite stop) nor counts a skip, and trains on."""
    scaler = _OverflowOnce("cpu", init_scale=2.0**127, backoff_factor=2.0**-110, growth_interval=1000)
    _fp16_trainer(tmp_path, scaler).run()
    metrics = json.loads((tmp_path / "o" / "a" / "metrics.json").read_text())
    history = metrics["history"]
    assert metrics["skipped_nonfinite_steps"] == 0 and (tmp_path / "o" / "a" / "COMPLETE").exists()
    assert [h.get("skipped") for h in history] == ["fp16 overflow", None, None, None]
    assert all(math.isfinite(h["train_loss"]) for h in history)  # the loss itself was fine
    assert scaler.get_scale() == 2.0**17
    adapter = load_file(tmp_path / "o" / "a" / "adapter_model.safetensors")
    assert all(bool(t.isfinite().all()) for t in adapter.values())
    assert any(bool(t.abs().sum() > 0) for k, t in adapter.items() if "loop_emb" in k)  # later steps did train


def test_fp16_nonfinite_loss_is_counted_and_the_scale_still_backs_off(tmp_path, fresh_accelerator_state):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=1000)
    _fp16_trainer(tmp_path, scaler, nonfinite="skip", callbacks=[FaultInjectionCallback(nan_at="a:2")]).run()
    metrics = json.loads((tmp_path / "o" / "a" / "metrics.json").read_text())
    assert metrics["skipped_nonfinite_steps"] == 1
    assert [h.get("skipped") for h in metrics["history"]] == [None, "non-finite", None, None]
    assert scaler.get_scale() == 2.0**15  # scaler.update() ran on the skipped step


@pytest.mark.parametrize("scale, verdict", [(2.0**16, True), (1.0, False)])
def test_fp16_guard_leaves_overflow_to_gradscaler_only_while_the_scale_amplifies(tmp_path, fresh_accelerator_state,
                                                                                  scale, verdict):
    scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    trainer = _fp16_trainer(tmp_path, scaler)
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = trainer.accelerator.prepare(torch.optim.SGD([param], lr=0.1))
    trainer.accelerator.backward(param.sum())  # scaled backward: grad = scale
    param.grad[1] = float("inf")
    assert all_finite(trainer.accelerator, torch.tensor(1.0), [param], optimizer) is verdict
    assert param.grad[0] == 1.0  # the guard saw (and left) the unscaled gradient


def test_huge_learning_rate_is_caught_as_nonfinite(tmp_path):
    """No hook: a learning rate of 1e30 really overflows the adapter within a few steps."""
    spec = crash_stress.tiny_dag(steps=6, checkpoint_every=2)
    spec["nodes"] = spec["nodes"][:1]
    spec["nodes"][0]["learning_rate"] = 9.9  # the curriculum allows < 10; the optimizer is changed below
    path = tmp_path / "lr.yaml"
    path.write_text(yaml.safe_dump(spec))
    curriculum = load_curriculum(path)
    curriculum.node("a").learning_rate = 1e30
    trainer = DAGCurriculumTrainer(curriculum=curriculum, output_dir=str(tmp_path / "out"), write_cards=False)
    with pytest.raises(NonFiniteError, match=r"node 'a': non-finite loss or gradient at step \d"):
        trainer.run()
    assert not (tmp_path / "out" / "a" / "COMPLETE").exists()


def test_nonfinite_option_is_checked(tmp_path):
    with pytest.raises(CurriculumError, match="nonfinite must be 'stop' or 'skip', got 'ignore'"):
        DAGCurriculumTrainer(curriculum=load_curriculum(_curriculum(tmp_path)), output_dir=str(tmp_path / "out"),
                             nonfinite="ignore")


# ---------------------------------------------------------------------------------------------------- safe loading
UNSAFE = re.compile(r"torch\.load\s*\(|^\s*(import|from)\s+(c?pickle|dill|cloudpickle|joblib)\b|pickle\.loads?\s*\(|"
                    r"allow_pickle\s*=\s*True|weights_only\s*=\s*False|trust_remote_code\s*=\s*True|"
                    r"yaml\.(unsafe_|full_)?load\s*\(")


def test_package_never_unpickles_or_trusts_remote_code():
    for unsafe in ("state = torch.load(path)", "import pickle", "AutoModel.from_pretrained(x, trust_remote_code=True)",
                   "yaml.load(text, Loader=yaml.Loader)", "np.load(p, allow_pickle=True)"):
        assert UNSAFE.search(unsafe), unsafe  # the pattern itself catches what it is meant to catch
    offenders = []
    for path in sorted((REPO / "modeling_gwm").rglob("*.py")) + [REPO / "training" / "dag_train.py"]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if UNSAFE.search(code):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert offenders == []


@pytest.mark.parametrize("name", ["../x", "/abs", "a/../../b", "..", ".hidden", "a\\b", "final"])
def test_node_names_never_escape_the_output_directory(tmp_path, name):
    spec = crash_stress.tiny_dag()
    spec["nodes"][0]["name"] = name
    spec["nodes"][2]["parents"] = [name, "b"]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(CurriculumError, match=re.escape(repr(name))):
        load_curriculum(path)


# ---------------------------------------------------------------------------------------------------- secrets
def test_hub_token_never_written_or_logged(tmp_path, capfd, monkeypatch):
    flag_token, env_token = "hf_FAKEflagTOKEN0123456789abcdef", "hf_FAKEenvTOKEN9876543210fedcba"
    monkeypatch.setenv("HF_TOKEN", env_token)
    out = tmp_path / "out"
    argv = ["--config", str(_curriculum(tmp_path)), "--output_dir", str(out), "--nodes", "a", "--max_steps", "2",
            "--report_to", "tensorboard", "--push_to_hub", "--hub_model_id", "someone/gwm-test"]
    assert dag_train.main(argv + ["--hub_token", flag_token]) == 2  # HF_HUB_OFFLINE=1: the push fails, cleanly
    first = capfd.readouterr()
    assert first.err.strip().splitlines()[-1].startswith("dag_train.py: error:")
    assert "Traceback" not in first.err
    assert dag_train.main(argv + ["--resume"]) == 2  # the token from HF_TOKEN this time
    second = capfd.readouterr()
    assert (out / "a" / "COMPLETE").exists() and list((out / "runs").rglob("events.out.tfevents*"))
    texts = [first.out, first.err, second.out, second.err]
    for path in out.rglob("*"):
        if path.is_file():
            texts.append(path.read_bytes().decode("latin-1"))
    for token in (flag_token, env_token):
        for secret in (token, token[3:]):
            assert not any(secret in text for text in texts), f"{secret} leaked"
