"""A node's checkpoint: its adapter, its optimizer and its loop state, written and read back without pickle.

    <node>/checkpoint/   adapter.safetensors  optimizer.safetensors  trainer_state.json
                         (staged in <node>/.checkpoint.tmp, then swapped in whole by `atomic_replace_dir`)
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file

from .curriculum import CurriculumError
from .faults import crash_point
from .io_utils import atomic_replace_dir, atomic_save_safetensors, atomic_write_json, read_json, writing

STATE_FILE = "trainer_state.json"


@dataclass
class NodeState:
    """What a node's training loop carries between steps (and across a resume)."""

    step: int = 0
    history: list[dict] = field(default_factory=list)
    val_history: list[dict] = field(default_factory=list)
    skipped_nonfinite: int = 0


def read_state(folder: str | os.PathLike) -> dict | None:
    """The checkpoint's trainer_state.json (step, histories, config), or None when `folder` holds no checkpoint."""
    path = Path(folder) / STATE_FILE
    return read_json(path) if path.is_file() else None


def save(folder: str | os.PathLike, name: str, state: NodeState, adapter: dict[str, torch.Tensor],
         optimizer: torch.optim.Optimizer, config: dict) -> None:
    """Write `<node>/checkpoint/` for node `name` (`folder` is that checkpoint folder); the old one stays until the
    new one is complete."""
    folder = Path(folder)
    staging = str(folder.parent / ".checkpoint.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    with writing(f"the step-{state.step} checkpoint of node {name!r} to {staging}"):
        atomic_save_safetensors(os.path.join(staging, "adapter.safetensors"), adapter)
        crash_point("checkpoint_mid", name, state.step)
        tensors, meta = _optimizer_tensors(optimizer)
        atomic_save_safetensors(os.path.join(staging, "optimizer.safetensors"), tensors)
    atomic_write_json(os.path.join(staging, STATE_FILE),
                      {"step": state.step, "history": state.history, "val_history": state.val_history,
                       "skipped_nonfinite": state.skipped_nonfinite, "optimizer": meta, "config": config})
    atomic_replace_dir(staging, str(folder))
    crash_point("checkpoint_written", name, state.step)


def load(folder: str | os.PathLike, name: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         config: dict) -> NodeState | None:
    """Put the checkpoint in `folder` into adapter `name` of the PEFT `model` and into `optimizer`; None if none.

    A checkpoint that no longer fits (e.g. n_loops changed under --allow_changed_config) is a `CurriculumError`
    naming what changed since it was written (`config` is the node's current record).
    """
    saved = read_state(folder)
    if saved is None:
        return None
    try:
        # read on the CPU; PEFT copies the adapter onto its parameters' device, torch moves the optimizer state to
        # each parameter's device (and keeps this optimizer's implementation: fused on CUDA, the default on the CPU)
        set_peft_model_state_dict(model, load_file(os.path.join(folder, "adapter.safetensors"), device="cpu"),
                                  adapter_name=name)
        optimizer.load_state_dict(_optimizer_state(load_file(os.path.join(folder, "optimizer.safetensors"),
                                                             device="cpu"), saved["optimizer"], optimizer))
    except (RuntimeError, ValueError, KeyError) as err:
        changes = "; ".join(config_changes(saved.get("config") or {}, config)[:3]) or "unknown changes"
        raise CurriculumError(f"node {name!r}: its step-{saved.get('step')} checkpoint in {folder} does not fit "
                              f"the current settings ({changes}): {str(err).splitlines()[0]}; delete that "
                              "checkpoint folder to restart the node") from None
    return NodeState(step=saved["step"], history=saved["history"], val_history=saved["val_history"],
                     skipped_nonfinite=saved.get("skipped_nonfinite", 0))


def config_changes(recorded: dict, current: dict, prefix: str = "") -> list[str]:
    """`key old -> new` for every setting that differs (nested objects by dotted key, in the current order)."""
    changes = []
    for key in [*current, *(k for k in recorded if k not in current)]:
        old, new = recorded.get(key, "(absent)"), current.get(key, "(absent)")
        if isinstance(old, dict) and isinstance(new, dict):
            changes += config_changes(old, new, f"{prefix}{key}.")
        elif old != new:
            changes.append(f"{prefix}{key} {old!r} -> {new!r}")
    return changes


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state as flat tensors (for safetensors) plus JSON-able metadata: no pickle anywhere."""
    state = optimizer.state_dict()
    tensors = {f"{index}.{key}": value for index, entries in state["state"].items() for key, value in entries.items()
               if torch.is_tensor(value)}
    return tensors, {"param_groups": state["param_groups"]}


# How an optimizer runs, not what it learned: a checkpoint written on a GPU (fused AdamW) resumes on a CPU and back.
_IMPLEMENTATION_KEYS = ("fused", "foreach", "capturable", "differentiable")


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: dict, optimizer: torch.optim.Optimizer) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    groups = [{**saved, **{key: group[key] for key in _IMPLEMENTATION_KEYS if key in group}}
              for saved, group in zip(meta["param_groups"], optimizer.param_groups)]
    return {"state": state, "param_groups": groups + meta["param_groups"][len(groups):]}
