#!/usr/bin/env python
"""Crash-safety stress: SIGKILL the DAG trainer at many moments, resume, and compare with an uninterrupted run.

    HF_HUB_OFFLINE=1 python benchmarks/crash_stress.py --kills 50                 # 50 random-time kills (minutes)
    HF_HUB_OFFLINE=1 python benchmarks/crash_stress.py --crash_at step:a:1 node_done:a --report out.json

Every run is `training/dag_train.py`'s `main()` in a forked child of this process (the heavy imports happen once),
so a kill is a real SIGKILL of a real training process. After each kill the output directory is checked: every node
with a COMPLETE marker has an adapter that loads and metrics that parse, dag.json parses, a step checkpoint (if any)
loads. After the chain of kills and `--resume` runs finishes, every node's adapter is compared with the uninterrupted
reference run (same seed): the report gives the largest absolute difference of any adapter tensor.
`--crash_at` uses the training command's `GWM_CRASH_AT=<moment>:<node>[:<step>]` hook (a `FaultInjectionCallback`:
deterministic moments); `--kills` kills at random times instead.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "training"))
DATA = REPO / "configuration" / "data"
TINY_BASE = REPO / "configuration" / "tiny-cogvideox"


def tiny_dag(steps: int = 4, checkpoint_every: int = 2) -> dict:
    """Two roots and a join on the shipped data and tiny base: every kind of moment in a few seconds."""
    return {
        "model": {"base": str(TINY_BASE), "d_model": 16, "seed": 0},
        "defaults": {"steps": steps, "batch_size": 4, "context_len": 12, "horizon": 2, "n_loops": 2,
                     "learning_rate": 0.005, "eval_windows": 8, "checkpoint_every": checkpoint_every,
                     "eval_every": 1},  # every step: the best state so far lives in each checkpoint
        "sources": {
            "us_macro": {"path": str(DATA / "us_macro_quarterly.csv"), "frequency": "QS",
                         "fields": {"macro.us.unemployment": "unemp", "macro.us.inflation": "infl"}},
            "co2": {"path": str(DATA / "co2_mauna_loa_monthly.csv"), "frequency": "MS",
                    "fields": {"climate.co2.mauna_loa": "co2"}},
        },
        "nodes": [
            {"name": "a", "sources": ["us_macro"]},
            {"name": "b", "sources": ["co2"]},
            {"name": "j", "parents": ["a", "b"], "sources": ["us_macro", "co2"],
             "merge": {"method": "linear", "weights": [0.6, 0.4]}},
        ],
    }


# ---------------------------------------------------------------------------------------------------- checks
def check_outputs(output_dir: str | os.PathLike) -> list[str]:
    """Everything that looks complete must be complete: returns the problems found (empty = consistent)."""
    from safetensors.numpy import load_file

    out, problems = Path(output_dir), []

    def loads(path: Path, kind: str) -> None:
        try:
            load_file(str(path)) if kind == "safetensors" else json.loads(path.read_text())
        except Exception as err:  # noqa: BLE001 - any failure to load is the finding
            problems.append(f"{path}: {type(err).__name__}: {err}")

    if (out / "dag.json").exists():
        loads(out / "dag.json", "json")
    for folder in sorted(p for p in out.iterdir() if p.is_dir()) if out.is_dir() else []:
        if (folder / "COMPLETE").exists() or folder.name == "final":
            for name in ("adapter_config.json", "metrics.json"):
                loads(folder / name, "json")
            loads(folder / "adapter_model.safetensors", "safetensors")
        checkpoint = folder / "checkpoint"
        if checkpoint.is_dir():
            loads(checkpoint / "trainer_state.json", "json")
            loads(checkpoint / "adapter.safetensors", "safetensors")
            loads(checkpoint / "optimizer.safetensors", "safetensors")
            if (checkpoint / "best_adapter.safetensors").exists():  # the best state so far, once one was evaluated
                loads(checkpoint / "best_adapter.safetensors", "safetensors")
    return problems


def max_adapter_diff(dir_a: str | os.PathLike, dir_b: str | os.PathLike, nodes: list[str]) -> float:
    """Largest |difference| of any adapter tensor of any node between two output directories."""
    import numpy as np
    from safetensors.numpy import load_file

    worst = 0.0
    for node in nodes:
        a = load_file(str(Path(dir_a) / node / "adapter_model.safetensors"))
        b = load_file(str(Path(dir_b) / node / "adapter_model.safetensors"))
        if set(a) != set(b):
            return float("inf")
        worst = max([worst] + [float(np.abs(a[k].astype("float64") - b[k].astype("float64")).max()) for k in a])
    return worst


# ---------------------------------------------------------------------------------------------------- runs
def run_forked(argv: list[str], env: dict[str, str] | None = None, kill_after: float | None = None,
               log: str | None = None) -> int:
    """Run dag_train.main(argv) in a forked child; returns its exit code, or -9 if it was SIGKILLed."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            if log:
                fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
            os.environ.update(env or {})
            import dag_train

            code = dag_train.main(argv)
        except BaseException:  # noqa: BLE001 - report and leave the child, never return into the parent's code
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    if kill_after is not None:
        deadline = time.monotonic() + kill_after
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.01)
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _preload() -> None:
    """Import the heavy stack once, before forking (children inherit it; nothing is computed in this process)."""
    import dag_train  # noqa: F401
    import datasets.load  # noqa: F401
    import datasets.packaged_modules.csv  # noqa: F401
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.backends.backend_agg  # noqa: F401
    import matplotlib.figure  # noqa: F401
    from diffusers import CogVideoXTransformer3DModel  # noqa: F401

    import modeling_gwm.hub.hub  # noqa: F401
    import modeling_gwm.training.trainer  # noqa: F401


def crash_chain(config: str, workdir: str, specs: list[str], seed: int = 0) -> dict:
    """Reference run, then one run killed at each `GWM_CRASH_AT` spec in turn (each resuming), then a final resume."""
    ref, out = os.path.join(workdir, "reference"), os.path.join(workdir, "crashed")
    log = os.path.join(workdir, "runs.log")
    base = ["--config", config, "--seed", str(seed)]
    started = time.time()
    report: dict = {"reference_rc": run_forked(base + ["--output_dir", ref], log=log), "kills": []}
    report["reference_s"] = round(time.time() - started, 2)
    for i, spec in enumerate(specs):
        rc = run_forked(base + ["--output_dir", out] + (["--resume"] if i else []), {"GWM_CRASH_AT": spec}, log=log)
        report["kills"].append({"spec": spec, "rc": rc, "problems": check_outputs(out),
                                "complete": sorted(p.parent.name for p in Path(out).glob("*/COMPLETE"))})
    report["final_rc"] = run_forked(base + ["--output_dir", out, "--resume"], log=log)
    report["problems"] = check_outputs(out)
    nodes = yaml.safe_load(Path(config).read_text())["nodes"]
    report["max_abs_diff"] = max_adapter_diff(ref, out, [n["name"] for n in nodes])
    report["total_s"] = round(time.time() - started, 2)
    return report


def random_kills(config: str, workdir: str, kills: int, seed: int = 0, rng_seed: int = 0) -> dict:
    """Kill at `kills` random moments: chains of kill / --resume until each chain finishes, each compared."""
    rng = random.Random(rng_seed)
    ref = os.path.join(workdir, "reference")
    log = os.path.join(workdir, "runs.log")
    base = ["--config", config, "--seed", str(seed)]
    nodes = [n["name"] for n in yaml.safe_load(Path(config).read_text())["nodes"]]
    started = time.time()
    assert run_forked(base + ["--output_dir", ref], log=log) == 0, f"reference run failed, see {log}"
    full = time.time() - started
    report: dict = {"reference_s": round(full, 2), "chains": [], "problems": []}
    done = 0
    while done < kills:
        out = os.path.join(workdir, f"chain{len(report['chains'])}")
        chain = {"kill_times_s": [], "resumes": 0}
        first = True
        while True:
            at = rng.uniform(0.0, full)
            began = time.time()
            rc = run_forked(base + ["--output_dir", out] + ([] if first else ["--resume"]),
                            kill_after=at if done < kills else None, log=log)
            if rc == 0:
                if first:  # an uninterrupted run: kill within the time a whole run takes now (the load varies)
                    full = time.time() - began
                break
            first = False
            if rc != -signal.SIGKILL:
                report["problems"].append(f"{out}: run exited {rc} (see {log})")
                break
            done += 1
            chain["kill_times_s"].append(round(at, 2))
            report["problems"] += check_outputs(out)
            chain["resumes"] += 1
        chain["max_abs_diff"] = max_adapter_diff(ref, out, nodes) if rc == 0 else None
        report["chains"].append(chain)
        print(f"chain {len(report['chains'])}: {len(chain['kill_times_s'])} kill(s) at {chain['kill_times_s']} s, "
              f"max |adapter diff| {chain['max_abs_diff']}; {done}/{kills} kills", flush=True)
    diffs = [c["max_abs_diff"] for c in report["chains"] if c["max_abs_diff"] is not None]
    report.update(kills=done, max_abs_diff=max(diffs) if diffs else None, total_s=round(time.time() - started, 1))
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="curriculum YAML (default: a 3-node tiny curriculum)")
    parser.add_argument("--workdir", default=None, help="default: a new temporary folder")
    parser.add_argument("--kills", type=int, default=50, help="random-time kills (ignored with --crash_at)")
    parser.add_argument("--crash_at", nargs="+", default=None, help="GWM_CRASH_AT specs, killed in this order")
    parser.add_argument("--steps", type=int, default=8, help="steps per node of the default curriculum")
    parser.add_argument("--rng_seed", type=int, default=0)
    parser.add_argument("--report", default=None, help="write the JSON report here")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny matrices: one thread is faster, and no fork-after-OpenMP
    workdir = args.workdir or tempfile.mkdtemp(prefix="gwm-crash-")
    os.makedirs(workdir, exist_ok=True)
    config = args.config
    if config is None:
        config = os.path.join(workdir, "tiny.yaml")
        Path(config).write_text(yaml.safe_dump(tiny_dag(steps=args.steps, checkpoint_every=2), sort_keys=False))
    _preload()
    if args.crash_at:
        report = crash_chain(config, workdir, args.crash_at)
    else:
        report = random_kills(config, workdir, args.kills, rng_seed=args.rng_seed)
    text = json.dumps(report, indent=2)
    if args.report:
        Path(args.report).write_text(text + "\n")
    print(text if args.crash_at else json.dumps({k: v for k, v in report.items() if k != "chains"}, indent=2))
    ok = not report["problems"] and report.get("max_abs_diff") is not None and report["max_abs_diff"] <= 1e-6
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
