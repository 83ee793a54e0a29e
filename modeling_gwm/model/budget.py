"""Parameter budget of a GWM model with the loop adapter: what is frozen, what one adapter trains.

Counted by walking the real modules of a `peft.PeftModel` (or a bare `GWMModel`), never from formulas, so the table
is what a user gets.
A saved adapter's budget (the model card's table) is read from its safetensors header instead: no model is built.
`budget_for_architecture` does it for the published CogVideoX bases without downloading them: the blocks are built
on the meta device from their architecture settings.

    python -m modeling_gwm.model.budget                         # tables for THUDM/CogVideoX-2b and -5b
    python -m modeling_gwm.model.budget THUDM/CogVideoX-5b --d_model 256 --n_loops 2
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from torch import nn

from ..run_folder import ADAPTER_WEIGHTS_FILE

# modules_to_save of the loop adapter -> the row they are reported under
_SAVED_MODULE_ROWS = {"encoder_token": "encoder token", "proj_in": "proj_in", "proj_out": "proj_out",
                      "codec": "codec", "norm_out": "output norm"}


_SUMMARY_ROWS = ("total trainable", "trainable %")

# Saved adapter state-dict key fragments -> the model card's budget rows, most specific first.
_BUDGET_GROUPS = (
    ("loop_emb_enc", "Loop embeddings, encoder token (blocks x loops x inner_dim)"),
    ("loop_emb", "Loop embeddings (blocks x loops x inner_dim)"),
    ("loop_gate", "Loop gates (blocks x loops)"),
    ("loop_block", "Per-adapter block copies (scratch backbone)"),
    ("encoder_token", "Encoder conditioning token"),
    ("proj_in", "proj_in (d_model -> inner_dim)"),
    ("proj_out", "proj_out (inner_dim -> d_model)"),
    ("norm_out", "Output LayerNorm"),
    ("codec", "Field codec (value encoder, field/mask embeddings, value head)"),
)


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def parameter_budget(model, adapter_name: str | None = None) -> list[dict]:
    """Rows `{component, params, trainable}` for one loop adapter of a `PeftModel`, or for a bare `GWMModel`.

    Rows: frozen blocks, loop embeddings (canvas + encoder streams), loop gates, encoder token, proj_in, proj_out,
    codec, output norm, trained block copies (adapters with `train_blocks`, i.e. the scratch backbone), then
    "total trainable" and "trainable %" (params is then a float percentage of all parameters the forward pass uses:
    frozen blocks + trainable). `adapter_name` defaults to the active adapter. A bare `GWMModel` (no adapter: every
    block runs once) has no loop parameters, so its loop rows are 0 and the rest count the model's own modules.
    """
    from peft import PeftModel
    from peft.utils import ModulesToSaveWrapper

    from .loop import LoopConfig, LoopLayer
    from .modeling_gwm import GWMModel

    if isinstance(model, PeftModel):
        name = adapter_name or model.active_adapter
        if name not in model.peft_config or not isinstance(model.peft_config[name], LoopConfig):
            raise ValueError(f"parameter_budget: no loop adapter named {name!r} on this model "
                             f"(adapters: {sorted(model.peft_config)})")
        gwm, train_blocks = model.base_model.model, model.peft_config[name].train_blocks
    elif isinstance(model, GWMModel):
        if any(isinstance(m, LoopLayer) for m in model.transformer_blocks):
            raise TypeError("parameter_budget: this GWMModel carries loop adapters; pass the PeftModel around it")
        name, gwm, train_blocks = None, model, False
    else:
        raise TypeError(f"parameter_budget expects a GWMModel or a peft.PeftModel around one, "
                        f"got {type(model).__name__}")
    layers = [m for m in gwm.transformer_blocks if isinstance(m, LoopLayer)]
    frozen = sum(_numel(m.base_layer if isinstance(m, LoopLayer) else m) for m in gwm.transformer_blocks)
    counts = {
        f"frozen blocks ({len(gwm.transformer_blocks)})": frozen,
        "loop embeddings": sum(m.loop_emb[name].numel() + m.loop_emb_enc[name].numel() for m in layers),
        "loop gates": sum(m.loop_gate[name].numel() for m in layers),
    }
    for attr, row in _SAVED_MODULE_ROWS.items():
        module = getattr(gwm, attr)
        if isinstance(module, ModulesToSaveWrapper):  # the adapter's own copy, not the untouched original
            module = module.modules_to_save[name]
        counts[row] = _numel(module)
    if train_blocks:
        counts["trained block copies"] = sum(_numel(m.loop_block[name]) for m in layers if name in m.loop_block)
    rows = [{"component": component, "params": params, "trainable": not component.startswith("frozen")}
            for component, params in counts.items()]
    trainable = sum(r["params"] for r in rows if r["trainable"])
    rows.append({"component": _SUMMARY_ROWS[0], "params": trainable, "trainable": True})
    rows.append({"component": _SUMMARY_ROWS[1], "params": 100.0 * trainable / max(frozen + trainable, 1),
                 "trainable": True})
    return rows


def _human(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def format_budget(rows: list[dict]) -> str:
    """A markdown table: component, exact count (with a short human figure), trainable yes/no."""
    lines = ["| Component | Params | Trainable? |", "|---|---:|---|"]
    for row in rows:
        if isinstance(row["params"], float):
            params = f"{row['params']:.4f}%"
        else:
            params = f"{row['params']:,} ({_human(row['params'])})" if row["params"] >= 1000 else f"{row['params']:,}"
        trainable = "" if row["component"] in _SUMMARY_ROWS else ("yes" if row["trainable"] else "no")
        lines.append(f"| {row['component']} | {params} | {trainable} |")
    return "\n".join(lines)


def budget_for_architecture(name_or_arch: str | dict, d_model: int = 128, n_loops: int = 3) -> list[dict]:
    """The budget of a published CogVideoX base (a key of `COGVIDEOX_ARCHITECTURES`, or architecture keyword
    arguments of `CogVideoXTransformer3DModel`), built on the meta device: no download, no memory for the blocks."""
    import peft

    from .base import COGVIDEOX_ARCHITECTURES, load_cogvideox_base
    from .configuration_gwm import GWMConfig
    from .loop import LoopConfig
    from .modeling_gwm import GWMModel

    if isinstance(name_or_arch, dict):
        name, architecture = "custom architecture", name_or_arch
    elif name_or_arch in COGVIDEOX_ARCHITECTURES:
        name, architecture = name_or_arch, COGVIDEOX_ARCHITECTURES[name_or_arch]
    else:
        raise ValueError(f"budget_for_architecture: unknown base {name_or_arch!r}; known: "
                         f"{sorted(COGVIDEOX_ARCHITECTURES)} (or pass the architecture as a dict)")
    frozen_base = load_cogvideox_base(name, architecture=architecture)
    config = GWMConfig(base_model_name_or_path=name, d_model=d_model, n_loops=n_loops)
    model = GWMModel(config, frozen_base=frozen_base)
    peft_model = peft.get_peft_model(model, LoopConfig(n_loops=n_loops))
    return parameter_budget(peft_model)


# ---------------------------------------------------------------------------------------------------- saved adapters
def _tensor_sizes(path: str | os.PathLike) -> dict[str, int]:
    """Element count of every tensor in a safetensors file, from its header alone (no tensor is read)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {key: math.prod(handle.get_slice(key).get_shape()) for key in handle.keys()}


def adapter_budget(adapter_dir: str | os.PathLike) -> list[dict]:
    """Trainable parameters of a saved adapter, grouped by component (read from the safetensors header only)."""
    counts: dict[str, int] = {}
    for key, n in _tensor_sizes(Path(adapter_dir) / ADAPTER_WEIGHTS_FILE).items():
        group = next((label for frag, label in _BUDGET_GROUPS if frag in key), "Other")
        counts[group] = counts.get(group, 0) + n
    order = [label for _, label in _BUDGET_GROUPS] + ["Other"]
    return [{"component": g, "params": counts[g], "trainable": True} for g in order if g in counts]


def frozen_block_params(gwm_config: dict) -> int | None:
    """Parameters of the frozen blocks the adapter runs on: from a local base's safetensors header, or from the
    architecture of a published CogVideoX (meta device, nothing downloaded). None when it cannot be known offline."""
    base = gwm_config.get("base_model_name_or_path")
    if gwm_config.get("backbone") == "scratch" or not base:
        return None
    weights = sorted(Path(base, "transformer").glob("*.safetensors")) if os.path.isdir(base) else []
    if weights:
        return sum(sum(n for k, n in _tensor_sizes(file).items() if k.startswith("transformer_blocks."))
                   for file in weights)
    from .base import COGVIDEOX_ARCHITECTURES, load_cogvideox_base

    if base in COGVIDEOX_ARCHITECTURES:
        return _numel(load_cogvideox_base(base, architecture=COGVIDEOX_ARCHITECTURES[base]).blocks)
    return None


def budget_rows(adapter_dir: str | os.PathLike, gwm_config: dict) -> list[dict]:
    """The model card's parameter-budget table: trainable components, total, frozen blocks and the trainable share."""
    rows = adapter_budget(adapter_dir)
    trainable = sum(r["params"] for r in rows)
    frozen = frozen_block_params(gwm_config)
    table = [{"component": r["component"], "params": f"{r['params']:,}", "trainable": "yes"} for r in rows]
    table.append({"component": "**Total trainable**", "params": f"**{trainable:,}**", "trainable": "yes"})
    if frozen is not None:
        table.append({"component": "Frozen CogVideoX blocks", "params": f"{frozen:,}", "trainable": "no"})
        share = 100.0 * trainable / (trainable + frozen)
        table.append({"component": "Trainable share", "params": f"{share:.3g} %", "trainable": ""})
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Print the parameter budget of GWM on published CogVideoX bases.")
    parser.add_argument("bases", nargs="*", default=["THUDM/CogVideoX-2b", "THUDM/CogVideoX-5b"])
    parser.add_argument("--d_model", type=int, default=128)
    parser.add_argument("--n_loops", type=int, default=3)
    args = parser.parse_args(argv)
    for base in args.bases:
        print(f"### {base} (d_model {args.d_model}, n_loops {args.n_loops})\n")
        print(format_budget(budget_for_architecture(base, d_model=args.d_model, n_loops=args.n_loops)) + "\n")


if __name__ == "__main__":
    main()
