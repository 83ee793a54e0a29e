"""DAG scaling: peak memory and wall time of a 2-node against a 12-node curriculum (issue 7, item 4).

Both curricula train on the shipped data with the tiny on-disk base, through the real entry point
(`training/dag_train.py`, one fresh process per run). The frozen base is loaded once per process and each node swaps
its adapter in, so the peak resident memory must not grow with the number of nodes. To compare like with like, the
2-node curriculum's nodes use the widest canvas of the 12-node one (every shipped source), so any growth is due to
the node count alone.

    python benchmarks/bench_dag_scaling.py --out benchmarks/results/dag_scaling.json
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from _common import DATA_DIR, REPO, TINY_BASE, machine, make_bench_base, mib, print_machine, print_table, write_json

ALL_SOURCES = ["us_macro", "co2", "enso", "sunspots"]


def shipped_sources() -> dict:
    """The shipped source declarations with absolute paths (the generated YAML lives in a temporary folder)."""
    sources = yaml.safe_load((DATA_DIR / "sources.yaml").read_text())["sources"]
    for spec in sources.values():
        spec["path"] = str(DATA_DIR / spec["path"])
    return sources


def twelve_nodes() -> list[dict]:
    """Four roots, four forks, four joins: every node kind, every shipped source."""
    return [
        {"name": "macro", "sources": ["us_macro"]},
        {"name": "co2", "sources": ["co2"]},
        {"name": "enso", "sources": ["enso"]},
        {"name": "solar", "sources": ["sunspots"]},
        {"name": "climate", "parents": ["co2", "enso"], "sources": ["co2", "enso"]},
        {"name": "macro_recent", "parents": ["macro"], "sources": ["us_macro"]},
        {"name": "world", "parents": ["macro_recent", "climate"], "sources": ["us_macro", "co2", "enso"],
         "merge": {"method": "ties", "weights": [0.5, 0.5]}},
        {"name": "world_solar", "parents": ["world"], "sources": ["enso", "sunspots"]},
        {"name": "solar_recent", "parents": ["solar"], "sources": ["sunspots"]},
        {"name": "everything", "parents": ["world_solar", "solar_recent", "macro"], "sources": ALL_SOURCES,
         "merge": {"method": "linear"}},
        {"name": "ocean", "parents": ["everything"], "sources": ["enso"]},
        {"name": "world_ocean", "parents": ["ocean", "world"], "sources": ALL_SOURCES,
         "merge": {"method": "dare_linear"}},
    ]


def two_nodes() -> list[dict]:
    """A root and a fork, both on the 12-node curriculum's widest canvas (every shipped source)."""
    return [{"name": "everything", "sources": ALL_SOURCES},
            {"name": "everything_more", "parents": ["everything"], "sources": ALL_SOURCES}]


def curriculum(nodes: list[dict], args: argparse.Namespace, base: str) -> dict:
    return {
        "description": f"issue-7 DAG scaling benchmark, {len(nodes)} nodes",
        "model": {"base": base, "backbone": "cogvideox", "d_model": args.d_model, "seed": 0},
        "defaults": {"steps": args.steps, "batch_size": args.batch_size, "context_len": args.context_len,
                     "horizon": 4, "n_loops": args.n_loops, "learning_rate": 0.005, "eval_windows": 16,
                     "checkpoint_every": args.steps + 1},
        "sources": shipped_sources(),
        "nodes": nodes,
    }


def run_training(config_path: Path, output_dir: Path, extra: list[str]) -> dict:
    """Run dag_train.py in a fresh process; its own peak RSS (wait4) and wall time."""
    command = [sys.executable, str(REPO / "training" / "dag_train.py"), "--config", str(config_path),
               "--output_dir", str(output_dir), *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    start = time.perf_counter()
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            log.seek(0)
            raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}):\n"
                               f"{log.read().decode(errors='replace')[-3000:]}")
    return {"wall_s": wall, "peak_rss_bytes": usage.ru_maxrss * 1024, "cpu_s": usage.ru_utime + usage.ru_stime}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="training steps per node")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--context_len", type=int, default=24)
    parser.add_argument("--n_loops", type=int, default=2)
    parser.add_argument("--d_model", type=int, default=32)
    parser.add_argument("--base", choices=["tiny", "bench"], default="tiny",
                        help="tiny: the shipped base (2 blocks, width 64); bench: the CPU bench base (4 blocks, width "
                             "512), whose larger adapters make a per-node leak easier to see")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each curriculum (the smaller peak is kept)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    info = machine()
    print_machine(info)
    rows = []
    with tempfile.TemporaryDirectory(prefix="gwm-bench-dag-") as workdir:
        base = str(TINY_BASE) if args.base == "tiny" else make_bench_base(Path(workdir) / "bench-base")
        for label, nodes in (("2-node", two_nodes()), ("12-node", twelve_nodes())):
            config_path = Path(workdir) / f"{label}.yaml"
            config_path.write_text(yaml.safe_dump(curriculum(nodes, args, base), sort_keys=False))
            runs = [run_training(config_path, Path(workdir) / f"{label}-out{i}", []) for i in range(args.repeats)]
            best = min(runs, key=lambda r: r["peak_rss_bytes"])
            fastest = min(r["wall_s"] for r in runs)
            adapter_bytes = [os.path.getsize(Path(workdir) / f"{label}-out0" / n["name"] / "adapter_model.safetensors")
                             for n in nodes]
            rows.append({"curriculum": label, "nodes": len(nodes), "steps_per_node": args.steps,
                         "peak_rss_mib": mib(best["peak_rss_bytes"]), "wall_s": fastest,
                         "wall_s_per_node": fastest / len(nodes), "cpu_s": best["cpu_s"],
                         "mean_adapter_bytes": sum(adapter_bytes) / len(adapter_bytes), "runs": runs})
            print(f"{label}: peak RSS {rows[-1]['peak_rss_mib']:.0f} MiB, {fastest:.1f} s", flush=True)
    small, large = rows
    # resolution: what keeping every finished node's adapter + gradients + AdamW state (4 copies) would have added
    leak_mib = mib(4 * large["mean_adapter_bytes"] * (large["nodes"] - small["nodes"]))
    result = {
        "benchmark": "dag_scaling",
        "machine": info,
        "settings": vars(args),
        "rows": rows,
        "peak_rss_12_over_2": large["peak_rss_mib"] / small["peak_rss_mib"],
        "wall_12_over_2": large["wall_s"] / small["wall_s"],
        "peak_rss_growth_mib": large["peak_rss_mib"] - small["peak_rss_mib"],
        "growth_if_adapters_leaked_mib": leak_mib,
        "target": "peak memory does not grow with the number of nodes",
    }
    print_table(f"DAG scaling through training/dag_train.py ({args.base} base, shipped data; a process per run)", rows,
                ["curriculum", "nodes", "steps_per_node", "peak_rss_mib", "wall_s", "wall_s_per_node", "cpu_s"])
    print(f"12-node / 2-node: peak RSS {result['peak_rss_12_over_2']:.3f}x (+{result['peak_rss_growth_mib']:.1f} MiB; "
          f"keeping every finished node's adapter, gradients and AdamW state would add {leak_mib:.1f} MiB), "
          f"wall {result['wall_12_over_2']:.2f}x")
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
