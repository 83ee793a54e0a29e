"""GWMModel: a canvas world model around the frozen blocks of a CogVideoX video transformer."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from peft import PeftModel
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoModel, PreTrainedModel
from transformers.utils import ModelOutput

from ..run_folder import ADAPTER_CONFIG_FILE
from .adapter_files import (
    AdapterLoadError,
    check_adapter_weights,
    expected_adapter_shapes,
    load_adapter_config,
    saved_model_file,
    warn_if_changed,
    warn_if_other_base,
)
from .base import (
    FrozenBase,
    build_frozen_base,
    cast_at_block_boundary,
    compile_frozen_blocks,
    resolve_device,
    resolve_frozen_dtype,
)
from .canvas import (
    FieldCodec,
    context_baseline,
    pinball_loss,
    seasonal_lag,
    sinusoidal_encoding,
    window_scale,
    window_statistics,
)
from .configuration_gwm import GWMConfig
from .loop import LoopLayer, check_adapter_fits

if TYPE_CHECKING:
    import pandas as pd


class ModelLoadError(OSError):
    """A saved GWMModel (config.json + model.safetensors) lacks its weights or they do not fit its config."""


# What `AutoModel.from_pretrained` adds to the call; hub options go to the file lookup of a saved model.
_AUTO_PLUMBING = ("_from_auto", "trust_remote_code", "adapter_kwargs")
_HUB_OPTIONS = ("cache_dir", "force_download", "local_files_only", "proxies")


@dataclass
class GWMOutput(ModelOutput):
    """Output of [`GWMModel.forward`].

    Args:
        loss: mean pinball loss, in each window's scaled units, over the positions hidden for prediction that have
            ground truth (None without a target mask).
        predictions: (B, T, F) the median, in the input's (normalised) units, for every position.
        quantiles: (B, T, F, Q) the predicted quantiles at `config.quantile_levels`, in the input's units.
        position_loss: (B, T, F) pinball loss of every observed position (mean over levels, scaled units; 0 where
            absent), so a trainer can sum it over its own mask and count (None without a target mask).
        hidden_states: (B, N, d_model) canvas output of the backbone.
    """

    loss: torch.Tensor | None = None
    predictions: torch.Tensor | None = None
    quantiles: torch.Tensor | None = None
    position_loss: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None


class EncoderToken(nn.Module):
    """The one learned token that joins CogVideoX's joint attention as global context."""

    def __init__(self, inner_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, 1, inner_dim) * 0.02)

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.weight.expand(batch_size, -1, -1)  # (B, 1, inner_dim)


class GWMModel(PreTrainedModel):
    """The seed's backbone plus a field codec.

    values + presence -> per-window scaling -> codec -> canvas (B, N, d_model) -> time encoding -> proj_in -> every
    frozen block `n_loops` times (the loop adapter) with one encoder token in the joint attention -> proj_out ->
    LayerNorm -> value head (quantiles) -> the window's scaling undone.

    Build it with [`GWMModel.from_pretrained`]. Without an adapter the blocks run once each; attach the loop adapter
    with `peft.get_peft_model(model, LoopConfig(...))` or load a trained one with `from_pretrained(base, adapter)`.
    """

    config_class = GWMConfig
    base_model_prefix = "gwm"
    main_input_name = "values"
    supports_gradient_checkpointing = True  # GWM's own non-reentrant scheme, see `_set_gradient_checkpointing`
    _no_split_modules = ["LoopLayer"]

    def __init__(self, config: GWMConfig, frozen_base: FrozenBase | None = None, device: str | None = None):
        device = None if device is None else resolve_device(device)
        super().__init__(config)
        config._name_or_path = config.base_model_name_or_path
        self.takes_adapter_settings = False  # see `with_adapter_settings`
        frozen_dtype = resolve_frozen_dtype(config.frozen_dtype, device)
        if frozen_base is None:
            frozen_base = build_frozen_base(config, dtype=frozen_dtype)  # read straight in its dtype
        self.base_source = frozen_base.source
        self.inner_dim = frozen_base.inner_dim
        # every model built from one config starts from the same adapter init, drawn on the CPU (then moved); the
        # caller's generators, CPU and CUDA, are left as they were
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(config.seed)
            self.codec = FieldCodec(config.max_fields, config.d_model, n_quantiles=len(config.quantile_levels),
                                    stats_input=config.window_stats_input, lag_input=config.seasonal_lag_input,
                                    residual=config.residual_baseline != "none")
            self.proj_in = nn.Linear(config.d_model, self.inner_dim)
            self.encoder_token = EncoderToken(self.inner_dim)
            self.proj_out = nn.Linear(self.inner_dim, config.d_model)
            self.norm_out = nn.LayerNorm(config.d_model)
        self.transformer_blocks = cast_at_block_boundary(frozen_base.blocks.to(frozen_dtype))  # no-op if loaded so
        self.transformer_blocks.requires_grad_(False)
        self.register_buffer("block_temb", frozen_base.temb, persistent=False)  # (1, time_embed_dim)
        self.register_buffer("quantile_levels", torch.tensor(config.quantile_levels), persistent=False)  # (Q,)
        self.post_init()
        # The frozen blocks come from the base the config names: `save_pretrained` (and `push_to_hub`, which calls
        # it) never writes them, `from_pretrained` of a saved model rebuilds them from that base.
        self._keys_to_ignore_on_save = {f"transformer_blocks.{key}" for key in self.transformer_blocks.state_dict()}
        if device is not None:
            self.to(device)
        if config.compile_blocks and config.backbone == "cogvideox":  # scratch blocks are trained, copied per adapter
            compile_frozen_blocks(self.transformer_blocks)

    def _init_weights(self, module: nn.Module) -> None:
        # Modules initialise themselves; the frozen blocks must never be touched.
        pass

    def _backward_compatibility_gradient_checkpointing(self) -> None:
        # transformers consumes and deletes a legacy `config.gradient_checkpointing` here; in GWM it is a live field
        # (saved, recorded in adapters, read by every loop layer PEFT creates), so it stays.
        pass

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        base: str | os.PathLike | None = None,
        adapter: str | os.PathLike | None = None,
        *,
        subfolder: str | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        adapter_name: str = "default",
        is_trainable: bool = False,
        device: str | torch.device | None = None,
        config: GWMConfig | None = None,
        **config_overrides,
    ):
        """Load the frozen base, and optionally a trained adapter onto it.

        Args:
            base: Hub id or local folder of a CogVideoX checkpoint in the diffusers layout (`transformer/`). With an
                adapter and no base, the base the adapter was trained on is used. A local adapter folder passed
                alone is recognised as the adapter; a folder (or Hub repo) written by `GWMModel.save_pretrained`
                (a `config.json` of model_type "gwm") as a saved model: its base is rebuilt from the config and its
                trained weights loaded exactly (`AutoModel.from_pretrained` takes the same path).
            adapter: local folder or Hub id of a GWM adapter (`adapter_config.json` + `adapter_model.safetensors`).
            subfolder / revision / token: where the adapter lives inside a Hub repo (a DAG node's subfolder).
            adapter_name: name of the loaded adapter on the model (several can sit on one base).
            is_trainable: load the adapter for further training rather than inference.
            device: where to put the model (`"cpu"`, `"cuda"`, `"cuda:1"`, or `"auto"`: CUDA when there is one);
                default: the CPU. The frozen blocks go to bf16 on CUDA when `frozen_dtype="auto"`; a CUDA device the
                machine lacks is a `DeviceError` (a `ValueError`) saying so.
            config / config_overrides: a `GWMConfig` or fields of one, for a model without adapter.

        Returns:
            a `peft.PeftModel` wrapping the `GWMModel` when an adapter is given (every `GWMModel` method is reachable
            through it), else the bare `GWMModel`.
        """
        for key in _AUTO_PLUMBING:
            config_overrides.pop(key, None)
        hub_options = {key: config_overrides.pop(key) for key in _HUB_OPTIONS if key in config_overrides}
        if adapter is None and base is not None and os.path.isfile(os.path.join(base, ADAPTER_CONFIG_FILE)):
            base, adapter = None, base
        if adapter is None and base is not None:
            saved_config = saved_model_file(base, "config.json", subfolder, revision, token, hub_options)
            if saved_config is not None:
                return cls._from_saved(base, config or GWMConfig.from_json_file(saved_config), subfolder, revision,
                                       token, hub_options, device, config_overrides)
        if adapter is None:
            bare = config is None and not config_overrides
            if config is None:
                config = GWMConfig(**({"base_model_name_or_path": str(base)} if base else {}), **config_overrides)
            model = cls(config, device=device)
            model.takes_adapter_settings = bare  # a base loaded with no GWM settings takes its first adapter's
            return model
        return cls._from_adapter(base, adapter, subfolder, revision, token, adapter_name, is_trainable, device,
                                 config_overrides)

    @classmethod
    def _from_adapter(cls, base, adapter, subfolder, revision, token, adapter_name, is_trainable, device, overrides):
        """The model an adapter's config describes (on `base` if given), its weights checked, then loaded by PEFT."""
        if not os.path.isdir(adapter):  # a Hub id: fetch (or find in the HF cache) just the adapter files
            adapter = _download_adapter(adapter, subfolder, revision, token)
            subfolder = revision = None
        loop_config = load_adapter_config(adapter, subfolder=subfolder, revision=revision, token=token)
        gwm_kwargs = {**loop_config.gwm_config, **overrides}
        if base is not None:
            gwm_kwargs["base_model_name_or_path"] = str(base)
        model = cls(GWMConfig(**gwm_kwargs), device=device)
        check_adapter_fits(loop_config, **model.adapter_architecture(), where=str(adapter))
        warn_if_other_base(loop_config, model.base_weights_sample(), str(adapter), model.base_source)
        check_adapter_weights(os.path.join(adapter, subfolder or ""), loop_config, model.adapter_architecture(),
                               expected=expected_adapter_shapes(model, loop_config, str(adapter)))
        warn_if_changed(os.path.join(adapter, subfolder or ""))
        try:
            return PeftModel.from_pretrained(  # the adapter's tensors are read straight onto the model's device
                model, str(adapter), adapter_name=adapter_name, is_trainable=is_trainable, subfolder=subfolder,
                revision=revision, token=token, torch_device=str(model.device),
            )
        except Exception as err:  # safetensors raises its own error types on damaged files
            if "safetensors" in type(err).__module__ or "header" in str(err).lower():
                raise AdapterLoadError(
                    f"Adapter weights in {adapter} are unreadable (truncated or not a safetensors file): {err}"
                ) from None
            raise

    @classmethod
    def _from_saved(cls, location, config, subfolder, revision, token, hub_options, device, overrides):
        """A model written by `save_pretrained`: config.json names the base, model.safetensors holds the rest."""
        if overrides:  # e.g. frozen_dtype, or base_model_name_or_path when the base folder moved
            config = GWMConfig.from_dict({**config.to_dict(), **overrides})
        model = cls(config, device=device)
        weights = saved_model_file(location, "model.safetensors", subfolder, revision, token, hub_options)
        if weights is None:
            raise ModelLoadError(f"No model.safetensors next to the GWM config.json in {location}: the saved model "
                                 "has no weights.")
        model._load_saved_weights(weights)
        return model

    def _load_saved_weights(self, path: str) -> None:
        """Load the trained (non-frozen) weights, refusing a file that does not hold exactly those."""
        from safetensors.torch import load_file

        try:
            state = load_file(path, device="cpu")  # load_state_dict copies onto the parameters' device
        except Exception as err:  # safetensors raises its own error types on damaged files
            raise ModelLoadError(f"Weights {path} are unreadable (truncated or not a safetensors file): "
                                 f"{err}") from None
        own = {k: v for k, v in self.state_dict().items() if k not in self._keys_to_ignore_on_save}
        missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
        wrong = [f"{k} {tuple(state[k].shape)} (model has {tuple(own[k].shape)})"
                 for k in sorted(own.keys() & state.keys()) if state[k].shape != own[k].shape]
        if missing or unexpected or wrong:
            parts = [f"{label}: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}"
                     for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
                     if names]
            raise ModelLoadError(f"Weights {path} do not fit the model its config.json describes ({'; '.join(parts)}).")
        self.load_state_dict(state, strict=False)  # strict=False: the frozen blocks come from the base, not this file

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs):
        """Write config.json and the trained modules only (codec, projections, encoder token, norm) as
        model.safetensors; the frozen blocks are left to the base the config names. A model with a loop adapter
        attached is saved through its `PeftModel` (which writes the adapter alone)."""
        if any(isinstance(module, LoopLayer) for module in self.transformer_blocks):
            raise ValueError("This GWMModel carries a loop adapter: save it with the PeftModel's save_pretrained "
                             "(adapter_config.json + adapter_model.safetensors), or unload the adapter first.")
        return super().save_pretrained(save_directory, *args, **kwargs)

    def with_adapter_settings(self, gwm_config: dict) -> GWMModel:
        """The model an adapter recorded (`LoopConfig.gwm_config`: `d_model`, quantile levels, ...) on this model's
        frozen blocks, when this model was loaded from a base with no GWM settings of its own
        (`GWMModel.from_pretrained(base)`, as `AutoPeftModel` and `PeftModel.from_pretrained(model, adapter)` do);
        otherwise (settings given, or none recorded) this model itself, and a mismatch is refused when the adapter
        loads. The base's architecture (block count and width) is never changed: it is checked as usual."""
        if not (self.takes_adapter_settings and gwm_config):
            return self
        settings = {**gwm_config, "base_model_name_or_path": self.config.base_model_name_or_path,
                    "frozen_dtype": self.config.frozen_dtype, "backbone": self.config.backbone}
        config = GWMConfig(**settings)
        if config.to_diff_dict() == self.config.to_diff_dict():
            return self
        device = self.block_temb.device
        if config.block_timestep != self.config.block_timestep:  # the blocks' time embedding changes: reload
            return type(self)(config, device=device)
        frozen = FrozenBase(blocks=self.transformer_blocks, temb=self.block_temb, inner_dim=self.inner_dim,
                            source=self.base_source)
        return type(self)(config, frozen_base=frozen, device=device)

    def base_weights_sample(self, count: int = 32) -> list[float] | None:
        """`count` of the frozen base's weights spread over its blocks: the base's identity an adapter records
        (`LoopConfig.base_weights`), so that another base of the same shapes but other weights is noticed at load.
        None for the scratch backbone (its blocks are trained with the adapter) and on the meta device."""
        named = sorted((n.replace("base_layer.", ""), p) for n, p in self.transformer_blocks.named_parameters()
                       if "loop_" not in n)  # the base's own weights, not an adapter's (LoopModel.prefix)
        params = [p for _, p in named]
        if self.config.backbone != "cogvideox" or not params or any(p.is_meta for p in params):
            return None
        picks = [params[i * (len(params) - 1) // max(1, count - 1)] for i in range(count)]
        values = torch.stack([p.detach().reshape(-1)[(p.numel() * (i + 1)) // (count + 1)].float()
                              for i, p in enumerate(picks)]).cpu()
        return [float(f"{v:.6g}") for v in values.tolist()]

    def adapter_architecture(self) -> dict[str, int]:
        """What an adapter must match to fit this model."""
        return {"inner_dim": self.inner_dim, "num_blocks": len(self.transformer_blocks), "d_model": self.config.d_model}

    @property
    def gradient_checkpointing(self) -> bool:
        """Whether the frozen blocks are recomputed in the backward pass (`config.gradient_checkpointing`)."""
        return bool(self.config.gradient_checkpointing)

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None,
                                    every_n_layers: int = 1) -> None:
        """What transformers' `gradient_checkpointing_enable()` / `disable()` (and `activation_checkpointing_*`)
        call. GWM keeps its own non-reentrant scheme: the loop layers checkpoint at the config's granularity and a
        bare model each block; `gradient_checkpointing_func` (transformers' kwargs for `torch.utils.checkpoint`) is
        not used. The switch lives in the config, so an adapter attached later inherits it."""
        if every_n_layers != 1:
            raise ValueError(f"GWMModel checkpoints every block (every_n_layers=1), got {every_n_layers}")
        self.config.gradient_checkpointing = enable
        for module in self.modules():
            if isinstance(module, LoopLayer):
                module.gradient_checkpointing = enable
                module.gradient_checkpointing_granularity = self.config.gradient_checkpointing_granularity

    @property
    def is_gradient_checkpointing(self) -> bool:
        """Always False for PEFT's sake: PEFT reads this (deprecated) flag to hook the input embeddings so that
        checkpointed inputs require grad. GWM has no input embeddings and needs no hook (its checkpointing is
        non-reentrant, per block application); `is_activation_checkpointing` tells whether it is on."""
        return False

    # ------------------------------------------------------------------ forward
    def backbone(self, canvas: torch.Tensor, time_index: torch.Tensor) -> torch.Tensor:
        """The seed's pipeline: canvas (B, N, d_model) -> (B, N, d_model)."""
        hidden = canvas + sinusoidal_encoding(time_index, canvas.size(-1)).to(canvas.dtype)  # (B, N, d_model)
        hidden = self.proj_in(hidden)  # (B, N, inner_dim)
        encoder = self.encoder_token(hidden.size(0))  # (B, 1, inner_dim)
        temb = self.block_temb.expand(hidden.size(0), -1)  # (B, time_embed_dim)
        checkpointed = self.gradient_checkpointing and torch.is_grad_enabled()
        for block in self.transformer_blocks:
            if checkpointed and not isinstance(block, LoopLayer):  # a loop layer checkpoints itself
                hidden, encoder = checkpoint(block, hidden, encoder, temb, None, None, use_reentrant=False)
            else:
                hidden, encoder = block(hidden, encoder, temb, None, None)  # (B, N, inner), (B, 1, inner)
        hidden = self.proj_out(hidden.float())  # (B, N, d_model)
        return self.norm_out(hidden)

    def forward(
        self,
        values: torch.Tensor | None = None,
        presence: torch.Tensor | None = None,
        field_ids: torch.Tensor | None = None,
        target_mask: torch.Tensor | None = None,
        return_dict: bool = True,
        *,
        past_values: torch.Tensor | None = None,
        past_observed_mask: torch.Tensor | None = None,
        future_values: torch.Tensor | None = None,
        future_observed_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> GWMOutput:
        """Predict every canvas position.

        Each field of each sample is made scale-free first: a location and a scale from its visible positions only
        (`config.window_scaling`, see `canvas.window_scale`), the codec sees `(x - loc) / scale`, the loss is taken
        in those units (every window and field counts alike) and the quantiles are mapped back with the same
        statistics, so outputs come in the input's units.

        Args:
            values: (B, T, F) normalised values (anything where `presence` is False).
            presence: (B, T, F) bool, True where the value was observed.
            field_ids: (F,) or (B, F) codec slots of the columns; defaults to 0..F-1 (the adapter's field order).
            target_mask: (B, T, F) bool, positions hidden from the input and predicted; the loss is taken where
                target_mask AND presence.
            past_values, past_observed_mask, future_values, future_observed_mask: the Hub's time-series names, in
                place of values/presence/target_mask: past (B, T_past, F) context and future (B, H, F) targets
                (their observed masks default to "finite"); the canvas is past then future, the future positions are
                the targets (the loss is taken there). Without future_values the future is `config.horizon` steps
                to predict. Outputs cover T_past + H steps.
        """
        if past_values is not None:
            if values is not None or presence is not None or target_mask is not None:
                raise ValueError("pass either past_values/past_observed_mask/future_values or values/presence/"
                                 "target_mask, not both")
            values, presence, target_mask = self._canvas_from_past_future(past_values, past_observed_mask,
                                                                         future_values, future_observed_mask)
        elif values is None or presence is None:
            raise ValueError("forward needs values and presence (or past_values, the Hub's time-series name)")
        batch, steps, n_fields = values.shape
        field_ids = torch.arange(n_fields, device=values.device) if field_ids is None else field_ids.to(values.device)
        presence = presence.bool().to(values.device)
        values = torch.where(presence, values, torch.zeros_like(values)).float()  # NaN never reaches the network
        target_mask = None if target_mask is None else target_mask.bool().to(values.device)
        visible = presence if target_mask is None else presence & ~target_mask
        loc, scale = window_scale(values, visible, self.config.window_scaling)  # (B, 1, F) each, from visible only
        scaled = (values - loc) / scale  # (B, T, F)
        context = torch.where(visible, scaled, 0.0)  # (B, T, F): all that anything below reads of the values
        window_stats = window_statistics(context, visible, scale)  # (B, F, 2) scale-free, bounded
        lag = seasonal_lag(context, visible, self.config.season_period) if self.config.seasonal_lag_input else None
        canvas = self.codec.encode(context, visible, field_ids, window_stats, lag)  # (B, N, D)
        time_index = torch.arange(steps, device=values.device).repeat_interleave(n_fields)  # (N,)
        hidden = self.backbone(canvas, time_index)  # (B, N, d_model)
        residual = self.codec.decode(hidden, steps).float()  # (B, T, F, Q) scaled units, over the baseline
        baseline = context_baseline(context, visible, self.config.residual_baseline, self.config.season_period)
        quantiles = residual + baseline.unsqueeze(-1)  # (B, T, F, Q)
        if not self.training:
            quantiles = quantiles.sort(dim=-1).values  # no crossing quantiles at inference
        median = self.config.quantile_levels.index(0.5)
        loss = position_loss = None
        if target_mask is not None:
            scored = (target_mask & presence).float()  # (B, T, F)
            position_loss = pinball_loss(quantiles, scaled, self.quantile_levels.float())  # (B, T, F)
            if self.config.residual_baseline != "none" and self.config.residual_penalty > 0:
                position_loss = position_loss + self.config.residual_penalty * residual[..., median] ** 2
            position_loss = position_loss * presence
            loss = (position_loss * scored).sum() / scored.sum().clamp_min(1.0)
        quantiles = quantiles * scale.unsqueeze(-1) + loc.unsqueeze(-1)  # (B, T, F, Q) input units
        output = GWMOutput(loss=loss, predictions=quantiles[..., median], quantiles=quantiles,
                           position_loss=position_loss, hidden_states=hidden)
        return output if return_dict else output.to_tuple()

    def _canvas_from_past_future(self, past_values, past_observed_mask, future_values, future_observed_mask
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Hub time-series inputs -> (values, presence, target_mask), each (B, T_past + H, F)."""
        if past_observed_mask is None:
            past_observed_mask = torch.isfinite(past_values)
        if future_values is None:  # predict the config's horizon after the past
            future_values = past_values.new_zeros(past_values.shape[0], self.config.horizon, past_values.shape[2])
            future_observed_mask = torch.zeros_like(future_values, dtype=torch.bool)
        elif future_observed_mask is None:
            future_observed_mask = torch.isfinite(future_values)
        values = torch.cat([past_values, future_values.to(past_values.dtype)], dim=1)  # (B, T_past + H, F)
        presence = torch.cat([past_observed_mask.bool(), future_observed_mask.bool()], dim=1)
        target_mask = torch.zeros_like(presence)
        target_mask[:, past_values.shape[1]:] = True  # the future is what is predicted
        values = torch.where(presence, values, torch.zeros_like(values))  # NaN never reaches the network
        return values, presence, target_mask

    # ------------------------------------------------------------------ inference in the data's own units
    def forecast(self, history, prediction_length: int | None = None, *, time_column: str | None = None,
                 freq: str | None = None, field: str | None = None, horizon: int | None = None) -> pd.DataFrame:
        """The median forecast of the `prediction_length` steps after `history`, in the data's own units: steps of
        the adapter's grid, or of the forecast fields' own calendar when they share a coarser frequency (quarters of a
        quarterly field of a weekly-grid adapter, indexed by the quarter starts).

        Args:
            history: a DataFrame / dict of arrays / `datasets.Dataset` with one column per field (any subset of the
                adapter's fields) and a time column (or a DatetimeIndex), or a single series (numpy array,
                `pd.Series`, tensor) of `field`'s values.
            prediction_length: steps to predict, of the grid or of the fields' own calendar (default: the adapter's
                horizon); longer forecasts are rolled out chunk by chunk, feeding back the median.
            time_column: the column holding the times when it is not named date, time or timestamp.
            freq: the grid's pandas alias when the adapter records none and the dates do not say; otherwise it may
                only name the adapter's grid or the forecast fields' own frequency.
            field: the field a single series holds (default: the adapter's only field); with a table, the one field
                to forecast (the other columns are its context).
            horizon: deprecated alias of `prediction_length`.

        Returns:
            a DataFrame (prediction_length, fields) indexed by the future times; a table mixing fields of different
            own frequencies stays on the grid, NaN where a coarser field starts no period. Details:
            `GWMPipeline.forecast` (`modeling_gwm.forecasting.pipeline`).
        """
        from ..forecasting.pipeline import GWMPipeline

        return GWMPipeline(self).forecast(history, prediction_length, time_column=time_column, freq=freq, field=field,
                                          horizon=horizon)

    def forecast_quantiles(self, history, prediction_length: int | None = None, *,
                           quantile_levels: list[float] | None = None, time_column: str | None = None,
                           freq: str | None = None, field: str | None = None, horizon: int | None = None
                           ) -> pd.DataFrame:
        """Quantile forecast of the `prediction_length` steps after `history` (as in `forecast`), in the data's units.

        Args:
            history, prediction_length, time_column, freq, field, horizon: as in `forecast`.
            quantile_levels: levels to return, among those the adapter was trained on (default: all of them).

        Returns:
            a DataFrame indexed by the future times with columns (field, level), e.g. `result["co2", 0.9]`. Past
            the adapter's horizon the band widens with the lead time (an approximation, see
            `GWMPipeline.forecast_quantiles`).
        """
        from ..forecasting.pipeline import GWMPipeline

        return GWMPipeline(self).forecast_quantiles(history, prediction_length, quantile_levels=quantile_levels,
                                                    time_column=time_column, freq=freq, field=field, horizon=horizon)

    def impute(self, frame, *, time_column: str | None = None, freq: str | None = None, field: str | None = None
               ) -> pd.DataFrame:
        """`frame` on its regular grid with the missing values of its known fields filled (the median).

        Args:
            frame: read as `forecast` reads its history (a table, or a single series of `field`).
            time_column, freq, field: as in `forecast`.

        Returns:
            the frame on its regular grid, observed values unchanged, each field filled at its own steps (a coarser
            field: the grid steps holding its period starts). Details: `GWMPipeline.impute`.
        """
        from ..forecasting.pipeline import GWMPipeline

        return GWMPipeline(self).impute(frame, time_column=time_column, freq=freq, field=field)

    def predict_df(self, df: pd.DataFrame, *, id_column: str = "item_id", timestamp_column: str = "timestamp",
                   target: str | list[str] | dict[str, str] | None = None, prediction_length: int | None = None,
                   quantile_levels: list[float] | None = None, batch_size: int = 256, freq: str | None = None
                   ) -> pd.DataFrame:
        """Quantile forecasts of every item of a long-format frame (one row per item and time), batched.

        Args:
            df: columns `id_column`, `timestamp_column` and the target column(s).
            target: the column(s) to forecast, each named by a field; a {column: field} mapping for other names;
                None: every other column.
            prediction_length: steps after each item's last period (default: the adapter's horizon): of the grid,
                or of a coarser field's own calendar, each row dated on its field's calendar.
            quantile_levels: levels to report, among the adapter's trained ones (default: all of them).
            batch_size: windows per forward pass.
            freq: the grid's pandas alias when the adapter records none and the timestamps do not say.

        Returns:
            a long-format DataFrame: `id_column`, `timestamp_column`, `target_name`, `predictions` (the median) and
            one column per level ("0.1", ...). Details: `GWMPipeline.predict_df`.
        """
        from ..forecasting.pipeline import GWMPipeline

        return GWMPipeline(self).predict_df(df, id_column=id_column, timestamp_column=timestamp_column, target=target,
                                            prediction_length=prediction_length, quantile_levels=quantile_levels,
                                            batch_size=batch_size, freq=freq)


def _download_adapter(adapter, subfolder: str | None, revision: str | None, token) -> str:
    """The local folder of a Hub adapter's files (fetched, or found in the HF cache); a non-id is no adapter."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from ..hub.hub import download_adapter

    try:
        validate_repo_id(str(adapter))
    except HFValidationError:
        raise AdapterLoadError(f"No adapter folder at {adapter} (and it is not a Hub repo id).") from None
    return download_adapter(str(adapter), subfolder=subfolder, revision=revision, token=token)


AutoModel.register(GWMConfig, GWMModel, exist_ok=True)  # here, not in __init__: the package imports lazily


__all__ = ["GWMModel", "GWMOutput", "ModelLoadError"]
