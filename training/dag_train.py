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
import json
import logging
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "configuration", "curricula", "demo.yaml")


def _steps_flag(value: str) -> int:
    """argparse type of --max_steps / --gradient_accumulation_steps: a whole number in [1, the steps limit]."""
    from modeling_gwm.curriculum import NODE_LIMITS

    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of steps, got {value!r}") from None
    if not 1 <= number <= NODE_LIMITS["steps"]:
        raise argparse.ArgumentTypeError(f"expected a whole number of steps in [1, {NODE_LIMITS['steps']}] "
                                         f"(curriculum.NODE_LIMITS), got {value}")
    return number


def _check_output_dir(args, curriculum) -> None:
    """Refuse, before any work, an --output_dir that is an input or whose writes would overwrite one.

    Inputs are the curriculum file, every local data file and a local base; the trainer writes dag.json, the run
    card and plot, one folder per node, final/, runs/ and .locks/ in --output_dir (see output_paths.check_output_dir).
    """
    from modeling_gwm.output_paths import check_output_dir
    from modeling_gwm.run_folder import RUN_WRITES

    inputs = {"--config": args.config, "--base": args.base or curriculum.model.get("base"),
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


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEMO, help="curriculum YAML (default: the shipped demo)")
    parser.add_argument("--output_dir", default="outputs/gwm-demo", help="where node adapters, cards and dag.json go")
    parser.add_argument("--base", default=None, help="Hub id or local CogVideoX checkpoint (overrides model.base)")
    parser.add_argument("--backbone", choices=["cogvideox", "scratch"], default=None)
    parser.add_argument("--nodes", nargs="+", default=None, help="train only these nodes (and missing ancestors)")
    parser.add_argument("--no_deps", action="store_true", help="with --nodes: do not train missing ancestors")
    parser.add_argument("--resume", action="store_true", help="skip complete nodes, continue half-trained ones")
    parser.add_argument("--allow_changed_config", action="store_true",
                        help="with --resume: continue although the curriculum or settings changed since the run "
                             "started (the new settings take over; refused by default)")
    parser.add_argument("--max_steps", type=_steps_flag, default=None, help="cap every node's steps (quick runs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--gradient_accumulation_steps", type=_steps_flag, default=1)
    parser.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                        help="default: accelerate's config (no on CPU)")
    parser.add_argument("--report_to", choices=["none", "tensorboard", "trackio", "wandb"], default="none")
    parser.add_argument("--push_to_hub", action="store_true", help="publish every node (one subfolder each)")
    parser.add_argument("--hub_model_id", default=None, help="user/repo for --push_to_hub")
    parser.add_argument("--hub_token", default=None, help="default: HF_TOKEN / the cached login")
    parser.add_argument("--nonfinite", choices=["stop", "skip"], default="stop",
                        help="on a NaN/inf loss or gradient: stop the node (its last checkpoint kept) or skip the step")
    parser.add_argument("--dry_run", action="store_true", help="validate and print the plan, train nothing")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    for noisy in ("datasets", "httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from modeling_gwm.curriculum import CurriculumError, load_curriculum
    from modeling_gwm.tabular import DataError

    try:
        curriculum = load_curriculum(args.config)
        if args.dry_run:
            print(curriculum.plan())
            print("\n```mermaid\n" + curriculum.mermaid() + "\n```")
            return 0
        _check_output_dir(args, curriculum)
        from modeling_gwm.trainer import DAGCurriculumTrainer, summary

        trainer = DAGCurriculumTrainer(
            curriculum=curriculum, output_dir=args.output_dir, backbone=args.backbone, pretrained_model_id=args.base,
            seed=args.seed, resume=args.resume, max_steps=args.max_steps, only_nodes=args.nodes,
            with_ancestors=not args.no_deps, mixed_precision=args.mixed_precision,
            gradient_accumulation_steps=args.gradient_accumulation_steps, report_to=args.report_to,
            gradient_checkpointing=args.gradient_checkpointing, push_to_hub=args.push_to_hub,
            hub_model_id=args.hub_model_id, hub_token=args.hub_token or os.environ.get("HF_TOKEN"),
            nonfinite=args.nonfinite, allow_changed_config=args.allow_changed_config,
        )
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
