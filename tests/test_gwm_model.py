"""GWMModel: the seed's backbone pipeline on the real tiny CogVideoX base, the scratch backbone, dtypes,
gradient checkpointing, loading errors, the shipped tiny base, and the parameter budget."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel

from modeling_gwm import GWMConfig, GWMModel, LoopConfig, LoopLayer
from modeling_gwm.base import TINY_BASE_PATH, BaseLoadError, make_tiny_cogvideox
from modeling_gwm.budget import budget_for_architecture, format_budget, parameter_budget
from modeling_gwm.canvas import sinusoidal_encoding

FIELDS = [{"name": "x.a", "mean": 0.0, "std": 1.0, "transform": "none"},
          {"name": "x.b", "mean": 0.0, "std": 1.0, "transform": "none"}]


def _model(**overrides) -> GWMModel:
    return GWMModel.from_pretrained(TINY_BASE_PATH, d_model=16, **overrides)


def _batch(batch: int = 2, steps: int = 5, n_fields: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(batch, steps, n_fields, generator=g)  # (B, T, F)
    presence = torch.rand(batch, steps, n_fields, generator=g) > 0.1
    target = torch.zeros_like(presence)
    target[:, -2:] = True  # forecast the last two steps
    return values, presence, target


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_config_is_registered_with_the_auto_classes(tmp_path):
    config = GWMConfig(base_model_name_or_path=TINY_BASE_PATH, d_model=16, n_loops=2)
    config.save_pretrained(tmp_path)
    reloaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(reloaded, GWMConfig) and reloaded.d_model == 16 and reloaded.n_loops == 2
    model = AutoModel.from_config(reloaded)
    assert isinstance(model, GWMModel) and model.inner_dim == 64 and len(model.transformer_blocks) == 2


@pytest.mark.parametrize("backbone", ["cogvideox", "scratch"])
def test_forward_shapes_for_both_backbones(backbone):
    model = _model(backbone=backbone, scratch_num_layers=2, scratch_attention_head_dim=8)
    peft_model = peft.get_peft_model(model, LoopConfig(n_loops=2, fields=FIELDS))
    values, presence, target = _batch()
    out = peft_model(values, presence, target_mask=target)
    assert out.predictions.shape == (2, 5, 2)
    assert out.hidden_states.shape == (2, 10, 16)  # (B, T*F, d_model)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    canvas = torch.randn(3, 7, 16)
    assert model.backbone(canvas, torch.arange(7)).shape == (3, 7, 16)
    expected_block = "CogVideoXBlock" if backbone == "cogvideox" else "ScratchBlock"
    assert type(model.transformer_blocks[0].base_layer).__name__ == expected_block


def test_loop_layer_at_init_is_an_even_blend_of_the_raw_diffusers_block():
    model = _model()
    raw_block = copy.deepcopy(model.transformer_blocks[0])  # the untouched diffusers CogVideoXBlock
    peft.get_peft_model(model, LoopConfig(n_loops=3))
    layer = model.transformer_blocks[0]
    assert isinstance(layer, LoopLayer)
    g = torch.Generator().manual_seed(1)
    hidden, encoder = torch.randn(2, 6, 64, generator=g), torch.randn(2, 1, 64, generator=g)
    temb = model.block_temb.expand(2, -1)
    with torch.no_grad():
        out_h, out_e = layer(hidden, encoder, temb)
        h, e = hidden, encoder
        for _ in range(3):  # by hand: h <- 0.5 * block(h) + 0.5 * h, three times
            block_h, block_e = raw_block(h, e, temb, None, None)
            h, e = 0.5 * block_h + 0.5 * h, 0.5 * block_e + 0.5 * e
    torch.testing.assert_close(out_h, h, atol=1e-6, rtol=0)
    torch.testing.assert_close(out_e, e, atol=1e-6, rtol=0)
    assert _rel(out_h, hidden) > 0.05  # the zero-initialised loop is not an identity


def test_backbone_at_init_is_the_documented_pipeline():
    model = _model()
    raw_blocks = copy.deepcopy(model.transformer_blocks)
    with torch.no_grad():
        once = model.backbone(torch.randn(1, 4, 16), torch.arange(4))  # reference run without adapter
    peft_model = peft.get_peft_model(model, LoopConfig(n_loops=3))
    g = torch.Generator().manual_seed(2)
    canvas, time_index = torch.randn(2, 8, 16, generator=g), torch.arange(4).repeat_interleave(2)
    with torch.no_grad():
        got = peft_model.backbone(canvas, time_index)
        h = model.proj_in(canvas + sinusoidal_encoding(time_index, 16))  # (B, N, inner_dim)
        e = model.encoder_token(2)  # (B, 1, inner_dim)
        temb = model.block_temb.expand(2, -1)
        for block in raw_blocks:
            for _ in range(3):
                block_h, block_e = block(h, e, temb, None, None)
                h, e = 0.5 * block_h + 0.5 * h, 0.5 * block_e + 0.5 * e
        expected = model.norm_out(model.proj_out(h))
        with peft_model.disable_adapter():  # without the adapter every block runs once, as before it was added
            unlooped = peft_model.backbone(torch.randn(1, 4, 16), torch.arange(4))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert got.shape == (2, 8, 16) and once.shape == unlooped.shape


def test_without_diffusers_cogvideox_falls_back_to_scratch_with_one_warning():
    code = (
        "import sys, logging\n"
        "sys.modules['diffusers'] = None\n"
        "logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(message)s')\n"
        "from modeling_gwm import GWMModel\n"
        "m = GWMModel.from_pretrained(d_model=8, scratch_num_layers=1, scratch_attention_head_dim=4)\n"
        "print('RESULT', m.config.backbone, type(m.transformer_blocks[0]).__name__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "RESULT scratch ScratchBlock" in proc.stdout
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("WARNING") and "diffusers" in line]
    assert len(warnings) == 1, proc.stderr[-2000:]


def test_unreachable_base_raises_base_load_error_fast(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(BaseLoadError, match=r"nobody-here/no-such-cogvideox.*local folder.*scratch"):
        GWMModel.from_pretrained("nobody-here/no-such-cogvideox", d_model=16)
    assert time.perf_counter() - start < 10.0


def test_bfloat16_frozen_blocks_on_cpu_train_fp32_adapter():
    model = _model(frozen_dtype="bfloat16")
    peft_model = peft.get_peft_model(model, LoopConfig(n_loops=2, fields=FIELDS))
    frozen = {n: p for n, p in peft_model.named_parameters() if ".base_layer." in n}
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert frozen and {p.dtype for p in frozen.values()} == {torch.bfloat16}
    assert {p.dtype for p in trainable.values()} == {torch.float32}
    values, presence, target = _batch()
    out = peft_model(values, presence, target_mask=target)
    assert out.predictions.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0
               for p in trainable.values())
    assert all(p.grad is None for p in frozen.values())


def test_gradient_checkpointing_recomputes_blocks_and_gives_the_same_loss_and_grads():
    model = _model()
    peft_model = peft.get_peft_model(model, LoopConfig(n_loops=2, fields=FIELDS))
    with torch.no_grad():  # move off the init so every gradient path is live
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    calls = []
    # a pre-hook: recomputation stops early once the saved tensors are rebuilt, so post-hooks do not fire again
    model.transformer_blocks[0].base_layer.register_forward_pre_hook(lambda *args: calls.append(1))
    values, presence, target = _batch()

    def loss_and_grads():
        peft_model.zero_grad()
        calls.clear()
        loss = peft_model(values, presence, target_mask=target).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}
        return loss.detach(), grads, len(calls)

    loss_plain, grads_plain, calls_plain = loss_and_grads()
    peft_model.set_gradient_checkpointing(True)
    loss_ckpt, grads_ckpt, calls_ckpt = loss_and_grads()
    assert calls_plain == 2 and calls_ckpt == 4  # n_loops applications, each recomputed in the backward pass
    torch.testing.assert_close(loss_ckpt, loss_plain, atol=1e-6, rtol=0)
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], grad, atol=1e-6, rtol=1e-5)


def test_gradient_checkpointing_config_switch_reaches_every_loop_layer():
    model = _model(gradient_checkpointing=True)
    peft.get_peft_model(model, LoopConfig(n_loops=2))
    assert [layer.gradient_checkpointing for layer in model.transformer_blocks] == [True, True]
    model.set_gradient_checkpointing(False)
    assert not model.config.gradient_checkpointing
    assert [layer.gradient_checkpointing for layer in model.transformer_blocks] == [False, False]


def test_regenerated_tiny_base_is_identical_to_the_shipped_one(tmp_path):
    make_tiny_cogvideox(tmp_path)
    shipped = load_file(os.path.join(TINY_BASE_PATH, "transformer", "diffusion_pytorch_model.safetensors"))
    regenerated = load_file(tmp_path / "transformer" / "diffusion_pytorch_model.safetensors")
    assert shipped.keys() == regenerated.keys()
    assert all(torch.equal(shipped[k], regenerated[k]) for k in shipped)
    config = json.loads((tmp_path / "transformer" / "config.json").read_text())
    shipped_config = json.loads(open(os.path.join(TINY_BASE_PATH, "transformer", "config.json")).read())
    config.pop("_diffusers_version"), shipped_config.pop("_diffusers_version")
    assert config == shipped_config


def test_budget_of_cogvideox_2b_has_the_exact_counts():
    rows = {r["component"]: r for r in budget_for_architecture("THUDM/CogVideoX-2b", d_model=128, n_loops=3)}
    blocks, loops, inner, d_model = 30, 3, 1920, 128
    assert rows["frozen blocks (30)"]["params"] == 1_682_446_080 and not rows["frozen blocks (30)"]["trainable"]
    assert rows["loop embeddings"]["params"] == 2 * blocks * loops * inner
    assert rows["loop gates"]["params"] == blocks * loops
    assert rows["encoder token"]["params"] == inner
    assert rows["proj_in"]["params"] == d_model * inner + inner
    assert rows["proj_out"]["params"] == inner * d_model + d_model
    assert rows["output norm"]["params"] == 2 * d_model
    assert "trained block copies" not in rows
    trainable = sum(r["params"] for r in rows.values() if r["trainable"] and isinstance(r["params"], int)
                    and r["component"] != "total trainable")
    assert rows["total trainable"]["params"] == trainable == 866_651
    assert rows["trainable %"]["params"] == pytest.approx(100 * trainable / (trainable + 1_682_446_080))


@pytest.mark.parametrize("backbone", ["cogvideox", "scratch"])
def test_budget_counts_what_the_adapter_trains_and_saves(backbone):
    model = _model(backbone=backbone, scratch_num_layers=2, scratch_attention_head_dim=8)
    peft_model = peft.get_peft_model(model, LoopConfig(n_loops=2, fields=FIELDS), adapter_name="first")
    peft_model.add_adapter("second", LoopConfig(n_loops=3, fields=FIELDS))
    rows = {r["component"]: r["params"] for r in parameter_budget(peft_model, "first")}
    requires_grad = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)  # "first" is active
    saved = peft.get_peft_model_state_dict(peft_model, adapter_name="first")
    assert rows["total trainable"] == requires_grad == sum(t.numel() for t in saved.values())
    assert rows["loop gates"] == 2 * 2
    assert parameter_budget(peft_model, "second")[2]["params"] == 2 * 3  # gates of the 3-loop adapter
    frozen = sum(p.numel() for n, p in peft_model.named_parameters() if ".base_layer." in n)
    assert rows[f"frozen blocks ({len(model.transformer_blocks)})"] == frozen
    assert ("trained block copies" in rows) == (backbone == "scratch")
    table = format_budget(parameter_budget(peft_model))
    assert table.splitlines()[0] == "| Component | Params | Trainable? |" and "| total trainable |" in table
