"""Peak training-step memory with and without gradient checkpointing, as n_loops and the canvas grow (issue 7, item 2).

Each configuration runs in a fresh child process (nothing cached from another configuration) on the CPU bench base.
The child builds the model, data and optimizer, runs one warm-up step (the AdamW state now exists), then measures
two further steps:

- torch peak: the highest running total of bytes torch allocated during one step, relative to the step's start,
  from the profiler's memory events (`torch.profiler`, `profile_memory=True`). This is the step's activation memory
  plus gradients and temporaries, exact and independent of the C allocator.
- RSS peak: the resident-set high-water mark during one step minus the RSS before it (Linux VmHWM, reset through
  /proc/self/clear_refs), with glibc told to return every large free block at once (MALLOC_MMAP_THRESHOLD_), so the
  OS-level figure follows the live tensors.

On CUDA the same step is measured with `torch.cuda.max_memory_allocated` (see bench_gpu_width.py).

    python benchmarks/bench_memory.py --out benchmarks/results/memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import machine, mib, print_machine, print_table, write_json

HERE = Path(__file__).resolve().parent


def torch_peak_bytes(fn) -> int:
    """Peak of the running total of torch allocations during `fn()`, from the profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.NamedTemporaryFile(suffix=".json") as trace:
        prof.export_chrome_trace(trace.name)
        events = json.load(open(trace.name))["traceEvents"]
    memory = sorted((e for e in events if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == 0),
                    key=lambda e: e["ts"])
    running = peak = 0
    for event in memory:
        running += event["args"]["Bytes"]
        peak = max(peak, running)
    return peak


def child(config: dict) -> dict:
    """Measure one configuration in this (fresh) process."""
    import gc

    import torch
    from _common import reset_rss_peak, rss_now_bytes, rss_peak_bytes
    from bench_step import StepBench

    torch.set_num_threads(config.pop("threads"))
    args = argparse.Namespace(**{"rows": 600, "horizon": 2, "num_layers": 4, "d_model": 128,
                                 "gradient_checkpointing_granularity": "loop", **config})
    with tempfile.TemporaryDirectory(prefix="gwm-bench-mem-") as workdir:
        bench = StepBench(args, Path(workdir))
        bench.step()  # warm-up: optimizer state, lazily built buffers
        gc.collect()
        rss_before = rss_now_bytes()
        reset_ok = reset_rss_peak()
        bench.step()
        rss_peak = rss_peak_bytes() - rss_before if reset_ok else None
        torch_peak = torch_peak_bytes(bench.step)
    return {"torch_peak_bytes": torch_peak, "rss_peak_bytes": rss_peak, "rss_model_bytes": rss_before}


def run_child(config: dict) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072",
           "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(config)],
                          capture_output=True, text=True, env=env, cwd=str(HERE))
    if done.returncode != 0:
        raise RuntimeError(f"child {config} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loops", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--contexts", type=int, nargs="+", default=[16, 32, 64], help="context_len values")
    parser.add_argument("--fields", type=int, default=16, help="canvas positions = context_len x fields")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--gradient_checkpointing_granularity", choices=["loop", "application"], default="loop")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return {}

    import torch

    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    info = machine()
    print_machine(info)
    rows = []
    for context_len in args.contexts:
        for checkpointing in (False, True):
            for n_loops in args.loops:
                config = {"context_len": context_len, "fields": args.fields, "batch_size": args.batch_size,
                          "n_loops": n_loops, "gradient_checkpointing": checkpointing, "threads": threads,
                          "gradient_checkpointing_granularity": args.gradient_checkpointing_granularity}
                measured = run_child(dict(config))
                row = {"positions": context_len * args.fields, **config, **measured,
                       "torch_peak_mib": mib(measured["torch_peak_bytes"]),
                       "rss_peak_mib": None if measured["rss_peak_bytes"] is None else mib(measured["rss_peak_bytes"])}
                rows.append(row)
                print(f"N={row['positions']:5d} checkpointing={checkpointing!s:5} n_loops={n_loops}: torch peak "
                      f"{row['torch_peak_mib']:.1f} MiB, RSS peak {row['rss_peak_mib'] or float('nan'):.1f} MiB",
                      flush=True)
    # growth with n_loops: each configuration against n_loops = min(loops) at the same canvas and checkpointing
    first = min(args.loops)
    reference = {(r["positions"], r["gradient_checkpointing"]): r for r in rows if r["n_loops"] == first}
    for row in rows:
        ref = reference[(row["positions"], row["gradient_checkpointing"])]
        row[f"torch_vs_loops{first}"] = row["torch_peak_bytes"] / ref["torch_peak_bytes"]
    last = max(args.loops)
    growth = {str(r["positions"]): r[f"torch_vs_loops{first}"] for r in rows
              if r["gradient_checkpointing"] and r["n_loops"] == last}
    result = {
        "benchmark": "memory",
        "machine": info,
        "settings": {k: v for k, v in vars(args).items() if k != "child"},
        "rows": rows,
        f"checkpointed_loops{last}_over_loops{first}": growth,
        "target": f"with checkpointing, peak activation memory at n_loops={last} within 1.2x of n_loops={first}",
        "target_met": all(g <= 1.2 for g in growth.values()),
    }
    print_table(f"peak memory of one training step above the step's start (B={args.batch_size}, bench base, "
                f"threads={threads})", rows,
                ["positions", "gradient_checkpointing", "n_loops", "torch_peak_mib", f"torch_vs_loops{first}",
                 "rss_peak_mib"])
    print(f"with checkpointing, n_loops={last} / n_loops={first}: "
          + ", ".join(f"N={k}: {v:.2f}x" for k, v in growth.items())
          + f" (target <= 1.2x: {'met' if result['target_met'] else 'NOT met'})")
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
