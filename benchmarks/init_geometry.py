"""What a freshly initialised loop adapter does to the stream (the README's "At initialisation" figures).

    HF_HUB_OFFLINE=1 python benchmarks/init_geometry.py            # tiny base, d_model 32, n_loops 3, 24 x 3 canvas
    HF_HUB_OFFLINE=1 python benchmarks/init_geometry.py --out init_geometry.json

At init every loop embedding and gate is zero, so each application is h <- h + sigmoid(0) * (block(h) - h): half of
the block's own residual update. Printed, all as relative L2 norms on the canvas stream:
- update: |block(h) - h| / |h| for every block application (the block's own update, as a fraction of its input);
- step:   |h_next - h| / |h| for every loop step (what the half-weighted update moves the stream by);
- the backbone's output canvas with the adapter against an identity backbone (blocks skipped) and against the bare
  model (every block once, no adapter).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from modeling_gwm import GWMModel, LoopConfig  # noqa: E402
from modeling_gwm.model.base import TINY_BASE_PATH  # noqa: E402


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _shown(path: str) -> str:
    """A path inside the repository relative to it (logs stay comparable across checkouts)."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else str(path)


class _Identity(nn.Module):
    """A block that returns its inputs: the backbone without any transformer work."""

    def forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, attention_kwargs=None):
        return hidden_states, encoder_hidden_states


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=TINY_BASE_PATH)
    parser.add_argument("--d_model", type=int, default=32)
    parser.add_argument("--n_loops", type=int, default=3)
    parser.add_argument("--steps", type=int, default=24, help="time steps of the canvas")
    parser.add_argument("--fields", type=int, default=3, help="fields of the canvas")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random (standard normal) values")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    import peft

    model = GWMModel.from_pretrained(args.base, d_model=args.d_model).eval()
    values = torch.randn(1, args.steps, args.fields, generator=torch.Generator().manual_seed(args.seed))
    presence = torch.ones_like(values, dtype=torch.bool)
    with torch.no_grad():
        canvas = model.codec.encode(values, presence, torch.arange(args.fields))  # (1, N, d_model)
    time_index = torch.arange(args.steps).repeat_interleave(args.fields)  # (N,)

    blocks = model.transformer_blocks
    with torch.no_grad():
        bare = model.backbone(canvas, time_index)  # every block once
        model.transformer_blocks = nn.ModuleList([_Identity() for _ in blocks])
        identity = model.backbone(canvas, time_index)
        model.transformer_blocks = blocks

    peft_model = peft.get_peft_model(model, LoopConfig(n_loops=args.n_loops))
    assert all(not layer.loop_gate["default"].any() for layer in model.transformer_blocks)  # gates zero at init
    seen = []  # (block, h_in, h_out) of every raw block application, in order

    def record(block_index: int):
        def hook(module, inputs, output):  # inputs: (h_in, e_in, temb, ...); output: (h_out, e_out)
            seen.append((block_index, inputs[0].float(), output[0].float()))
        return hook

    handles = [layer.base_layer.register_forward_hook(record(i)) for i, layer in enumerate(model.transformer_blocks)]
    final = []
    handles.append(model.transformer_blocks[-1].register_forward_hook(lambda m, i, o: final.append(o[0].float())))
    with torch.no_grad():
        looped = peft_model.backbone(canvas, time_index)
    for handle in handles:
        handle.remove()
    # the stream after each loop step is what the next application receives (loop embeddings are zero at init)
    nexts = [h_in for _, h_in, _ in seen[1:]] + final
    updates = [{"block": b, "update": _rel(h_out, h_in)} for b, h_in, h_out in seen]
    steps = [{"step": _rel(h_next, h_in)} for (_, h_in, _), h_next in zip(seen, nexts)]

    result = {
        "base": _shown(args.base), "d_model": args.d_model, "n_loops": args.n_loops,
        "canvas": [args.steps, args.fields],
        "blocks": len(blocks), "inner_dim": model.inner_dim,
        "update_min": min(u["update"] for u in updates), "update_max": max(u["update"] for u in updates),
        "step_min": min(s["step"] for s in steps), "step_max": max(s["step"] for s in steps),
        "vs_identity_backbone": _rel(looped, identity), "vs_bare_model": _rel(looped, bare),
        "applications": [u | s for u, s in zip(updates, steps)],
    }
    print(f"base {result['base']}: {result['blocks']} blocks, inner_dim {result['inner_dim']}; d_model {args.d_model}, "
          f"n_loops {args.n_loops}, canvas {args.steps} steps x {args.fields} fields")
    for row in result["applications"]:
        print(f"  block {row['block']}: update |block(h) - h| / |h| = {row['update']:.1%}, "
              f"loop step |h_next - h| / |h| = {row['step']:.1%}")
    print(f"block update: {result['update_min']:.1%}-{result['update_max']:.1%} of the stream's norm; "
          f"loop step: {result['step_min']:.1%}-{result['step_max']:.1%}")
    print(f"output canvas at init vs an identity backbone: {result['vs_identity_backbone']:.1%} (relative L2)")
    print(f"output canvas at init vs the bare model (every block once): {result['vs_bare_model']:.1%} (relative L2)")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
