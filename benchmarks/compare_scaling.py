#!/usr/bin/env python
"""Which per-window scaling should GWM use by default? Measured on held-out tails of the shipped series.

Every series in configuration/data/ loses its LAST part (`--holdout_years`, in its own steps) before training: the
truncated CSVs are written to a temporary folder and only they are given to the trainer, so training (and its
validation split) never reads the hold-out. A small curriculum (one root per frequency: quarterly macro, monthly
climate, yearly sunspots; every field declared with the default `transform: none`, trending levels included) is
trained once per scaling scheme and seed, then `modeling_gwm.forecasting.evaluate` forecasts the hold-out from the
training part and scores MASE (scaled by the in-sample seasonal-naive error) for the model, last-value (naive) and
seasonal-naive.

    python benchmarks/compare_scaling.py                 # the full comparison (tens of minutes on a loaded CPU)
    python benchmarks/compare_scaling.py --smoke         # seconds: 2 schemes, 1 seed, 3 steps
    python benchmarks/compare_scaling.py --seeds 0 1 2 --resume   # add a seed to the runs already in the JSON

Aggregates per configuration, over fields and seeds: the geometric mean of MASE(model) / MASE(seasonal-naive)
(the Chronos / GIFT-Eval aggregate; < 1 beats seasonal-naive) and of MASE(model) / MASE(naive), and the share of
(field, seed) pairs where the model beats last-value.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from _common import DATA_DIR, REPO, TINY_BASE, machine, print_table

# (name, csv, frequency, {field: column}, hold-out in the series' own steps: two years, two years, 11 years)
SOURCES = [
    ("us_macro", "us_macro_quarterly.csv", "QS", {"macro.us.real_gdp": "realgdp", "macro.us.unemployment": "unemp",
                                                  "macro.us.inflation": "infl", "macro.us.tbill_rate": "tbilrate"}, 8),
    ("co2", "co2_mauna_loa_monthly.csv", "MS", {"climate.co2.mauna_loa": "co2"}, 24),
    ("enso", "elnino_nino12_monthly.csv", "MS", {"climate.enso.nino12_sst": "sst"}, 24),
    ("sunspots", "sunspots_yearly.csv", "YS", {"solar.sunspots.yearly": "sunactivity"}, 11),
]
NODES = [("macro", ["us_macro"]), ("climate", ["co2", "enso"]), ("solar", ["sunspots"])]
# (label, window_scaling, window_stats_input)
CONFIGS = [
    ("none", "none", False),
    ("instance", "instance", True),
    ("mean_abs", "mean_abs", True),
    ("last_value", "last_value", True),
    ("last_value-nostats", "last_value", False),
    ("instance-nostats", "instance", False),
]


def truncate(folder: Path) -> dict:
    """Write each CSV without its hold-out rows; returns the curriculum's sources on those copies."""
    sources = {}
    for name, filename, freq, fields, holdout in SOURCES:
        frame = pd.read_csv(DATA_DIR / filename)
        frame.iloc[:-holdout].to_csv(folder / filename, index=False)
        sources[name] = {"path": str(folder / filename), "time_column": "date", "frequency": freq,
                         "fields": {f: {"column": c} for f, c in fields.items()}}  # transform: none (the default)
    return sources


def curriculum(sources: dict, args, scaling: str, stats: bool, seed: int) -> dict:
    return {
        "model": {"base": str(TINY_BASE), "d_model": args.d_model, "seed": seed, "window_scaling": scaling,
                  "window_stats_input": stats},
        "defaults": {"steps": args.steps, "learning_rate": 0.005, "batch_size": 16, "context_len": args.context_len,
                     "horizon": 4, "n_loops": 2, "random_fraction": 0.15, "forecast_probability": 0.5,
                     "val_fraction": 0.2, "eval_windows": 32, "checkpoint_every": 10_000},
        "sources": sources,
        "nodes": [{"name": n, "sources": s} for n, s in NODES],
    }


def run_one(sources: dict, args, label: str, scaling: str, stats: bool, seed: int, folder: Path) -> dict:
    import yaml

    from modeling_gwm import GWMModel
    from modeling_gwm.curriculum import load_curriculum
    from modeling_gwm.forecasting import evaluate
    from modeling_gwm.trainer import DAGCurriculumTrainer

    path = folder / f"{label}-{seed}.yaml"
    path.write_text(yaml.safe_dump(curriculum(sources, args, scaling, stats, seed), sort_keys=False))
    out = folder / f"{label}-{seed}"
    started = time.time()
    DAGCurriculumTrainer(curriculum=load_curriculum(str(path)), output_dir=str(out), seed=seed, device="cpu",
                         write_cards=False).run()
    train_s = time.time() - started
    fields = {}
    for node, node_sources in NODES:
        model = GWMModel.from_pretrained(str(TINY_BASE), str(out / node))
        for name, filename, _freq, columns, holdout in SOURCES:
            if name not in node_sources:
                continue
            data = pd.read_csv(DATA_DIR / filename).rename(columns={c: f for f, c in columns.items()})
            result = evaluate(model, data[["date", *columns]], holdout, time_column="date")
            for field, scores in result["fields"].items():
                fields[field] = {m: scores[m]["mase"] for m in ("model", "naive", "seasonal_naive") if m in scores}
    return {"config": label, "window_scaling": scaling, "window_stats_input": stats, "seed": seed,
            "train_s": round(train_s, 1), "fields": fields}


def geomean(values: list[float]) -> float:
    values = [v for v in values if v and math.isfinite(v) and v > 0]
    return float(np.exp(np.mean(np.log(values)))) if values else math.nan


def aggregate(runs: list[dict]) -> list[dict]:
    rows = []
    for label in dict.fromkeys(r["config"] for r in runs):
        mine = [r for r in runs if r["config"] == label]
        pairs = [s for r in mine for s in r["fields"].values()]
        vs_snaive = [p["model"] / p["seasonal_naive"] for p in pairs if "seasonal_naive" in p]
        vs_naive = [p["model"] / p["naive"] for p in pairs]
        rows.append({"config": label, "seeds": len(mine),
                     "gmean_mase_model": geomean([p["model"] for p in pairs]),
                     "gmean_rel_seasonal_naive": geomean(vs_snaive), "gmean_rel_naive": geomean(vs_naive),
                     "beats_naive": f"{sum(v < 1 for v in vs_naive)}/{len(vs_naive)}",
                     "train_s_per_run": round(float(np.mean([r["train_s"] for r in mine])), 1)})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=120, help="training steps per node (the demo's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--configs", nargs="+", default=[c[0] for c in CONFIGS], choices=[c[0] for c in CONFIGS])
    parser.add_argument("--d_model", type=int, default=32)
    parser.add_argument("--context_len", type=int, default=24)
    parser.add_argument("--smoke", action="store_true", help="2 schemes, 1 seed, 3 steps: checks it runs")
    parser.add_argument("--out", default=None, help="JSON to write (default benchmarks/results/compare_scaling.json)")
    parser.add_argument("--resume", action="store_true", help="keep the (configuration, seed) runs already in --out "
                        "and run only the missing ones (e.g. add a seed)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.seeds, args.configs = 3, [0], ["none", "last_value"]
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(args.out or REPO / "benchmarks" / "results" / ("compare_scaling_smoke.json" if args.smoke
                                                               else "compare_scaling.json"))
    runs = json.loads(out.read_text())["runs"] if args.resume and out.is_file() else []
    done = {(r["config"], r["seed"]) for r in runs}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        sources = truncate(folder)
        for seed in args.seeds:  # seed-major: an interrupted run still compares every configuration
            for label, scaling, stats in [c for c in CONFIGS if c[0] in args.configs]:
                if (label, seed) in done:
                    continue
                run = run_one(sources, args, label, scaling, stats, seed, folder)
                runs.append(run)
                print(f"{label} seed {seed}: {run['train_s']} s; MASE " + ", ".join(
                    f"{f.split('.')[-1]} {s['model']:.3g} (naive {s['naive']:.3g})" for f, s in run["fields"].items()),
                    flush=True)
                report(runs, args, out, quiet=True)
    report(runs, args, out)
    return 0


def report(runs: list[dict], args, out: Path, quiet: bool = False) -> None:
    """Per-field and aggregate tables of the runs so far, printed (unless quiet) and written as JSON."""
    per_field = []
    for label in dict.fromkeys(r["config"] for r in runs):
        for field in runs[0]["fields"]:
            values = [r["fields"][field] for r in runs if r["config"] == label and field in r["fields"]]
            per_field.append({"config": label, "field": field,
                              **{m: float(np.mean([v[m] for v in values])) for m in values[0]}})
    rows = aggregate(runs)
    settings = {"steps": args.steps, "seeds": args.seeds, "d_model": args.d_model, "context_len": args.context_len,
                "base": "configuration/tiny-cogvideox", "holdout": {s[0]: s[4] for s in SOURCES}}
    result = {"machine": machine(), "settings": settings, "aggregate": rows, "per_field": per_field, "runs": runs}
    out.write_text(json.dumps(result, indent=2) + "\n")
    if not quiet:
        print()
        print_table("MASE per field (mean over seeds)", per_field)
        print()
        print_table("Aggregate over fields and seeds (geometric means; < 1 beats the reference)", rows)
        print(f"\nwrote {out}")


if __name__ == "__main__":
    raise SystemExit(main())
