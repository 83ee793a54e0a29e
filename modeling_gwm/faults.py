"""Fault-injection points for the crash-safety tests; each does nothing unless a test sets its environment variable.

`GWM_CRASH_AT=<phase>:<node>[:<step>]` SIGKILLs the process at that point (tests/test_reliability.py,
benchmarks/crash_stress.py); `GWM_INJECT_NAN=<node>:<step>` turns that step's loss into NaN (a real run, a real NaN).
"""

from __future__ import annotations

import os
import signal

import torch


def crash_point(phase: str, node: str, step: int | None = None) -> None:
    """SIGKILL this process here when `GWM_CRASH_AT` names this point.

    Phases: step, checkpoint_mid, checkpoint_written (with a step); merge_done, adapter_written, before_complete,
    node_done (without).
    """
    spec = os.environ.get("GWM_CRASH_AT")
    if spec and spec == (f"{phase}:{node}" if step is None else f"{phase}:{node}:{step}"):
        os.kill(os.getpid(), signal.SIGKILL)


def inject_nan(loss: torch.Tensor, node: str, step: int) -> torch.Tensor:
    """`loss` itself, or `loss * NaN` when `GWM_INJECT_NAN` names this node and step."""
    if os.environ.get("GWM_INJECT_NAN") == f"{node}:{step}":
        return loss * float("nan")
    return loss
