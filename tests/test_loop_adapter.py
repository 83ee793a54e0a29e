"""The loop adapter as a PEFT method: what trains, what is saved, named adapters, reloading and its errors."""

from __future__ import annotations

import json
import math
import os
import time

import peft
import pytest
import torch
from peft import LoraConfig, PeftModel
from safetensors import safe_open

from modeling_gwm import AdapterLoadError, AdapterMismatchError, GWMModel, LoopConfig
from modeling_gwm.base import TINY_BASE_PATH, make_tiny_cogvideox

FIELDS = [{"name": "x.a", "mean": 1.0, "std": 2.0, "transform": "none", "unit": "m"},
          {"name": "x.b", "mean": 0.0, "std": 1.0, "transform": "log"}]


def _model(**overrides) -> GWMModel:
    return GWMModel.from_pretrained(TINY_BASE_PATH, d_model=16, **overrides)


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(2, 5, 2, generator=g)  # (B, T, F)
    presence = torch.ones(2, 5, 2, dtype=torch.bool)
    target = torch.zeros_like(presence)
    target[:, -2:] = True
    return values, presence, target


def _train(peft_model, steps: int = 3, lr: float = 0.05) -> None:
    values, presence, target = _batch()
    optimizer = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        peft_model(values, presence, target_mask=target).loss.backward()
        optimizer.step()


def _predict(model) -> torch.Tensor:
    values, presence, _ = _batch(seed=1)
    with torch.no_grad():
        return model(values, presence).predictions


def _frozen(peft_model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in peft_model.named_parameters() if not p.requires_grad}


@pytest.fixture
def saved_adapter(tmp_path):
    """A trained adapter saved as `tmp_path/adapter`, with the outputs of the model that saved it."""
    peft_model = peft.get_peft_model(_model(), LoopConfig(n_loops=2, fields=FIELDS))
    _train(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter", peft_model, _predict(peft_model)


@pytest.mark.parametrize("backbone", ["cogvideox", "scratch"])
def test_only_adapter_parameters_require_and_receive_gradients(backbone):
    model = _model(backbone=backbone, scratch_num_layers=2, scratch_attention_head_dim=8)
    peft_model = peft.get_peft_model(model, LoopConfig(n_loops=2, fields=FIELDS))
    _train(peft_model, steps=1)  # moves the loop gates and embeddings off zero so all paths carry gradient
    peft_model.zero_grad()
    values, presence, target = _batch()
    peft_model(values, presence, target_mask=target).loss.backward()
    adapter_keys = ("loop_emb", "loop_emb_enc", "loop_gate", "loop_block", "modules_to_save.default")
    for name, param in peft_model.named_parameters():
        is_adapter = any(key in name for key in adapter_keys)
        assert param.requires_grad == is_adapter, name
        if is_adapter:
            assert param.grad is not None and param.grad.abs().sum() > 0, f"no gradient reaches {name}"
        else:
            assert param.grad is None, f"gradient leaked into frozen {name}"
    assert any("loop_block" in n for n, _ in peft_model.named_parameters()) == (backbone == "scratch")


@pytest.mark.parametrize("frozen_dtype", ["float32", "bfloat16"])
def test_frozen_weights_are_bit_identical_after_optimizer_steps(frozen_dtype):
    peft_model = peft.get_peft_model(_model(frozen_dtype=frozen_dtype), LoopConfig(n_loops=2, fields=FIELDS))
    before = _frozen(peft_model)
    trainable_before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    _train(peft_model, steps=3)
    after = dict(peft_model.named_parameters())
    assert any(".base_layer." in n for n in before)
    assert all(torch.equal(after[n], tensor) for n, tensor in before.items())
    assert all(not torch.equal(after[n], tensor) for n, tensor in trainable_before.items())


def test_save_writes_only_the_adapter_and_reloading_reproduces_outputs_exactly(saved_adapter):
    folder, peft_model, expected = saved_adapter
    assert sorted(os.listdir(folder)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "GWM_LOOP" and config["fields"] == FIELDS
    assert config["gwm_config"]["d_model"] == 16 and config["gwm_config"]["base_model_name_or_path"] == TINY_BASE_PATH
    assert (config["inner_dim"], config["num_blocks"], config["d_model"], config["n_loops"]) == (64, 2, 16, 2)
    with safe_open(folder / "adapter_model.safetensors", framework="pt") as weights:
        keys = list(weights.keys())
        saved = sum(math.prod(weights.get_slice(k).get_shape()) for k in keys)
    assert not any("base_layer" in k or "original_module" in k for k in keys)  # never a frozen weight
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert saved == trainable
    assert os.path.getsize(folder / "adapter_model.safetensors") <= 1.01 * 4 * trainable + 16 * 1024

    reloaded = GWMModel.from_pretrained(TINY_BASE_PATH, folder)
    assert isinstance(reloaded, PeftModel)
    assert torch.equal(_predict(reloaded), expected)
    alone = GWMModel.from_pretrained(folder)  # the base is read from the adapter's gwm_config
    assert torch.equal(_predict(alone), expected)


def test_peft_model_from_pretrained_loads_the_same_adapter(saved_adapter):
    folder, trained, expected = saved_adapter
    peft_model = PeftModel.from_pretrained(_model(), str(folder), adapter_name="node")
    assert peft_model.active_adapter == "node"
    assert torch.equal(_predict(peft_model), expected)
    assert not any(p.requires_grad for p in peft_model.parameters())  # inference by default
    trainable = GWMModel.from_pretrained(TINY_BASE_PATH, folder, is_trainable=True)
    assert sum(p.numel() for p in trainable.parameters() if p.requires_grad) == sum(
        p.numel() for p in trained.parameters() if p.requires_grad)


def test_scratch_adapter_carries_its_trained_blocks_and_reloads_exactly(tmp_path):
    model = GWMModel.from_pretrained(backbone="scratch", d_model=16, scratch_num_layers=2, scratch_attention_head_dim=8)
    peft_model = peft.get_peft_model(model, LoopConfig(n_loops=2, fields=FIELDS))
    _train(peft_model, steps=2)
    peft_model.save_pretrained(tmp_path)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert os.path.getsize(tmp_path / "adapter_model.safetensors") <= 1.01 * 4 * trainable + 16 * 1024
    reloaded = GWMModel.from_pretrained(tmp_path)  # rebuilt from gwm_config: backbone "scratch", no base needed
    assert reloaded.base_model.model.config.backbone == "scratch"
    peft_model.eval()  # nn.MultiheadAttention takes its fused fast path in eval mode only; compare like with like
    assert torch.equal(_predict(reloaded), _predict(peft_model))


def test_two_named_adapters_give_different_outputs_and_switch_fast_without_touching_the_base():
    peft_model = peft.get_peft_model(_model(), LoopConfig(n_loops=2, fields=FIELDS), adapter_name="macro")
    _train(peft_model)
    peft_model.add_adapter("climate", LoopConfig(n_loops=3, fields=FIELDS[:1]))
    peft_model.set_adapter("climate")
    _train(peft_model, lr=0.1)
    frozen = _frozen(peft_model)
    out_climate = _predict(peft_model)
    start = time.perf_counter()
    peft_model.set_adapter("macro")
    switch_seconds = time.perf_counter() - start
    out_macro = _predict(peft_model)
    assert switch_seconds < 0.05
    assert (out_macro - out_climate).abs().max() > 1e-3
    peft_model.set_adapter("climate")
    assert torch.equal(_predict(peft_model), out_climate)  # switching back restores the same function
    params = dict(peft_model.named_parameters())
    assert all(torch.equal(params[n], t) for n, t in frozen.items() if ".base_layer." in n)

    peft_model.delete_adapter("macro")
    assert list(peft_model.peft_config) == ["climate"]
    assert not any(".macro" in n for n, _ in peft_model.named_parameters())
    assert torch.equal(_predict(peft_model), out_climate)


def test_adapter_on_a_base_of_another_width_is_refused_naming_the_mismatch(saved_adapter, tmp_path):
    folder, _, _ = saved_adapter
    other_base = make_tiny_cogvideox(tmp_path / "narrow-base", num_attention_heads=2)
    with pytest.raises(AdapterMismatchError, match=rf"{folder}.*inner_dim 64 \(model has 32\)"):
        GWMModel.from_pretrained(other_base, folder)


def test_adapter_config_with_a_wrong_n_loops_is_refused_from_the_weights(saved_adapter):
    folder, _, _ = saved_adapter
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["n_loops"] = 3  # the weights hold 2 loops
    config_path.write_text(json.dumps(config))
    with pytest.raises(AdapterMismatchError, match=r"adapter_model\.safetensors.*n_loops 3"):
        GWMModel.from_pretrained(TINY_BASE_PATH, folder)


def test_truncated_weights_are_a_clear_error_naming_the_file(saved_adapter):
    folder, _, _ = saved_adapter
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(AdapterLoadError, match=rf"{weights}.*truncated"):
        GWMModel.from_pretrained(TINY_BASE_PATH, folder)


def test_missing_weights_file_is_a_clear_error(saved_adapter):
    folder, _, _ = saved_adapter
    os.remove(folder / "adapter_model.safetensors")
    with pytest.raises(AdapterLoadError, match=rf"No adapter_model.safetensors in {folder}"):
        GWMModel.from_pretrained(TINY_BASE_PATH, folder)


def test_a_foreign_peft_adapter_is_refused(tmp_path):
    LoraConfig(r=2, target_modules=["to_q"]).save_pretrained(tmp_path / "lora")
    with pytest.raises(AdapterLoadError, match=rf"{tmp_path / 'lora'} holds a LORA adapter, not a GWM loop adapter"):
        GWMModel.from_pretrained(TINY_BASE_PATH, tmp_path / "lora")


def test_a_missing_adapter_folder_is_a_clear_error(tmp_path):
    missing = tmp_path / "no" / "such-adapter"
    with pytest.raises(AdapterLoadError, match=rf"No adapter folder at {missing}"):
        GWMModel.from_pretrained(TINY_BASE_PATH, missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(AdapterLoadError, match=rf"No adapter_config.json in {empty}"):
        GWMModel.from_pretrained(TINY_BASE_PATH, empty)
