"""Training that stops at its best: the learning-rate schedule, validation every `eval_every` steps, the best step
written, early stopping, a join that keeps the better of its merge and its training, the init seed, and a resume
that restores the schedule and the best state. Real runs of one or two tiny nodes (seconds each).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from _tiny import tiny_curriculum, write_curriculum
from peft import set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import get_scheduler

from modeling_gwm.training.callbacks import FaultInjectionCallback
from modeling_gwm.training.curriculum import load_curriculum
from modeling_gwm.training.trainer import DAGCurriculumTrainer, NonFiniteError

STEPS = 8


def _spec(**defaults) -> dict:
    spec = tiny_curriculum(steps=STEPS, checkpoint_every=100)
    spec["defaults"].update(eval_every=1, **defaults)
    return spec


def _train(tmp_path, spec: dict, out: str = "out", **kwargs) -> DAGCurriculumTrainer:
    trainer = DAGCurriculumTrainer(curriculum=load_curriculum(write_curriculum(tmp_path, spec)),
                                   output_dir=str(tmp_path / out), device="cpu", write_cards=False, **kwargs)
    trainer.run()
    return trainer


def _metrics(tmp_path, node: str, out: str = "out") -> dict:
    return json.loads((tmp_path / out / node / "metrics.json").read_text())


def _adapter(tmp_path, node: str, out: str = "out") -> dict[str, torch.Tensor]:
    return load_file(tmp_path / out / node / "adapter_model.safetensors")


def _written_val_loss(trainer: DAGCurriculumTrainer, node: str) -> float:
    """The validation loss of the adapter file the node wrote, measured again on the node's validation windows."""
    set_peft_model_state_dict(trainer.peft_model, load_file(os.path.join(trainer.plan.node_dir(node),
                                                                         "adapter_model.safetensors")),
                              adapter_name=node)
    data, spec = trainer.plan.node_data(node), trainer.curriculum.node(node)
    fields = trainer.curriculum.adapter_fields(node)
    ids = torch.tensor([fields.index(f) for f in data.field_names])
    return trainer.evaluate(data.val, ids, spec.horizon, spec.eval_windows)


@pytest.mark.parametrize(("schedule", "warmup"), [("cosine", {"warmup_steps": 3}), ("linear", {"warmup_ratio": 0.3}),
                                                  ("constant", {})])
def test_learning_rates_follow_transformers_get_scheduler(tmp_path, schedule, warmup):
    _train(tmp_path, _spec(lr_scheduler_type=schedule, **warmup), only_nodes=["macro"])
    metrics = _metrics(tmp_path, "macro")
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.005)
    expected_warmup = 0 if schedule == "constant" else 3  # warmup_steps 3, or ceil(0.3 × 8 steps)
    reference = get_scheduler(schedule, optimizer, num_warmup_steps=expected_warmup, num_training_steps=STEPS)
    expected = []
    for _ in range(STEPS):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        reference.step()
    assert [h["learning_rate"] for h in metrics["history"]] == expected
    assert metrics["settings"]["lr_scheduler_type"] == schedule
    assert metrics["settings"]["warmup_steps"] == expected_warmup
    assert all(h["grad_norm"] > 0 for h in metrics["history"][1:])


def test_the_node_writes_its_best_evaluated_step(tmp_path):
    """A rate too high for the node makes validation rise after a few steps: the node writes its best step, and that
    file is the state at that step (a run stopped there writes the same bytes; its loss measures val_loss_best)."""
    spec = _spec(lr_scheduler_type="constant", learning_rate=0.2)
    trainer = _train(tmp_path, spec, only_nodes=["macro"])
    metrics = _metrics(tmp_path, "macro")
    losses = {h["step"]: h["val_loss"] for h in metrics["val_history"]}
    assert sorted(losses) == list(range(STEPS + 1))  # step 0 and every step (eval_every 1)
    best = min(losses, key=losses.get)
    assert metrics["best_step"] == best and metrics["val_loss_best"] == losses[best]
    assert 0 < best < STEPS, losses  # measured: the best is inside the run, so "written = last step" would fail
    assert metrics["val_loss_end"] == losses[STEPS] > losses[best]
    assert _written_val_loss(trainer, "macro") == losses[best]
    _train(tmp_path, spec, out="stopped", only_nodes=["macro"], max_steps=best)  # constant rate: same steps
    stopped = _adapter(tmp_path, "macro", "stopped")
    for key, tensor in _adapter(tmp_path, "macro").items():
        assert torch.equal(stopped[key], tensor), key


def test_early_stopping_stops_after_patience_evaluations_without_a_better_loss(tmp_path):
    spec = _spec(lr_scheduler_type="constant", learning_rate=0.2, early_stopping_patience=2)
    _train(tmp_path, spec, only_nodes=["macro"])
    metrics = _metrics(tmp_path, "macro")
    stopped_at = metrics["best_step"] + 2
    assert metrics["stopped_early"] and metrics["steps"] == stopped_at < STEPS
    assert len(metrics["history"]) == stopped_at and metrics["val_history"][-1]["step"] == stopped_at
    assert all(h["val_loss"] >= metrics["val_loss_best"] for h in metrics["val_history"])


def test_a_join_keeps_its_merge_when_training_makes_it_worse(tmp_path):
    spec = _spec()
    spec["nodes"][2].update(learning_rate=2.0, lr_scheduler_type="constant", eval_every=100)  # ruins the merge
    trainer = _train(tmp_path, spec, only_nodes=["world"])
    metrics, dag = _metrics(tmp_path, "world"), json.loads((tmp_path / "out" / "dag.json").read_text())
    assert metrics["val_loss_end"] > metrics["val_loss_start"]  # after training vs right after the merge
    assert metrics["best_step"] == 0 and metrics["val_loss_best"] == metrics["val_loss_start"]
    entry = dag["nodes"]["world"]
    assert (entry["val_loss_start"], entry["val_loss_end"], entry["best_step"]) == \
        (metrics["val_loss_start"], metrics["val_loss_end"], 0)
    assert _written_val_loss(trainer, "world") == metrics["val_loss_start"]


def test_a_join_keeps_its_training_when_training_helps(tmp_path):
    spec = _spec()
    # evaluated after its merge and after training only; measured: 0.303 -> 0.297 in 30 steps at this rate
    spec["nodes"][2].update(eval_every=100, steps=30, learning_rate=0.02)
    trainer = _train(tmp_path, spec, only_nodes=["world"])
    metrics = _metrics(tmp_path, "world")
    assert [h["step"] for h in metrics["val_history"]] == [0, 30]
    assert metrics["val_loss_end"] < metrics["val_loss_start"] and metrics["best_step"] == 30
    assert _written_val_loss(trainer, "world") == metrics["val_loss_end"]


def _root_init(tmp_path, seed: int) -> dict[str, torch.Tensor]:
    trainer = DAGCurriculumTrainer(curriculum=load_curriculum(write_curriculum(tmp_path, _spec())), seed=seed,
                                   output_dir=str(tmp_path / "unused"), device="cpu", write_cards=False)
    return trainer._attach_adapter("macro", [{"name": "macro.us.unemployment"}])


def test_seed_changes_the_root_init_and_the_same_seed_repeats_it(tmp_path):
    zero, zero_again, one = _root_init(tmp_path, 0), _root_init(tmp_path, 0), _root_init(tmp_path, 1)
    assert zero.keys() == one.keys()
    assert all(torch.equal(zero[k], zero_again[k]) for k in zero)
    assert any(not torch.equal(zero[k], one[k]) for k in zero)  # model.seed 0 in the curriculum, --seed 1 differs
    _train(tmp_path, _spec(), out="one", only_nodes=["macro"], seed=1)
    recorded = json.loads((tmp_path / "one" / "macro" / "adapter_config.json").read_text())["gwm_config"]
    assert recorded["seed"] == 0 + 1  # model.seed + --seed, recorded as the adapter's init seed


def test_resume_restores_the_schedule_and_the_best_state(tmp_path):
    """Stopped by a NaN after a checkpoint that follows the best step, then resumed: the bytes of a straight run."""
    spec = _spec(lr_scheduler_type="cosine", warmup_steps=1, learning_rate=0.1, checkpoint_every=5)
    # a plain value head (no residual baseline): at this rate its loss turns up again after an early best step
    spec["model"].update(residual_baseline="none", window_stats_input=True)
    _train(tmp_path, spec, out="straight", only_nodes=["macro"])
    straight = _metrics(tmp_path, "macro", "straight")
    assert 0 < straight["best_step"] < 5, straight["val_history"]  # the best is held only in the checkpoint
    with pytest.raises(NonFiniteError):
        _train(tmp_path, spec, out="resumed", only_nodes=["macro"],
               callbacks=[FaultInjectionCallback(nan_at="macro:7")])
    saved = json.loads((tmp_path / "resumed" / "macro" / "checkpoint" / "trainer_state.json").read_text())
    assert saved["step"] == 5 and saved["best_step"] == straight["best_step"] and saved["scheduler"]["last_epoch"] == 5
    assert (tmp_path / "resumed" / "macro" / "checkpoint" / "best_adapter.safetensors").is_file()
    _train(tmp_path, spec, out="resumed", only_nodes=["macro"], resume=True)
    resumed = _metrics(tmp_path, "macro", "resumed")
    assert resumed["history"] == straight["history"] and resumed["val_history"] == straight["val_history"]
    expected = _adapter(tmp_path, "macro", "straight")
    for key, tensor in _adapter(tmp_path, "macro", "resumed").items():
        assert torch.equal(tensor, expected[key]), key
