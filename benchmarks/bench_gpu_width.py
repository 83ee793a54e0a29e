"""Training at the real CogVideoX width on a GPU (issue 7, item 5; issue 19, item 4).

A CogVideoX-2b-architecture base (30 blocks, width 1920; `--model 5b` for 42 blocks of width 3072) with random
weights, built from the published settings on the GPU (no download), frozen blocks in bf16, adapter in fp32, the
trainer's own step (as `trainer.train_node` takes it: its batch, pinball loss, non-finite guard, fused AdamW on
CUDA) under accelerate's bf16 mixed precision. For each canvas size
(`--positions`, per sample; `--batch_size` canvases packed into one step) and each checkpointing mode (`none`, and
the two granularities `loop` and `application`), it prints:

- the step time and the frozen-compute floor (every block applied n_loops times forward, input gradients backward;
  plus the recomputed forwards when checkpointing), and the SHARE OF THE STEP OUTSIDE THE FROZEN WORK:
  (step - floor - recomputation) / step;
- the time to assemble one batch of windows on the CPU (a part of that share);
- the MFU of the useful frozen work: the floor's FLOPs (torch's FlopCounterMode, without recomputation) over the
  step time and the GPU's dense bf16 peak;
- peak memory (`torch.cuda.max_memory_allocated`) above the loaded model.

`--compile_blocks` compiles the frozen blocks first (`GWMConfig.compile_blocks`, regional `torch.compile`).

    python benchmarks/bench_gpu_width.py --positions 2048 8192 16384 --out benchmarks/results/gpu/gpu_width.json
    python benchmarks/bench_gpu_width.py --positions 2048 --batch_size 4 --compile_blocks    # packing, compiled

Needs CUDA; without it, it says so and exits 2. `--device cpu` with a narrow `--num_layers/--num_attention_heads`
only checks that the script runs (its figures mean nothing).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from _common import machine, mib, print_machine, print_table, summary, timed, write_json

from modeling_gwm import GWMConfig, GWMModel
from modeling_gwm.model.base import COGVIDEOX_ARCHITECTURES, FrozenBase

SHORT_NAMES = {"2b": "THUDM/CogVideoX-2b", "5b": "THUDM/CogVideoX-5b"}
# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, from the vendors' data sheets.
PEAK_BF16 = {"H100 SXM": 989.4e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989.4e12, "H200": 989.4e12,
             "GH200": 989.4e12, "A100": 312e12, "L40S": 362.05e12, "A10G": 70e12, "L4": 121e12}


def peak_flops(device_name: str) -> float | None:
    for key in sorted(PEAK_BF16, key=len, reverse=True):
        if key.lower() in device_name.lower():
            return PEAK_BF16[key]
    return None


def random_width_model(architecture: dict, name: str, d_model: int, device: torch.device,
                       compile_blocks: bool = False) -> GWMModel:
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
    config = GWMConfig(base_model_name_or_path=name, d_model=d_model, frozen_dtype="auto",
                       compile_blocks=compile_blocks)
    return GWMModel(config, frozen_base=base, device=str(device))


CHECKPOINTING = ("none", "loop", "application")


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(SHORT_NAMES), default="2b")
    parser.add_argument("--positions", type=int, nargs="+", default=[2048, 8192, 16384],
                        help="canvas positions per sample (context_len x fields)")
    parser.add_argument("--fields", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=1,
                        help="canvases per step: packing small canvases so that a step carries enough positions")
    parser.add_argument("--checkpointing", nargs="+", choices=CHECKPOINTING, default=list(CHECKPOINTING),
                        help="none, and the gradient checkpointing granularities (GWMConfig)")
    parser.add_argument("--compile_blocks", action="store_true", help="compile the frozen blocks (torch.compile)")
    parser.add_argument("--n_loops", type=int, default=3)
    parser.add_argument("--d_model", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--peak_tflops", type=float, default=None, help="GPU dense bf16 peak (else PEAK_BF16)")
    parser.add_argument("--num_layers", type=int, default=None, help="override (only to check the script on a CPU)")
    parser.add_argument("--num_attention_heads", type=int, default=None, help="override (as --num_layers)")
    parser.add_argument("--out", default=None)
    return parser.parse_args(argv)


def _set_checkpointing(model: GWMModel, mode: str) -> None:
    with warnings.catch_warnings():  # transformers 5 prefers activation_checkpointing_*; older ones lack them
        warnings.simplefilter("ignore", FutureWarning)
        if mode == "none":
            model.gradient_checkpointing_disable()
        else:
            model.config.gradient_checkpointing_granularity = mode
            model.gradient_checkpointing_enable()


def _eager():
    """FLOPs are counted on the plain blocks: a dispatch mode does not see inside compiled code."""
    stance = getattr(torch.compiler, "set_stance", None)
    return stance("force_eager") if stance else contextlib.nullcontext()


def _peak_memory(bench, device: torch.device) -> tuple[int | None, int | None]:
    if device.type != "cuda":
        return None, None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    resident = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    bench.trainer_step()
    torch.cuda.synchronize()
    return resident, torch.cuda.max_memory_allocated() - resident


def _measure(bench, args, mode: str, sync, peak: float | None, device: torch.device, floor: dict) -> dict:
    """One (canvas, checkpointing) row: step time, the share outside the frozen work, MFU, peak memory."""
    step = summary(timed(bench.trainer_step, args.repeats, args.warmup, sync=sync))
    recomputes = 0 if mode == "none" else (2 if mode == "loop" and args.n_loops > 1 else 1)
    frozen_s = floor["floor"]["median_s"] + recomputes * floor["floor_forward"]["median_s"]
    resident, peak_memory = _peak_memory(bench, device)
    return {
        "positions": floor["positions"], "batch_size": args.batch_size, "checkpointing": mode, "step": step,
        **floor, "recomputed_forwards": recomputes, "frozen_work_s": frozen_s,
        "step_over_floor": step["median_s"] / floor["floor"]["median_s"],
        "step_over_frozen_work": step["median_s"] / frozen_s,
        "outside_frozen_share": (step["median_s"] - frozen_s) / step["median_s"],
        "batch_assembly_share": floor["batch_assembly"]["median_s"] / step["median_s"],
        "positions_per_s": args.batch_size * floor["positions"] / step["median_s"],
        "mfu_useful": floor["floor_flops"] / step["median_s"] / peak if peak else None,
        "mfu_floor": floor["floor_flops"] / floor["floor"]["median_s"] / peak if peak else None,
        "resident_bytes": resident, "peak_above_resident_bytes": peak_memory,
    }


def _floor(bench, args, positions: int, sync) -> dict:
    _set_checkpointing(bench.gwm, "none")
    with _eager():
        flops = bench.floor_flops()
    return {"positions": positions, "floor_flops": flops,
            "floor": summary(timed(bench.floor, args.repeats, args.warmup, sync=sync)),
            "floor_forward": summary(timed(bench.floor_forward, args.repeats, args.warmup, sync=sync)),
            "batch_assembly": summary(timed(bench.trainer_batch, args.repeats, args.warmup, sync=sync))}


def main(argv: list[str] | None = None) -> dict:
    args = _arguments(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_gpu_width.py: no CUDA device here: this benchmark measures the real CogVideoX width on a GPU and "
              "has not been run (use --device cpu with a small --num_layers/--num_attention_heads only to check it "
              "runs).", file=sys.stderr)
        sys.exit(2)

    from accelerate import Accelerator
    from bench_step import StepBench
    from peft import get_peft_model

    from modeling_gwm.model.loop import LoopConfig

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

    model = random_width_model(architecture, name, args.d_model, device, compile_blocks=args.compile_blocks)
    fields = [{"name": f"bench.series_{j:02d}", "mean": 0.0, "std": 1.0, "transform": "none"}
              for j in range(args.fields)]
    peft_model = get_peft_model(model, LoopConfig(n_loops=args.n_loops, fields=fields), adapter_name="bench")
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision="bf16" if device.type == "cuda" else "no")
    frozen_params = sum(p.numel() for p in model.transformer_blocks.parameters() if not p.requires_grad)
    rows = []
    with tempfile.TemporaryDirectory(prefix="gwm-bench-gpu-") as workdir:
        for positions in args.positions:
            context_len = positions // args.fields
            step_args = argparse.Namespace(context_len=context_len, fields=args.fields,
                                           rows=max(600, 2 * context_len), horizon=min(4, context_len // 2),
                                           batch_size=args.batch_size, n_loops=args.n_loops)
            bench = StepBench(step_args, Path(workdir), peft_model=peft_model, accelerator=accelerator)
            floor = _floor(bench, args, positions, sync)
            for mode in args.checkpointing:
                _set_checkpointing(model, mode)
                rows.append(_measure(bench, args, mode, sync, peak, device, floor))
                r = rows[-1]
                print(f"N={positions} B={args.batch_size} checkpointing={mode}: step "
                      f"{r['step']['median_s'] * 1e3:.1f} ms, frozen work {r['frozen_work_s'] * 1e3:.1f} ms, "
                      f"outside {r['outside_frozen_share']:.1%}",
                      flush=True)
            del bench
    result = {
        "benchmark": "gpu_width",
        "machine": info,
        "settings": {**vars(args), "architecture": architecture, "frozen_parameters": frozen_params,
                     "peak_bf16_flops": peak},
        "rows": rows,
    }
    _print(args, model, frozen_params, rows)
    write_json(args.out, result)
    return result


def _print(args, model: GWMModel, frozen_params: int, rows: list[dict]) -> None:
    frozen_dtype = next(model.transformer_blocks.parameters()).dtype
    mib_or_none = lambda v: None if v is None else mib(v)  # noqa: E731
    print_table(f"{args.model} architecture (random weights), B={args.batch_size}, n_loops={args.n_loops}, "
                f"{frozen_dtype} frozen blocks{', compiled' if args.compile_blocks else ''}, "
                f"{frozen_params / 1e6:.0f}M frozen parameters", [{
                    "positions": r["positions"], "checkpointing": r["checkpointing"],
                    "step ms": r["step"]["median_s"] * 1e3, "frozen work ms": r["frozen_work_s"] * 1e3,
                    "outside frozen": r["outside_frozen_share"], "batch assembly": r["batch_assembly_share"],
                    "step/(floor+recompute)": r["step_over_frozen_work"], "positions/s": r["positions_per_s"],
                    "MFU useful": r["mfu_useful"], "MFU floor": r["mfu_floor"],
                    "peak MiB": mib_or_none(r["peak_above_resident_bytes"]),
                } for r in rows])


if __name__ == "__main__":
    main()
