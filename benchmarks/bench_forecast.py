#!/usr/bin/env python
"""Held-out forecasting benchmark on public series split BY SERIES into a tuning set and a test set.

The series and their split are fixed in benchmarks/forecast_split.json (45 series: monthly, quarterly, yearly, weekly,
daily; written by benchmarks/export_forecast_series.py). `--split tuning` (every choice of settings is made there)
or `--split test` (what the README reports; run once per shipped candidate). Every series of the chosen split loses
its last part (18 steps of a monthly series, 8 quarterly, 6 yearly, 13 weekly, 14 daily); truncated copies are
written to the run folder and the curriculum reads only those (asserted). A curriculum of one root per frequency
(the demo's model, defaults and field handling) is trained with `DAGCurriculumTrainer` on the tiny shipped base, once
per seed;
`modeling_gwm.forecasting.evaluation.evaluate` forecasts each held-out tail from the rest with the frequency's adapter.

Methods: GWM (trained), GWM's own untrained start (`gwm_baseline`: the same adapter with its value head zeroed,
which forecasts exactly the context baseline of `residual_baseline`), naive, seasonal-naive, AutoETS, AutoARIMA,
AutoTheta (statsforecast; fitted once per series and cached in a JSON, not once per seed; fitted on at most the
last `STATS_MAX_HISTORY` observations) and NHITS (neuralforecast, optional: trained per frequency on the same
truncated series, once per seed). Scores: MASE and WQL per series; geometric means relative to seasonal-naive
(naive for a series without a season); the share of series where GWM beats each method; the worst series.

    python benchmarks/bench_forecast.py --split test --out benchmarks/results/bench_forecast.json \\
        | tee benchmarks/results/bench_forecast.log
    python benchmarks/bench_forecast.py --split tuning --set residual_baseline=seasonal_naive  # a tuning run
    python benchmarks/bench_forecast.py --smoke      # seconds: 2 steps, one seed, two tuning series
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from _common import REPO, TINY_BASE, machine, print_machine, write_json

DEMO = REPO / "configuration" / "curricula" / "demo.yaml"
SPLIT_FILE = Path(__file__).resolve().parent / "forecast_split.json"
BASELINE_CACHE = Path(__file__).resolve().parent / "results" / "forecast_baselines_cache.json"
HOLDOUT = {"MS": 18, "QS": 8, "YS": 6, "W-SAT": 13, "D": 14}  # M4's horizons; weekly a quarter, daily two weeks
NODES = {"MS": "monthly", "QS": "quarterly", "YS": "yearly", "W-SAT": "weekly", "D": "daily"}
# the window of a direct forecast: about three seasons (monthly), or a season plus the hold-out
DIRECT_CONTEXT = {"MS": 36, "QS": 24, "YS": 24, "W-SAT": 78, "D": 42}
STATS_MAX_HISTORY = 600  # statsforecast fits the last 600 observations at most (sunspot.month has 3177)
MODEL_KEYS = {"base", "backbone", "d_model", "seed", "frozen_dtype", "max_fields", "block_timestep", "quantile_levels",
              "window_scaling", "window_stats_input", "seasonal_lag_input", "residual_baseline", "residual_penalty",
              "scratch_num_layers", "scratch_num_attention_heads", "scratch_attention_head_dim"}
SMOKE_SERIES = ["transport.air.passengers", "hydrology.nile.flow"]
STATS = ("auto_ets", "auto_arima", "auto_theta")


def load_series(split: str, names: list[str] | None = None) -> list[dict]:
    """The series of one split (or of both: "all"), as written in forecast_split.json."""
    series = json.loads(SPLIT_FILE.read_text())["series"]
    chosen = [s for s in series if split == "all" or s["split"] == split]
    if names:
        chosen = [s for s in series if s["name"] in names]
    return chosen


def _source_name(i: int, entry: dict) -> str:
    return f"s{i:02d}_" + "".join(c if c.isalnum() else "_" for c in entry["name"].lower())


def truncate(series: list[dict], folder: Path) -> dict[str, dict]:
    """Each series without its held-out tail, one CSV per series in `folder`; -> {name: {"source", "train", "full",
    "holdout"}}. The full file is only ever read for scoring."""
    folder.mkdir(parents=True, exist_ok=True)
    split = {}
    for i, entry in enumerate(series):
        source = _source_name(i, entry)
        full = pd.read_csv(REPO / entry["path"])[["date", entry["column"]]]
        holdout = HOLDOUT[entry["frequency"]]
        train = full.iloc[:-holdout]
        train.to_csv(folder / f"{source}.csv", index=False)
        assert pd.to_datetime(train["date"]).max() < pd.to_datetime(full["date"]).iloc[-holdout]
        split[entry["name"]] = {"source": source, "train": str(folder / f"{source}.csv"),
                                "full": str(REPO / entry["path"]), "holdout": holdout}
    return split


def curriculum_yaml(series: list[dict], split: dict, args) -> dict:
    """The demo's model and defaults (with the flags' overrides), one root per frequency over the truncated copies."""
    demo = yaml.safe_load(DEMO.read_text())
    defaults = {**demo["defaults"], "checkpoint_every": 10**6}
    for key in ("steps", "n_loops", "context_len"):
        if getattr(args, key) is not None:
            defaults[key] = getattr(args, key)
    model = {**demo["model"], "base": str(TINY_BASE)}
    if args.d_model is not None:
        model["d_model"] = args.d_model
    node_keys = {}
    for item in args.set or []:  # KEY=VALUE (YAML value) on the model block, the defaults, or FREQ.KEY per node
        key, _, value = item.partition("=")
        if "." in key:
            freq, _, key = key.partition(".")
            node_keys.setdefault(freq, {})[key] = yaml.safe_load(value)
        else:
            (model if key in MODEL_KEYS else defaults)[key] = yaml.safe_load(value)
    if model["base"] != str(TINY_BASE):
        model["base"] = str(Path(model["base"]).resolve())
    sources = {}
    for entry in series:
        field = {"column": entry["column"], "unit": entry["unit"]}
        if entry.get("transform"):
            field["transform"] = entry["transform"]
        sources[split[entry["name"]]["source"]] = {"path": split[entry["name"]]["train"], "time_column": "date",
                                                   "frequency": entry["frequency"], "fields": {entry["name"]: field}}
    nodes = []
    for freq, node in NODES.items():
        members = [split[s["name"]]["source"] for s in series if s["frequency"] == freq]
        if not members:
            continue
        nodes.append({"name": node, "description": f"Every {node} series.", "sources": members})
        if not args.rollout:  # forecast the whole hold-out in one window instead of rolling out chunks
            context = args.context_len or DIRECT_CONTEXT[freq]
            nodes[-1]["horizon"] = HOLDOUT[freq]
            nodes[-1]["context_len"] = context if context > HOLDOUT[freq] else 2 * HOLDOUT[freq]
        nodes[-1].update(node_keys.get(node, {}))
    return {"description": "bench_forecast: one root per frequency on the truncated series", "model": model,
            "defaults": defaults, "sources": sources, "nodes": nodes}


def train(config_path: Path, output_dir: Path, seed: int) -> None:
    from modeling_gwm.training.curriculum import load_curriculum
    from modeling_gwm.training.trainer import DAGCurriculumTrainer

    curriculum = load_curriculum(config_path)
    for source in curriculum.sources.values():  # the hold-out is never read in training
        assert Path(source.path).parent == config_path.parent / "truncated", source.path
    DAGCurriculumTrainer(curriculum=curriculum, output_dir=str(output_dir), seed=seed, write_cards=False).run()


def _frame(entry: dict, split: dict) -> pd.DataFrame:
    return pd.read_csv(split[entry["name"]]["full"])[["date", entry["column"]]].rename(
        columns={entry["column"]: entry["name"]})


def zero_value_head(model) -> None:
    """The adapter's value head zeroed: the model then forecasts exactly its context baseline (its untrained start)."""
    import torch

    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "value_head" in name:
                parameter.zero_()


def evaluate_gwm(output_dir: Path, series: list[dict], split: dict, baseline: bool) -> dict[str, dict]:
    """{series: {"model": scores}} (and "gwm_baseline" with `baseline`), each scored by its frequency's adapter."""
    from modeling_gwm import GWMModel
    from modeling_gwm.forecasting.evaluation import evaluate

    scored = {}
    for freq, node in NODES.items():
        members = [s for s in series if s["frequency"] == freq]
        if not members:
            continue
        model = GWMModel.from_pretrained(None, str(output_dir / node))
        for entry in members:
            result = evaluate(model, _frame(entry, split), split[entry["name"]]["holdout"], methods=("naive",))
            scored[entry["name"]] = {"model": result["fields"][entry["name"]]["model"]}
        if baseline:
            zero_value_head(model)
            for entry in members:
                result = evaluate(model, _frame(entry, split), split[entry["name"]]["holdout"], methods=("naive",))
                scored[entry["name"]]["gwm_baseline"] = result["fields"][entry["name"]]["model"]
    return scored


def evaluate_baselines(series: list[dict], split: dict, methods: tuple[str, ...], cache_path: Path | None,
                       output_dir: Path) -> dict[str, dict]:
    """{series: {method: scores}} for the naive and statistical baselines; statistical fits cached by series, hold-out
    and length (they do not depend on GWM or the seed)."""
    from modeling_gwm import GWMModel
    from modeling_gwm.forecasting.evaluation import evaluate

    cache = json.loads(cache_path.read_text()) if cache_path and cache_path.is_file() else {}
    out = {}
    for freq, node in NODES.items():
        members = [s for s in series if s["frequency"] == freq]
        if not members:
            continue
        model = GWMModel.from_pretrained(None, str(output_dir / node))  # evaluate needs a model; its scores unused
        for entry in members:
            frame, holdout = _frame(entry, split), split[entry["name"]]["holdout"]
            key = f"{entry['name']}|{holdout}|{len(frame)}|{frame['date'].iloc[-1]}|{STATS_MAX_HISTORY}"
            wanted = tuple(m for m in methods if m in STATS and m not in cache.get(key, {}))
            capped = pd.concat([frame.iloc[:-holdout].iloc[-STATS_MAX_HISTORY:], frame.iloc[-holdout:]])
            if wanted:
                result = evaluate(model, capped, holdout, methods=wanted)
                cache.setdefault(key, {}).update({m: result["fields"][entry["name"]][m] for m in wanted
                                                  if m in result["fields"][entry["name"]]})
            result = evaluate(model, frame, holdout, methods=tuple(m for m in methods if m not in STATS))
            fields = result["fields"][entry["name"]]
            out[entry["name"]] = {**{m: fields[m] for m in fields if m not in ("unit", "model")},
                                  **{m: v for m, v in cache.get(key, {}).items() if m in methods}}
            out[entry["name"]].setdefault("seasonal_naive", out[entry["name"]]["naive"])  # no season: naive
    if cache_path:  # merged with what another run may have written meanwhile
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        written = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
        cache_path.write_text(json.dumps(_finite({**written, **cache}), indent=0, sort_keys=True) + "\n")
    return out


# ------------------------------------------------------------------------------------------------ deep baseline
def has_neuralforecast() -> bool:
    try:
        import neuralforecast  # noqa: F401
    except ImportError:
        return False
    return True


def evaluate_nhits(series: list[dict], split: dict, seed: int, steps: int) -> dict[str, dict]:
    """NHITS (neuralforecast) trained per frequency on the same truncated series, from scratch, CPU; scored like GWM.
    Its quantiles come from a multi-quantile loss at GWM's levels."""
    from neuralforecast import NeuralForecast
    from neuralforecast.losses.pytorch import MQLoss
    from neuralforecast.models import NHITS

    from modeling_gwm.forecasting.evaluation import (
        QUANTILE_LEVELS,
        default_season,
        error_metrics,
        weighted_quantile_loss,
    )

    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    out = {}
    levels = sorted({round(abs(2 * q - 1) * 100) for q in QUANTILE_LEVELS} - {0})
    for freq in NODES:
        members = [s for s in series if s["frequency"] == freq]
        if not members:
            continue
        holdout = HOLDOUT[freq]
        frames = []
        for entry in members:
            train = pd.read_csv(split[entry["name"]]["train"])
            values = train[entry["column"]].astype("float64")
            frames.append(pd.DataFrame({"unique_id": entry["name"], "ds": pd.to_datetime(train["date"]),
                                        "y": values}))
        data = pd.concat(frames).dropna()
        context = DIRECT_CONTEXT[freq] - holdout
        model = NHITS(h=holdout, input_size=context, loss=MQLoss(level=levels), max_steps=steps, random_seed=seed,
                      scaler_type="robust", batch_size=16, enable_progress_bar=False, enable_model_summary=False,
                      logger=False, accelerator="cpu", start_padding_enabled=True)
        runner = NeuralForecast(models=[model], freq=freq)
        runner.fit(df=data)
        forecast = runner.predict()
        forecast = forecast.reset_index() if "unique_id" not in forecast.columns else forecast
        season = default_season(freq) or 1
        for entry in members:
            rows = forecast[forecast["unique_id"] == entry["name"]]
            frame = _frame(entry, split)
            history = frame[entry["name"]].to_numpy(np.float64)[:-holdout]
            actual = frame[entry["name"]].to_numpy(np.float64)[-holdout:]
            columns = [("NHITS-median" if q == 0.5 else f"NHITS-{'lo' if q < 0.5 else 'hi'}-"
                        f"{round(abs(2 * q - 1) * 100)}") for q in QUANTILE_LEVELS]
            quantiles = rows[columns].to_numpy(np.float64)
            scores = error_metrics(actual, quantiles[:, QUANTILE_LEVELS.index(0.5)], history,
                                   season if len(history) > season else 1)
            scores["wql"] = weighted_quantile_loss(actual, quantiles, QUANTILE_LEVELS)
            out[entry["name"]] = scores
    return out


# ------------------------------------------------------------------------------------------------ summary
def _mean_spread(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), (statistics.stdev(finite) if len(finite) > 1 else 0.0)


def _fmt(value: float | None, spread: float | None = None) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.3f}" + (f" ± {spread:.3f}" if spread is not None and math.isfinite(spread) else "")


def _ratio(entry: dict, method: str, metric: str) -> float:
    value, base = entry.get(method, {}).get(metric), entry["seasonal_naive"].get(metric)
    if value is None or base is None or not (math.isfinite(value) and math.isfinite(base)) or base <= 0 or value <= 0:
        return math.nan
    return value / base


def _gmean(ratios: list[float]) -> float:
    finite = [r for r in ratios if math.isfinite(r)]
    return math.exp(statistics.fmean(math.log(r) for r in finite)) if finite else math.nan


def summarise(per_seed: list[dict[str, dict]], baselines: dict[str, dict], meta: dict[str, dict]) -> dict:
    """Per series and aggregate. Seeded methods (gwm, nhits) as mean ± sample std over seeds; the rest once."""
    fixed = [m for m in ("gwm_baseline", "naive", "seasonal_naive", *STATS)
             if any(m in e for e in baselines.values())]
    seeded = [m for m in ("model", "nhits") if all(m in s[f] for s in per_seed for f in s)]
    names = list(baselines)
    rows = {}
    for name in names:
        row = {"frequency": meta[name]["frequency"], "source": meta[name]["source"]}
        for metric in ("mase", "wql"):
            for method in seeded:
                mean, spread = _mean_spread([s[name][method][metric] for s in per_seed])
                row[f"{method}_{metric}"], row[f"{method}_{metric}_std"] = mean, spread
            for method in fixed:
                row[f"{method}_{metric}"] = baselines[name].get(method, {}).get(metric, math.nan)
        rows[name] = row
    aggregate = {}
    for metric in ("mase", "wql"):
        agg = {}
        for method in seeded:
            per = [_gmean([_ratio({**baselines[n], **s[n]}, method, metric) for n in names]) for s in per_seed]
            agg[method], agg[f"{method}_std"] = _mean_spread(per)
            agg[f"{method}_per_seed"] = per
        for method in fixed:
            agg[method] = _gmean([_ratio(baselines[n], method, metric) for n in names])
        aggregate[metric] = agg
    # share of series where GWM's MASE is below each other method's, per seed; GWM's worst series
    beats = {}
    for method in [*fixed, *[m for m in seeded if m != "model"]]:
        per = []
        for s in per_seed:
            pairs = [(s[n]["model"]["mase"], {**baselines[n], **s[n]}.get(method, {}).get("mase")) for n in names]
            pairs = [(a, b) for a, b in pairs if a is not None and b is not None and math.isfinite(a)
                     and math.isfinite(b)]
            per.append(sum(a < b for a, b in pairs) / len(pairs) if pairs else math.nan)
        mean, spread = _mean_spread(per)
        beats[method] = {"share": mean, "std": spread, "per_seed": per}
    aggregate["gwm_beats"] = beats
    worst = {}
    for method in [*seeded, *fixed]:
        if method in seeded:
            values = [(n, statistics.fmean(_ratio({**baselines[n], **s[n]}, method, "mase") for s in per_seed))
                      for n in names]
        else:
            values = [(n, _ratio(baselines[n], method, "mase")) for n in names]
        values = [(n, v) for n, v in values if math.isfinite(v)]
        if values:
            name, value = max(values, key=lambda item: item[1])
            worst[method] = {"series": name, "mase_rel_seasonal_naive": value}
    aggregate["worst"] = worst
    return {"methods": [*seeded, *fixed], "seeded": seeded, "fields": rows, "aggregate": aggregate}


LABELS = {"model": "GWM", "gwm_baseline": "GWM untrained (its baseline)", "nhits": "NHITS", "naive": "naive",
          "seasonal_naive": "seasonal-naive", "auto_ets": "AutoETS", "auto_arima": "AutoARIMA",
          "auto_theta": "AutoTheta"}


def table(summary: dict, n_seeds: int) -> str:
    """The aggregate table (one row per method) and the per-series MASE table."""
    agg, seeded = summary["aggregate"], summary["seeded"]
    lines = ["| method | gmean MASE rel. seasonal-naive | gmean WQL rel. seasonal-naive | GWM beats it on (MASE) "
             "| worst series' MASE rel. seasonal-naive |", "|---|---:|---:|---:|---|"]
    for method in summary["methods"]:
        spread = n_seeds > 1 and method in seeded
        beat = agg["gwm_beats"].get(method)
        worst = agg["worst"].get(method)
        lines.append("| " + " | ".join([
            LABELS.get(method, method) + (f" ({n_seeds} seeds)" if method in seeded else ""),
            _fmt(agg["mase"][method], agg["mase"].get(f"{method}_std") if spread else None),
            _fmt(agg["wql"][method], agg["wql"].get(f"{method}_std") if spread else None),
            "" if beat is None else f"{100 * beat['share']:.0f} %" + (f" ± {100 * beat['std']:.0f}" if n_seeds > 1
                                                                      else ""),
            "" if worst is None else f"{worst['mase_rel_seasonal_naive']:.2f} ({worst['series']})"]) + " |")
    head = ["series", "freq", *[f"{LABELS.get(m, m)} MASE" for m in summary["methods"]]]
    lines += ["", "| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for name, row in summary["fields"].items():
        cells = [name, row["frequency"]] + [_fmt(row[f"{m}_mase"], row.get(f"{m}_mase_std") if n_seeds > 1 else None)
                                            for m in summary["methods"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", choices=("tuning", "test"), default="tuning",
                        help="which series (forecast_split.json): tune on 'tuning', report 'test' (default: tuning)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None, help="training steps per node (default: the demo's)")
    parser.add_argument("--d_model", type=int, default=None, help="canvas width (default: the demo's)")
    parser.add_argument("--n_loops", type=int, default=None, help="loops per block (default: the demo's)")
    parser.add_argument("--context_len", type=int, default=None, help="window length (default: DIRECT_CONTEXT)")
    parser.add_argument("--set", nargs="+", default=None, metavar="KEY=VALUE",
                        help="override a model key (base, residual_baseline, ...), a default (learning_rate, ...) or "
                             "one node's key (monthly.steps=...) of the demo")
    parser.add_argument("--rollout", action="store_true",
                        help="every node takes the demo's (or the flags') context_len and horizon and longer tails are "
                             "rolled out; default: each node's horizon is its hold-out (one window)")
    parser.add_argument("--methods", nargs="+", default=None,
                        help="baselines (default: naive, seasonal_naive and, with statsforecast, auto_ets, "
                             "auto_arima, auto_theta)")
    parser.add_argument("--deep", choices=("auto", "nhits", "none"), default="auto",
                        help="the deep baseline: NHITS when neuralforecast is installed (auto), or none")
    parser.add_argument("--deep_steps", type=int, default=200, help="NHITS training steps per frequency")
    parser.add_argument("--baseline_cache", default=str(BASELINE_CACHE),
                        help="JSON cache of the statistical baselines' scores ('' for none)")
    parser.add_argument("--output_dir", default=None, help="run folder (default: a temporary one, removed)")
    parser.add_argument("--smoke", action="store_true", help="2 steps, seed 0, two series, naive baselines")
    parser.add_argument("--out", default=None, help="JSON to write")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seeds, args.steps = args.seeds[:1], args.steps or 2
        args.d_model, args.context_len = args.d_model or 16, args.context_len or 12
        args.methods = args.methods or ["naive", "seasonal_naive"]
        args.deep, args.baseline_cache = "none", ""
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    from modeling_gwm.forecasting.evaluation import check_methods

    methods = check_methods(args.methods)
    if "naive" not in methods:
        raise SystemExit("bench_forecast: --methods must include naive")
    deep = args.deep == "nhits" or (args.deep == "auto" and has_neuralforecast())
    info = machine()
    print_machine(info)
    series = load_series(args.split, SMOKE_SERIES if args.smoke else None)
    meta = {s["name"]: s for s in series}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gwm-bench-forecast-") as scratch:
        workdir = Path(args.output_dir or scratch)
        split = truncate(series, workdir / "truncated")
        config = curriculum_yaml(series, split, args)
        config_path = workdir / "bench_forecast.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        per_seed, baselines, timings = [], None, []
        for i, seed in enumerate(args.seeds):
            t0 = time.perf_counter()
            train(config_path, workdir / f"seed{seed}", seed)
            t1 = time.perf_counter()
            scored = evaluate_gwm(workdir / f"seed{seed}", series, split, baseline=i == 0)
            if i == 0:  # the baselines (and GWM's untrained start) do not depend on the seed
                baselines = evaluate_baselines(series, split, methods, Path(args.baseline_cache)
                                               if args.baseline_cache else None, workdir / f"seed{seed}")
                for name, entry in scored.items():
                    baselines[name]["gwm_baseline"] = entry.pop("gwm_baseline")
            t2 = time.perf_counter()
            if deep:
                for name, scores in evaluate_nhits(series, split, seed, args.deep_steps).items():
                    scored[name]["nhits"] = scores
            t3 = time.perf_counter()
            timings.append({"seed": seed, "train_s": t1 - t0, "evaluate_s": t2 - t1, "nhits_s": t3 - t2})
            print(f"seed {seed}: GWM trained in {t1 - t0:.0f} s, evaluated in {t2 - t1:.0f} s"
                  + (f"; NHITS {t3 - t2:.0f} s" if deep else ""), flush=True)
            per_seed.append(scored)
    wall = time.perf_counter() - start
    summary = summarise(per_seed, baselines, meta)
    counts = {NODES[f]: sum(s["frequency"] == f for s in series) for f in NODES}
    print(f"\n{args.split.upper()} series ({len(series)}: "
          + ", ".join(f"{n} {c}" for n, c in counts.items() if c)
          + "); held-out tails monthly 18, quarterly 8, yearly 6, weekly 13, daily 14 steps; MASE scaled by the "
          "in-sample seasonal-naive error; WQL over quantiles 0.1 ... 0.9; relative scores: geometric mean over "
          "series of the method's score over seasonal-naive's (naive's without a season)\n")
    print(table(summary, len(args.seeds)))
    print(f"\nwall time: {wall:.0f} s for {len(args.seeds)} seed(s) (training and evaluation)")
    result = {"benchmark": "bench_forecast", "machine": info, "settings": {**vars(args), "methods": list(methods),
                                                                           "deep": deep},
              "split": args.split, "series": [s["name"] for s in series], "curriculum": config, "holdout": HOLDOUT,
              "wall_s": wall, "timings": timings, "summary": summary,
              "per_seed": {str(s): scored for s, scored in zip(args.seeds, per_seed)}, "baselines": baselines}
    write_json(args.out, _finite(result))
    return result


def _finite(value):
    """NaN / inf -> None, so the JSON is standard."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


if __name__ == "__main__":
    main()
