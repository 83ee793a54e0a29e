"""The contracts GWMModel inherits from transformers' PreTrainedModel, on the real tiny CogVideoX base: save/load of a
model without adapter (config + trained weights only, the frozen blocks rebuilt from the base), AutoModel, push_to_hub,
bf16 frozen blocks on every path, transformers' gradient-checkpointing switch, and safetensors-only base loading."""

from __future__ import annotations

import json
import logging
import os
import shutil

import peft
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModel

from modeling_gwm import GWMConfig, GWMModel, LoopConfig
from modeling_gwm.model.base import BaseLoadError
from modeling_gwm.model.modeling_gwm import ModelLoadError

FIELDS = [{"name": "x.a", "mean": 0.0, "std": 1.0, "transform": "none"},
          {"name": "x.b", "mean": 0.0, "std": 1.0, "transform": "none"}]
TRAINED = ("codec.", "proj_in.", "proj_out.", "encoder_token.", "norm_out.")
GC_DEPRECATED = "ignore:`gradient_checkpointing_(enable|disable)` is deprecated:FutureWarning"  # transformers 5


def _batch(batch: int = 2, steps: int = 5, n_fields: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(batch, steps, n_fields, generator=g)  # (B, T, F)
    presence = torch.rand(batch, steps, n_fields, generator=g) > 0.1
    target = torch.zeros_like(presence)
    target[:, -2:] = True
    return values, presence, target


def _perturbed(model: GWMModel) -> GWMModel:
    """Move every trained parameter off its seeded init, so a fresh model cannot pass for a loaded one."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith(TRAINED):
                param.add_(0.1 * torch.randn(param.shape, generator=g))
    return model


def _safetensors_keys(path) -> set[str]:
    with safe_open(str(path), framework="pt") as weights:
        return set(weights.keys())


# ---------------------------------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("backbone, frozen_dtype", [("cogvideox", "float32"), ("cogvideox", "bfloat16"),
                                                    ("scratch", "float32")])
def test_bare_model_saves_config_and_trained_weights_only_and_loads_bit_for_bit(tmp_path, tiny_base, backbone,
                                                                              frozen_dtype, caplog):
    model = _perturbed(GWMModel.from_pretrained(tiny_base, d_model=16, frozen_dtype=frozen_dtype, backbone=backbone,
                                                scratch_num_layers=2, scratch_attention_head_dim=8))
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "gwm" and saved["base_model_name_or_path"] == tiny_base
    keys = _safetensors_keys(tmp_path / "model.safetensors")
    assert keys == {n for n in model.state_dict() if n.startswith(TRAINED)}  # no frozen block tensor
    assert not any(k.startswith("transformer_blocks.") for k in keys)
    values, presence, _ = _batch()
    with torch.no_grad():
        expected = model(values, presence).predictions

    caplog.set_level(logging.INFO)
    for loaded in (GWMModel.from_pretrained(tmp_path), AutoModel.from_pretrained(tmp_path)):
        assert type(loaded) is GWMModel and (loaded.config.frozen_dtype, loaded.config.backbone) == (frozen_dtype,
                                                                                                    backbone)
        state, reference = loaded.state_dict(), model.state_dict()
        assert state.keys() == reference.keys()
        for name, tensor in reference.items():  # trained ones from the file, frozen ones from the base
            assert state[name].dtype == tensor.dtype and torch.equal(state[name], tensor), name
        with torch.no_grad():
            assert torch.equal(loaded(values, presence).predictions, expected)
    noise = [r.getMessage() for r in caplog.records if "missing" in r.getMessage().lower()
             or "unexpected" in r.getMessage().lower() or "newly initialized" in r.getMessage().lower()]
    assert not noise


def test_saved_model_with_a_moved_base_loads_with_an_override_and_bad_weights_are_named(tmp_path, tiny_base):
    model = _perturbed(GWMModel.from_pretrained(tiny_base, d_model=16))
    model.save_pretrained(tmp_path / "saved")
    moved = shutil.copytree(tiny_base, tmp_path / "moved-base")
    loaded = GWMModel.from_pretrained(tmp_path / "saved", base_model_name_or_path=str(moved))
    assert loaded.config.base_model_name_or_path == str(moved) and torch.equal(loaded.proj_in.weight,
                                                                                model.proj_in.weight)
    with pytest.raises(ModelLoadError, match=r"do not fit .*wrong shape: codec"):
        GWMModel.from_pretrained(tmp_path / "saved", d_model=8)
    (tmp_path / "saved" / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ModelLoadError, match=r"unreadable"):
        GWMModel.from_pretrained(tmp_path / "saved")
    os.remove(tmp_path / "saved" / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"No model.safetensors"):
        GWMModel.from_pretrained(tmp_path / "saved")


def test_push_to_hub_uploads_the_same_small_files(tmp_path, tiny_base, monkeypatch):
    """Only the network is replaced: transformers' own push_to_hub writes through save_pretrained."""
    import transformers.utils.hub as hf_hub_utils

    class Repo:
        repo_id = "someone/gwm-bare"

    class Api:
        def create_repo(self, repo_id, **kwargs):
            return Repo()

    uploaded = {}

    def upload(folder, repo_id, **kwargs):
        uploaded.update({name: _safetensors_keys(os.path.join(folder, name)) if name.endswith(".safetensors")
                         else None for name in os.listdir(folder)})

    monkeypatch.setattr(hf_hub_utils, "hf_api", lambda: Api())
    monkeypatch.setattr(hf_hub_utils, "create_and_tag_model_card",
                        lambda repo_id, tags=None, token=None: hf_hub_utils.ModelCard(""))
    model = GWMModel.from_pretrained(tiny_base, d_model=16)
    monkeypatch.setattr(model, "_upload_modified_files", upload)
    model.push_to_hub("someone/gwm-bare")
    model.save_pretrained(tmp_path)
    assert sorted(uploaded) == ["README.md", "config.json", "model.safetensors"]
    assert uploaded["model.safetensors"] == _safetensors_keys(tmp_path / "model.safetensors")


def test_peft_wrapped_model_saves_the_adapter_only(tmp_path, tiny_base):
    model = GWMModel.from_pretrained(tiny_base, d_model=16)
    peft_model = peft.get_peft_model(model, LoopConfig(n_loops=2, fields=FIELDS))
    peft_model.save_pretrained(tmp_path / "adapter")
    assert sorted(os.listdir(tmp_path / "adapter")) == ["README.md", "adapter_config.json",
                                                        "adapter_model.safetensors"]
    keys = _safetensors_keys(tmp_path / "adapter" / "adapter_model.safetensors")
    assert not any(".base_layer." in k for k in keys) and any(k.endswith(".loop_emb") for k in keys)
    with pytest.raises(ValueError, match=r"carries a loop adapter: save it with the PeftModel"):
        model.save_pretrained(tmp_path / "bare")  # the inner model would otherwise write the frozen blocks
    assert not (tmp_path / "bare").exists()
    reloaded = GWMModel.from_pretrained(tiny_base, tmp_path / "adapter")  # (base, adapter) as documented
    assert isinstance(reloaded, peft.PeftModel)
    assert isinstance(GWMModel.from_pretrained(tmp_path / "adapter"), peft.PeftModel)  # the adapter folder alone


# ---------------------------------------------------------------------------------------------------- bf16
def test_base_is_read_straight_in_its_frozen_dtype(tiny_base, monkeypatch):
    from diffusers import CogVideoXTransformer3DModel

    calls, original = [], CogVideoXTransformer3DModel.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        calls.append(kwargs)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(CogVideoXTransformer3DModel, "from_pretrained", classmethod(spy))
    bf16 = GWMModel.from_pretrained(tiny_base, d_model=16, frozen_dtype="bfloat16")
    fp32 = GWMModel.from_pretrained(tiny_base, d_model=16, frozen_dtype="float32")
    assert [(c["torch_dtype"], c["use_safetensors"]) for c in calls] == [(torch.bfloat16, True), (torch.float32, True)]
    assert {p.dtype for p in bf16.transformer_blocks.parameters()} == {torch.bfloat16}
    assert bf16.block_temb.dtype == torch.float32  # computed in fp32 from the bf16-stored time projection
    torch.testing.assert_close(bf16.block_temb, fp32.block_temb, rtol=0, atol=0.02)


@pytest.mark.parametrize("backbone", ["cogvideox", "scratch"])
def test_bare_model_runs_and_backpropagates_with_bf16_frozen_blocks(tiny_base, backbone):
    # no residual baseline: its zero-initialised value head would stop every gradient but its own at the first step
    model = GWMModel.from_pretrained(tiny_base, d_model=16, frozen_dtype="bfloat16", backbone=backbone,
                                     scratch_num_layers=2, scratch_attention_head_dim=8, residual_baseline="none")
    assert {p.dtype for p in model.transformer_blocks.parameters()} == {torch.bfloat16}
    values, presence, target = _batch()
    out = model(values, presence, target_mask=target)
    assert out.predictions.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.proj_in.weight.grad is not None and model.proj_in.weight.grad.abs().sum() > 0
    reference = GWMModel.from_pretrained(tiny_base, d_model=16, frozen_dtype="float32", backbone=backbone,
                                         scratch_num_layers=2, scratch_attention_head_dim=8, residual_baseline="none")
    with torch.no_grad():
        fp32 = reference(values, presence, target_mask=target).predictions
        rel = (out.predictions - fp32).norm() / fp32.norm()
    assert 0 < rel < 0.05  # the same model, only the blocks' arithmetic in bf16


def test_adapter_trains_with_bf16_frozen_blocks_and_round_trips(tmp_path, tiny_base):
    model = GWMModel.from_pretrained(tiny_base, d_model=16, frozen_dtype="bfloat16")
    peft_model = peft.get_peft_model(model, LoopConfig(n_loops=2, fields=FIELDS))
    frozen = {n: p.detach().clone() for n, p in peft_model.named_parameters() if ".base_layer." in n}
    assert frozen and not any(p.requires_grad for n, p in peft_model.named_parameters() if n in frozen)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=0.01)
    values, presence, target = _batch()
    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        loss = peft_model(values, presence, target_mask=target).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert {p.dtype for p in trainable} == {torch.float32}
    for name, param in peft_model.named_parameters():
        if name in frozen:
            assert param.dtype == torch.bfloat16 and torch.equal(param, frozen[name]), name
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(values, presence).predictions
    peft_model.save_pretrained(tmp_path)
    reloaded = GWMModel.from_pretrained(tmp_path)  # frozen_dtype comes back from the adapter's recorded config
    assert {p.dtype for n, p in reloaded.named_parameters() if ".base_layer." in n} == {torch.bfloat16}
    with torch.no_grad():
        assert torch.equal(reloaded(values, presence).predictions, expected)


# ---------------------------------------------------------------------------------------------------- checkpointing
@pytest.mark.filterwarnings(GC_DEPRECATED)
def test_gradient_checkpointing_enable_on_a_bare_model_checkpoints_it_and_the_adapter_attached_later(tiny_base):
    model = GWMModel.from_pretrained(tiny_base, d_model=16)
    _perturbed(model)
    calls = []
    model.transformer_blocks[0].register_forward_pre_hook(lambda *args: calls.append(1))
    values, presence, target = _batch()

    def grads():
        model.zero_grad()
        calls.clear()
        model(values, presence, target_mask=target).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, len(calls)

    plain, plain_calls = grads()
    model.gradient_checkpointing_enable()
    assert model.config.gradient_checkpointing and model.is_activation_checkpointing
    assert model.is_gradient_checkpointing is False  # PEFT's probe: no input-embedding hook for GWM
    checkpointed, checkpointed_calls = grads()
    assert (plain_calls, checkpointed_calls) == (1, 2)  # the bare block is recomputed once in the backward pass
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=1e-5)
    peft_model = peft.get_peft_model(model, LoopConfig(n_loops=2, fields=FIELDS))  # no input-embedding error
    assert [layer.gradient_checkpointing for layer in model.transformer_blocks] == [True, True]
    peft_model.gradient_checkpointing_disable()
    assert not model.is_activation_checkpointing
    assert [layer.gradient_checkpointing for layer in model.transformer_blocks] == [False, False]
    with pytest.raises(ValueError, match="every_n_layers"):
        model.gradient_checkpointing_enable(every_n_layers=2)


def test_checkpointing_granularity_is_a_validated_config_field(tiny_base):
    with pytest.raises(ValueError, match=r"granularity must be one of \('loop', 'application'\), got 'block'"):
        GWMConfig(gradient_checkpointing_granularity="block")
    model = GWMModel.from_pretrained(tiny_base, d_model=16, gradient_checkpointing=True,
                                     gradient_checkpointing_granularity="application")
    peft.get_peft_model(model, LoopConfig(n_loops=2))
    assert model.config.gradient_checkpointing  # transformers' post_init would consume the legacy field
    assert {(layer.gradient_checkpointing, layer.gradient_checkpointing_granularity)
            for layer in model.transformer_blocks} == {(True, "application")}


# ---------------------------------------------------------------------------------------------------- safe loading
def test_a_base_with_only_pickled_weights_is_refused_without_unpickling(tmp_path, tiny_base, monkeypatch, caplog,
                                                                       capfd):
    folder = tmp_path / "pickled-base" / "transformer"
    folder.mkdir(parents=True)
    shutil.copy(os.path.join(tiny_base, "transformer", "config.json"), folder)
    torch.save({"proj.weight": torch.zeros(2, 2)}, folder / "diffusion_pytorch_model.bin")

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load was called on user weights")

    monkeypatch.setattr(torch, "load", no_unpickling)
    caplog.set_level(logging.INFO)
    with pytest.raises(BaseLoadError, match=r"holds only pickled weights \(diffusion_pytorch_model.bin\).*"
                                             r"safetensors only") as info:
        GWMModel.from_pretrained(str(tmp_path / "pickled-base"), d_model=16)
    assert "\n" not in str(info.value)
    (folder / "diffusion_pytorch_model.bin").unlink()  # no weights at all: diffusers is asked for safetensors only
    with pytest.raises(BaseLoadError, match=r"Could not load the CogVideoX base"):
        GWMModel.from_pretrained(str(tmp_path / "pickled-base"), d_model=16)
    logged = " ".join(r.getMessage() for r in caplog.records) + "".join(capfd.readouterr())
    assert "unsafe serialization" not in logged
