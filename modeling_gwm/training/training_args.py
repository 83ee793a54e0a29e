"""The training arguments of a curriculum run, declared once: `DAGCurriculumTrainer(args=...)` takes them and
`training/dag_train.py` parses them from its command line with transformers' `HfArgumentParser`.

A field's name is the trainer's keyword; `aliases` in its metadata are the command line's own names (`--base`,
`--nodes`). The defaults are the Python API's; dag_train.py sets two of its own (`--output_dir`, `--mixed_precision`).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Literal


class StepCount(int):
    """Type of a steps argument on the command line: a whole number in [1, curriculum.NODE_LIMITS['steps']].

    As an argparse `type` (what `HfArgumentParser` takes from the annotation) it turns the flag's text into a plain
    int or refuses it with a one-line message naming the limit.
    """

    def __new__(cls, value: str) -> int:  # type: ignore[misc]
        from .curriculum import NODE_LIMITS

        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number of steps, got {value!r}") from None
        if not 1 <= number <= NODE_LIMITS["steps"]:
            raise argparse.ArgumentTypeError(f"expected a whole number of steps in [1, {NODE_LIMITS['steps']}] "
                                             f"(curriculum.NODE_LIMITS), got {value}")
        return number


def _arg(default, help: str, repr: bool = True, **metadata) -> field:  # noqa: A002 (argparse's names)
    return field(default=default, repr=repr, metadata={"help": help, **metadata})


@dataclass
class TrainingArguments:
    """How to run a curriculum: where it goes, which nodes, resuming, precision, trackers, the Hub.

    What each node learns (steps, learning rate, batch, fields) is the curriculum's; these are the run's settings.
    """

    output_dir: str = _arg("outputs/gwm", "where node adapters, cards and dag.json go")
    pretrained_model_id: str | None = _arg(None, "Hub id or local CogVideoX checkpoint (overrides model.base)",
                                           aliases=["--base"])
    backbone: Literal["cogvideox", "scratch"] | None = _arg(None, "overrides model.backbone")
    only_nodes: list[str] | None = _arg(None, "train only these nodes (and missing ancestors)", aliases=["--nodes"],
                                        metavar="NODE")
    with_ancestors: bool = _arg(True, "with --nodes: also train missing ancestors (--no_deps: do not)")
    resume: bool = _arg(False, "skip complete nodes, continue half-trained ones")
    allow_changed_config: bool = _arg(False, "with --resume: continue although the curriculum or settings changed "
                                             "since the run started (the new settings take over; refused by default)")
    max_steps: StepCount | None = _arg(None, "cap every node's steps (quick runs); never raises them")
    steps: StepCount | None = _arg(None, "train every node this many steps instead of the curriculum's (up or down; "
                                         "--max_steps still caps)")
    seed: int = _arg(0, "the run's seed: batches, masks and the adapters' init (seeded with model.seed + --seed)")
    gradient_checkpointing: bool = _arg(False, "recompute the frozen blocks' activations in backward (less memory)")
    gradient_accumulation_steps: StepCount = _arg(1, "split each step's batch into this many micro-batches")
    mixed_precision: Literal["no", "fp16", "bf16"] | None = _arg("no", "default on the command line: accelerate's "
                                                                       "config (no on CPU)")
    report_to: Literal["none", "tensorboard", "trackio", "wandb"] = _arg("none", "log every step's loss there")
    push_to_hub: bool = _arg(False, "publish every node (one subfolder each)")
    hub_model_id: str | None = _arg(None, "user/repo for --push_to_hub")
    hub_token: str | None = _arg(None, "default: HF_TOKEN / the cached login", repr=False)  # never in a log line
    nonfinite: Literal["stop", "skip"] = _arg("stop", "on a NaN/inf loss or gradient: stop the node (its last "
                                                      "checkpoint kept) or skip the step")
