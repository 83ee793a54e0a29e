"""The training command line: `gwm train` and `training/dag_train.py` (a thin script around it), alike under
`accelerate launch`.

    gwm train                                                      # the shipped demo curriculum (base: --base DIR)
    accelerate launch -q training/dag_train.py                     # the same from a source checkout
    accelerate launch -q --config_file configuration/accelerate/cpu_2proc.yaml training/dag_train.py   # DDP, CPU

Its flags are `TrainingArguments` (parsed by transformers' `HfArgumentParser`) plus --config, --dry_run and --no_deps.
Spread one curriculum over several machines by running independent nodes as separate jobs that share --output_dir
(e.g. `--nodes macro` on one machine, `--nodes climate` on another, then `--nodes world --no_deps`): a join refuses to
start, with a clear message, until its parents' adapters are complete there. Give every job the same curriculum and
--seed: the split run then gives the one-job adapters exactly.
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

from ..resources import DEMO_CURRICULUM, shipped_path
from .training_args import TrainingArguments

logger = logging.getLogger(__name__)



@dataclass
class ScriptArguments:
    """This script's flags besides the trainer's `TrainingArguments`."""

    config: str = field(default=DEMO_CURRICULUM, metadata={"help": "curriculum YAML (default: the shipped demo)"})
    dry_run: bool = field(default=False, metadata={"help": "validate and print the plan, train nothing"})


def _check_output_dir(script: ScriptArguments, args: TrainingArguments, curriculum) -> None:
    """Refuse, before any work, an --output_dir that is an input or whose writes would overwrite one.

    Inputs are the curriculum file, every local data file and a local base; the trainer writes dag.json, the run
    card and plot, one folder per node, final/, runs/ and .locks/ in --output_dir (see output_paths.check_output_dir).
    """
    from ..output_paths import check_output_dir
    from ..run_folder import RUN_WRITES

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


def parse_args(argv=None, prog: str | None = None) -> tuple[ScriptArguments, TrainingArguments]:
    """The script's own flags and the trainer's `TrainingArguments` (each declared once, as a dataclass field)."""
    parser = HfArgumentParser((ScriptArguments, TrainingArguments), prog=prog, description=__doc__,
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


def warn_if_one_process_of_several(environ=os.environ) -> str | None:
    """`accelerate launch --num_processes 2` without `--multi_gpu` (or a config saying so) starts ONE process through
    its simple launcher, which sets MASTER_ADDR for the processes it did not start and no WORLD_SIZE; a run that
    believes it is distributed then trains alone. Say so, once, with the launch that works (returns the message)."""
    if "ACCELERATE_USE_CPU" not in environ or "MASTER_ADDR" not in environ or "WORLD_SIZE" in environ:
        return None
    message = ("accelerate launch was asked for several processes but started one (no --multi_gpu): this run trains "
               "in a single process. For DDP on the CPU launch with --config_file "
               f"{shipped_path('accelerate', 'cpu_2proc.yaml')} (or --multi_gpu --num_processes N).")
    logger.warning(message)
    return message


def main(argv=None, prog: str = "dag_train.py") -> int:
    """Train (or with --dry_run plan) a curriculum; 0 when done, 2 on a user error (one line `PROG: error: ...`)."""
    script, args = parse_args(argv, prog=prog)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    for noisy in ("datasets", "httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from ..tabular import DataError
    from .curriculum import CurriculumError, load_curriculum

    warn_if_one_process_of_several()
    try:
        curriculum = load_curriculum(script.config)
        if script.dry_run:
            print(curriculum.plan())
            print("\n```mermaid\n" + curriculum.mermaid() + "\n```")
            return 0
        _check_output_dir(script, args, curriculum)
        from .callbacks import FaultInjectionCallback
        from .trainer import DAGCurriculumTrainer, summary

        # the crash and NaN tests' hook into a launched run: GWM_CRASH_AT=<moment>:<node>[:<step>] SIGKILLs the process
        # at that moment, GWM_INJECT_NAN=<node>:<step> makes that step's loss NaN (callbacks.FaultInjectionCallback);
        # read here, once, never during training
        faults = FaultInjectionCallback.from_environment()
        trainer = DAGCurriculumTrainer(curriculum=curriculum, args=args, callbacks=[faults] if faults else None)
        dag = trainer.run()
        if trainer.accelerator.is_main_process:
            print(summary(dag, trainer.output_dir))
    except (CurriculumError, DataError, OSError, RuntimeError, ValueError) as err:
        if not isinstance(err, (CurriculumError, DataError)) and os.environ.get("GWM_DEBUG"):
            raise
        print(f"{prog}: error: {err}", file=sys.stderr)
        _tell_launcher(f"{prog}: error: {err}")
        return 2
    return 0


# `python -m modeling_gwm.training.train_cli` / `accelerate launch -m modeling_gwm.training.train_cli`
if __name__ == "__main__":
    sys.exit(main(prog="gwm train"))
