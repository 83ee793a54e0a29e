"""GWMModel on the real tiny CogVideoX base: the seed's pipeline, what it computes at initialisation, both backbones,
dtypes, gradient checkpointing, base loading and its errors, the shipped tiny base, and the parameter budget."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from contextlib import nullcontext

import peft
import pytest
import torch
from transformers import AutoConfig, AutoModel

from modeling_gwm import GWMConfig, GWMModel, LoopConfig, LoopLayer
from modeling_gwm.model.base import BaseLoadError, make_tiny_cogvideox
from modeling_gwm.model.budget import budget_for_architecture, format_budget, parameter_budget
from modeling_gwm.model.canvas import sinusoidal_encoding

FIELDS = [{"name": "x.a", "mean": 0.0, "std": 1.0, "transform": "none"},
          {"name": "x.b", "mean": 0.0, "std": 1.0, "transform": "none"}]
SCRATCH = dict(scratch_num_layers=2, scratch_attention_head_dim=8)  # a scratch backbone as small as the tiny base


def _batch(batch: int = 2, steps: int = 5, n_fields: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(batch, steps, n_fields, generator=g)  # (B, T, F)
    presence = torch.rand(batch, steps, n_fields, generator=g) > 0.1
    target = torch.zeros_like(presence)
    target[:, -2:] = True  # forecast the last two steps
    return values, presence, target


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_config_is_registered_with_the_auto_classes(tmp_path, tiny_base):
    GWMConfig(base_model_name_or_path=tiny_base, d_model=16, n_loops=2).save_pretrained(tmp_path)
    reloaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(reloaded, GWMConfig) and reloaded.model_type == "gwm"
    assert (reloaded.d_model, reloaded.n_loops, reloaded.base_model_name_or_path) == (16, 2, tiny_base)
    model = AutoModel.from_config(reloaded)
    assert isinstance(model, GWMModel) and model.inner_dim == 64 and len(model.transformer_blocks) == 2


@pytest.mark.parametrize("backbone", ["cogvideox", "scratch"])
def test_forward_shapes_for_both_backbones(backbone, tiny_base):
    model = GWMModel.from_pretrained(tiny_base, d_model=16, backbone=backbone, **SCRATCH)
    canvas = torch.randn(3, 7, 16)  # (B, N, d_model)
    assert model.backbone(canvas, torch.arange(7)).shape == (3, 7, 16)  # bare model: every block once
    peft_model = peft.get_peft_model(model, LoopConfig(n_loops=2, fields=FIELDS))
    values, presence, target = _batch()
    out = peft_model(values, presence, target_mask=target)
    assert out.predictions.shape == (2, 5, 2)  # (B, T, F)
    assert out.hidden_states.shape == (2, 10, 16)  # (B, T*F, d_model)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert peft_model.backbone(canvas, torch.arange(7)).shape == (3, 7, 16)
    expected_block = "CogVideoXBlock" if backbone == "cogvideox" else "ScratchBlock"
    assert type(model.transformer_blocks[0].base_layer).__name__ == expected_block


def test_loop_layer_at_init_applies_each_block_with_half_its_residual_update(tiny_base):
    """Documented behaviour at initialisation: loop embeddings 0 and gates sigmoid(0) = 1/2, so each of the n_loops
    applications is h <- (block(h) + h) / 2 = h + delta(h) / 2 (the block's own residual update, halved). Not an
    identity: checked against the raw diffusers CogVideoXBlock by hand."""
    model = GWMModel.from_pretrained(tiny_base, d_model=16)
    raw_block = copy.deepcopy(model.transformer_blocks[0])  # the untouched diffusers CogVideoXBlock
    assert type(raw_block).__name__ == "CogVideoXBlock"
    peft.get_peft_model(model, LoopConfig(n_loops=3))
    layer = model.transformer_blocks[0]
    assert isinstance(layer, LoopLayer)
    assert not layer.loop_emb["default"].any() and not layer.loop_emb_enc["default"].any()
    assert not layer.loop_gate["default"].any()
    g = torch.Generator().manual_seed(1)
    hidden, encoder = torch.randn(2, 6, 64, generator=g), torch.randn(2, 1, 64, generator=g)
    temb = model.block_temb.expand(2, -1)
    with torch.no_grad():
        out_h, out_e = layer(hidden, encoder, temb)
        h, e = hidden, encoder
        for _ in range(3):
            block_h, block_e = raw_block(h, e, temb, None, None)
            h, e = 0.5 * block_h + 0.5 * h, 0.5 * block_e + 0.5 * e
    torch.testing.assert_close(out_h, h, atol=1e-6, rtol=0)
    torch.testing.assert_close(out_e, e, atol=1e-6, rtol=0)
    assert _rel(out_h, hidden) > 0.1  # a zero-initialised loop still changes the hidden states


def test_backbone_at_init_is_the_documented_pipeline_and_disabling_the_adapter_restores_the_bare_model(tiny_base):
    model = GWMModel.from_pretrained(tiny_base, d_model=16)
    raw_blocks = copy.deepcopy(model.transformer_blocks)
    g = torch.Generator().manual_seed(2)
    canvas, time_index = torch.randn(2, 8, 16, generator=g), torch.arange(4).repeat_interleave(2)  # (B, N, D), (N,)
    with torch.no_grad():
        bare = model.backbone(canvas, time_index)  # every block once
    peft_model = peft.get_peft_model(model, LoopConfig(n_loops=3))
    with torch.no_grad():
        got = peft_model.backbone(canvas, time_index)
        h = model.proj_in(canvas + sinusoidal_encoding(time_index, 16))  # (B, N, inner_dim)
        e = model.encoder_token(2)  # (B, 1, inner_dim): the one learned conditioning token
        temb = model.block_temb.expand(2, -1)
        for block in raw_blocks:
            for _ in range(3):
                block_h, block_e = block(h, e, temb, None, None)
                h, e = 0.5 * block_h + 0.5 * h, 0.5 * block_e + 0.5 * e
        expected = model.norm_out(model.proj_out(h))
        with peft_model.disable_adapter():
            disabled = peft_model.backbone(canvas, time_index)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(disabled, bare, atol=0, rtol=0)
    assert _rel(got, bare) > 0.05  # the looped model at init is not the bare one either


def test_without_diffusers_cogvideox_falls_back_to_scratch_with_one_warning():
    code = (
        "import sys, logging\n"
        "sys.modules['diffusers'] = None  # import diffusers now raises ImportError\n"
        "logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(message)s')\n"
        "import peft, torch\n"
        "from modeling_gwm import GWMModel, LoopConfig\n"
        "m = GWMModel.from_pretrained(d_model=8, scratch_num_layers=1, scratch_attention_head_dim=4)\n"
        "pm = peft.get_peft_model(m, LoopConfig(n_loops=2))\n"
        "out = pm(torch.randn(1, 3, 2), torch.ones(1, 3, 2, dtype=torch.bool), target_mask=torch.ones(1, 3, 2))\n"
        "print('RESULT', m.config.backbone, type(m.transformer_blocks[0].base_layer).__name__,\n"
        "      tuple(out.predictions.shape), bool(torch.isfinite(out.loss)))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "RESULT scratch ScratchBlock (1, 3, 2) True" in proc.stdout
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("WARNING") and "diffusers" in line]
    assert len(warnings) == 1 and "scratch" in warnings[0], proc.stderr[-2000:]


def test_unreachable_hub_base_fails_fast_naming_it_and_the_alternatives(hub_offline):
    start = time.perf_counter()
    with pytest.raises(BaseLoadError, match=r"nobody-here/no-such-cogvideox.*local folder.*backbone='scratch'"):
        GWMModel.from_pretrained("nobody-here/no-such-cogvideox", d_model=16)
    assert time.perf_counter() - start < 10.0  # no network wait


def test_missing_local_base_folder_is_named(tmp_path):
    missing = tmp_path / "no-base-here"
    with pytest.raises(BaseLoadError, match=r"No CogVideoX base folder at .*no-base-here.*backbone='scratch'") as info:
        GWMModel.from_pretrained(str(missing), d_model=16)
    assert "\n" not in str(info.value)
    with pytest.raises(BaseLoadError, match=r"Could not load the CogVideoX base .*" + tmp_path.name):
        GWMModel.from_pretrained(str(tmp_path), d_model=16)  # a folder, but no transformer/ checkpoint in it


def test_bfloat16_frozen_blocks_on_cpu_train_an_fp32_adapter(tiny_base):
    # no residual baseline: its zero-initialised head would stop every gradient but its own at the first step
    model = GWMModel.from_pretrained(tiny_base, d_model=16, frozen_dtype="bfloat16", residual_baseline="none")
    peft_model = peft.get_peft_model(model, LoopConfig(n_loops=2, fields=FIELDS))
    frozen = {n: p for n, p in peft_model.named_parameters() if ".base_layer." in n}
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert frozen and {p.dtype for p in frozen.values()} == {torch.bfloat16}
    assert trainable and {p.dtype for p in trainable.values()} == {torch.float32}
    values, presence, target = _batch()
    out = peft_model(values, presence, target_mask=target)
    assert out.predictions.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0
               for p in trainable.values())
    assert all(p.grad is None for p in frozen.values())


def test_frozen_dtype_auto_is_float32_on_cpu(tiny_base):
    model = GWMModel.from_pretrained(tiny_base, d_model=16, device="cpu")
    assert {p.dtype for p in model.transformer_blocks.parameters()} == {torch.float32}


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")  # transformers 5
@pytest.mark.parametrize("granularity, recomputed", [("loop", 6), ("application", 4)])
def test_gradient_checkpointing_recomputes_blocks_and_gives_the_same_loss_and_grads(tiny_base, granularity,
                                                                                     recomputed):
    model = GWMModel.from_pretrained(tiny_base, d_model=16, gradient_checkpointing_granularity=granularity)
    peft_model = peft.get_peft_model(model, LoopConfig(n_loops=2, fields=FIELDS))
    with torch.no_grad():  # move off the init so every gradient path is live
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    calls = []  # a pre-hook: torch stops a recomputation early, before forward hooks would run
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
    peft_model.gradient_checkpointing_enable()  # transformers' switch, reached through the PeftModel
    assert model.is_activation_checkpointing
    loss_ckpt, grads_ckpt, calls_ckpt = loss_and_grads()
    # n_loops applications; "loop": the whole loop is recomputed once and each application once more inside it;
    # "application": each application is recomputed once
    assert calls_plain == 2 and calls_ckpt == recomputed
    torch.testing.assert_close(loss_ckpt, loss_plain, atol=1e-6, rtol=0)
    assert grads_ckpt.keys() == grads_plain.keys()
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], grad, atol=1e-6, rtol=1e-5)


def test_gradient_checkpointing_config_switch_reaches_every_loop_layer_quietly(tiny_base, recwarn):
    model = GWMModel.from_pretrained(tiny_base, d_model=16, gradient_checkpointing=True)
    peft.get_peft_model(model, LoopConfig(n_loops=2))
    assert [layer.gradient_checkpointing for layer in model.transformer_blocks] == [True, True]
    assert model.is_activation_checkpointing
    assert not [w for w in recwarn if "checkpointing" in str(w.message)]  # no deprecation noise from PEFT's probe
    with pytest.warns(FutureWarning) if hasattr(model, "activation_checkpointing_disable") else nullcontext():
        model.gradient_checkpointing_disable()  # deprecated in transformers 5 for activation_checkpointing_disable
    assert not model.config.gradient_checkpointing and not model.is_activation_checkpointing
    assert [layer.gradient_checkpointing for layer in model.transformer_blocks] == [False, False]


def test_regenerated_tiny_base_is_byte_identical_to_the_shipped_one(tmp_path, tiny_base):
    make_tiny_cogvideox(tmp_path)
    weights = os.path.join("transformer", "diffusion_pytorch_model.safetensors")
    with open(os.path.join(tiny_base, weights), "rb") as shipped, open(tmp_path / weights, "rb") as regenerated:
        assert shipped.read() == regenerated.read()
    with open(os.path.join(tiny_base, "transformer", "config.json")) as f:
        shipped_config = json.load(f)
    config = json.loads((tmp_path / "transformer" / "config.json").read_text())
    config.pop("_diffusers_version"), shipped_config.pop("_diffusers_version")  # the only field that may drift
    assert config == shipped_config


# ---------------------------------------------------------------------------------------------------- budget
def _cogvideox_block_params(heads: int, head_dim: int, time_embed_dim: int = 512) -> int:
    """Parameters of one diffusers CogVideoXBlock, from its layer shapes (independent of the counting code)."""
    dim = heads * head_dim
    norm_zero = time_embed_dim * 6 * dim + 6 * dim + 2 * dim  # adaptive LayerNormZero: linear to 6 chunks + LayerNorm
    attention = 4 * (dim * dim + dim) + 2 * 2 * head_dim  # q, k, v, out + q/k LayerNorms over one head
    feed_forward = dim * 4 * dim + 4 * dim + 4 * dim * dim + dim
    return 2 * norm_zero + attention + feed_forward


@pytest.mark.parametrize("name, heads, layers", [("THUDM/CogVideoX-2b", 30, 30), ("THUDM/CogVideoX-5b", 48, 42)])
def test_budget_of_published_bases_has_the_exact_counts(name, heads, layers):
    rows = {r["component"]: r for r in budget_for_architecture(name, d_model=128, n_loops=3)}
    inner, loops, d_model = heads * 64, 3, 128
    frozen = rows[f"frozen blocks ({layers})"]
    assert frozen["params"] == layers * _cogvideox_block_params(heads, 64) and not frozen["trainable"]
    assert rows["loop embeddings"]["params"] == 2 * layers * loops * inner
    assert rows["loop gates"]["params"] == layers * loops
    assert rows["encoder token"]["params"] == inner
    assert rows["proj_in"]["params"] == d_model * inner + inner
    assert rows["proj_out"]["params"] == inner * d_model + d_model
    assert rows["output norm"]["params"] == 2 * d_model
    codec = (d_model + d_model) + (d_model * d_model + d_model) + 64 * d_model + d_model + 9 * (d_model + 1)
    assert rows["codec"]["params"] == codec  # value encoder, field slots, mask embedding, 9-level head
    assert "trained block copies" not in rows
    trainable = sum(r["params"] for c, r in rows.items() if r["trainable"] and c not in ("total trainable",
                                                                                         "trainable %"))
    assert rows["total trainable"]["params"] == trainable
    assert rows["trainable %"]["params"] == pytest.approx(100 * trainable / (trainable + frozen["params"]))
    if name.endswith("2b"):
        assert frozen["params"] == 1_682_446_080 and trainable == 867_683  # the README's figures


@pytest.mark.parametrize("backbone", ["cogvideox", "scratch"])
def test_budget_counts_what_the_adapter_trains_and_saves(backbone, tiny_base):
    model = GWMModel.from_pretrained(tiny_base, d_model=16, backbone=backbone, **SCRATCH)
    peft_model = peft.get_peft_model(model, LoopConfig(n_loops=2, fields=FIELDS), adapter_name="first")
    peft_model.add_adapter("second", LoopConfig(n_loops=3, fields=FIELDS))
    rows = {r["component"]: r["params"] for r in parameter_budget(peft_model, "first")}
    requires_grad = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)  # "first" is active
    saved = peft.get_peft_model_state_dict(peft_model, adapter_name="first")
    assert rows["total trainable"] == requires_grad == sum(t.numel() for t in saved.values())
    assert rows["loop gates"] == 2 * 2
    assert {r["component"]: r["params"] for r in parameter_budget(peft_model, "second")}["loop gates"] == 2 * 3
    frozen = sum(p.numel() for n, p in peft_model.named_parameters() if ".base_layer." in n)
    assert rows[f"frozen blocks ({len(model.transformer_blocks)})"] == frozen
    assert ("trained block copies" in rows) == (backbone == "scratch")
    with pytest.raises(ValueError, match="no loop adapter named 'third'"):
        parameter_budget(peft_model, "third")


def test_budget_of_a_bare_model_and_its_table(tiny_base):
    model = GWMModel.from_pretrained(tiny_base, d_model=16)
    rows = parameter_budget(model)
    by_name = {r["component"]: r["params"] for r in rows}
    assert by_name["loop embeddings"] == by_name["loop gates"] == 0  # no adapter: every block runs once
    assert by_name["total trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert by_name["frozen blocks (2)"] == sum(p.numel() for p in model.transformer_blocks.parameters())
    table = format_budget(rows).splitlines()
    assert table[0] == "| Component | Params | Trainable? |" and len(table) == 2 + len(rows)
    assert f"| proj_in | {16 * 64 + 64:,} (1.09K) | yes |" in table
    assert table[-1].startswith("| trainable % |") and table[-1].endswith("% |  |")


# ------------------------------------------------------------------------------------------ scaling, quantiles
def _scaled_canvas(model, values, presence, target):
    """The canvas the codec builds for a batch (what the blocks see), captured by wrapping encode."""
    seen = {}
    original = model.codec.encode

    def spy(*args, **kwargs):
        seen["canvas"] = original(*args, **kwargs)
        return seen["canvas"]

    model.codec.encode = spy
    try:
        with torch.no_grad():
            out = model(values, presence, target_mask=target)
    finally:
        del model.codec.encode
    return seen["canvas"], out


@pytest.mark.parametrize("scheme", ["last_value", "instance"])
def test_window_scaling_is_invariant_to_an_affine_change_of_the_input(scheme, tiny_base):
    model = GWMModel.from_pretrained(tiny_base, d_model=16, window_scaling=scheme, window_stats_input=False).eval()
    values, presence, target = _batch(steps=8)
    canvas, out = _scaled_canvas(model, values, presence, target)
    shifted_canvas, shifted = _scaled_canvas(model, 3.0 * values + 7.0, presence, target)
    torch.testing.assert_close(shifted_canvas, canvas, atol=1e-4, rtol=1e-4)  # the blocks see the same canvas
    torch.testing.assert_close(shifted.quantiles, 3.0 * out.quantiles + 7.0, atol=1e-4, rtol=1e-4)  # mapped back
    torch.testing.assert_close(shifted.loss, out.loss, atol=1e-5, rtol=1e-5)  # the loss is scale-free


@pytest.mark.parametrize("scheme", ["last_value", "instance", "mean_abs", "none"])
def test_constant_single_and_empty_contexts_never_give_nan(scheme, tiny_base):
    from modeling_gwm.model.canvas import window_scale

    values = torch.zeros(3, 6, 2)  # (B, T, F)
    values[0] = 5.0  # constant context
    values[1, 2, :] = -4.0  # a single observation
    visible = torch.ones(3, 6, 2, dtype=torch.bool)
    visible[1] = False
    visible[1, 2] = True
    visible[2] = False  # nothing visible
    loc, scale = window_scale(values, visible, scheme)
    assert torch.isfinite(loc).all() and (scale > 0).all()
    if scheme in ("last_value", "instance"):
        assert scale[0].eq(1).all() and scale[1].eq(1).all() and scale[2].eq(1).all()  # one training std
        assert loc[0].eq(5).all() and loc[1].eq(-4).all() and loc[2].eq(0).all()
    model = GWMModel.from_pretrained(tiny_base, d_model=16, window_scaling=scheme)
    target = ~visible
    out = model(values, torch.ones_like(visible), target_mask=target)
    assert torch.isfinite(out.quantiles).all() and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.codec.parameters() if p.grad is not None)


def test_predictions_never_read_the_target_values(tiny_base):
    model = GWMModel.from_pretrained(tiny_base, d_model=16).eval()
    values, presence, target = _batch(steps=8)
    changed = torch.where(target, values * 100.0 + 50.0, values)  # only the hidden positions differ
    with torch.no_grad():
        a = model(values, presence, target_mask=target)
        b = model(changed, presence, target_mask=target)
    torch.testing.assert_close(a.quantiles, b.quantiles, atol=0, rtol=0)
    assert not torch.isclose(a.loss, b.loss)  # the loss does read them


def test_pinball_loss_on_a_hand_checked_case():
    from modeling_gwm.model.canvas import pinball_loss

    levels = torch.tensor([0.1, 0.5, 0.9])
    quantiles = torch.tensor([[0.0, 1.0, 2.0]])  # (1, Q)
    value = torch.tensor([1.5])  # errors y - q: 1.5, 0.5, -0.5
    # 0.1 * 1.5 = 0.15; 0.5 * 0.5 = 0.25; (0.9 - 1) * -0.5 = 0.05 -> mean 0.15
    torch.testing.assert_close(pinball_loss(quantiles, value, levels), torch.tensor([0.15]))


def test_quantile_output_shape_sorted_and_median_is_the_prediction(tiny_base):
    model = GWMModel.from_pretrained(tiny_base, d_model=16, quantile_levels=[0.05, 0.5, 0.95]).eval()
    values, presence, target = _batch(steps=6)
    with torch.no_grad():
        out = model(values, presence, target_mask=target)
    assert out.quantiles.shape == (2, 6, 2, 3)  # (B, T, F, Q)
    assert (out.quantiles.diff(dim=-1) >= 0).all()  # no crossing at inference
    torch.testing.assert_close(out.predictions, out.quantiles[..., 1])
    assert out.position_loss.shape == (2, 6, 2)


@pytest.mark.parametrize("levels, message", [
    ([0.1, 0.9], "must include 0.5"), ([0.5, 0.1], "sorted and unique"), ([0.0, 0.5], "strictly between 0 and 1"),
    ("0.5", "list of numbers"), ([], "non-empty"),
])
def test_bad_quantile_levels_are_one_clear_error(levels, message):
    with pytest.raises(ValueError, match=message):
        GWMConfig(quantile_levels=levels)


def test_bad_window_scaling_is_one_clear_error():
    with pytest.raises(ValueError, match="window_scaling must be one of"):
        GWMConfig(window_scaling="z")


def test_seasonal_lag_is_the_latest_visible_value_whole_seasons_back_and_grids_know_their_season():
    from modeling_gwm.model.canvas import season_period, seasonal_lag

    values = torch.arange(10.0).view(1, 10, 1)  # (B, T, F)
    visible = torch.ones(1, 10, 1, dtype=torch.bool)
    visible[0, 7:] = False  # the forecast part
    visible[0, 3] = False  # a gap one season before step 6: step 6 reaches two seasons back
    lag, has = seasonal_lag(values, visible, period=3)
    assert has[0, :, 0].tolist() == [False] * 3 + [True] * 7
    assert lag[0, 3:, 0].tolist() == [0.0, 1.0, 2.0, 0.0, 4.0, 5.0, 6.0]
    assert [season_period(f) for f in ("MS", "QS", "D", "W", "h", "YS", "2MS", None)] == [12, 4, 7, 52, 24, 0, 0, 0]


def test_seasonal_lag_input_never_reads_the_target_values(tiny_base):
    model = GWMModel.from_pretrained(tiny_base, d_model=16, seasonal_lag_input=True, season_period=2).eval()
    torch.nn.init.normal_(model.codec.lag_encoder.weight)  # zero at init: make it matter
    values, presence, target = _batch(steps=8)
    changed = torch.where(target, values * 100.0 + 50.0, values)
    with torch.no_grad():
        a = model(values, presence, target_mask=target)
        b = model(changed, presence, target_mask=target)
    torch.testing.assert_close(a.quantiles, b.quantiles, atol=0, rtol=0)
    model.config.season_period = 0  # no season: the lag input is empty and the output changes
    with torch.no_grad():
        assert not torch.allclose(model(values, presence, target_mask=target).quantiles, a.quantiles)
