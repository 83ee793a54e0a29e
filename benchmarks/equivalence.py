"""How far gradient accumulation and two DDP processes move the adapters from a one-process run (same global batch).

    HF_HUB_OFFLINE=1 python benchmarks/equivalence.py                  # the demo curriculum, 20 steps a node
    HF_HUB_OFFLINE=1 python benchmarks/equivalence.py --max_steps 120 --out equivalence.json

Trains the curriculum three times through `training/dag_train.py` (one process; `--gradient_accumulation_steps 2`;
`accelerate launch --multi_gpu --num_processes 2`, gloo on a CPU) and prints, per node, the largest absolute
difference of any adapter tensor against the one-process run. Differences come only from float summation order
(amplified by Adam); the tests assert 1e-4 (`tests/test_dag_train.py`, `tests/test_trainer.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DAG_TRAIN = REPO / "training" / "dag_train.py"
ACCELERATE = [sys.executable, "-m", "accelerate.commands.accelerate_cli"]


def _train(launcher: list[str], out: Path, args: list[str]) -> None:
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*launcher, str(DAG_TRAIN), "--output_dir", str(out), *args], env=env,
                          capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"equivalence.py: training into {out} failed:\n{done.stderr[-3000:]}")


def _max_difference(a: Path, b: Path) -> dict[str, float]:
    from safetensors.torch import load_file

    out = {}
    for node in sorted(p.name for p in a.iterdir() if (p / "adapter_model.safetensors").is_file()):
        x, y = load_file(a / node / "adapter_model.safetensors"), load_file(b / node / "adapter_model.safetensors")
        out[node] = max(float((x[k] - y[k]).abs().max()) for k in x)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="curriculum YAML (default: the shipped demo)")
    parser.add_argument("--max_steps", type=int, default=20, help="cap every node's steps")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    common = ["--max_steps", str(args.max_steps), *(["--config", args.config] if args.config else [])]
    work = Path(tempfile.mkdtemp(prefix="gwm-equivalence-"))
    _train([sys.executable], work / "one", common)
    _train([sys.executable], work / "accumulation", [*common, "--gradient_accumulation_steps", "2"])
    _train([*ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2"], work / "two", common)
    result = {"config": args.config or "configuration/curricula/demo.yaml", "max_steps": args.max_steps,
              "accumulation_2": _max_difference(work / "one", work / "accumulation"),
              "processes_2": _max_difference(work / "one", work / "two"),
              "accumulation_2_vs_processes_2": _max_difference(work / "accumulation", work / "two")}
    for key, label in (("accumulation_2", "gradient accumulation 2 vs one process"),
                       ("processes_2", "2 DDP processes vs one process"),
                       ("accumulation_2_vs_processes_2", "gradient accumulation 2 vs 2 DDP processes")):
        diffs = result[key]
        print(f"{label}: max |adapter diff| {max(diffs.values()):.2e} "
              f"({', '.join(f'{n} {d:.1e}' for n, d in diffs.items())})")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
