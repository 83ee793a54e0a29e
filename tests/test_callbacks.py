"""Trainer callbacks: a user's callback sees a node's moments in order with the real loop state; the fault-injection
callback's NaN goes through the real guard, its crash lands at the named moment. Real runs of one tiny root node."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
from _tiny import tiny_curriculum, write_curriculum

from modeling_gwm.training.callbacks import CRASH_MOMENTS, FaultInjectionCallback, TrainerCallback
from modeling_gwm.training.curriculum import load_curriculum
from modeling_gwm.training.trainer import DAGCurriculumTrainer, NonFiniteError
from modeling_gwm.training.training_args import TrainingArguments


class Recorder(TrainerCallback):
    """Every hook call as (hook, state.step, what it was given), with copies of the state as it was then."""

    def __init__(self):
        self.calls = []

    def on_node_begin(self, args, state, node, **kwargs):
        self.calls.append(("on_node_begin", state.step, {"node": node, "args": args}))

    def on_micro_batch(self, args, state, loss, node, step, **kwargs):
        self.calls.append(("on_micro_batch", state.step, {"node": node, "step": step, "loss": float(loss.detach())}))
        return loss

    def on_step_end(self, args, state, node, **kwargs):
        self.calls.append(("on_step_end", state.step, {"node": node, "history": list(state.history)}))

    def on_save(self, args, state, node, path, **kwargs):
        path = Path(path)
        self.calls.append(("on_save", state.step, {"node": node, "path": path, "exists": path.exists()}))

    def on_node_end(self, args, state, node, metrics, **kwargs):
        self.calls.append(("on_node_end", state.step, {"node": node, "metrics": metrics, "state": state}))

    def hooks(self, *names: str) -> list[tuple]:
        return [c for c in self.calls if c[0] in names]


def _trainer(tmp_path: Path, callbacks, out: str = "out", **kwargs) -> DAGCurriculumTrainer:
    """Node macro alone (a root): 4 steps, a checkpoint at step 2."""
    spec = tiny_curriculum(steps=4, checkpoint_every=2)
    return DAGCurriculumTrainer(curriculum=load_curriculum(write_curriculum(tmp_path, spec)),
                                output_dir=str(tmp_path / out), only_nodes=["macro"],
                                device="cpu", write_cards=False, callbacks=callbacks, **kwargs)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("callbacks")
    recorder = Recorder()
    _trainer(tmp_path, [recorder]).run()
    return recorder, tmp_path / "out"


def test_a_callback_sees_a_nodes_moments_in_order(recorded):
    recorder, out = recorded
    events = [(hook, step) for hook, step, _ in recorder.calls if hook != "on_micro_batch"]
    assert events == [("on_node_begin", 0),
                      ("on_step_end", 1), ("on_step_end", 2),
                      ("on_save", 2), ("on_save", 2), ("on_save", 2), ("on_save", 2), ("on_save", 2),
                      ("on_step_end", 3), ("on_step_end", 4),
                      ("on_save", 4), ("on_save", 4),
                      ("on_node_end", 4)]
    assert all(given["node"] == "macro" for _, _, given in recorder.calls)
    assert isinstance(recorder.calls[0][2]["args"], TrainingArguments)
    # one micro-batch per step (no accumulation), each the step's real, finite summed loss
    micro = recorder.hooks("on_micro_batch")
    assert [given["step"] for _, _, given in micro] == [1, 2, 3, 4]
    assert [step for _, step, _ in micro] == [0, 1, 2, 3]  # state.step: the steps done before it
    assert all(math.isfinite(given["loss"]) and given["loss"] > 0 for _, _, given in micro)


def test_step_end_sees_the_steps_history_and_save_the_written_files(recorded):
    recorder, out = recorded
    for _, step, given in recorder.hooks("on_step_end"):
        assert [h["step"] for h in given["history"]] == list(range(1, step + 1))
        assert math.isfinite(given["history"][-1]["train_loss"])
    saves = [(given["path"], given["exists"]) for _, _, given in recorder.hooks("on_save")]
    staging = out / "macro" / ".checkpoint.tmp"
    assert saves == [(staging / "adapter.safetensors", True), (staging / "optimizer.safetensors", True),
                     (staging / "best_adapter.safetensors", True), (staging / "trainer_state.json", True),
                     (out / "macro" / "checkpoint", True),
                     (out / "macro" / "adapter_model.safetensors", True), (out / "macro", True)]


def test_node_end_sees_the_written_metrics_and_the_final_state(recorded):
    recorder, out = recorded
    [(_, _, given)] = recorder.hooks("on_node_end")
    written = json.loads((out / "macro" / "metrics.json").read_text())
    assert given["metrics"] == written and written["steps"] == 4
    assert given["state"].history == written["history"] and given["state"].best_step == written["best_step"]
    assert (out / "macro" / "COMPLETE").exists()


def test_injected_nan_reaches_later_callbacks_and_is_caught_by_the_guard(tmp_path):
    recorder = Recorder()
    _trainer(tmp_path, [FaultInjectionCallback(nan_at="macro:2"), recorder], nonfinite="skip").run()
    losses = [given["loss"] for _, _, given in recorder.hooks("on_micro_batch")]
    assert math.isnan(losses[1]) and all(math.isfinite(x) for x in losses[:1] + losses[2:])
    metrics = json.loads((tmp_path / "out" / "macro" / "metrics.json").read_text())
    assert metrics["skipped_nonfinite_steps"] == 1
    assert [h.get("skipped") for h in metrics["history"]] == [None, "non-finite", None, None]
    with pytest.raises(NonFiniteError, match=r"node 'macro': non-finite loss or gradient at step 3"):
        _trainer(tmp_path, [FaultInjectionCallback(nan_at="macro:3")], out="stopped").run()


def test_crash_at_checkpoint_mid_kills_between_the_checkpoints_files(tmp_path):
    """SIGKILLed in a forked child right after the first file of the step-2 checkpoint: that file alone is staged."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            _trainer(tmp_path, [FaultInjectionCallback(crash_at="checkpoint_mid:macro:2")]).run()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == -signal.SIGKILL
    node = tmp_path / "out" / "macro"
    assert sorted(os.listdir(node / ".checkpoint.tmp")) == ["adapter.safetensors"]
    assert not (node / "checkpoint").exists() and not (node / "COMPLETE").exists()


def test_fault_injection_from_the_environment_and_a_bad_moment():
    assert FaultInjectionCallback.from_environment({}) is None
    faults = FaultInjectionCallback.from_environment({"GWM_CRASH_AT": "step:a:3", "GWM_INJECT_NAN": "b:2"})
    assert (faults.crash_at, faults.nan_at) == ("step:a:3", "b:2")
    assert set(CRASH_MOMENTS) == {"merge_done", "step", "checkpoint_mid", "checkpoint_written", "adapter_written",
                                  "before_complete", "node_done"}
    with pytest.raises(ValueError, match=r"crash_at 'stpe:a:3': the moment must be one of"):
        FaultInjectionCallback(crash_at="stpe:a:3")
