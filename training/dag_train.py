#!/usr/bin/env python
"""Train a GWM DAG curriculum.

    accelerate launch -q training/dag_train.py                   # the shipped demo, CPU, tiny base, no download
    accelerate launch -q training/dag_train.py --config my.yaml --base THUDM/CogVideoX-2b --mixed_precision bf16
    accelerate launch -q --multi_gpu --num_processes 2 training/dag_train.py   # DDP (gloo on CPU)

Spread one curriculum over several machines by running independent nodes as separate jobs that share --output_dir
(a shared file system; e.g. `--nodes macro` on one machine, `--nodes climate` on another, then `--nodes world
--no_deps`): a join waits for nothing and refuses to start, with a clear message, until its parents' adapters are
complete there. Give every job the same curriculum and --seed: the split run then gives the one-job adapters exactly.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from modeling_gwm.training_args import TrainingArguments

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "configuration", "curricula", "demo.yaml")


@dataclass
class ScriptArguments:
    """This script's flags besides the trainer's `TrainingArguments`."""

    config: str = field(default=DEMO, metadata={"help": "curriculum YAML (default: the shipped demo)"})
    dry_run: bool = field(default=False, metadata={"help": "validate and print the plan, train nothing"})


def _check_output_dir(script: ScriptArguments, args: TrainingArguments, curriculum) -> None:
    """Refuse, before any work, an --output_dir that is an input or whose writes would overwrite one.

    Inputs are the curriculum file, every local data file and a local base; the trainer writes dag.json, the run
    card and plot, one folder per node, final/, runs/ and .locks/ in --output_dir (see output_paths.check_output_dir).
    """
    from modeling_gwm.output_paths import check_output_dir
    from modeling_gwm.run_folder import RUN_WRITES

    inputs = {"--config": script.config, "--base": args.pretrained_model_id or curriculum.model.get("base"),
              **{f"source {name!r}": source.path for name, source in curriculum.sources.items()}}
    writes = [*RUN_WRITES, *(node.name for node in curriculum.nodes)]
    check_output_dir("--output_dir", args.output_dir, writes, inputs)


def _tell_launcher(message: str) -> None:
    """Under torchrun (multi-process `accelerate launch`), put the one-line error in its failure report.

    torchrun always ends a failed run with its own ChildFailedError report; its "Root Cause" then shows this line
    instead of "To enable traceback see ...". The file is torch elastic's per-process error file (a JSON message).
    """
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        try:
            with open(path, "w", encoding="utf-8") as handle:
                json.dump({"message": message, "timestamp": int(time.time())}, handle)
        except OSError:
            pass


def parse_args(argv=None) -> tuple[ScriptArguments, TrainingArguments]:
    """The script's own flags and the trainer's `TrainingArguments` (each declared once, as a dataclass field)."""
    parser = HfArgumentParser((ScriptArguments, TrainingArguments), description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no_deps", dest="with_ancestors", action="store_false",
                        help="with --nodes: do not train missing ancestors")
    # the command line's own defaults: the demo's folder, and accelerate's config (`accelerate launch`) for precision
    parser.set_defaults(output_dir="outputs/gwm-demo", mixed_precision=None)
    script, args, unknown = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True,
                                                               look_for_args_file=False)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return script, dataclasses.replace(args, hub_token=args.hub_token or os.environ.get("HF_TOKEN"))


def main(argv=None) -> int:
    script, args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    for noisy in ("datasets", "httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from modeling_gwm.curriculum import CurriculumError, load_curriculum
    from modeling_gwm.tabular import DataError

    try:
        curriculum = load_curriculum(script.config)
        if script.dry_run:
            print(curriculum.plan())
            print("\n```mermaid\n" + curriculum.mermaid() + "\n```")
            return 0
        _check_output_dir(script, args, curriculum)
        from modeling_gwm.trainer import DAGCurriculumTrainer, summary

        trainer = DAGCurriculumTrainer(curriculum=curriculum, args=args)
        dag = trainer.run()
        if trainer.accelerator.is_main_process:
            print(summary(dag, trainer.output_dir))
    except (CurriculumError, DataError, OSError, RuntimeError, ValueError) as err:
        if not isinstance(err, (CurriculumError, DataError)) and os.environ.get("GWM_DEBUG"):
            raise
        print(f"dag_train.py: error: {err}", file=sys.stderr)
        _tell_launcher(f"dag_train.py: error: {err}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
