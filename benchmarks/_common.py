"""Shared pieces of the benchmark scripts: the machine description, the bench base, timing, tables and JSON.

Not a test helper: every script prints its figures and writes them as JSON (`--out`); nothing here asserts a time.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
DATA_DIR = REPO / "configuration" / "data"
TINY_BASE = REPO / "configuration" / "tiny-cogvideox"

# The CPU bench configuration of issue 7: a CogVideoX-architecture base of moderate width (inner_dim 512).
BENCH_ARCHITECTURE = dict(num_attention_heads=8, attention_head_dim=64, num_layers=4, time_embed_dim=128)


def machine() -> dict:
    """What the figures were measured on, written next to every figure."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        info["gpu_count"] = torch.cuda.device_count()
    return info


def make_bench_base(folder: str | os.PathLike, **overrides) -> str:
    """Write the CPU bench base (random weights, diffusers layout) and return its path."""
    from modeling_gwm.model.base import make_tiny_cogvideox

    return make_tiny_cogvideox(folder, **{**BENCH_ARCHITECTURE, **overrides})


def timed(fn: Callable[[], object], repeats: int, warmup: int = 1,
          sync: Callable[[], None] | None = None) -> list[float]:
    """Wall seconds of `repeats` calls of `fn` after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if sync:
            sync()
        start = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - start)
    return times


def summary(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": len(times)}


def rss_now_bytes() -> int:
    """Resident set size of this process now (Linux /proc)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmRSS in /proc/self/status")


def rss_peak_bytes() -> int:
    """High-water mark of the resident set since start or since the last `reset_rss_peak`."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def reset_rss_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def print_table(title: str, rows: list[dict], columns: list[str] | None = None) -> None:
    """A plain aligned table on stdout (figures formatted by the caller or with 4 significant digits)."""
    if not rows:
        print(f"{title}: no rows")
        return
    columns = columns or list(rows[0])

    def fmt(value) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "" if value is None else str(value)

    cells = [[fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print(f"\n{title}")
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def print_machine(info: dict) -> None:
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items() if k != "command"))
    print(f"command: {info['command']}")


def write_json(path: str | os.PathLike | None, payload: dict) -> None:
    if not path:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"\nwrote {path}")


def mib(n_bytes: float) -> float:
    return n_bytes / 2**20
