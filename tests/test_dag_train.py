"""Launch-level behaviours: a curriculum spread over jobs, gradient accumulation, trackers, checks before training.

Every run here is the tiny curriculum in-process (a few steps per node, no model cards), so the file costs seconds.
"""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from _tiny import tiny_curriculum, write_curriculum
from accelerate.utils import is_trackio_available
from safetensors.torch import load_file

from modeling_gwm.tabular import DataError
from modeling_gwm.training.curriculum import CurriculumError, load_curriculum
from modeling_gwm.training.trainer import DAGCurriculumTrainer

NODES = ["macro", "climate", "world", "ocean"]
STEPS = 3


def _train(config, out, **kwargs) -> dict:
    trainer = DAGCurriculumTrainer(curriculum=load_curriculum(config), output_dir=str(out), device="cpu",
                                   write_cards=False, **kwargs)
    return trainer.run()


def _adapters(out) -> dict[str, dict[str, torch.Tensor]]:
    return {n: load_file(os.path.join(out, n, "adapter_model.safetensors")) for n in NODES}


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    return write_curriculum(tmp_path_factory.mktemp("curriculum"), tiny_curriculum(steps=STEPS, checkpoint_every=2))


@pytest.fixture(scope="module")
def reference(config, tmp_path_factory):
    """The whole curriculum as one job."""
    out = tmp_path_factory.mktemp("one-job") / "out"
    _train(config, out)
    return out


def test_independent_nodes_as_separate_jobs_on_one_output_dir_give_the_one_job_adapters(config, reference, tmp_path):
    out = tmp_path / "shared"
    _train(config, out, only_nodes=["macro"])  # machine A
    _train(config, out, only_nodes=["climate"])  # machine B
    dag = _train(config, out, only_nodes=["ocean"])  # then the join and the node after it, parents found done
    assert [dag["nodes"][n]["status"] for n in NODES] == ["done"] * 4
    expected, got = _adapters(reference), _adapters(out)
    for node in NODES:
        for key, tensor in expected[node].items():
            assert torch.equal(got[node][key], tensor), (node, key)


def test_gradient_accumulation_gives_the_adapters_of_one_big_batch(config, reference, tmp_path):
    _train(config, tmp_path / "out", gradient_accumulation_steps=2)
    expected, got = _adapters(reference), _adapters(tmp_path / "out")
    # measured: at most ~1e-6 apart (float summation order of the two micro-batches)
    worst = max(float((got[n][k] - expected[n][k]).abs().max()) for n in NODES for k in expected[n])
    assert worst <= 1e-4  # float summation order; measured 1e-6 to 1.2e-5


def test_outputs_have_ordinary_permissions_for_jobs_sharing_the_folder(reference):
    umask = os.umask(0)
    os.umask(umask)
    for path in (reference / "dag.json", reference / "world" / "adapter_model.safetensors",
                 reference / "world" / "adapter_config.json", reference / "world" / "metrics.json"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask, path


def test_a_data_problem_in_a_late_node_stops_the_run_before_any_node_trains(tmp_path):
    spec = tiny_curriculum(steps=STEPS)
    spec["nodes"][3]["context_len"] = 5000  # longer than the El Nino series: no window fits
    config = write_curriculum(tmp_path, spec)
    with pytest.raises(DataError, match=r"tiny.yaml: node 'ocean': .*context_len=5000"):
        _train(config, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_batch_that_does_not_split_over_accumulation_steps_stops_the_run_before_training(config, tmp_path):
    with pytest.raises(CurriculumError, match=r"node 'macro': batch_size 4 is not divisible by 1 processes × 3"):
        _train(config, tmp_path / "out", gradient_accumulation_steps=3)
    assert not (tmp_path / "out").exists()


def test_report_to_tensorboard_logs_losses_rate_and_gradient_norm_of_every_node(config, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "out"
    _train(config, out, only_nodes=["world"], report_to="tensorboard")
    runs = [root for root, _, files in os.walk(out / "runs") if any("tfevents" in f for f in files)]
    scalars = {}
    for folder in runs:
        events = EventAccumulator(folder)
        events.Reload()
        scalars.update({tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]})
    for node in ("macro", "climate", "world"):
        metrics = json.loads((out / node / "metrics.json").read_text())
        assert len(scalars[f"{node}/train_loss"]) == STEPS
        assert scalars[f"{node}/learning_rate"] == pytest.approx([h["learning_rate"] for h in metrics["history"]])
        assert scalars[f"{node}/grad_norm"] == pytest.approx([h["grad_norm"] for h in metrics["history"]])
        assert scalars[f"{node}/val_loss"] == pytest.approx([h["val_loss"] for h in metrics["val_history"]])
        coverage = [h["val_coverage_10_90"] for h in metrics["val_history"]]
        assert scalars[f"{node}/val_coverage_10_90"] == pytest.approx(coverage)
        assert all(0.0 <= c <= 1.0 for c in coverage) and metrics["val_coverage_10_90_end"] == coverage[-1]
    retention = json.loads((out / "dag.json").read_text())["nodes"]["world"]["retention"]
    for parent in ("macro", "climate"):
        assert scalars[f"world/retention/{parent}"] == pytest.approx([retention[parent]["retention"]])


@pytest.mark.skipif(bool(is_trackio_available()), reason="needs an environment without trackio")
def test_report_to_a_tracker_that_is_not_installed_is_refused(config, tmp_path):
    with pytest.raises(CurriculumError, match=r"--report_to trackio needs the trackio package"):
        _train(config, tmp_path / "out", report_to="trackio")


def test_a_join_refuses_parents_grown_from_another_seeded_init(config, tmp_path):
    # model.seed is 0 in the curriculum; the init seed is model.seed + --seed, so jobs given different seeds disagree
    _train(config, tmp_path / "out", only_nodes=["macro", "climate"], seed=1)
    with pytest.raises(CurriculumError, match=r"node 'world': parent 'macro' .* trained with adapter init seed "
                                              r"\(model.seed \+ --seed\) 1, this job uses 2"):
        _train(config, tmp_path / "out", only_nodes=["world"], seed=2)
    assert not (tmp_path / "out" / "world").exists()
