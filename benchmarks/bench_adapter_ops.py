"""Adapter operations at the real CogVideoX-2b and -5b widths (issue 7, item 3).

The model has the real architecture (30 blocks of width 1920 for 2b, 42 of width 3072 for 5b, built by diffusers from
the published settings in `COGVIDEOX_ARCHITECTURES`), but its frozen blocks are allocated and never initialised:
none of these operations reads a frozen weight, and untouched pages cost no RAM, so a 2-core CPU box can hold the
5b structure. The adapters are real PEFT loop adapters with random values. Measured:

- adapter bytes (`adapter_model.safetensors`) against 4 bytes x trainable parameters (fp32);
- save (`PeftModel.save_pretrained`), load (safetensors `load_file`), attach (`PeftModel.load_adapter` of a saved
  folder onto the model that already holds the base: wraps the blocks' adapter slots and copies the weights in);
- `set_adapter` switch between two attached adapters;
- join merge (`modeling_gwm.model.merging.merge_adapters`) of 2 and 5 parents for every merge method.

    python benchmarks/bench_adapter_ops.py --out benchmarks/results/adapter_ops.json
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
from _common import machine, mib, print_machine, print_table, rss_now_bytes, summary, timed, write_json

from modeling_gwm import GWMConfig, GWMModel
from modeling_gwm.model.base import COGVIDEOX_ARCHITECTURES, FrozenBase, load_cogvideox_base
from modeling_gwm.model.loop import LoopConfig
from modeling_gwm.model.merging import MERGE_METHODS, MergeSpec, merge_adapters

SHORT_NAMES = {"2b": "THUDM/CogVideoX-2b", "5b": "THUDM/CogVideoX-5b"}


def real_width_model(name: str, d_model: int, max_fields: int) -> GWMModel:
    """A GWMModel with the published architecture of `name`; frozen blocks allocated (bf16) but never written."""
    meta = load_cogvideox_base(name, architecture=COGVIDEOX_ARCHITECTURES[name])  # blocks on the meta device
    blocks = meta.blocks.to(torch.bfloat16).to_empty(device="cpu").requires_grad_(False)
    base = FrozenBase(blocks=blocks, temb=torch.zeros(1, meta.temb.size(-1)), inner_dim=meta.inner_dim,
                      source=f"{name} (architecture, uninitialised blocks)")
    config = GWMConfig(base_model_name_or_path=name, d_model=d_model, max_fields=max_fields, frozen_dtype="bfloat16")
    return GWMModel(config, frozen_base=base)


def field_list(names: list[str]) -> list[dict]:
    return [{"name": n, "mean": 0.0, "std": 1.0, "transform": "none"} for n in names]


def randomise_adapter(peft_model, adapter_name: str, generator: torch.Generator) -> None:
    """Give an adapter trained-looking (random, non-zero) values in place."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    state = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    noisy = {k: v + 0.02 * torch.randn(v.shape, generator=generator) for k, v in state.items()}
    set_peft_model_state_dict(peft_model, noisy, adapter_name=adapter_name)


def bench_model(short: str, args: argparse.Namespace) -> tuple[dict, list[dict]]:
    from peft import get_peft_model, get_peft_model_state_dict
    from safetensors.torch import load_file

    name = SHORT_NAMES[short]
    generator = torch.Generator().manual_seed(0)
    rss_start = rss_now_bytes()
    model = real_width_model(name, args.d_model, args.max_fields)
    fields = [f"bench.field_{i:02d}" for i in range(args.fields)]
    peft_model = get_peft_model(model, LoopConfig(n_loops=args.n_loops, fields=field_list(fields)), adapter_name="a")
    randomise_adapter(peft_model, "a", generator)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    state = get_peft_model_state_dict(peft_model, adapter_name="a")
    state_numel = sum(v.numel() for v in state.values())
    rss_model = rss_now_bytes() - rss_start

    with tempfile.TemporaryDirectory(prefix="gwm-bench-adapter-") as workdir:
        # PEFT writes an adapter not named "default" into <dir>/<adapter name>/
        save = summary(timed(lambda: peft_model.save_pretrained(workdir, selected_adapters=["a"]), args.repeats))
        folder = os.path.join(workdir, "a")
        weights_file = os.path.join(folder, "adapter_model.safetensors")
        file_bytes = os.path.getsize(weights_file)
        load = summary(timed(lambda: load_file(weights_file), args.repeats))
        attached = []

        def attach() -> None:
            adapter_name = f"attached{len(attached)}"
            peft_model.load_adapter(folder, adapter_name=adapter_name)
            attached.append(adapter_name)

        attach_times = []
        for _ in range(args.repeats + 1):  # the first attach is a warm-up; each attached copy is deleted after
            attach_times += timed(attach, repeats=1, warmup=0)
            peft_model.delete_adapter(attached[-1])
        attach_s = summary(attach_times[1:])

        # switching: two adapters attached, flip the active one
        peft_model.load_adapter(folder, adapter_name="b")
        targets = iter(["b", "a"] * (args.switches + 10))
        switch = summary(timed(lambda: peft_model.set_adapter(next(targets)), args.switches, warmup=10))
        assert peft_model.active_adapter in ("a", "b")

    # join merges over the adapter's state dict (what the trainer merges); parents cover overlapping field sets
    init = {k: v.detach().clone() for k, v in state.items()}
    merge_rows = []
    for n_parents in args.parents:
        per_parent = max(1, args.fields // 2)
        parent_fields = [fields[(i * per_parent // 2) % args.fields:][:per_parent] for i in range(n_parents)]
        child_fields = list(dict.fromkeys(f for pf in parent_fields for f in pf))
        parents = [{k: v + 0.02 * torch.randn(v.shape, generator=generator) for k, v in init.items()}
                   for _ in range(n_parents)]
        for method in args.methods:
            spec = MergeSpec(method=method, density=0.5)
            times = timed(lambda spec=spec, parents=parents, parent_fields=parent_fields, child_fields=child_fields:
                          merge_adapters(parents, parent_fields, child_fields, init, spec=spec), args.repeats)
            merge_rows.append({"model": short, "parents": n_parents, "method": method, **summary(times)})

    row = {
        "model": short,
        "blocks": len(model.transformer_blocks),
        "inner_dim": model.inner_dim,
        "n_loops": args.n_loops,
        "d_model": args.d_model,
        "max_fields": args.max_fields,
        "trainable_parameters": trainable,
        "adapter_state_parameters": state_numel,
        "adapter_file_bytes": file_bytes,
        "fp32_bytes_of_trainable": 4 * trainable,
        "file_over_4x_trainable": file_bytes / (4 * trainable),
        "save": save,
        "load": load,
        "attach": attach_s,
        "switch": switch,
        "process_rss_growth_bytes": rss_model,
    }
    return row, merge_rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["2b", "5b"], choices=sorted(SHORT_NAMES))
    parser.add_argument("--n_loops", type=int, default=3)
    parser.add_argument("--d_model", type=int, default=128)
    parser.add_argument("--max_fields", type=int, default=64)
    parser.add_argument("--fields", type=int, default=16, help="fields of each adapter")
    parser.add_argument("--parents", type=int, nargs="+", default=[2, 5])
    parser.add_argument("--methods", nargs="+", default=list(MERGE_METHODS), choices=MERGE_METHODS)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--switches", type=int, default=200)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine()
    print_machine(info)
    rows, merges = [], []
    for short in args.models:
        row, merge_rows = bench_model(short, args)
        rows.append(row)
        merges += merge_rows
        print(f"{short}: done", flush=True)

    switch_ms = max(r["switch"]["median_s"] for r in rows) * 1e3
    linear5 = [m["median_s"] * 1e3 for m in merges if m["method"] == "linear" and m["parents"] == 5]
    result = {
        "benchmark": "adapter_ops",
        "machine": info,
        "settings": vars(args),
        "models": rows,
        "merges": merges,
        "targets": {"switch_ms < 10": switch_ms < 10, "linear_merge_5_parents_ms < 50": bool(linear5) and
                    max(linear5) < 50},
    }
    print_table("adapter size and operations (median ms)", [{
        "model": r["model"], "blocks x inner": f"{r['blocks']} x {r['inner_dim']}",
        "trainable": r["trainable_parameters"], "file MiB": mib(r["adapter_file_bytes"]),
        "file / 4xtrainable": r["file_over_4x_trainable"], "save ms": r["save"]["median_s"] * 1e3,
        "load ms": r["load"]["median_s"] * 1e3, "attach ms": r["attach"]["median_s"] * 1e3,
        "switch ms": r["switch"]["median_s"] * 1e3} for r in rows])
    print_table("join merge (median ms)", [{"model": m["model"], "parents": m["parents"], "method": m["method"],
                                            "median ms": m["median_s"] * 1e3, "min ms": m["min_s"] * 1e3}
                                           for m in merges])
    print(f"targets: switch {switch_ms:.3f} ms (< 10 ms: {'met' if switch_ms < 10 else 'NOT met'}); linear merge of 5 "
          f"parents {max(linear5) if linear5 else float('nan'):.1f} ms (< 50 ms: "
          f"{'met' if result['targets']['linear_merge_5_parents_ms < 50'] else 'NOT met'})")
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
