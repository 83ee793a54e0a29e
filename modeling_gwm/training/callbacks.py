"""Trainer callbacks, in the shape of transformers' `TrainerCallback`: hooks the trainer calls at fixed moments.

    trainer = DAGCurriculumTrainer(curriculum=curriculum, output_dir="out", callbacks=[MyCallback()])

Each hook gets the run's `TrainingArguments`, the node's `NodeState` (step, histories, best step) and keywords, always
`node` (the node's name). A hook returns nothing, except `on_micro_batch`, which returns the loss to backpropagate.
Hooks run on every process, except `on_save` of a checkpoint and of the adapter: on the main process, which writes them.

    on_node_begin(args, state, node)          the node's start state is in its adapter (a join: its merge), before its
                                               checkpoint is resumed and before its first step
    on_micro_batch(args, state, node, step, loss) -> loss
                                               each micro-batch's summed loss, before backward (`step`: the step it
                                               belongs to, `state.step + 1`)
    on_step_end(args, state, node)            after each step, a skipped one too (`state.step` counts it; its history
                                               entry is written), before its evaluation and checkpoint
    on_save(args, state, node, path)          after each file of a step checkpoint is written into its staging folder
                                               (`path`: the file), after the checkpoint is in place (`path`:
                                               `<node>/checkpoint`), after the node's adapter is written (`path`:
                                               `<node>/adapter_model.safetensors`) and when the node's folder holds
                                               everything but its COMPLETE marker (`path`: `<node>`)
    on_node_end(args, state, node, metrics)   the node is complete (its metrics.json record as `metrics`)

`FaultInjectionCallback` is what the crash and NaN tests install: a SIGKILL at a named moment, a NaN at a named step.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from ..run_folder import ADAPTER_WEIGHTS_FILE, CHECKPOINT_DIR, CHECKPOINT_STAGING
from .checkpoint import ADAPTER_FILE


class TrainerCallback:
    """A callback of `DAGCurriculumTrainer`: override the hooks you need (see the module's docstring); each default
    does nothing."""

    def on_node_begin(self, args, state, **kwargs) -> None:
        pass

    def on_micro_batch(self, args, state, loss, **kwargs):
        return loss

    def on_step_end(self, args, state, **kwargs) -> None:
        pass

    def on_save(self, args, state, **kwargs) -> None:
        pass

    def on_node_end(self, args, state, **kwargs) -> None:
        pass


# The crash moments `FaultInjectionCallback(crash_at=...)` knows, and the hook each fires in.
CRASH_MOMENTS = {
    "merge_done": "on_node_begin",  # the node's start state (a join: its merge) is in its adapter
    "step": "on_step_end",  # step <step> is done, not yet evaluated nor checkpointed
    "checkpoint_mid": "on_save",  # between the files of the step-<step> checkpoint (its first file written)
    "checkpoint_written": "on_save",  # the step-<step> checkpoint is in place
    "adapter_written": "on_save",  # the node's adapter files are written; metrics.json and COMPLETE not yet
    "before_complete": "on_save",  # everything of the node but its COMPLETE marker
    "node_done": "on_node_end",  # the node is complete, the next one not started
}


def _saved_moment(path: Path, node: str) -> str | None:
    """Which crash moment an `on_save` of `path` is (None: a later file of a checkpoint being written)."""
    if path.parent.name == CHECKPOINT_STAGING and path.parent.parent.name == node:
        return "checkpoint_mid" if path.name == ADAPTER_FILE else None  # the checkpoint's first file
    if path.parent.name == node and path.name in (CHECKPOINT_DIR, ADAPTER_WEIGHTS_FILE):
        return "checkpoint_written" if path.name == CHECKPOINT_DIR else "adapter_written"
    return "before_complete" if path.name == node else None


class FaultInjectionCallback(TrainerCallback):
    """Real faults at named moments, for the crash-safety and non-finite tests.

    `crash_at="<moment>:<node>[:<step>]"` SIGKILLs this process at that moment (`CRASH_MOMENTS`; `step`,
    `checkpoint_mid` and `checkpoint_written` take a step, the others none), e.g. `"checkpoint_mid:a:2"`.
    `nan_at="<node>:<step>"` multiplies every micro-batch loss of that step by NaN: a real NaN through backward and
    the trainer's non-finite guard.

    The training command line installs one when the environment asks for it (`GWM_CRASH_AT`, `GWM_INJECT_NAN`,
    read once at launch: the hook of the subprocess tests and `benchmarks/crash_stress.py`); in Python, pass
    `callbacks=[FaultInjectionCallback(...)]` to the trainer.
    """

    def __init__(self, crash_at: str | None = None, nan_at: str | None = None):
        if crash_at and crash_at.split(":", 1)[0] not in CRASH_MOMENTS:
            raise ValueError(f"crash_at {crash_at!r}: the moment must be one of {sorted(CRASH_MOMENTS)}")
        self.crash_at, self.nan_at = crash_at or None, nan_at or None

    @classmethod
    def from_environment(cls, environ=os.environ) -> FaultInjectionCallback | None:
        """The callback `GWM_CRASH_AT` / `GWM_INJECT_NAN` ask for, or None when neither is set."""
        crash_at, nan_at = environ.get("GWM_CRASH_AT"), environ.get("GWM_INJECT_NAN")
        return cls(crash_at, nan_at) if crash_at or nan_at else None

    def _crash(self, moment: str, node: str, step: int | None = None) -> None:
        if self.crash_at == (f"{moment}:{node}" if step is None else f"{moment}:{node}:{step}"):
            os.kill(os.getpid(), signal.SIGKILL)

    def on_node_begin(self, args, state, node: str, **kwargs) -> None:
        self._crash("merge_done", node)

    def on_micro_batch(self, args, state, loss, node: str, step: int, **kwargs):
        return loss * float("nan") if self.nan_at == f"{node}:{step}" else loss

    def on_step_end(self, args, state, node: str, **kwargs) -> None:
        self._crash("step", node, state.step)

    def on_save(self, args, state, node: str, path: Path, **kwargs) -> None:
        moment = _saved_moment(Path(path), node)
        if moment is not None:
            self._crash(moment, node, state.step if moment.startswith("checkpoint") else None)

    def on_node_end(self, args, state, node: str, **kwargs) -> None:
        self._crash("node_done", node)
