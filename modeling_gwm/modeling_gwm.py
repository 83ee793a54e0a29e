"""GWMModel: a canvas world model around the frozen blocks of a CogVideoX video transformer."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from peft import PeftModel
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .base import FrozenBase, build_scratch_base, load_cogvideox_base, resolve_frozen_dtype
from .canvas import FieldCodec, pinball_loss, seasonal_lag, sinusoidal_encoding, window_scale
from .configuration_gwm import GWMConfig
from .loop import AdapterMismatchError, LoopConfig, LoopLayer, check_adapter_fits
from .loop.config import ADAPTER_FORMAT_VERSION

logger = logging.getLogger(__name__)


class AdapterLoadError(OSError):
    """An adapter folder is missing files, holds a foreign PEFT method or a damaged weights file."""


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


def _is_auto_dtype(config: GWMConfig) -> bool:
    return config.frozen_dtype == "auto"


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
    supports_gradient_checkpointing = False  # our own per-application switch, see `set_gradient_checkpointing`
    _no_split_modules = ["LoopLayer"]

    def __init__(self, config: GWMConfig, frozen_base: FrozenBase | None = None, device: str | None = None):
        super().__init__(config)
        config._name_or_path = config.base_model_name_or_path  # PEFT records it as the adapter's base_model
        if frozen_base is None:
            frozen_base = build_frozen_base(config)
        self.base_source = frozen_base.source
        self.inner_dim = frozen_base.inner_dim
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(config.seed)  # every model built from one config starts from the same adapter init
        self.codec = FieldCodec(config.max_fields, config.d_model, n_quantiles=len(config.quantile_levels),
                                stats_input=config.window_stats_input, lag_input=config.seasonal_lag_input)
        self.proj_in = nn.Linear(config.d_model, self.inner_dim)
        self.encoder_token = EncoderToken(self.inner_dim)
        self.proj_out = nn.Linear(self.inner_dim, config.d_model)
        self.norm_out = nn.LayerNorm(config.d_model)
        torch.random.set_rng_state(generator_state)
        self.transformer_blocks = frozen_base.blocks
        self.transformer_blocks.requires_grad_(False)
        self.register_buffer("block_temb", frozen_base.temb, persistent=False)  # (1, time_embed_dim)
        self.register_buffer("quantile_levels", torch.tensor(config.quantile_levels), persistent=False)  # (Q,)
        self.post_init()
        if device is not None:
            self.to(device)
        self.set_frozen_dtype(resolve_frozen_dtype(config.frozen_dtype, device))

    def _init_weights(self, module: nn.Module) -> None:
        # Modules initialise themselves; the frozen blocks must never be touched.
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
                alone is recognised as the adapter.
            adapter: local folder or Hub id of a GWM adapter (`adapter_config.json` + `adapter_model.safetensors`).
            subfolder / revision / token: where the adapter lives inside a Hub repo (a DAG node's subfolder).
            adapter_name: name of the loaded adapter on the model (several can sit on one base).
            is_trainable: load the adapter for further training rather than inference.
            device: where to put the model; the frozen blocks go to bf16 on CUDA when `frozen_dtype="auto"`.
            config / config_overrides: a `GWMConfig` or fields of one, for a model without adapter.

        Returns:
            a `peft.PeftModel` wrapping the `GWMModel` when an adapter is given (every `GWMModel` method is reachable
            through it), else the bare `GWMModel`.
        """
        if adapter is None and base is not None and os.path.isfile(os.path.join(base, "adapter_config.json")):
            base, adapter = None, base
        if adapter is None:
            if config is None:
                config = GWMConfig(**({"base_model_name_or_path": str(base)} if base else {}), **config_overrides)
            return cls(config, device=device)

        if not os.path.isdir(adapter):  # a Hub id: fetch (or find in the HF cache) just the adapter files
            from huggingface_hub.utils import HFValidationError, validate_repo_id

            from .hub import download_adapter

            try:
                validate_repo_id(str(adapter))
            except HFValidationError:
                raise AdapterLoadError(f"No adapter folder at {adapter} (and it is not a Hub repo id).") from None

            adapter = download_adapter(str(adapter), subfolder=subfolder, revision=revision, token=token)
            subfolder = revision = None
        loop_config = load_adapter_config(adapter, subfolder=subfolder, revision=revision, token=token)
        gwm_kwargs = {**loop_config.gwm_config, **config_overrides}
        if base is not None:
            gwm_kwargs["base_model_name_or_path"] = str(base)
        model = cls(GWMConfig(**gwm_kwargs), device=device)
        check_adapter_fits(loop_config, **model.adapter_architecture(), where=str(adapter))
        _check_adapter_weights(os.path.join(adapter, subfolder or ""), loop_config, model.adapter_architecture())
        try:
            return PeftModel.from_pretrained(
                model, str(adapter), adapter_name=adapter_name, is_trainable=is_trainable, subfolder=subfolder,
                revision=revision, token=token,
            )
        except Exception as err:  # safetensors raises its own error types on damaged files
            if "safetensors" in type(err).__module__ or "header" in str(err).lower():
                raise AdapterLoadError(
                    f"Adapter weights in {adapter} are unreadable (truncated or not a safetensors file): {err}"
                ) from None
            raise

    def adapter_architecture(self) -> dict[str, int]:
        """What an adapter must match to fit this model."""
        return {"inner_dim": self.inner_dim, "num_blocks": len(self.transformer_blocks), "d_model": self.config.d_model}

    def set_frozen_dtype(self, dtype: torch.dtype) -> None:
        """Put the frozen blocks (and only them) in `dtype`; trainable parameters stay float32."""
        for module in self.transformer_blocks:
            block = module.base_layer if isinstance(module, LoopLayer) else module
            block.to(dtype)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block application in the backward pass (activation memory flat in `n_loops`)."""
        self.config.gradient_checkpointing = enabled
        for module in self.modules():
            if isinstance(module, LoopLayer):
                module.gradient_checkpointing = enabled

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
        for block in self.transformer_blocks:
            hidden, encoder = block(hidden, encoder, temb, None, None)  # (B, N, inner), (B, 1, inner)
        hidden = self.proj_out(hidden.float())  # (B, N, d_model)
        return self.norm_out(hidden)

    def forward(
        self,
        values: torch.Tensor,
        presence: torch.Tensor,
        field_ids: torch.Tensor | None = None,
        target_mask: torch.Tensor | None = None,
        return_dict: bool = True,
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
        """
        batch, steps, n_fields = values.shape
        if field_ids is None:
            field_ids = torch.arange(n_fields, device=values.device)
        presence = presence.bool()
        values = torch.where(presence, values, torch.zeros_like(values)).float()  # NaN never reaches the network
        visible = presence if target_mask is None else presence & ~target_mask.bool()
        loc, scale = window_scale(values, visible, self.config.window_scaling)  # (B, 1, F) each, from visible only
        scaled = (values - loc) / scale  # (B, T, F)
        window_stats = torch.stack([loc[:, 0], scale[:, 0].log()], dim=-1)  # (B, F, 2)
        lag = seasonal_lag(scaled, visible, self.config.season_period) if self.config.seasonal_lag_input else None
        canvas = self.codec.encode(torch.where(visible, scaled, 0.0), visible, field_ids, window_stats, lag)  # (B,N,D)
        time_index = torch.arange(steps, device=values.device).repeat_interleave(n_fields)  # (N,)
        hidden = self.backbone(canvas, time_index)  # (B, N, d_model)
        quantiles = self.codec.decode(hidden, steps).float()  # (B, T, F, Q) scaled units
        if not self.training:
            quantiles = quantiles.sort(dim=-1).values  # no crossing quantiles at inference
        loss = position_loss = None
        if target_mask is not None:
            scored = (target_mask.bool() & presence).float()  # (B, T, F)
            position_loss = pinball_loss(quantiles, scaled, self.quantile_levels.float()) * presence  # (B, T, F)
            loss = (position_loss * scored).sum() / scored.sum().clamp_min(1.0)
        quantiles = quantiles * scale.unsqueeze(-1) + loc.unsqueeze(-1)  # (B, T, F, Q) input units
        median = self.config.quantile_levels.index(0.5)
        output = GWMOutput(loss=loss, predictions=quantiles[..., median], quantiles=quantiles,
                           position_loss=position_loss, hidden_states=hidden)
        return output if return_dict else output.to_tuple()

    # ------------------------------------------------------------------ inference in the data's own units
    def forecast(self, history, horizon: int, **kwargs):
        """The `horizon` steps after `history` in raw units; see `modeling_gwm.forecasting.forecast`."""
        from .forecasting import forecast

        return forecast(self, history, horizon, **kwargs)

    def forecast_quantiles(self, history, horizon: int, **kwargs):
        """Quantile forecast in raw units, columns (field, level); see `modeling_gwm.forecasting.forecast_quantiles`."""
        from .forecasting import forecast_quantiles

        return forecast_quantiles(self, history, horizon, **kwargs)

    def impute(self, frame, **kwargs):
        """`frame` with its missing values filled; see `modeling_gwm.forecasting.impute`."""
        from .forecasting import impute

        return impute(self, frame, **kwargs)


def build_frozen_base(config: GWMConfig, architecture: dict | None = None) -> FrozenBase:
    """The frozen blocks a config asks for; `backbone="cogvideox"` falls back to scratch without diffusers."""
    backbone = config.backbone
    if backbone == "cogvideox":
        try:
            import diffusers  # noqa: F401
        except ImportError:
            logger.warning("diffusers is not installed: falling back to the scratch backbone (pip install diffusers).")
            config.backbone = backbone = "scratch"
    if backbone == "cogvideox":
        return load_cogvideox_base(config.base_model_name_or_path, config.block_timestep, architecture=architecture)
    return build_scratch_base(config.scratch_num_layers, config.scratch_num_attention_heads,
                              config.scratch_attention_head_dim, config.scratch_time_embed_dim, seed=config.seed)


def _check_adapter_weights(folder: str, loop_config: LoopConfig, arch: dict[str, int]) -> None:
    """Check the weights file against the model from its header alone: a config edited by hand cannot hide a
    different n_loops, width, block count or canvas width, and a damaged file is named before PEFT reads it."""
    from safetensors import safe_open

    path = os.path.join(folder, "adapter_model.safetensors")
    if not os.path.isfile(path):
        raise AdapterLoadError(f"No adapter_model.safetensors in {folder}: the adapter has no weights.")
    try:
        with safe_open(path, framework="pt") as weights:
            shapes = {key: tuple(weights.get_slice(key).get_shape()) for key in weights.keys()}
    except Exception as err:  # safetensors raises its own error type on damaged files
        raise AdapterLoadError(f"Adapter weights {path} are unreadable (truncated or not a safetensors file): "
                               f"{err}") from None
    prefix = "base_model.model."
    loop_shapes = {k: v for k, v in shapes.items() if k.startswith(prefix + "transformer_blocks.")
                   and k.endswith(".loop_emb")}
    wrong = []
    if len(loop_shapes) != arch["num_blocks"]:
        wrong.append(f"{len(loop_shapes)} looped blocks (model has {arch['num_blocks']})")
    expected = (loop_config.n_loops, arch["inner_dim"])
    for shape in sorted(set(loop_shapes.values()) - {expected}):
        wrong.append(f"loop embeddings of shape {shape} (n_loops {loop_config.n_loops} and inner_dim "
                     f"{arch['inner_dim']} expect {expected})")
    proj_in = shapes.get(prefix + "proj_in.weight")
    if proj_in is not None and proj_in != (arch["inner_dim"], arch["d_model"]):
        wrong.append(f"proj_in of shape {proj_in} (model expects {(arch['inner_dim'], arch['d_model'])})")
    if wrong:
        raise AdapterMismatchError(f"Adapter weights {path} do not fit this model: " + "; ".join(wrong) + ".")


def load_adapter_config(adapter: str | os.PathLike, subfolder: str | None = None, revision: str | None = None,
                        token: str | bool | None = None) -> LoopConfig:
    """Read an adapter's `adapter_config.json`, refusing anything that is not a GWM loop adapter."""
    from peft import PeftConfig

    location = f"{adapter}" + (f" (subfolder {subfolder})" if subfolder else "")
    local = os.path.isdir(adapter)
    if local and not os.path.isfile(os.path.join(adapter, subfolder or "", "adapter_config.json")):
        raise AdapterLoadError(f"No adapter_config.json in {location}: not a GWM adapter folder.")
    try:
        peft_config = PeftConfig.from_pretrained(str(adapter), subfolder=subfolder, revision=revision, token=token)
    except ValueError as err:
        raise AdapterLoadError(f"{location}/adapter_config.json is not a valid PEFT adapter config: {err}") from None
    except OSError as err:
        raise AdapterLoadError(f"Could not fetch the adapter {location}: {str(err).splitlines()[0]}") from None
    if not isinstance(peft_config, LoopConfig):
        raise AdapterLoadError(
            f"{location} holds a {getattr(peft_config.peft_type, 'value', peft_config.peft_type)} adapter, "
            "not a GWM loop adapter (peft_type GWM_LOOP)."
        )
    if peft_config.format_version != ADAPTER_FORMAT_VERSION:
        found = "no format_version" if peft_config.format_version is None else \
            f"format_version {peft_config.format_version}"
        raise AdapterLoadError(
            f"{location} has {found} (this GWM reads format_version {ADAPTER_FORMAT_VERSION}: scale-free windows "
            "and quantile forecasts): it was made by an older GWM and needs retraining (gwm train / dag_train.py)."
        )
    return peft_config


__all__ = ["ADAPTER_FORMAT_VERSION", "AdapterLoadError", "AdapterMismatchError", "GWMModel", "GWMOutput",
           "build_frozen_base"]
