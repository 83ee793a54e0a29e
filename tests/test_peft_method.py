"""The loop adapter as a PEFT method: what trains, what stays frozen, save/load round trips through GWMModel and PEFT,
the adapter file, several adapters on one base, and the errors of loading an adapter that does not fit."""

from __future__ import annotations

import json
import math
import os
import time
import warnings

import peft
import pytest
import torch
from _tiny import canvas_batch, train_steps
from peft import LoraConfig, PeftModel
from safetensors import safe_open

from modeling_gwm import AdapterLoadError, AdapterMismatchError, GWMModel, LoopConfig, LoopLayer
from modeling_gwm.model.base import make_tiny_cogvideox
from modeling_gwm.model.budget import parameter_budget

D_MODEL = 32
FIELDS = [{"name": f"x.{i}", "mean": 0.0, "std": 1.0, "transform": "none"} for i in range(3)]
SCRATCH = dict(scratch_num_layers=2, scratch_attention_head_dim=8)
ADAPTER_PARTS = (".loop_emb.", ".loop_emb_enc.", ".loop_gate.", ".modules_to_save.")


def _peft_model(tiny_base, adapter_name: str = "default", n_loops: int = 2, **overrides):
    model = GWMModel.from_pretrained(tiny_base, d_model=D_MODEL, **overrides)
    return peft.get_peft_model(model, LoopConfig(n_loops=n_loops, fields=FIELDS), adapter_name=adapter_name)


def _predict(model) -> torch.Tensor:
    values, presence, _ = canvas_batch(seed=7)
    with torch.no_grad():
        return model(values, presence).predictions


@pytest.fixture
def saved_adapter(tmp_path, tiny_base):
    """A trained cogvideox adapter on disk and the predictions of the model that saved it."""
    peft_model = _peft_model(tiny_base)
    train_steps(peft_model)
    peft_model.eval()
    folder = tmp_path / "adapter"
    peft_model.save_pretrained(folder)
    return folder, _predict(peft_model)


@pytest.fixture(scope="session")
def narrow_base(tmp_path_factory) -> str:
    """A second tiny CogVideoX base, half as wide (inner_dim 32): adapters of the shipped one must not fit it."""
    return make_tiny_cogvideox(tmp_path_factory.mktemp("narrow-cogvideox"), num_attention_heads=2)


# ---------------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("backbone", ["cogvideox", "scratch"])
def test_only_adapter_parameters_require_and_receive_gradients(tiny_base, backbone):
    peft_model = _peft_model(tiny_base, backbone=backbone, **SCRATCH)
    train_steps(peft_model, steps=1)  # off the zero init, so every path carries gradient
    peft_model.zero_grad(set_to_none=True)
    values, presence, target = canvas_batch()
    peft_model(values, presence, target_mask=target).loss.backward()
    parts = ADAPTER_PARTS + ((".loop_block.",) if backbone == "scratch" else ())  # scratch trains block copies
    assert any(".loop_block." in n for n, _ in peft_model.named_parameters()) == (backbone == "scratch")
    for name, param in peft_model.named_parameters():
        is_adapter = any(part in name for part in parts)
        assert param.requires_grad == is_adapter, name
        if is_adapter:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert trainable == {r["component"]: r["params"] for r in parameter_budget(peft_model)}["total trainable"]


@pytest.mark.parametrize("frozen_dtype", ["float32", "bfloat16"])
def test_frozen_weights_are_bit_identical_after_optimizer_steps(tiny_base, frozen_dtype):
    peft_model = _peft_model(tiny_base, frozen_dtype=frozen_dtype)
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    # Every parameter handed to the optimizer, with weight decay: frozen ones must still not move.
    optimizer = torch.optim.AdamW(peft_model.parameters(), lr=0.05, weight_decay=0.1)
    values, presence, target = canvas_batch()
    for _ in range(3):
        optimizer.zero_grad()
        peft_model(values, presence, target_mask=target).loss.backward()
        optimizer.step()
    after = dict(peft_model.named_parameters())
    frozen = [n for n in before if not after[n].requires_grad]
    assert any(".base_layer." in n for n in frozen) and any(".original_module." in n for n in frozen)
    assert all(torch.equal(before[n], after[n]) for n in frozen)
    assert all(not torch.equal(before[n], after[n]) for n in before if n not in frozen)


# ---------------------------------------------------------------------------------------------------- saving
def test_adapter_folder_holds_only_adapter_weights_at_four_bytes_each(saved_adapter, tiny_base):
    folder, _ = saved_adapter
    assert sorted(os.listdir(folder)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "GWM_LOOP" and config["n_loops"] == 2 and config["fields"] == FIELDS
    assert (config["inner_dim"], config["num_blocks"], config["d_model"]) == (64, 2, D_MODEL)
    assert config["gwm_config"]["base_model_name_or_path"] == tiny_base and config["gwm_config"]["d_model"] == D_MODEL
    with safe_open(folder / "adapter_model.safetensors", framework="pt") as weights:
        keys = list(weights.keys())
        dtypes = {weights.get_slice(k).get_dtype() for k in keys}
        trainable = sum(math.prod(weights.get_slice(k).get_shape()) for k in keys)
    assert dtypes == {"F32"}
    assert not [k for k in keys if "base_layer" in k or "original_module" in k]  # never a frozen weight
    block_keys = [k for k in keys if ".transformer_blocks." in k]
    assert len(block_keys) == 2 * 3 and all(k.endswith(("loop_emb", "loop_emb_enc", "loop_gate")) for k in block_keys)
    rows = {r["component"]: r["params"] for r in parameter_budget(_peft_model(tiny_base))}
    assert trainable == rows["total trainable"]
    size = os.path.getsize(folder / "adapter_model.safetensors")
    assert 4 * trainable < size <= 1.01 * 4 * trainable + 16 * 1024


def test_saving_is_offline_safe_and_silent(tmp_path, tiny_base):
    """PEFT's save probes the Hub for the base's config.json when the adapter records a base id; GWM adapters record
    their base in gwm_config instead, so saving makes no lookup (offline it would warn 'Could not find a config')."""
    peft_model = _peft_model(tiny_base)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        peft_model.save_pretrained(tmp_path / "a")
        peft_model.save_pretrained(tmp_path / "b")  # the second save too (PEFT fills in fields on the first)
        elapsed = time.perf_counter() - start
    assert not [str(w.message) for w in caught], [str(w.message) for w in caught]
    assert elapsed < 5.0


@pytest.mark.parametrize("backbone", ["cogvideox", "scratch"])
def test_save_then_gwm_from_pretrained_reproduces_outputs_exactly(tmp_path, tiny_base, backbone):
    peft_model = _peft_model(tiny_base, backbone=backbone, **SCRATCH)
    train_steps(peft_model)
    peft_model.eval()
    expected = _predict(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")
    loaded = GWMModel.from_pretrained(tiny_base, tmp_path / "adapter")
    assert isinstance(loaded, PeftModel) and isinstance(loaded.base_model.model, GWMModel)
    assert torch.equal(_predict(loaded), expected)
    assert not any(p.requires_grad for p in loaded.parameters())  # inference unless is_trainable
    alone = GWMModel.from_pretrained(tmp_path / "adapter")  # the base recorded in the adapter
    assert torch.equal(_predict(alone), expected)
    renamed = GWMModel.from_pretrained(tiny_base, tmp_path / "adapter", is_trainable=True, adapter_name="node")
    assert renamed.active_adapter == "node" and any(p.requires_grad for p in renamed.parameters())
    assert torch.equal(_predict(renamed.eval()), expected)  # the file is independent of the adapter's name
    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", framework="pt") as weights:
        assert not [k for k in weights.keys() if ".default" in k]


def test_peft_model_from_pretrained_loads_the_same_adapter(saved_adapter, tiny_base):
    folder, expected = saved_adapter
    model = GWMModel.from_pretrained(tiny_base, d_model=D_MODEL)
    loaded = PeftModel.from_pretrained(model, str(folder))
    assert isinstance(loaded.peft_config["default"], LoopConfig)
    assert torch.equal(_predict(loaded), expected)


# ---------------------------------------------------------------------------------------------------- several adapters
def test_two_adapters_on_one_base_differ_and_switch_without_touching_the_base(tiny_base):
    peft_model = _peft_model(tiny_base, adapter_name="first")
    peft_model.add_adapter("second", LoopConfig(n_loops=3, fields=FIELDS))
    train_steps(peft_model, seed=1)  # "first" is active
    peft_model.set_adapter("second")
    train_steps(peft_model, seed=2)
    peft_model.eval()
    base = {n: (p.data_ptr(), p.detach().clone()) for n, p in peft_model.named_parameters() if ".base_layer." in n}
    out_second = _predict(peft_model)
    start = time.perf_counter()
    peft_model.set_adapter("first")
    switch_seconds = time.perf_counter() - start
    out_first = _predict(peft_model)
    assert _rel_diff(out_first, out_second) > 1e-3
    peft_model.set_adapter("second")
    assert torch.equal(_predict(peft_model), out_second)  # switching back gives the very same model
    for name, param in peft_model.named_parameters():
        if name in base:  # the base was neither copied nor changed by switching
            assert param.data_ptr() == base[name][0] and torch.equal(param, base[name][1]), name
    assert switch_seconds < 0.5  # only flags move: no tensor is copied or loaded
    layer = peft_model.base_model.model.transformer_blocks[0]
    assert layer.n_loops == {"first": 2, "second": 3}


def test_delete_adapter_removes_it_and_leaves_the_other_intact(tiny_base):
    peft_model = _peft_model(tiny_base, adapter_name="first")
    train_steps(peft_model)
    peft_model.eval()
    expected = _predict(peft_model)
    peft_model.add_adapter("second", LoopConfig(n_loops=3, fields=FIELDS))
    peft_model.delete_adapter("second")
    assert list(peft_model.peft_config) == ["first"]
    gwm = peft_model.base_model.model
    for layer in gwm.transformer_blocks:
        assert isinstance(layer, LoopLayer)
        assert list(layer.loop_emb) == list(layer.loop_emb_enc) == list(layer.loop_gate) == ["first"]
    assert list(gwm.proj_in.modules_to_save) == ["first"]
    assert torch.equal(_predict(peft_model), expected)


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# ---------------------------------------------------------------------------------------------------- load errors
def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_adapter_onto_a_base_of_another_width_is_refused(saved_adapter, narrow_base):
    folder, _ = saved_adapter
    with pytest.raises(AdapterMismatchError) as err:
        GWMModel.from_pretrained(narrow_base, folder)
    message = _one_line(err)
    assert str(folder) in message and "inner_dim 64 (model has 32)" in message
    with pytest.raises(AdapterMismatchError, match=r"inner_dim 64 \(model has 32\)"):
        PeftModel.from_pretrained(GWMModel.from_pretrained(narrow_base, d_model=D_MODEL), str(folder))


def test_adapter_onto_another_canvas_width_is_refused(saved_adapter, tiny_base):
    folder, _ = saved_adapter
    with pytest.raises(AdapterMismatchError, match=rf"d_model {D_MODEL} \(model has 16\)"):
        GWMModel.from_pretrained(tiny_base, folder, d_model=16)


def test_hand_edited_n_loops_is_caught_from_the_weights(saved_adapter, tiny_base):
    folder, _ = saved_adapter
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["n_loops"] = 3  # the weights hold 2 loops
    config_path.write_text(json.dumps(config))
    with pytest.raises(AdapterMismatchError, match=r"adapter_model\.safetensors.*loop embeddings of shape \(2, 64\)"):
        GWMModel.from_pretrained(tiny_base, folder)


def test_truncated_weights_are_named(saved_adapter, tiny_base):
    folder, _ = saved_adapter
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: os.path.getsize(weights) // 2])
    with pytest.raises(AdapterLoadError) as err:
        GWMModel.from_pretrained(tiny_base, folder)
    assert str(weights) in _one_line(err) and "truncated" in str(err.value)


def test_foreign_peft_adapter_is_refused(tmp_path, tiny_base):
    LoraConfig(r=4, target_modules=["to_q"]).save_pretrained(tmp_path)  # a real LoRA adapter_config.json
    with pytest.raises(AdapterLoadError) as err:
        GWMModel.from_pretrained(tiny_base, tmp_path)
    message = _one_line(err)
    assert str(tmp_path) in message and "LORA" in message and "GWM_LOOP" in message


def test_missing_adapter_folder_or_files_are_named(tmp_path, tiny_base):
    missing = tmp_path / "no" / "adapter"
    with pytest.raises(AdapterLoadError) as err:
        GWMModel.from_pretrained(tiny_base, missing)
    assert str(missing) in _one_line(err)
    with pytest.raises(AdapterLoadError, match=r"No adapter_config\.json in .*"):
        GWMModel.from_pretrained(tiny_base, tmp_path)  # a folder without an adapter


def test_adapter_config_without_weights_is_named(saved_adapter, tiny_base):
    folder, _ = saved_adapter
    os.remove(folder / "adapter_model.safetensors")
    with pytest.raises(AdapterLoadError, match=r"No adapter_model\.safetensors in .*adapter"):
        GWMModel.from_pretrained(tiny_base, folder)


def test_copying_an_adapter_under_a_new_name_carries_everything_it_trained(tiny_base):
    """A DAG fork: the parent's state dict set into a child adapter of another name gives the parent's function,
    trained scratch block copies included."""
    peft_model = _peft_model(tiny_base, adapter_name="parent", backbone="scratch", **SCRATCH)
    train_steps(peft_model)
    peft_model.eval()
    expected = _predict(peft_model)
    state = peft.get_peft_model_state_dict(peft_model, adapter_name="parent")
    assert any(".loop_block." in k for k in state) and not [k for k in state if "parent" in k]
    peft_model.add_adapter("child", LoopConfig(n_loops=2, fields=FIELDS))
    result = peft.set_peft_model_state_dict(peft_model, state, adapter_name="child")
    assert not [k for k in result.missing_keys if "child" in k] and not result.unexpected_keys
    peft_model.set_adapter("child")
    assert torch.equal(_predict(peft_model.eval()), expected)
