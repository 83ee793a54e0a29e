"""Devices on any machine: device names and their errors, merges that run on the CPU whatever their inputs' device,
the optimizer a checkpoint brings back, and `compile_blocks` with its fallback. What needs a GPU is in test_cuda.py.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from _tiny import canvas_batch, train_steps
from peft import get_peft_model

from modeling_gwm import GWMConfig, GWMModel
from modeling_gwm.commands import main
from modeling_gwm.model import base as base_module
from modeling_gwm.model.base import DeviceError, resolve_device
from modeling_gwm.model.loop import LoopConfig
from modeling_gwm.model.merging import MergeSpec, merge_adapters
from modeling_gwm.training.checkpoint import NodeState
from modeling_gwm.training.checkpoint import load as load_checkpoint
from modeling_gwm.training.checkpoint import save as save_checkpoint
from modeling_gwm.training.trainer import adamw

FIELDS = [{"name": f"f{i}", "mean": 0.0, "std": 1.0, "transform": "none"} for i in range(3)]
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")


def _adapter_model(tiny_base, **config):
    model = GWMModel.from_pretrained(tiny_base, d_model=16, **config)
    return get_peft_model(model, LoopConfig(n_loops=2, fields=FIELDS), adapter_name="a")


# ---------------------------------------------------------------------------------------------------- device names
def test_auto_is_cuda_when_present_else_cpu():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected and resolve_device(None).type == expected
    assert resolve_device("cpu") == torch.device("cpu")


@no_cuda
def test_cuda_without_cuda_is_one_sentence_naming_the_argument(tiny_base):
    with pytest.raises(DeviceError, match=r"^device='cuda': CUDA is not available.*use device=cpu$"):
        GWMModel.from_pretrained(tiny_base, d_model=16, device="cuda")
    with pytest.raises(DeviceError, match=r"^--device cuda:1: CUDA is not available"):
        resolve_device("cuda:1", "--device")


def test_unknown_device_name_is_refused():
    with pytest.raises(DeviceError, match=r"^--device gpu: not a device torch knows"):
        resolve_device("gpu", "--device")


@no_cuda
@pytest.mark.parametrize("command", [["forecast", "--horizon", "3", "--out", "{tmp}/p.csv"],
                                     ["evaluate", "--holdout", "3"]])
def test_cli_device_cuda_without_cuda_exits_2_with_one_line(tmp_path, capsys, command):
    argv = [c.format(tmp=tmp_path) for c in command]
    # checked first: the adapter and data need not even exist
    assert main([argv[0], "--adapter", str(tmp_path / "none"), "--data", str(tmp_path / "none.csv"),
                 "--device", "cuda", *argv[1:]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"gwm {argv[0]}: error: --device cuda: CUDA is not available") and "\n" not in err, err


# ---------------------------------------------------------------------------------------------------- merges
def test_merges_run_on_the_cpu_whatever_the_inputs_device(tiny_base):
    """Parents read from files and an init taken from the model: the result is on the CPU, ready for PEFT's setter.
    (A CUDA init with CPU parents is test_cuda.py's; here every method gives CPU tensors equal to a CPU-only merge.)"""
    peft_model = _adapter_model(tiny_base)
    from peft import get_peft_model_state_dict

    init = {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model, adapter_name="a").items()}
    parents = [{k: v + 0.01 * (i + 1) * torch.randn(v.shape, generator=torch.Generator().manual_seed(i))
                for k, v in init.items()} for i in range(2)]
    names = [f["name"] for f in FIELDS]
    for method in ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune"):
        merged = merge_adapters(parents, [names, names[:2]], names, init, spec=MergeSpec(method), seed=3)
        assert {t.device.type for t in merged.values()} == {"cpu"}
        again = merge_adapters(parents, [names, names[:2]], names, init, spec=MergeSpec(method), seed=3)
        assert all(torch.equal(merged[k], again[k]) for k in merged), method  # DARE is seeded on the CPU


# ---------------------------------------------------------------------------------------------------- optimizer
def test_adamw_is_fused_only_on_cuda():
    params = [torch.nn.Parameter(torch.zeros(3))]
    assert not adamw(params, 1e-3, 0.0).param_groups[0].get("fused")


def test_checkpoint_keeps_the_resuming_optimizers_implementation(tiny_base, tmp_path):
    """A checkpoint written by a fused AdamW (a GPU run) resumes into the optimizer this machine builds."""
    peft_model = _adapter_model(tiny_base)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    fused = torch.optim.AdamW(params, lr=1e-3, fused=True)
    values, presence, target = canvas_batch()
    peft_model(values, presence, target_mask=target).loss.backward()
    fused.step()
    from peft import get_peft_model_state_dict

    adapter = get_peft_model_state_dict(peft_model, adapter_name="a")
    save_checkpoint(tmp_path / "checkpoint", "a", NodeState(step=1), adapter, fused, {})
    plain = adamw(params, 1e-3, 0.0)
    assert load_checkpoint(tmp_path / "checkpoint", "a", peft_model, plain, {}).step == 1
    assert not plain.param_groups[0]["fused"]
    state, saved = plain.state[params[0]], fused.state[params[0]]
    assert state["exp_avg"].device == params[0].device and torch.equal(state["exp_avg"], saved["exp_avg"])


# ---------------------------------------------------------------------------------------------------- compile_blocks
@pytest.fixture
def fresh_compiler(monkeypatch):
    monkeypatch.setattr(base_module, "_compile_failure", [])


def _outputs(model) -> torch.Tensor:
    values, presence, target = canvas_batch()
    with torch.no_grad():
        return model(values, presence, target_mask=target).quantiles


def test_compile_blocks_is_a_checked_config_field_kept_out_of_adapters(tiny_base):
    with pytest.raises(ValueError, match="compile_blocks must be true or false"):
        GWMConfig(compile_blocks="yes")
    peft_model = _adapter_model(tiny_base)
    assert "compile_blocks" not in peft_model.peft_config["a"].gwm_config


def test_compile_that_torch_refuses_falls_back_with_one_warning(tiny_base, fresh_compiler, monkeypatch):
    reference = _outputs(GWMModel.from_pretrained(tiny_base, d_model=16).eval())

    def refuse(*args, **kwargs):
        raise RuntimeError("Dynamo is not supported on this Python")

    monkeypatch.setattr(torch, "compile", refuse)
    with pytest.warns(RuntimeWarning, match="compile_blocks: torch.compile does not work") as caught:
        model = GWMModel.from_pretrained(tiny_base, d_model=16, compile_blocks=True).eval()
        GWMModel.from_pretrained(tiny_base, d_model=16, compile_blocks=True)  # a second model: no second warning
    assert len([w for w in caught if "compile_blocks" in str(w.message)]) == 1
    assert not any(getattr(b, "_gwm_compiled", False) for b in model.transformer_blocks)
    assert torch.equal(_outputs(model), reference)


def test_compiler_failing_at_the_first_call_falls_back_with_one_warning(tiny_base, fresh_compiler, monkeypatch):
    """torch compiles on the first call (no C++ compiler, no Triton): that call and every later one run eagerly."""
    from torch._dynamo.exc import TorchDynamoException

    calls = []

    def broken_compile(fn, *args, **kwargs):
        def compiled(*a, **k):
            calls.append(1)
            raise TorchDynamoException("backend 'inductor' failed: no working C++ compiler")
        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    reference_model = GWMModel.from_pretrained(tiny_base, d_model=16)
    peft_model = _adapter_model(tiny_base, compile_blocks=True)
    assert all(getattr(b.base_layer, "_gwm_compiled", False) for b in peft_model.base_model.model.transformer_blocks)
    with pytest.warns(RuntimeWarning, match="no working C\\+\\+ compiler") as caught:
        train_steps(peft_model, steps=2)  # forward and backward, through the fallback
    assert len([w for w in caught if "compile_blocks" in str(w.message)]) == 1 and len(calls) == 1
    reference = get_peft_model(reference_model, LoopConfig(n_loops=2, fields=FIELDS), adapter_name="a")
    train_steps(reference, steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no further warning
        assert torch.equal(_outputs(peft_model.eval()), _outputs(reference.eval()))


def test_errors_of_the_block_itself_are_not_taken_for_a_compiler_failure(tiny_base, fresh_compiler, monkeypatch):
    def compile_that_runs_into_a_shape_error(fn, *args, **kwargs):
        def compiled(*a, **k):
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
        return compiled

    monkeypatch.setattr(torch, "compile", compile_that_runs_into_a_shape_error)
    model = GWMModel.from_pretrained(tiny_base, d_model=16, compile_blocks=True)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        _outputs(model)
    assert base_module._compile_failure == []


@no_cuda
def test_trainer_on_cuda_without_cuda_is_refused_with_one_sentence(tmp_path):
    from _tiny import tiny_curriculum, write_curriculum

    from modeling_gwm.training.curriculum import load_curriculum
    from modeling_gwm.training.trainer import DAGCurriculumTrainer

    curriculum = load_curriculum(write_curriculum(tmp_path, tiny_curriculum()))
    with pytest.raises(DeviceError, match=r"^device='cuda': CUDA is not available"):
        DAGCurriculumTrainer(curriculum=curriculum, output_dir=str(tmp_path / "out"), device="cuda")
    assert not (tmp_path / "out").exists()
