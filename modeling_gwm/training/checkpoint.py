"""A node's checkpoint: its adapter, its optimizer and its loop state, written and read back without pickle.

    <node>/checkpoint/   adapter.safetensors  optimizer.safetensors  best_adapter.safetensors  trainer_state.json
                         (staged in <node>/.checkpoint.tmp, then swapped in whole by `atomic_replace_dir`)

best_adapter.safetensors is the adapter at the best validation loss so far (what the node writes at its end);
trainer_state.json holds the step, the histories, the best step and the learning-rate scheduler's state.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..io_utils import atomic_replace_dir, atomic_save_safetensors, atomic_write_json, read_json, writing
from ..run_folder import CHECKPOINT_STAGING
from .curriculum import CurriculumError

ADAPTER_FILE = "adapter.safetensors"  # written first
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
BEST_FILE = "best_adapter.safetensors"


@dataclass
class NodeState:
    """What a node's training loop carries between steps (and across a resume)."""

    step: int = 0
    history: list[dict] = field(default_factory=list)
    val_history: list[dict] = field(default_factory=list)
    skipped_nonfinite: int = 0
    best_step: int | None = None  # the evaluated step with the lowest validation loss so far
    best_val_loss: float | None = None
    best_adapter: dict[str, torch.Tensor] | None = None  # the adapter at `best_step`

    def offer(self, step: int, val_loss: float, adapter: dict[str, torch.Tensor]) -> bool:
        """Record an evaluation; keep `adapter` (detached copies) when it is a new best. Returns whether it was."""
        self.val_history.append({"step": step, "val_loss": val_loss})
        if val_loss == val_loss and (self.best_val_loss is None or val_loss < self.best_val_loss):  # NaN never wins
            self.best_step, self.best_val_loss = step, val_loss
            self.best_adapter = {k: v.detach().clone() for k, v in adapter.items()}
            return True
        return False

    def evaluations_since_best(self) -> int:
        """Evaluations after the best one (early stopping's count); all of them while none has been finite."""
        return sum(1 for entry in self.val_history if self.best_step is None or entry["step"] > self.best_step)


def read_state(folder: str | os.PathLike) -> dict | None:
    """The checkpoint's trainer_state.json (step, histories, config), or None when `folder` holds no checkpoint."""
    path = Path(folder) / STATE_FILE
    return read_json(path) if path.is_file() else None


def save(folder: str | os.PathLike, name: str, state: NodeState, adapter: dict[str, torch.Tensor],
         optimizer: torch.optim.Optimizer, config: dict, scheduler=None,
         on_file: Callable[[Path], None] | None = None) -> None:
    """Write `<node>/checkpoint/` for node `name` (`folder` is that checkpoint folder); the old one stays until the
    new one is complete. `on_file(path)` is called after each file is written into the staging folder (the
    trainer's `on_save` callbacks)."""
    folder = Path(folder)
    staging = str(folder.parent / CHECKPOINT_STAGING)

    def written(filename: str) -> None:
        if on_file is not None:
            on_file(Path(staging) / filename)

    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        with writing(f"the step-{state.step} checkpoint of node {name!r} to {staging}"):
            atomic_save_safetensors(os.path.join(staging, ADAPTER_FILE), adapter)
            written(ADAPTER_FILE)
            tensors, meta = _optimizer_tensors(optimizer)
            atomic_save_safetensors(os.path.join(staging, OPTIMIZER_FILE), tensors)
            written(OPTIMIZER_FILE)
            if state.best_adapter is not None:
                atomic_save_safetensors(os.path.join(staging, BEST_FILE), state.best_adapter)
                written(BEST_FILE)
        atomic_write_json(os.path.join(staging, STATE_FILE),
                          {"step": state.step, "history": state.history, "val_history": state.val_history,
                           "skipped_nonfinite": state.skipped_nonfinite, "best_step": state.best_step,
                           "best_val_loss": state.best_val_loss,
                           "scheduler": scheduler.state_dict() if scheduler is not None else {},
                           "optimizer": meta, "config": config})
        written(STATE_FILE)
        atomic_replace_dir(staging, str(folder))
    except BaseException:  # a full disk, an interrupt: no half-written staging folder stays behind
        shutil.rmtree(staging, ignore_errors=True)
        raise


def load(folder: str | os.PathLike, name: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         config: dict, scheduler=None) -> NodeState | None:
    """Put the checkpoint in `folder` into adapter `name` of the PEFT `model`, into `optimizer` and into the
    learning-rate `scheduler`; returns the loop state (best adapter included), None if there is no checkpoint.

    A checkpoint that no longer fits (e.g. n_loops changed under --allow_changed_config) is a `CurriculumError`
    naming what changed since it was written (`config` is the node's current record).
    """
    saved = read_state(folder)
    if saved is None:
        return None
    _check_saved(saved, Path(folder) / STATE_FILE, config.get("steps"))
    try:
        # read on the CPU; PEFT copies the adapter onto its parameters' device, torch moves the optimizer state to
        # each parameter's device (and keeps this optimizer's implementation: fused on CUDA, the default on the CPU)
        files = [ADAPTER_FILE, OPTIMIZER_FILE]
        files += [BEST_FILE] if os.path.isfile(os.path.join(folder, BEST_FILE)) else []
        tensors = {f: load_file(os.path.join(folder, f), device="cpu") for f in files}
    except (SafetensorError, OSError) as err:
        raise CurriculumError(f"node {name!r}: its step-{saved['step']} checkpoint in {folder} is damaged "
                              f"({str(err).splitlines()[0]}); delete that checkpoint folder to restart the node, or "
                              "restore it") from None
    best_adapter = tensors.get(BEST_FILE)  # set into the model when it is written
    try:
        set_peft_model_state_dict(model, tensors[ADAPTER_FILE], adapter_name=name)
        optimizer.load_state_dict(_optimizer_state(tensors[OPTIMIZER_FILE], saved["optimizer"], optimizer))
        if scheduler is not None and saved.get("scheduler"):
            scheduler.load_state_dict(saved["scheduler"])
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        changes = "; ".join(config_changes(saved.get("config") or {}, config)[:3]) or "unknown changes"
        raise CurriculumError(f"node {name!r}: its step-{saved.get('step')} checkpoint in {folder} does not fit "
                              f"the current settings ({changes}): {str(err).splitlines()[0]}; delete that "
                              "checkpoint folder to restart the node") from None
    return NodeState(step=saved["step"], history=saved["history"], val_history=saved["val_history"],
                     skipped_nonfinite=saved.get("skipped_nonfinite", 0), best_step=saved.get("best_step"),
                     best_val_loss=saved.get("best_val_loss"), best_adapter=best_adapter)


def _check_saved(saved: dict, path: Path, steps) -> None:
    """trainer_state.json's loop state, type- and range-checked: a step outside [0, steps] would train too long."""
    high = steps if isinstance(steps, int) and not isinstance(steps, bool) else None
    step = saved.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0 or (high is not None and step > high):
        raise CurriculumError(f"{path}: step must be an integer in [0, {high if high is not None else 'steps'}], got "
                              f"{step!r:.60}; restore the file or delete the checkpoint folder to restart the node")
    for key, kind in (("history", list), ("val_history", list), ("optimizer", dict)):
        if not isinstance(saved.get(key), kind):
            raise CurriculumError(f"{path}: {key} must be a {kind.__name__}, got {saved.get(key)!r:.60}; restore the "
                                  "file or delete the checkpoint folder to restart the node")
    skipped = saved.get("skipped_nonfinite", 0)
    if isinstance(skipped, bool) or not isinstance(skipped, int) or not 0 <= skipped <= step:
        raise CurriculumError(f"{path}: skipped_nonfinite must be an integer in [0, step], got {skipped!r:.60}")


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
