"""The validation sweep of benchmarks/README.md section 6 as a markdown table, from the JSON of every run here:

    python benchmarks/results/sweep/summarise.py

Each v_<name>.json is one `bench_forecast.py --validation --methods naive seasonal_naive <flags>` run (v_demo: every
method); the settings column is read from the curriculum the run trained (what differs from the old demo defaults:
120 steps, n_loops 2, d_model 32, lr 0.005, forecast_probability 0.5, val_fraction 0.2, last_value scaling, no
seasonal lag, horizon 4 rolled out on 24-step windows).
"""

import json
from pathlib import Path

OLD = {"steps": 120, "n_loops": 2, "d_model": 32, "learning_rate": 0.005, "forecast_probability": 0.5,
       "val_fraction": 0.2, "window_scaling": "last_value", "seasonal_lag_input": False}


def _f(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def settings(curriculum: dict) -> str:
    merged = {**curriculum["defaults"], **curriculum["model"]}
    merged.setdefault("seasonal_lag_input", False)
    parts = [f"{k}={merged[k]}" for k, old in OLD.items() if merged.get(k, old) != old]
    monthly = next(n for n in curriculum["nodes"] if n["name"] == "monthly")
    if "horizon" in monthly:
        parts.append(f"direct (monthly {monthly['context_len']}/{monthly['horizon']})")
    if Path(merged["base"]).name != "tiny-cogvideox":
        parts.append("wide base (4 heads x 32)")
    return ", ".join(parts) or "old demo defaults"


def main() -> None:
    print("| run | settings | seeds | GWM rel. MASE | AutoETS | GWM rel. WQL | beats last-value | wall s |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for path in sorted(Path(__file__).parent.glob("v_*.json"), key=lambda p: p.stat().st_mtime):
        r = json.loads(path.read_text())
        agg = r["summary"]["aggregate"]
        print(f"| {path.stem} | {settings(r['curriculum'])} | {','.join(map(str, r['settings']['seeds']))} | "
              f"{_f(agg['mase']['gwm'])} | {_f(agg['mase'].get('auto_ets'))} | {_f(agg['wql']['gwm'])} | "
              f"{100 * agg['share_beats_naive']:.0f} % | {r['wall_s']:.0f} |")


if __name__ == "__main__":
    main()
