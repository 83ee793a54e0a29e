#!/usr/bin/env python
"""Held-out forecasting benchmark: GWM against naive, seasonal-naive, AutoETS and AutoARIMA on ten public series.

Every series in configuration/data/ (the four the demo uses and the six of benchmarks/export_bench_data.py) loses its
last part (18 steps of a monthly series, 8 of a quarterly, 6 of a yearly: the M4 horizons); truncated copies are
written to the run folder and the curriculum reads only those (asserted). A curriculum of one root per frequency
(monthly, quarterly, yearly; the demo's model, defaults and field declarations) is trained with
`DAGCurriculumTrainer` on the tiny shipped base, once per seed; then `modeling_gwm.evaluation.evaluate` forecasts
each held-out tail from the rest with the field's root adapter and scores it next to the baselines (MASE, WQL, and
the geometric mean relative to seasonal-naive). The baselines do not depend on the seed: they are fitted once.

    python benchmarks/bench_forecast.py --out benchmarks/results/bench_forecast.json \\
        | tee benchmarks/results/bench_forecast.log
    python benchmarks/bench_forecast.py --smoke      # seconds: 2 steps, one seed, two series
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml
from _common import DATA_DIR, REPO, TINY_BASE, machine, print_machine, write_json

DEMO = REPO / "configuration" / "curricula" / "demo.yaml"
HOLDOUT = {"MS": 18, "QS": 8, "YS": 6}  # the M4 competition's horizons by frequency
NODES = {"MS": "monthly", "QS": "quarterly", "YS": "yearly"}
# the windows validated with direct forecasts (benchmarks/README.md section 6): about three seasons or 2H
DIRECT_CONTEXT = {"MS": 36, "QS": 24, "YS": 24}
MODEL_KEYS = {"base", "backbone", "d_model", "seed", "frozen_dtype", "max_fields", "block_timestep", "quantile_levels",
              "window_scaling", "window_stats_input", "seasonal_lag_input"}
# the series the demo does not declare: (source, file, frequency, {column: (field, unit)}); transform: none
EXTRA = [
    ("airline", "airline_passengers_monthly.csv", "MS", {"passengers": ("transport.air.passengers", "thousands")}),
    ("wine", "wine_sales_australia_monthly.csv", "MS", {"wine": ("trade.au.wine_sales", "bottles")}),
    ("beer", "beer_production_australia_quarterly.csv", "QS", {"beer": ("industry.au.beer", "megalitres")}),
    ("yarn", "woollen_yarn_australia_quarterly.csv", "QS", {"yarn": ("industry.au.woollen_yarn", "tonnes")}),
    ("lynx", "lynx_trappings_yearly.csv", "YS", {"lynx": ("ecology.canada.lynx", "skins")}),
    ("nile", "nile_flow_yearly.csv", "YS", {"volume": ("hydrology.nile.flow", "1e8 m^3")}),
]
SMOKE_SOURCES = ["airline", "nile"]


def declared_sources() -> dict:
    """Every source of the benchmark as curriculum declarations, paths relative to configuration/data."""
    demo = yaml.safe_load(DEMO.read_text())
    sources = {}
    for name, spec in demo["sources"].items():
        sources[name] = {**spec, "path": Path(spec["path"]).name}
    for name, file, freq, columns in EXTRA:
        sources[name] = {"path": file, "time_column": "date", "frequency": freq,
                         "fields": {field: {"column": column, "unit": unit}
                                    for column, (field, unit) in columns.items()}}
    return sources


def truncate(sources: dict, folder: Path, validation: bool = False) -> dict[str, dict]:
    """Write each source's CSV without its held-out tail into `folder`; -> {source: {"train", "full", "holdout"}}.

    With `validation`, the test tail (the last H steps) is dropped first and never read by anything: the model trains
    on series[:-2H] and is scored on series[-2H:-H] ("full" is then the series without its test tail). Every choice
    of settings is made in this mode; the test mode is run once with the chosen ones.
    """
    folder.mkdir(parents=True, exist_ok=True)
    split = {}
    for name, spec in sources.items():
        full = pd.read_csv(DATA_DIR / spec["path"])
        holdout = HOLDOUT[spec["frequency"]]
        if validation:
            full = full.iloc[:-holdout]
            full.to_csv(folder / f"scored_{spec['path']}", index=False)
        train = full.iloc[:-holdout]
        train.to_csv(folder / spec["path"], index=False)
        assert pd.to_datetime(train["date"]).max() < pd.to_datetime(full["date"]).iloc[-holdout]
        scored = folder / f"scored_{spec['path']}" if validation else DATA_DIR / spec["path"]
        split[name] = {"train": str(folder / spec["path"]), "full": str(scored), "holdout": holdout}
    return split


def curriculum_yaml(sources: dict, split: dict, args) -> dict:
    """The demo's model and defaults (with the flags' overrides), one root per frequency over the truncated copies."""
    demo = yaml.safe_load(DEMO.read_text())
    defaults = {**demo["defaults"], "checkpoint_every": 10**6}
    for key in ("steps", "n_loops", "context_len"):
        if getattr(args, key) is not None:
            defaults[key] = getattr(args, key)
    model = {**demo["model"], "base": str(TINY_BASE)}
    if args.d_model is not None:
        model["d_model"] = args.d_model
    for item in args.set or []:  # KEY=VALUE (YAML value) on the model block or the defaults
        key, _, value = item.partition("=")
        (model if key in MODEL_KEYS else defaults)[key] = yaml.safe_load(value)
    if model["base"] != str(TINY_BASE):
        model["base"] = str(Path(model["base"]).resolve())
    declared = {name: {**spec, "path": split[name]["train"]} for name, spec in sources.items()}
    nodes = []
    for freq, node in NODES.items():
        members = [name for name, spec in sources.items() if spec["frequency"] == freq]
        if members:
            nodes.append({"name": node, "description": f"Every {node} series.", "sources": members})
            if not args.rollout:  # forecast the whole hold-out in one window instead of rolling out chunks
                context = args.context_len or DIRECT_CONTEXT[freq]
                nodes[-1]["horizon"] = HOLDOUT[freq]
                nodes[-1]["context_len"] = context if context > HOLDOUT[freq] else 2 * HOLDOUT[freq]
    return {"description": "bench_forecast: one root per frequency on the truncated series", "model": model,
            "defaults": defaults, "sources": declared, "nodes": nodes}


def train(config_path: Path, output_dir: Path, seed: int) -> None:
    from modeling_gwm.curriculum import load_curriculum
    from modeling_gwm.trainer import DAGCurriculumTrainer

    curriculum = load_curriculum(config_path)
    for source in curriculum.sources.values():  # the hold-out is never read in training
        assert Path(source.path).parent == config_path.parent / "truncated", source.path
    DAGCurriculumTrainer(curriculum=curriculum, output_dir=str(output_dir), seed=seed, write_cards=False).run()


def evaluate_seed(output_dir: Path, sources: dict, split: dict, methods: tuple[str, ...]) -> dict[str, dict]:
    """{field: evaluate's entry} for every field, each scored by its frequency's root adapter."""
    from modeling_gwm import GWMModel
    from modeling_gwm.evaluation import evaluate

    fields = {}
    for freq, node in NODES.items():
        members = [name for name, spec in sources.items() if spec["frequency"] == freq]
        if not members:
            continue
        model = GWMModel.from_pretrained(None, str(output_dir / node))
        for name in members:
            spec = sources[name]
            columns = {(f["column"] if isinstance(f, dict) else f): field for field, f in spec["fields"].items()}
            frame = pd.read_csv(split[name]["full"])[["date", *columns]].rename(columns=columns)
            result = evaluate(model, frame, split[name]["holdout"], methods=methods)
            for field, entry in result["fields"].items():
                fields[field] = {"source": name, "frequency": freq, "holdout": split[name]["holdout"], **entry}
    return fields


def _mean_spread(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), (statistics.stdev(finite) if len(finite) > 1 else 0.0)


def _fmt(value: float | None, spread: float | None = None) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.3f}" + (f" ± {spread:.3f}" if spread is not None and math.isfinite(spread) else "")


def summarise(per_seed: list[dict], baselines: dict) -> dict:
    """Per field and aggregate: GWM mean ± spread (sample std) over seeds, baselines once."""
    from modeling_gwm.evaluation import relative_scores

    methods = [m for m in ("naive", "seasonal_naive", "auto_ets", "auto_arima")
               if any(m in entry for entry in baselines.values())]
    fields = {}
    for field, base in baselines.items():
        row = {"source": base["source"], "frequency": base["frequency"], "unit": base["unit"]}
        for metric in ("mase", "wql"):
            mean, spread = _mean_spread([seed[field]["model"][metric] for seed in per_seed])
            row[f"gwm_{metric}"], row[f"gwm_{metric}_std"] = mean, spread
            for method in methods:
                row[f"{method}_{metric}"] = base.get(method, {}).get(metric, math.nan)
        row["gwm_beats_naive"] = [seed[field]["model"]["mae"] < base["naive"]["mae"] for seed in per_seed]
        fields[field] = row
    aggregate = {}
    for metric in ("mase", "wql"):
        # geometric mean over fields relative to seasonal-naive, for each seed's GWM and for the baselines
        gwm = []
        for seed in per_seed:
            combined = {f: {**{m: baselines[f][m] for m in methods if m in baselines[f]}, "model": seed[f]["model"]}
                        for f in baselines}
            gwm.append(relative_scores(combined, metric).get("model"))
        mean, spread = _mean_spread(gwm)
        ref = relative_scores({f: {m: baselines[f][m] for m in methods if m in baselines[f]} for f in baselines},
                              metric)
        aggregate[metric] = {"gwm": mean, "gwm_std": spread, "gwm_per_seed": gwm, **ref}
    wins = [sum(seed[f]["model"]["mae"] < baselines[f]["naive"]["mae"] for f in baselines) / len(baselines)
            for seed in per_seed]
    aggregate["share_beats_naive"], aggregate["share_beats_naive_std"] = _mean_spread(wins)
    aggregate["share_beats_naive_per_seed"] = wins
    return {"methods": methods, "fields": fields, "aggregate": aggregate}


def table(summary: dict, n_seeds: int) -> str:
    methods = summary["methods"]
    head = ["field", "freq", f"GWM MASE (±sd, {n_seeds} seed{'s' if n_seeds > 1 else ''})",
            *[f"{m} MASE" for m in methods], "GWM WQL", *[f"{m} WQL" for m in methods]]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for field, row in summary["fields"].items():
        cells = [field, row["frequency"], _fmt(row["gwm_mase"], row["gwm_mase_std"] if n_seeds > 1 else None),
                 *[_fmt(row[f"{m}_mase"]) for m in methods],
                 _fmt(row["gwm_wql"], row["gwm_wql_std"] if n_seeds > 1 else None),
                 *[_fmt(row[f"{m}_wql"]) for m in methods]]
        lines.append("| " + " | ".join(cells) + " |")
    agg = summary["aggregate"]
    cells = ["**geometric mean relative to seasonal-naive**", "",
             _fmt(agg["mase"]["gwm"], agg["mase"]["gwm_std"] if n_seeds > 1 else None),
             *[_fmt(agg["mase"].get(m)) for m in methods],
             _fmt(agg["wql"]["gwm"], agg["wql"]["gwm_std"] if n_seeds > 1 else None),
             *[_fmt(agg["wql"].get(m)) for m in methods]]
    lines.append("| " + " | ".join(cells) + " |")
    share = agg["share_beats_naive"]
    lines.append(f"\nGWM beats last-value (MAE) on {100 * share:.0f} % of fields "
                 f"(per seed: {', '.join(f'{100 * w:.0f} %' for w in agg['share_beats_naive_per_seed'])})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None, help="training steps per node (default: the demo's)")
    parser.add_argument("--d_model", type=int, default=None, help="canvas width (default: the demo's)")
    parser.add_argument("--n_loops", type=int, default=None, help="loops per block (default: the demo's)")
    parser.add_argument("--context_len", type=int, default=None, help="window length (default: the demo's)")
    parser.add_argument("--set", nargs="+", default=None, metavar="KEY=VALUE",
                        help="override a model key (base, window_scaling, ...) or a default (learning_rate, horizon, "
                             "forecast_probability, ...) of the demo")
    parser.add_argument("--rollout", action="store_true",
                        help="every node takes the demo's (or the flags') context_len and horizon and longer tails are "
                             "rolled out; default: each node's horizon is its hold-out H (one window, the demo's "
                             "choice), context 36 monthly, 24 quarterly and yearly (or --context_len, at least H + 1)")
    parser.add_argument("--direct", action="store_true", help=argparse.SUPPRESS)  # the default; kept for old commands
    parser.add_argument("--validation", action="store_true",
                        help="tune: train on series[:-2H], score on series[-2H:-H]; the test tail is never read")
    parser.add_argument("--methods", nargs="+", default=None,
                        help="baselines (default: all; auto_ets/auto_arima need statsforecast)")
    parser.add_argument("--output_dir", default=None, help="run folder (default: a temporary one, removed)")
    parser.add_argument("--smoke", action="store_true", help="2 steps, seed 0, two series, naive baselines")
    parser.add_argument("--out", default=None, help="JSON to write")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seeds, args.steps = args.seeds[:1], args.steps or 2
        args.d_model, args.context_len = args.d_model or 16, args.context_len or 12
        args.methods = args.methods or ["naive", "seasonal_naive"]
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    from modeling_gwm.evaluation import NAIVE_METHODS, check_methods

    methods = check_methods(args.methods)
    if "naive" not in methods:
        raise SystemExit("bench_forecast: --methods must include naive (the share of fields beating it)")
    info = machine()
    print_machine(info)
    sources = declared_sources()
    if args.smoke:
        sources = {k: v for k, v in sources.items() if k in SMOKE_SOURCES}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gwm-bench-forecast-") as scratch:
        workdir = Path(args.output_dir or scratch)
        split = truncate(sources, workdir / "truncated", args.validation)
        config = curriculum_yaml(sources, split, args)
        config_path = workdir / "bench_forecast.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        per_seed, baselines, timings = [], None, []
        for i, seed in enumerate(args.seeds):
            t0 = time.perf_counter()
            train(config_path, workdir / f"seed{seed}", seed)
            t1 = time.perf_counter()
            # the baselines do not depend on the seed: fitted with the first seed only
            scored = evaluate_seed(workdir / f"seed{seed}", sources, split,
                                   methods if i == 0 else tuple(m for m in methods if m in NAIVE_METHODS))
            t2 = time.perf_counter()
            timings.append({"seed": seed, "train_s": t1 - t0, "evaluate_s": t2 - t1})
            print(f"seed {seed}: trained in {t1 - t0:.0f} s, evaluated in {t2 - t1:.0f} s", flush=True)
            if i == 0:
                baselines = {f: {k: v for k, v in e.items() if k != "model"} for f, e in scored.items()}
                for entry in baselines.values():  # a yearly series has no season: seasonal-naive is naive (season 1)
                    entry.setdefault("seasonal_naive", entry["naive"])
            per_seed.append(scored)
    wall = time.perf_counter() - start
    summary = summarise(per_seed, baselines)
    print(("\nVALIDATION (series[-2H:-H], trained on series[:-2H]; test tails unread). " if args.validation else "")
          + f"\nHeld-out tails (monthly 18, quarterly 8, yearly 6 steps), {len(baselines)} fields; MASE scaled by the "
          "in-sample seasonal-naive error; WQL over quantiles 0.1 ... 0.9 (n/a: the method gives no quantiles)\n")
    print(table(summary, len(args.seeds)))
    print(f"\nwall time: {wall:.0f} s for {len(args.seeds)} seed(s) (training and evaluation)")
    result = {"benchmark": "bench_forecast", "machine": info, "settings": {**vars(args), "methods": list(methods)},
              "curriculum": config, "holdout": HOLDOUT, "wall_s": wall, "timings": timings,
              "summary": summary, "per_seed": {str(s): scored for s, scored in zip(args.seeds, per_seed)}}
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
