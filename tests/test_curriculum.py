"""The curriculum spec: parsing, validation before any training, order and the dry-run plan."""

from __future__ import annotations

import copy
import re
import subprocess
import sys

import pytest
from _tiny import DAG_TRAIN, REPO, tiny_curriculum, write_curriculum

from modeling_gwm.training.curriculum import CurriculumError, load_curriculum


def test_demo_curriculum_loads_in_topological_order():
    curriculum = load_curriculum(REPO / "configuration" / "curricula" / "demo.yaml")
    order = curriculum.order()
    assert order == ["macro", "climate", "world", "world_solar"]
    assert [curriculum.node(n).kind for n in order] == ["root", "root", "join", "fork"]
    assert curriculum.sink() == "world_solar"
    assert curriculum.ancestors("world_solar") == ["macro", "climate", "world"]


def test_order_puts_every_parent_before_its_child_whatever_the_declaration_order(tmp_path):
    spec = tiny_curriculum()
    spec["nodes"].reverse()
    order = load_curriculum(write_curriculum(tmp_path, spec)).order()
    for child, parents in [("world", ["macro", "climate"]), ("ocean", ["world"])]:
        assert all(order.index(p) < order.index(child) for p in parents)


def test_adapter_fields_keep_parent_slots_first_and_append_new_fields(tmp_path):
    curriculum = load_curriculum(write_curriculum(tmp_path))
    assert curriculum.adapter_fields("world") == ["macro.us.unemployment", "macro.us.inflation",
                                                  "climate.co2.mauna_loa"]
    assert curriculum.adapter_fields("ocean") == curriculum.adapter_fields("world") + ["climate.enso.nino12_sst"]


def _broken(mutate) -> dict:
    spec = copy.deepcopy(tiny_curriculum())
    mutate(spec)
    return spec


CASES = {
    "cycle": (lambda s: s["nodes"][0].update(parents=["ocean"]), r"cycle"),
    "unknown parent": (lambda s: s["nodes"][3].update(parents=["atlantis"]),
                       r"node 'ocean': unknown parent 'atlantis'"),
    "duplicate name": (lambda s: s["nodes"][1].update(name="macro"), r"node 'macro' is declared twice"),
    "unknown source": (lambda s: s["nodes"][1].update(sources=["moon"]), r"node 'climate': unknown data source 'moon'"),
    "empty dag": (lambda s: s.update(nodes=[]), r"no nodes"),
    "dotdot name": (lambda s: s["nodes"][0].update(name="../escape"), r"'\.\./escape' is not a safe folder name"),
    "slash name": (lambda s: s["nodes"][0].update(name="a/b"), r"'a/b' is not a safe folder name"),
    "zero steps": (lambda s: s["nodes"][1].update(steps=0), r"node 'climate': steps must be a positive integer"),
    "negative lr": (lambda s: s["nodes"][1].update(learning_rate=-1.0), r"node 'climate': learning_rate"),
    "horizon too long": (lambda s: s["nodes"][1].update(horizon=12), r"node 'climate': horizon"),
    "unknown merge": (lambda s: s["nodes"][2]["merge"].update(method="soup"), r"node 'world': unknown merge method"),
    "weights length": (lambda s: s["nodes"][2]["merge"].update(weights=[1.0]), r"node 'world': merge weights"),
    "negative share": (lambda s: s["nodes"][2]["merge"].update(weights=[1.0, -0.5]),
                       r"node 'world': linear merge weights \[1.0, -0.5\] must be non-negative"),
    "zero shares": (lambda s: s["nodes"][2]["merge"].update(weights=[0, 0]), r"node 'world': .*positive sum"),
    "nan weight": (lambda s: s["nodes"][2]["merge"].update(weights=[float("nan"), 1.0]),
                   r"node 'world': merge weights .* finite numbers"),
    "bool weight": (lambda s: s["nodes"][2]["merge"].update(weights=[True, 1.0]), r"node 'world': merge weights"),
    "zero task vector": (lambda s: s["nodes"][2].update(merge={"method": "task_arithmetic", "weights": [0, 0]}),
                         r"node 'world': task_arithmetic merge weights \[0, 0\] are all zero"),
    "join loops": (lambda s: s["nodes"][0].update(n_loops=3), r"node 'world': a join needs the same n_loops"),
    "unknown key": (lambda s: s["nodes"][0].update(epochs=3), r"node 'macro': unknown key\(s\) \['epochs'\]"),
    "unknown field": (lambda s: s["nodes"][0].update(fields=["macro.us.gold"]), r"node 'macro': field 'macro.us.gold'"),
    "merge on root": (lambda s: s["nodes"][0].update(merge={"method": "linear"}), r"node 'macro': 'merge' is only"),
    "no median level": (lambda s: s["model"].update(quantile_levels=[0.1, 0.9]),
                        r"model.quantile_levels must include 0.5"),
    "level out of range": (lambda s: s["model"].update(quantile_levels=[0.5, 1.5]),
                           r"model.quantile_levels must lie strictly between 0 and 1"),
    "unknown residual baseline": (lambda s: s["model"].update(residual_baseline="ets"),
                                  r"model.residual_baseline must be one of \['none', 'last_value', 'seasonal_naive', "
                                  r"'seasonal_drift', 'seasonal_damped_drift'\], got 'ets'"),
    "unknown window scaling": (lambda s: s["model"].update(window_scaling="robust"),
                               r"model.window_scaling must be one of"),
}


def test_model_block_sets_quantile_levels_and_window_scaling(tmp_path):
    spec = tiny_curriculum()
    spec["model"].update(quantile_levels=[0.05, 0.5, 0.95], window_scaling="instance")
    curriculum = load_curriculum(write_curriculum(tmp_path, spec))
    assert curriculum.model["quantile_levels"] == [0.05, 0.5, 0.95]
    assert curriculum.model["window_scaling"] == "instance"


@pytest.mark.parametrize("case", sorted(CASES))
def test_broken_curricula_fail_before_training_naming_file_and_node(tmp_path, case):
    mutate, message = CASES[case]
    path = write_curriculum(tmp_path, _broken(mutate))
    with pytest.raises(CurriculumError, match=message) as info:
        load_curriculum(path)
    assert str(path) in str(info.value)


def test_merge_weights_are_shares_normalised_except_for_task_arithmetic(tmp_path):
    spec = tiny_curriculum()
    spec["nodes"][2]["merge"] = {"method": "linear", "weights": [3, 1]}
    assert load_curriculum(write_curriculum(tmp_path, spec)).node("world").merge_weights() == [0.75, 0.25]
    spec["nodes"][2]["merge"] = {"method": "ties"}  # default: equal shares
    assert load_curriculum(write_curriculum(tmp_path, spec)).node("world").merge_weights() == [0.5, 0.5]
    spec["nodes"][2]["merge"] = {"method": "task_arithmetic", "weights": [1, -0.5]}  # signed, as given
    curriculum = load_curriculum(write_curriculum(tmp_path, spec))
    assert curriculum.node("world").merge_weights() == [1.0, -0.5]
    assert "task_arithmetic merge of macro×1, climate×-0.5" in curriculum.plan()


def test_malformed_yaml_is_one_clear_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("nodes: [\n  - name: a\n    parents: [b\n")
    with pytest.raises(CurriculumError, match=r"bad.yaml: not valid YAML"):
        load_curriculum(path)


def test_dry_run_prints_order_parents_weights_fields_and_steps(tmp_path):
    path = write_curriculum(tmp_path)
    result = subprocess.run([sys.executable, str(DAG_TRAIN), "--config", str(path), "--dry_run"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    plan = result.stdout
    assert plan.index("1. macro") < plan.index("3. world") < plan.index("4. ocean")
    assert "linear merge of macro×0.6, climate×0.4" in plan
    assert "copy of world" in plan and "8 steps" in plan and "climate.co2.mauna_loa" in plan
    ids = {name: node_id for node_id, name in re.findall(r'(n\d+)\["([\w.-]+)<br/>', plan)}  # the cards' lineage graph
    assert f'{ids["macro"]} -- "linear 0.6" --> {ids["world"]}' in plan
    assert not (tmp_path / "outputs").exists()


def test_broken_curriculum_on_the_command_line_exits_2_with_one_line(tmp_path):
    path = write_curriculum(tmp_path, _broken(CASES["cycle"][0]))
    result = subprocess.run([sys.executable, str(DAG_TRAIN), "--config", str(path), "--dry_run"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "cycle" in result.stderr
