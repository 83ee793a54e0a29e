"""The PEFT and package switches users know from other methods: unload, merge refusal, weighted merge of loaded
adapters, registration clashes, and the specification's import path (lazy, so `import modeling_gwm` stays light)."""

from __future__ import annotations

import subprocess
import sys

import peft
import pytest
import torch
from _tiny import canvas_batch, tiny_curriculum, train_steps, write_curriculum
from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock
from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

import modeling_gwm
from modeling_gwm import GWMModel, LoopConfig, LoopLayer, LoopMergeError
from modeling_gwm.model.loop import PEFT_TYPE, register

D_MODEL = 16
FIELDS = [{"name": f"x.{i}", "mean": 0.0, "std": 1.0, "transform": "none"} for i in range(3)]


def _model(tiny_base) -> GWMModel:
    return GWMModel.from_pretrained(tiny_base, d_model=D_MODEL)


def _predict(model) -> torch.Tensor:
    values, presence, _ = canvas_batch(seed=7)
    with torch.no_grad():
        return model.eval()(values, presence).predictions


# ---------------------------------------------------------------------------------------------------- unload / merge
def test_unload_of_a_fresh_adapter_gives_back_the_plain_model_exactly(tiny_base):
    expected = _predict(_model(tiny_base))
    model = _model(tiny_base)
    blocks = [id(b) for b in model.transformer_blocks]
    plain = peft.get_peft_model(model, LoopConfig(n_loops=2, fields=FIELDS)).unload()
    assert type(plain) is GWMModel and not hasattr(plain, "peft_config")
    assert [id(b) for b in plain.transformer_blocks] == blocks  # the raw diffusers blocks, not copies
    assert all(type(b) is CogVideoXBlock for b in plain.transformer_blocks)
    assert not [m for m in plain.modules() if isinstance(m, (LoopLayer, peft.utils.AuxiliaryTrainingWrapper))]
    assert torch.equal(_predict(plain), expected)
    again = peft.get_peft_model(plain, LoopConfig(n_loops=2, fields=FIELDS))  # and it can be wrapped again
    assert isinstance(again.base_model.model.transformer_blocks[0], LoopLayer)


def test_unload_of_a_trained_adapter_keeps_its_modules_and_drops_the_loop(tiny_base):
    peft_model = peft.get_peft_model(_model(tiny_base), LoopConfig(n_loops=2, fields=FIELDS))
    train_steps(peft_model, steps=2)
    looped = _predict(peft_model)
    trained_proj_in = peft_model.base_model.model.proj_in.modules_to_save["default"].weight.detach().clone()
    plain = peft_model.unload()
    assert torch.equal(plain.proj_in.weight, trained_proj_in)  # PEFT's rule: modules_to_save keep the adapter's copy
    fresh = _model(tiny_base)
    fresh.load_state_dict(plain.state_dict())  # the same weights in a model that never had an adapter
    out = _predict(plain)
    assert torch.equal(out, _predict(fresh))
    assert not torch.allclose(out, looped)  # each block now runs once: the loop is gone


def test_merge_and_unload_and_merge_adapter_refuse_with_one_sentence(tiny_base):
    peft_model = peft.get_peft_model(_model(tiny_base), LoopConfig(n_loops=2, fields=FIELDS))
    for call in (peft_model.merge_and_unload, peft_model.merge_adapter):
        with pytest.raises(LoopMergeError, match=r"^A loop adapter cannot be merged into the base weights") as err:
            call()
        assert "\n" not in str(err.value)
    assert isinstance(peft_model.base_model.model.transformer_blocks[0], LoopLayer)  # nothing was changed


# ---------------------------------------------------------------------------------------------------- weighted merge
def _two_trained_adapters(tiny_base):
    peft_model = peft.get_peft_model(_model(tiny_base), LoopConfig(n_loops=2, fields=FIELDS[:2]), adapter_name="a")
    peft_model.add_adapter("b", LoopConfig(n_loops=2, fields=FIELDS[1:]))
    peft_model.add_adapter("init", LoopConfig(n_loops=2, fields=FIELDS[:2]))  # the common seeded initialisation
    train_steps(peft_model, steps=2, seed=1)
    peft_model.set_adapter("b")
    train_steps(peft_model, steps=2, seed=2)
    return peft_model


def test_weighted_merge_of_two_loaded_adapters_is_their_average_and_runs(tiny_base):
    peft_model = _two_trained_adapters(tiny_base)
    peft_model.add_weighted_adapter(["a", "b"], [3, 1], "ab")  # shares: 0.75, 0.25
    assert peft_model.peft_config["ab"].field_names == ["x.0", "x.1", "x.2"]
    a, b, ab = (peft.get_peft_model_state_dict(peft_model, adapter_name=n) for n in ("a", "b", "ab"))
    emb = next(k for k in ab if k.endswith("codec.field_embedding.weight"))
    for key in ab:
        if key != emb:
            torch.testing.assert_close(ab[key], 0.75 * a[key] + 0.25 * b[key], atol=1e-6, rtol=0)
    torch.testing.assert_close(ab[emb][0], a[emb][0], atol=1e-6, rtol=0)  # x.0: only a has it
    torch.testing.assert_close(ab[emb][1], 0.75 * a[emb][1] + 0.25 * b[emb][0], atol=1e-6, rtol=0)  # x.1: both
    torch.testing.assert_close(ab[emb][2], b[emb][1], atol=1e-6, rtol=0)  # x.2: only b
    peft_model.set_adapter("ab")
    merged = _predict(peft_model)
    assert torch.isfinite(merged).all()
    peft_model.set_adapter("a")
    assert not torch.allclose(_predict(peft_model), merged)


def test_task_vector_merges_need_the_common_init(tiny_base):
    peft_model = _two_trained_adapters(tiny_base)
    with pytest.raises(ValueError, match=r"'ties' merges task vectors .* pass init="):
        peft_model.add_weighted_adapter(["a", "b"], [1, 1], "t", combination_type="ties")
    assert "t" not in peft_model.peft_config
    peft_model.add_weighted_adapter(["a", "b"], [1, 1], "t", combination_type="task_arithmetic", init="init")
    a, b, t, init = (peft.get_peft_model_state_dict(peft_model, adapter_name=n) for n in ("a", "b", "t", "init"))
    key = next(k for k in t if k.endswith("transformer_blocks.0.loop_emb"))
    torch.testing.assert_close(t[key], init[key] + (a[key] - init[key]) + (b[key] - init[key]), atol=1e-6, rtol=0)
    peft_model.add_weighted_adapter(["a", "b"], [1, 1], "ties", combination_type="ties", init="init", density=0.5)
    peft_model.set_adapter("ties")
    assert torch.isfinite(_predict(peft_model)).all()


@pytest.mark.parametrize("args, message", [
    ((["a", "zz"], [1, 1], "m"), r"unknown adapter\(s\) \['zz'\]"),
    ((["a", "b"], [1], "m"), r"1 weights for 2 adapters"),
    ((["a", "b"], [1, 1], "a"), r"an adapter named 'a' already exists"),
    ((["a", "b"], [1, -1], "m"), r"linear merge weights \[1, -1\] must be non-negative"),
])
def test_weighted_merge_bad_arguments_are_named(tiny_base, args, message):
    peft_model = peft.get_peft_model(_model(tiny_base), LoopConfig(n_loops=2, fields=FIELDS), adapter_name="a")
    peft_model.add_adapter("b", LoopConfig(n_loops=2, fields=FIELDS))
    with pytest.raises(ValueError, match=message):
        peft_model.add_weighted_adapter(*args)
    assert "m" not in peft_model.peft_config


# ---------------------------------------------------------------------------------------------------- registration
def test_register_is_idempotent_but_refuses_another_class(monkeypatch):
    register()  # the same classes again: fine
    monkeypatch.setitem(PEFT_TYPE_TO_TUNER_MAPPING, PEFT_TYPE, peft.LoraModel)
    with pytest.raises(ValueError, match=r"'GWM_LOOP' is already registered to .*LoraModel"):
        register()
    assert PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE] is peft.LoraModel  # refused, not half-overwritten


# ---------------------------------------------------------------------------------------------------- import path
def test_specification_import_path_is_lazy():
    from modeling_gwm import DAGCurriculumTrainer, MergeSpec, TrainingNode
    from modeling_gwm.training.trainer import DAGCurriculumTrainer as direct

    assert DAGCurriculumTrainer is direct and MergeSpec().method == "linear" and TrainingNode("n").kind == "root"
    with pytest.raises(AttributeError, match="has no attribute 'Nope'"):
        modeling_gwm.Nope  # noqa: B018
    code = ("import sys, modeling_gwm; print(sorted(m for m in ('modeling_gwm.training.trainer', "
            "'modeling_gwm.training.curriculum', 'modeling_gwm.model.merging', 'modeling_gwm.model.data') "
            "if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "[]"  # importing the package does not load the training side


def test_dag_json_records_the_normalised_weights(tmp_path):
    from modeling_gwm import DAGCurriculumTrainer, load_curriculum

    spec = tiny_curriculum()
    spec["nodes"][2]["merge"] = {"method": "linear", "weights": [3, 2]}
    trainer = DAGCurriculumTrainer(curriculum=load_curriculum(write_curriculum(tmp_path, spec)),
                                   output_dir=str(tmp_path / "out"), write_cards=False)
    assert trainer.plan.load_dag()["nodes"]["world"]["merge"]["weights"] == [0.6, 0.4]
