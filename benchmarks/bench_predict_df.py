"""Does `predict_df` scale with the number of series? Times 10 against 1,000 items of one field on the CPU.

    OMP_NUM_THREADS=1 python benchmarks/bench_predict_df.py        # 10 vs 1,000 items; target: ratio <= 10
    python benchmarks/bench_predict_df.py --profile                # also the top of a cProfile of the large run
    python benchmarks/bench_predict_df.py --smoke                  # seconds: what tests/test_benchmarks_smoke.py runs

The model: the shipped tiny CogVideoX base with an untrained loop adapter over one monthly field (the weights do not
change the cost). Items are synthetic monthly series of different lengths and end dates. The 1,000 items take 100x
the work of 10; batching their windows into shared forward passes is what keeps the time within 10x. For reference,
the same items are also forecast one `model.forecast` call at a time (`--loop_items` of them).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import functools
import io
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.utils.flop_counter

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import TINY_BASE, machine, print_machine, summary, timed, write_json  # noqa: E402

FIELD = "climate.co2.mauna_loa"


def make_items(n: int, seed: int = 0, min_len: int = 48, max_len: int = 120) -> pd.DataFrame:
    """n monthly series (trend + season + noise) of random lengths ending in one of 24 different months."""
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(n):
        length = int(rng.integers(min_len, max_len + 1))
        end = pd.Timestamp("2020-01-01") + pd.DateOffset(months=int(rng.integers(0, 24)))
        times = pd.date_range(end=end, periods=length, freq="MS")
        steps = np.arange(length)
        values = 340 + rng.normal(0, 20) + 0.1 * steps + 3 * np.sin(2 * np.pi * steps / 12) + rng.normal(0, 0.5,
                                                                                                          length)
        frames.append(pd.DataFrame({"item_id": f"item{i:05d}", "timestamp": times, FIELD: values}))
    return pd.concat(frames, ignore_index=True)


def make_model(args):
    import peft

    from modeling_gwm import GWMModel, LoopConfig

    torch.manual_seed(0)
    base = GWMModel.from_pretrained(str(TINY_BASE), d_model=args.d_model, context_len=args.context_len,
                                    horizon=args.horizon)
    fields = [{"name": FIELD, "mean": 360.0, "std": 25.0, "transform": "none", "unit": "ppm", "frequency": "MS"}]
    return peft.get_peft_model(base, LoopConfig(n_loops=args.n_loops, fields=fields), adapter_name="bench")


@contextlib.contextmanager
def forward_clock():
    """Seconds and calls spent in predict_df's batched model calls (everything else is gridding and frames)."""
    from modeling_gwm.forecasting import pipeline as module

    clock, inner = {"seconds": 0.0, "calls": 0}, module.predict_windows

    def clocked(*args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            clock["seconds"] += time.perf_counter() - start
            clock["calls"] += 1
    module.predict_windows = clocked
    try:
        yield clock
    finally:
        module.predict_windows = inner


def count_flops(model, call) -> int:
    """FLOPs of one call (matmuls and attention, torch's FlopCounterMode), the weights frozen while counting: its
    module hooks cannot follow parameters that require grad through a no_grad forward."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    for parameter in trainable:
        parameter.requires_grad_(False)
    try:
        with torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
            call()
        return counter.get_total_flops()
    finally:
        for parameter in trainable:
            parameter.requires_grad_(True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=10, help="items in the small run")
    parser.add_argument("--large", type=int, default=1000, help="items in the large run")
    parser.add_argument("--prediction_length", type=int, default=12)
    parser.add_argument("--context_len", type=int, default=24)
    parser.add_argument("--horizon", type=int, default=4)
    parser.add_argument("--d_model", type=int, default=32)
    parser.add_argument("--n_loops", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each size, alternating")
    parser.add_argument("--loop_items", type=int, default=100, help="items forecast one call at a time (0: skip)")
    parser.add_argument("--profile", action="store_true", help="print the top of a cProfile of the large run")
    parser.add_argument("--smoke", action="store_true", help="2 vs 20 items, one repeat (for the smoke test)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "predict_df.json"))
    args = parser.parse_args(argv)
    if args.smoke:
        args.small, args.large, args.repeats, args.loop_items = 2, 20, 1, 2
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    info = machine()
    print_machine(info)

    model = make_model(args)
    frames = {n: make_items(n) for n in (args.small, args.large)}
    calls = {n: functools.partial(model.predict_df, frame, prediction_length=args.prediction_length,
                                  batch_size=args.batch_size) for n, frame in frames.items()}
    for n, call in calls.items():  # also the warm-up
        out = call()
        assert out["item_id"].nunique() == n and len(out) == n * args.prediction_length
    # small and large alternate, so a change of load on the shared machine hits both sides of the ratio
    totals, forwards, passes = {n: [] for n in calls}, {n: [] for n in calls}, {}
    for _ in range(args.repeats):
        for n, call in calls.items():
            with forward_clock() as clock:
                start = time.perf_counter()
                call()
                totals[n].append(time.perf_counter() - start)
            forwards[n].append(clock["seconds"])
            passes[n] = clock["calls"]
    runs = {}
    for n, frame in frames.items():
        rests = [t - f for t, f in zip(totals[n], forwards[n])]
        run = runs[n] = {**summary(totals[n]), "forward_calls_per_run": passes[n],
                         "forward_median_s": statistics.median(forwards[n]), "rest_median_s": statistics.median(rests),
                         "forward_gflop": count_flops(model, calls[n]) / 1e9}
        print(f"{n:>6} items ({len(frame)} rows): median {run['median_s']:.3f} s over {args.repeats} runs "
              f"(min {run['min_s']:.3f}, max {run['max_s']:.3f}); per run {run['forward_calls_per_run']} "
              f"forward passes, {run['forward_gflop']:.2f} GFLOP, median {run['forward_median_s']:.3f} s in them "
              f"({run['forward_gflop'] / run['forward_median_s']:.1f} GFLOP/s), {run['rest_median_s']:.3f} s outside")
    small, large = runs[args.small], runs[args.large]
    ratio = large["median_s"] / small["median_s"]
    print(f"ratio {args.large} / {args.small} items: {ratio:.2f}x the time for {args.large / args.small:.0f}x the "
          f"items (target <= 10x: {'met' if ratio <= 10 else 'missed'}); inside the forward passes "
          f"{large['forward_median_s'] / small['forward_median_s']:.2f}x the time for "
          f"{large['forward_gflop'] / small['forward_gflop']:.0f}x the FLOPs; outside them "
          f"{large['rest_median_s'] / small['rest_median_s']:.2f}x; best of {args.repeats}: "
          f"{large['min_s'] / small['min_s']:.2f}x")

    loop = None
    if args.loop_items:
        frame = frames[args.large]
        ids = frame["item_id"].unique()[:args.loop_items]
        histories = [frame[frame["item_id"] == i].drop(columns="item_id") for i in ids]

        def one_at_a_time():
            for history in histories:
                model.forecast(history, args.prediction_length, time_column="timestamp")
        loop = summary(timed(one_at_a_time, 1, warmup=0))
        batched = summary(timed(lambda: model.predict_df(frame[frame["item_id"].isin(ids)],
                                                         prediction_length=args.prediction_length), 1, warmup=0))
        print(f"{args.loop_items} items one forecast() call each: {loop['median_s']:.3f} s; the same items in one "
              f"predict_df: {batched['median_s']:.3f} s")
        loop = {"items": args.loop_items, "forecast_loop": loop, "predict_df": batched}

    profile = None
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        model.predict_df(frames[args.large], prediction_length=args.prediction_length, batch_size=args.batch_size)
        profiler.disable()
        stream = io.StringIO()
        pstats.Stats(profiler, stream=stream).sort_stats("cumulative").print_stats(20)
        profile = stream.getvalue()
        print(profile)

    result = {"machine": info, "settings": {k: v for k, v in vars(args).items() if k not in ("out", "profile")},
              "small": {"items": args.small, **runs[args.small]}, "large": {"items": args.large, **runs[args.large]},
              "ratio": ratio, "target_ratio": 10.0, "met": ratio <= 10,
              "ratio_best": large["min_s"] / small["min_s"],
              "forward_time_ratio": large["forward_median_s"] / small["forward_median_s"],
              "forward_flop_ratio": large["forward_gflop"] / small["forward_gflop"],
              "rest_time_ratio": large["rest_median_s"] / small["rest_median_s"], "one_at_a_time": loop}
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
