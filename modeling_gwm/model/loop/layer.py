"""The loop tuner layer: wraps one frozen transformer block and runs it `n_loops` times per forward pass."""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..base import copy_block


class LoopLayer(nn.Module, BaseTunerLayer):
    """Per-adapter loop embeddings (for the canvas and the encoder stream) and sigmoid gates around one block.

    For loop `l` of block `i`, with `h` the canvas stream and `e` the encoder stream:
        h_in, e_in = h + loop_emb[l], e + loop_emb_enc[l]
        h_out, e_out = block(h_in, e_in)
        g = sigmoid(loop_gate[l]);  h, e = g * h_out + (1 - g) * h_in, g * e_out + (1 - g) * e_in
    Everything starts at zero, so at initialisation each application is an even blend of block output and input.
    """

    adapter_layer_names = ("loop_emb", "loop_emb_enc", "loop_gate", "loop_block")
    other_param_names = ("n_loops",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, inner_dim: int, **kwargs) -> None:
        super().__init__()
        BaseTunerLayer.__init__(self)
        self.base_layer = base_layer
        self.inner_dim = inner_dim
        self.gradient_checkpointing = False
        self.gradient_checkpointing_granularity = "loop"  # or "application", see GWMConfig
        self.loop_emb = nn.ParameterDict({})
        self.loop_emb_enc = nn.ParameterDict({})
        self.loop_gate = nn.ParameterDict({})
        self.loop_block = nn.ModuleDict({})  # only for adapters with `train_blocks`
        self.n_loops: dict[str, int] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self.update_layer(adapter_name, config)
        self._active_adapter = adapter_name

    def update_layer(self, adapter_name: str, config) -> None:
        device = next(self.base_layer.parameters()).device
        self.n_loops[adapter_name] = config.n_loops
        shape = (config.n_loops, self.inner_dim)
        self.loop_emb[adapter_name] = nn.Parameter(torch.zeros(shape, device=device))
        self.loop_emb_enc[adapter_name] = nn.Parameter(torch.zeros(shape, device=device))
        self.loop_gate[adapter_name] = nn.Parameter(torch.zeros(config.n_loops, device=device))
        if config.train_blocks:
            block = copy_block(self.base_layer).float()
            block.requires_grad_(True)
            self.loop_block[adapter_name] = block
        self.set_adapter(self.active_adapters)

    def forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, attention_kwargs=None):
        # hidden_states: (B, N, inner_dim) canvas stream; encoder_hidden_states: (B, S, inner_dim); temb: (B|1, T_emb)
        # The block casts at its own boundary (`modeling_gwm.model.base.cast_at_block_boundary`): it may run in bf16,
        # its outputs come back fp32 like the adapter's streams.
        if self.disable_adapters or not self.active_adapters:
            return self.base_layer(hidden_states, encoder_hidden_states, temb, image_rotary_emb, attention_kwargs)
        if len(self.active_adapters) > 1:
            raise ValueError(f"The loop adapter runs one adapter at a time, got active adapters {self.active_adapters}")
        name = self.active_adapters[0]
        block = self.loop_block[name] if name in self.loop_block else self.base_layer
        h, e = hidden_states.float(), encoder_hidden_states.float()
        checkpointed = self.gradient_checkpointing and torch.is_grad_enabled()

        def loop(h, e):
            for step in range(self.n_loops[name]):
                h_in = h + self.loop_emb[name][step]  # (B, N, D)
                e_in = e + self.loop_emb_enc[name][step]  # (B, S, D)
                if checkpointed:
                    h_out, e_out = checkpoint(block, h_in, e_in, temb, image_rotary_emb, attention_kwargs,
                                              use_reentrant=False)
                else:
                    h_out, e_out = block(h_in, e_in, temb, image_rotary_emb, attention_kwargs)
                gate = torch.sigmoid(self.loop_gate[name][step])  # scalar
                h = h_in + gate * (h_out - h_in)  # = gate * h_out + (1 - gate) * h_in, one saved tensor
                e = e_in + gate * (e_out - e_in)
            return h, e

        if checkpointed and self.n_loops[name] > 1 and self.gradient_checkpointing_granularity == "loop":
            # Two levels: the whole loop keeps only the block's input stream, and its recomputation checkpoints each
            # application, so activation memory stays flat in n_loops (benchmarks/bench_memory.py). With granularity
            # "application" only the inner level runs: one recomputation less, memory growing with n_loops.
            return checkpoint(loop, h, e, use_reentrant=False)
        return loop(h, e)

    def __repr__(self) -> str:
        return "loop." + super().__repr__()
