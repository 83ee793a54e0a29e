"""One training step against the frozen-compute floor (issue 7, item 1).

The floor is the unavoidable work: every frozen block applied `n_loops` times forward, and the gradient with respect
to its inputs backward (the blocks are frozen, so no weight gradients), at the step's shapes. The step is the real
training step of `modeling_gwm.training.trainer`: batch assembly from a `CanvasDataset` (windows, collate, target mask),
codec, loop adapter, loss, backward and the AdamW update of the adapter, under the same accelerate calls. The figure
is step / floor; everything GWM adds around the frozen blocks is the excess over 1.

    python benchmarks/bench_step.py --out benchmarks/results/step.json
    python benchmarks/bench_step.py --gradient_checkpointing [--gradient_checkpointing_granularity application]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from _common import BENCH_ARCHITECTURE, machine, make_bench_base, print_machine, print_table, summary, timed, write_json

from modeling_gwm import GWMModel
from modeling_gwm.model.data import DataSource, build_node_data, collate_canvas
from modeling_gwm.model.loop import LoopConfig, LoopLayer
from modeling_gwm.training.checkpoint import NodeState
from modeling_gwm.training.curriculum import TrainingNode
from modeling_gwm.training.masking import sample_target_mask
from modeling_gwm.training.trainer import adamw, guarded_step, micro_batches, step_batch


def synthetic_source(folder: Path, n_fields: int, n_rows: int, seed: int = 0) -> DataSource:
    """A monthly CSV of `n_fields` random walks with ~10% gaps, read through the data module like any source."""
    rng = np.random.default_rng(seed)
    table = pd.DataFrame({"date": pd.date_range("1950-01-01", periods=n_rows, freq="MS").strftime("%Y-%m-%d")})
    for j in range(n_fields):
        series = np.cumsum(rng.normal(size=n_rows))
        series[rng.random(n_rows) < 0.1] = np.nan
        table[f"s{j}"] = series
    path = folder / "bench_series.csv"
    table.to_csv(path, index=False)
    fields = {f"bench.series_{j:02d}": {"column": f"s{j}"} for j in range(n_fields)}
    return DataSource.from_dict("bench", {"path": str(path), "frequency": "MS", "fields": fields})


def bench_model(base: str, args: argparse.Namespace, fields: list[dict], **config):
    """The bench base (or any) with a fresh loop adapter, as a root node starts."""
    from peft import get_peft_model

    model = GWMModel.from_pretrained(base, d_model=args.d_model, gradient_checkpointing=args.gradient_checkpointing,
                                     gradient_checkpointing_granularity=args.gradient_checkpointing_granularity,
                                     **config)
    return get_peft_model(model, LoopConfig(n_loops=args.n_loops, fields=fields), adapter_name="bench")


class StepBench:
    """The model, data and optimizer of one node, and the two callables that are timed.

    `args` needs context_len, fields, rows, horizon, batch_size, n_loops (and num_layers, d_model,
    gradient_checkpointing, gradient_checkpointing_granularity when the model is built here).
    """

    def __init__(self, args: argparse.Namespace, workdir: Path, peft_model=None, accelerator=None):
        import datasets
        from accelerate import Accelerator

        datasets.disable_progress_bars()
        logging.getLogger("modeling_gwm.model.data").setLevel(logging.ERROR)  # the synthetic gaps are deliberate
        self.data = build_node_data([synthetic_source(workdir, args.fields, args.rows)], None, args.context_len)
        if peft_model is None:
            base = make_bench_base(workdir / "base", num_layers=args.num_layers)
            peft_model = bench_model(base, args, [s.to_dict() for s in self.data.stats.values()])
        self.model = peft_model
        self.gwm = peft_model.base_model.model
        self.args = args
        self.accelerator = accelerator or Accelerator(cpu=True)
        self.device = self.accelerator.device
        self.field_ids = torch.arange(args.fields, device=self.device)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.n_trainable = sum(p.numel() for p in params)
        optimizer = adamw(params, 1e-3, 0.01)  # the trainer's: fused on CUDA
        if getattr(peft_model, "_bench_prepared", False):  # a model reused across canvases is prepared (wrapped) once
            self.ddp_model, self.optimizer = peft_model, self.accelerator.prepare(optimizer)
        else:
            self.ddp_model, self.optimizer = self.accelerator.prepare(self.model, optimizer)
            peft_model._bench_prepared = True
        self.ddp_model.train()
        self.step_index = 0
        self.frozen_blocks = [layer.base_layer if isinstance(layer, LoopLayer) else layer
                              for layer in self.gwm.transformer_blocks]
        assert not any(p.requires_grad for block in self.frozen_blocks for p in block.parameters())
        # floor inputs: the blocks' own input shapes and dtype, requiring grad so backward computes input gradients
        batch, positions, inner = args.batch_size, args.context_len * args.fields, self.gwm.inner_dim
        dtype = next(self.frozen_blocks[0].parameters()).dtype
        generator = torch.Generator().manual_seed(0)
        self.floor_hidden = torch.randn(batch, positions, inner, generator=generator).to(self.device, dtype)
        self.floor_encoder = torch.randn(batch, 1, inner, generator=generator).to(self.device, dtype)
        self.floor_hidden.requires_grad_(True)
        self.floor_encoder.requires_grad_(True)
        # the trainer's own step (`trainer_step`): its node settings, parameters and loop state
        self.node = TrainingNode(name="bench", batch_size=args.batch_size, context_len=args.context_len,
                                 horizon=args.horizon, n_loops=args.n_loops)
        self.params, self.state, self.ahead = params, NodeState(), None

    def batch(self) -> dict[str, torch.Tensor]:
        """The trainer's batch assembly: random windows, collate, target mask (seeded per step)."""
        args = self.args
        generator = torch.Generator().manual_seed(self.step_index)
        picks = torch.randint(len(self.data.train), (args.batch_size,), generator=generator)
        batch = collate_canvas([self.data.train[int(i)] for i in picks])
        batch["target_mask"] = sample_target_mask(batch["presence"], args.horizon, 0.15, 0.5, generator=generator)
        return {key: value.to(self.device) for key, value in batch.items()}

    def step(self) -> None:
        """One optimizer step exactly as `DAGCurriculumTrainer.train_node` runs it (one micro-batch)."""
        acc = self.accelerator
        batch = self.batch()
        scored_total = float((batch["target_mask"] & batch["presence"]).sum().clamp_min(1))
        with acc.accumulate(self.ddp_model):
            with acc.autocast():
                predictions = self.ddp_model(batch["values"], batch["presence"], field_ids=self.field_ids,
                                             target_mask=batch["target_mask"]).predictions
            scored = batch["target_mask"] & batch["presence"]
            sse = ((predictions.float() - batch["values"]) ** 2 * scored).sum()
            acc.backward(sse / scored_total)
            self.optimizer.step()
            self.optimizer.zero_grad()
        self.step_index += 1

    def trainer_batch(self) -> list[dict]:
        """The trainer's batch of the next step (`trainer.step_batch`, `trainer.micro_batches`), on the device."""
        batch = step_batch(self.data, self.node, 0, 0, self.state.step)
        return micro_batches(self.accelerator, batch, self.node.batch_size)

    def trainer_step(self) -> None:
        """One step as `DAGCurriculumTrainer.train_node` takes it, with the trainer's functions: its batch (the next
        one drawn while the device computes), pinball loss, backward, the guarded optimizer step (one host sync) and
        the loss read back."""
        acc, node, step = self.accelerator, self.node, self.state.step + 1
        batch = self.ahead or step_batch(self.data, node, 0, 0, self.state.step)
        self.ahead, sse_step = None, torch.zeros((), device=acc.device)
        for micro in micro_batches(acc, batch, node.batch_size):
            with acc.accumulate(self.ddp_model):
                with acc.autocast():
                    position_loss = self.ddp_model(micro["values"], micro["presence"], field_ids=self.field_ids,
                                                   target_mask=micro["target_mask"]).position_loss
                sse = (position_loss.float() * (micro["target_mask"] & micro["presence"])).sum()
                acc.backward(sse * (acc.num_processes * acc.gradient_accumulation_steps / batch["scored_total"]))
                if acc.sync_gradients:
                    self.ahead = step_batch(self.data, node, 0, 0, step)
                    guarded_step(acc, self.optimizer, self.params, sse_step + sse.detach(), batch["scored_total"])
                self.optimizer.zero_grad()
            sse_step += sse.detach()
        self.state.step = step

    def floor_forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The floor's forward half: blocks x n_loops applications (what a checkpointing recompute repeats)."""
        temb = self.gwm.block_temb.expand(self.args.batch_size, -1).to(self.floor_hidden.dtype)  # (B, time_embed_dim)
        hidden, encoder = self.floor_hidden, self.floor_encoder  # (B, N, inner), (B, 1, inner)
        for block in self.frozen_blocks:
            for _ in range(self.args.n_loops):
                hidden, encoder = block(hidden, encoder, temb, None, None)
        return hidden, encoder

    def floor(self) -> None:
        """The frozen blocks alone: blocks x n_loops applications forward, input gradients backward."""
        hidden, encoder = self.floor_forward()
        torch.autograd.backward([hidden, encoder], [torch.ones_like(hidden), torch.ones_like(encoder)])
        self.floor_hidden.grad = self.floor_encoder.grad = None

    def floor_flops(self) -> int:
        """FLOPs of one floor call, counted by torch's FlopCounterMode (matmuls and attention)."""
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            self.floor()
        return counter.get_total_flops()


def profile_gap(bench: StepBench, top: int) -> list[dict]:
    """Self CPU time per aten op in one step minus one floor call: which ops the step adds."""
    from torch.profiler import ProfilerActivity, profile

    def per_op(fn) -> dict[str, tuple[float, int]]:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        totals: dict[str, list] = defaultdict(lambda: [0.0, 0])
        for event in prof.key_averages():
            totals[event.key][0] += event.self_cpu_time_total / 1e3  # ms
            totals[event.key][1] += event.count
        return totals

    step_ops, floor_ops = per_op(bench.step), per_op(bench.floor)
    rows = []
    for key in set(step_ops) | set(floor_ops):
        step_ms, step_n = step_ops.get(key, (0.0, 0))
        floor_ms, floor_n = floor_ops.get(key, (0.0, 0))
        rows.append({"op": key, "step_ms": step_ms, "floor_ms": floor_ms, "extra_ms": step_ms - floor_ms,
                     "step_calls": step_n, "floor_calls": floor_n})
    rows.sort(key=lambda r: -r["extra_ms"])
    total = {"op": "TOTAL (self CPU)", "step_ms": sum(r["step_ms"] for r in rows),
             "floor_ms": sum(r["floor_ms"] for r in rows), "extra_ms": sum(r["extra_ms"] for r in rows)}
    return [total] + rows[:top]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context_len", type=int, default=32)
    parser.add_argument("--fields", type=int, default=16, help="canvas positions = context_len x fields")
    parser.add_argument("--rows", type=int, default=600, help="monthly rows of the synthetic source")
    parser.add_argument("--horizon", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--n_loops", type=int, default=3)
    parser.add_argument("--num_layers", type=int, default=BENCH_ARCHITECTURE["num_layers"])
    parser.add_argument("--d_model", type=int, default=128)
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--gradient_checkpointing_granularity", choices=["loop", "application"], default="loop",
                        help="loop: whole loop then each application (memory flat in n_loops); application: each "
                             "application only (one recomputed forward less)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--profile", type=int, default=0, metavar="TOP",
                        help="also profile one step and one floor call and print the TOP ops the step adds")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine()
    print_machine(info)

    with tempfile.TemporaryDirectory(prefix="gwm-bench-step-") as workdir:
        bench = StepBench(args, Path(workdir))
        # interleave step and floor repeats so a change of machine load hits both alike
        step_times, floor_times, forward_times, step_cpu, floor_cpu = [], [], [], [], []
        timed(bench.step, repeats=0, warmup=args.warmup)
        timed(bench.floor, repeats=0, warmup=args.warmup)
        for _ in range(args.repeats):
            for fn, wall, cpu in ((bench.step, step_times, step_cpu), (bench.floor, floor_times, floor_cpu)):
                cpu_start = time.process_time()
                wall += timed(fn, repeats=1, warmup=0)
                cpu.append(time.process_time() - cpu_start)
            if args.gradient_checkpointing:
                forward_times += timed(bench.floor_forward, repeats=1, warmup=0)
        flops = bench.floor_flops()
        gap = profile_gap(bench, args.profile) if args.profile else None

    step, floor = summary(step_times), summary(floor_times)
    ratio = step["median_s"] / floor["median_s"]
    recompute = None
    if args.gradient_checkpointing:
        # two-level checkpointing runs each application's forward twice more (once for n_loops=1); per-application
        # checkpointing once more
        recomputes = 2 if args.n_loops > 1 and args.gradient_checkpointing_granularity == "loop" else 1
        forward = summary(forward_times)
        recompute = {"floor_forward": forward, "recomputed_forwards": recomputes,
                     "floor_with_recompute_s": floor["median_s"] + recomputes * forward["median_s"]}
        recompute["step_over_floor_with_recompute"] = step["median_s"] / recompute["floor_with_recompute_s"]
    cpu_ratio = statistics.median(step_cpu) / statistics.median(floor_cpu)
    positions = args.context_len * args.fields
    result = {
        "benchmark": "step_vs_floor",
        "machine": info,
        "settings": {**vars(args), "positions": positions, "inner_dim": bench.gwm.inner_dim,
                     "num_blocks": len(bench.frozen_blocks), "trainable_parameters": bench.n_trainable,
                     "block_applications": len(bench.frozen_blocks) * args.n_loops},
        "step": step,
        "floor": floor,
        "step_over_floor": ratio,
        "step_over_floor_cpu_time": cpu_ratio,  # process CPU seconds: less sensitive to other load on the machine
        "step_cpu_s_median": statistics.median(step_cpu),
        "floor_cpu_s_median": statistics.median(floor_cpu),
        "floor_gflop": flops / 1e9,
        "floor_gflops_per_s": flops / floor["median_s"] / 1e9,
        "tokens_per_s": args.batch_size * positions / step["median_s"],
        "target": "step/floor <= 1.10",
        "target_met": ratio <= 1.10,
        "checkpointing": recompute,
        "profile_gap": gap,
    }
    print_table(f"step vs frozen-compute floor (B={args.batch_size}, N={positions}, inner={bench.gwm.inner_dim}, "
                f"{len(bench.frozen_blocks)} blocks x {args.n_loops} loops, checkpointing="
                f"{args.gradient_checkpointing and args.gradient_checkpointing_granularity}, "
                f"threads={torch.get_num_threads()})",
                [{"what": "floor (frozen blocks fwd + input-grad bwd)", **floor},
                 {"what": "training step", **step}],
                ["what", "median_s", "min_s", "max_s", "repeats"])
    print(f"step/floor = {ratio:.3f} wall, {cpu_ratio:.3f} CPU time (target <= 1.10: "
          f"{'met' if ratio <= 1.10 else 'NOT met'}); floor "
          f"{flops / 1e9:.1f} GFLOP at {result['floor_gflops_per_s']:.1f} GFLOP/s; "
          f"{result['tokens_per_s']:.0f} canvas positions/s")
    if recompute:
        print(f"with checkpointing: floor + {recompute['recomputed_forwards']} recomputed forwards of the blocks "
              f"({recompute['floor_forward']['median_s']:.3f} s each) = {recompute['floor_with_recompute_s']:.3f} s; "
              f"step / that = {recompute['step_over_floor_with_recompute']:.3f}")
    if gap:
        print_table("ops the step adds over the floor (one profiled call each, self CPU ms)", gap,
                    ["op", "extra_ms", "step_ms", "floor_ms", "step_calls", "floor_calls"])
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
