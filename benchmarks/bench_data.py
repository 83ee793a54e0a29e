"""Is batch assembly ever the bottleneck? Times one batch (window picks + collate + masking) against a model step.

    python benchmarks/bench_data.py                      # the shipped sources, context_len 24, batch 16
    python benchmarks/bench_data.py --out bench.json     # also write the figures as JSON

The model step (forward + backward through the loop adapter on the tiny on-disk base) is timed only when
`from modeling_gwm import GWMModel` works; otherwise only assembly is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from modeling_gwm.model.data import build_node_data, collate_canvas, load_sources  # noqa: E402
from modeling_gwm.training.masking import sample_target_mask  # noqa: E402


def median_ms(step, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def make_model_step(data, batch_fn, args):
    """A forward + backward closure over the loop adapter, or None when the model is not importable."""
    try:
        from modeling_gwm import GWMModel, LoopConfig
    except ImportError as err:
        print(f"model step: skipped (from modeling_gwm import GWMModel failed: {err})")
        return None, None
    from peft import get_peft_model

    model = GWMModel.from_pretrained(args.base, d_model=args.d_model, context_len=args.context_len,
                                     horizon=args.horizon, device=args.device)
    fields = [data.stats[name].to_dict() for name in data.field_names]
    model = get_peft_model(model, LoopConfig(n_loops=args.n_loops, fields=fields))
    model.train()

    def step():
        batch = batch_fn()
        out = model(batch["values"].to(args.device), batch["presence"].to(args.device),
                    target_mask=batch["target_mask"].to(args.device))
        out.loss.backward()
        model.zero_grad(set_to_none=True)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    described = f"{model.base_source}, {len(model.transformer_blocks)} blocks, inner_dim {model.inner_dim}, " \
                f"d_model {args.d_model}, n_loops {args.n_loops}, {args.device}"
    return step, described


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sources", default=str(REPO / "configuration" / "data" / "sources.yaml"))
    parser.add_argument("--context_len", type=int, default=24)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--horizon", type=int, default=4)
    parser.add_argument("--random_fraction", type=float, default=0.15)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--base", default=str(REPO / "configuration" / "tiny-cogvideox"))
    parser.add_argument("--d_model", type=int, default=32)
    parser.add_argument("--n_loops", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()

    start = time.perf_counter()
    data = build_node_data(list(load_sources(args.sources).values()), None, args.context_len)
    build_s = time.perf_counter() - start
    generator = torch.Generator().manual_seed(0)

    def assemble() -> dict[str, torch.Tensor]:
        picks = torch.randint(len(data.train), (args.batch_size,), generator=generator)
        batch = collate_canvas([data.train[int(i)] for i in picks])  # (B, T, F) each
        batch["target_mask"] = sample_target_mask(batch["presence"], args.horizon, args.random_fraction,
                                                  generator=generator)
        return batch

    results = {"sources": args.sources, "fields": len(data.field_names), "grid_frequency": data.frequency,
               "grid_steps": len(data.index), "train_windows": len(data.train), "context_len": args.context_len,
               "batch_size": args.batch_size, "build_node_data_s": round(build_s, 3),
               "assembly_ms": round(median_ms(assemble, args.repeats), 4)}
    print(f"node data: {results['fields']} fields on a {data.frequency} grid of {results['grid_steps']} steps, "
          f"{results['train_windows']} training windows (built in {build_s:.2f} s)")
    print(f"batch assembly (pick + collate + mask), B={args.batch_size} T={args.context_len}: "
          f"{results['assembly_ms']:.3f} ms (median of {args.repeats})")

    step, described = make_model_step(data, assemble, args)
    if step is not None:
        results["model"] = described
        results["model_step_ms"] = round(median_ms(step, max(5, args.repeats // 5)), 3)  # includes one assembly
        results["assembly_over_step"] = round(results["assembly_ms"] / results["model_step_ms"], 5)
        print(f"model step (assembly + forward + backward) on {described}: {results['model_step_ms']:.2f} ms")
        print(f"assembly / model step = {results['assembly_over_step']:.2%}")
    results["load_average_1m"] = round(os.getloadavg()[0], 2)  # a busy machine inflates the model step most
    results["torch_threads"] = torch.get_num_threads()
    print(f"(load average {results['load_average_1m']}, {results['torch_threads']} torch threads, {os.cpu_count()} "
          "cores)")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
