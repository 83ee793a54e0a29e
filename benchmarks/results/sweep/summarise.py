"""The validation sweep of benchmarks/README.md section 6 as a markdown table, from the JSON of every run here:

    python benchmarks/results/sweep/summarise.py

Each v_<name>.json is `bench_forecast.py --validation --methods naive seasonal_naive <flags>` (v_demo: all methods).
"""

import json
from pathlib import Path


def _f(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def main() -> None:
    print("| run | settings | seeds | GWM rel. MASE | last-value | AutoETS | GWM rel. WQL | beats naive | wall s |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for path in sorted(Path(__file__).parent.glob("v_*.json")):
        r = json.loads(path.read_text())
        s, agg = r["settings"], r["summary"]["aggregate"]
        changed = [f"{key}={s[key]}" for key in ("steps", "context_len", "d_model", "n_loops") if s.get(key)]
        changed += ["direct" if s.get("direct") or s.get("rollout") is False else "rollout", *(s.get("set") or [])]
        print(f"| {path.stem} | {' '.join(changed)} | {','.join(map(str, s['seeds']))} | {_f(agg['mase']['gwm'])} | "
              f"{_f(agg['mase'].get('naive'))} | {_f(agg['mase'].get('auto_ets'))} | {_f(agg['wql']['gwm'])} | "
              f"{100 * agg['share_beats_naive']:.0f} % | {r['wall_s']:.0f} |")


if __name__ == "__main__":
    main()
