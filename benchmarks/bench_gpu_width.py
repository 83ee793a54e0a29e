"""Training at the real CogVideoX width on a GPU (issue 7, item 5).

A CogVideoX-2b-architecture base (30 blocks, width 1920; `--model 5b` for 42 blocks of width 3072) with random
weights, built from the published settings on the GPU (no download), frozen blocks in bf16, adapter in fp32, the
trainer's step under accelerate's bf16 mixed precision. For canvases of 1k-4k positions, with and without gradient
checkpointing: canvas positions per second, MFU of the frozen-block work (the FLOPs of the frozen-compute floor,
counted by torch's FlopCounterMode, over the step time and the GPU's dense bf16 peak), the step against the floor,
and peak memory (`torch.cuda.max_memory_allocated`) above the loaded model.

    python benchmarks/bench_gpu_width.py --out benchmarks/results/gpu_width.json

Needs CUDA; without it, it says so and exits 2. `--device cpu` with a narrow `--num_layers/--num_attention_heads`
only checks that the script runs (its figures mean nothing).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from _common import machine, mib, print_machine, print_table, summary, timed, write_json

from modeling_gwm import GWMConfig, GWMModel
from modeling_gwm.base import COGVIDEOX_ARCHITECTURES, FrozenBase

SHORT_NAMES = {"2b": "THUDM/CogVideoX-2b", "5b": "THUDM/CogVideoX-5b"}
# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, from the vendors' data sheets.
PEAK_BF16 = {"H100 SXM": 989.4e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989.4e12, "H200": 989.4e12,
             "GH200": 989.4e12, "A100": 312e12, "L40S": 362.05e12, "A10G": 70e12, "L4": 121e12}


def peak_flops(device_name: str) -> float | None:
    for key in sorted(PEAK_BF16, key=len, reverse=True):
        if key.lower() in device_name.lower():
            return PEAK_BF16[key]
    return None


def random_width_model(architecture: dict, name: str, d_model: int, device: torch.device) -> GWMModel:
    """GWMModel over a CogVideoX transformer built on `device` from its settings, unit-gain random weights."""
    from diffusers import CogVideoXTransformer3DModel

    with torch.device("meta"):
        transformer = CogVideoXTransformer3DModel(**architecture)
    transformer = transformer.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for module in transformer.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()  # norms to one, biases to their defaults
        for param in transformer.parameters():
            if param.dim() >= 2:  # as make_tiny_cogvideox: std 1/sqrt(fan_in), attention logits of order one
                param.normal_(0.0, param.shape[1] ** -0.5, generator=generator)
        t = torch.zeros(1, dtype=torch.long, device=device)  # the blocks' time embedding at timestep 0
        temb = transformer.time_embedding(transformer.time_proj(t)).float()  # (1, time_embed_dim)
    inner_dim = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    base = FrozenBase(blocks=transformer.transformer_blocks, temb=temb, inner_dim=inner_dim,
                      source=f"{name} architecture, random weights")
    config = GWMConfig(base_model_name_or_path=name, d_model=d_model, frozen_dtype="auto")
    return GWMModel(config, frozen_base=base, device=str(device))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(SHORT_NAMES), default="2b")
    parser.add_argument("--positions", type=int, nargs="+", default=[1024, 2048, 4096],
                        help="canvas positions (context_len x fields)")
    parser.add_argument("--fields", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--n_loops", type=int, default=3)
    parser.add_argument("--d_model", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--peak_tflops", type=float, default=None, help="GPU dense bf16 peak (else PEAK_BF16)")
    parser.add_argument("--num_layers", type=int, default=None, help="override (only to check the script on a CPU)")
    parser.add_argument("--num_attention_heads", type=int, default=None, help="override (as --num_layers)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_gpu_width.py: no CUDA device here: this benchmark measures the real CogVideoX width on a GPU and "
              "has not been run (use --device cpu with a small --num_layers/--num_attention_heads only to check it "
              "runs).", file=sys.stderr)
        sys.exit(2)

    from accelerate import Accelerator
    from bench_step import StepBench
    from peft import get_peft_model

    from modeling_gwm.loop import LoopConfig

    name = SHORT_NAMES[args.model]
    architecture = dict(COGVIDEOX_ARCHITECTURES[name])
    for key in ("num_layers", "num_attention_heads"):
        if getattr(args, key) is not None:
            architecture[key] = getattr(args, key)
    info = machine()
    print_machine(info)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else (
        peak_flops(torch.cuda.get_device_name()) if device.type == "cuda" else None)
    sync = torch.cuda.synchronize if device.type == "cuda" else None

    model = random_width_model(architecture, name, args.d_model, device)
    fields = [{"name": f"bench.series_{j:02d}", "mean": 0.0, "std": 1.0, "transform": "none"}
              for j in range(args.fields)]
    peft_model = get_peft_model(model, LoopConfig(n_loops=args.n_loops, fields=fields), adapter_name="bench")
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision="bf16" if device.type == "cuda" else "no")
    frozen_params = sum(p.numel() for p in model.transformer_blocks.parameters() if not p.requires_grad)
    rows = []
    with tempfile.TemporaryDirectory(prefix="gwm-bench-gpu-") as workdir:
        for positions in args.positions:
            for checkpointing in (False, True):
                model.gradient_checkpointing_enable() if checkpointing else model.gradient_checkpointing_disable()
                context_len = positions // args.fields
                step_args = argparse.Namespace(context_len=context_len, fields=args.fields,
                                               rows=max(600, 2 * context_len), horizon=min(4, context_len // 2),
                                               batch_size=args.batch_size, n_loops=args.n_loops)
                bench = StepBench(step_args, Path(workdir), peft_model=peft_model, accelerator=accelerator)
                step_times = timed(bench.step, args.repeats, args.warmup, sync=sync)
                floor_times = timed(bench.floor, args.repeats, args.warmup, sync=sync)
                forward = summary(timed(bench.floor_forward, args.repeats, args.warmup, sync=sync))
                flops = bench.floor_flops()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
                    resident = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                    bench.step()
                    torch.cuda.synchronize()
                    peak_memory = torch.cuda.max_memory_allocated() - resident
                else:
                    resident = peak_memory = None
                step, floor = summary(step_times), summary(floor_times)
                tokens = args.batch_size * positions
                rows.append({
                    "positions": positions, "gradient_checkpointing": checkpointing, "step": step, "floor": floor,
                    "step_over_floor": step["median_s"] / floor["median_s"], "floor_forward": forward,
                    # with checkpointing the loop layer recomputes each application's forward twice (n_loops > 1)
                    "step_over_floor_with_recompute": step["median_s"] / (
                        floor["median_s"] + checkpointing * (2 if args.n_loops > 1 else 1) * forward["median_s"]),
                    "positions_per_s": tokens / step["median_s"],
                    "floor_tflop": flops / 1e12,
                    "mfu_step": flops / step["median_s"] / peak if peak else None,
                    "mfu_floor": flops / floor["median_s"] / peak if peak else None,
                    "resident_bytes": resident, "peak_above_resident_bytes": peak_memory,
                })
                print(f"N={positions} checkpointing={checkpointing}: step {step['median_s'] * 1e3:.1f} ms, floor "
                      f"{floor['median_s'] * 1e3:.1f} ms", flush=True)
                del bench
    result = {
        "benchmark": "gpu_width",
        "machine": info,
        "settings": {**vars(args), "architecture": architecture, "frozen_parameters": frozen_params,
                     "peak_bf16_flops": peak},
        "rows": rows,
    }
    frozen_dtype = next(model.transformer_blocks.parameters()).dtype
    print_table(f"{args.model} architecture (random weights), B={args.batch_size}, n_loops={args.n_loops}, "
                f"{frozen_dtype} frozen blocks, {frozen_params / 1e6:.0f}M frozen parameters", [{
                    "positions": r["positions"], "checkpointing": r["gradient_checkpointing"],
                    "step ms": r["step"]["median_s"] * 1e3, "floor ms": r["floor"]["median_s"] * 1e3,
                    "step/floor": r["step_over_floor"], "step/(floor+recompute)": r["step_over_floor_with_recompute"],
                    "positions/s": r["positions_per_s"],
                    "MFU step": r["mfu_step"], "MFU floor": r["mfu_floor"],
                    "peak MiB": None if r["peak_above_resident_bytes"] is None else mib(r["peak_above_resident_bytes"]),
                } for r in rows])
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
