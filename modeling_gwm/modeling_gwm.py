"""GWMModel: a canvas world model around the frozen blocks of a CogVideoX video transformer."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, replace

import torch
from peft import PeftModel
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoModel, PreTrainedModel
from transformers.utils import ModelOutput

from .base import FrozenBase, build_scratch_base, cast_at_block_boundary, load_cogvideox_base, resolve_frozen_dtype
from .canvas import FieldCodec, pinball_loss, seasonal_lag, sinusoidal_encoding, window_scale
from .configuration_gwm import GWMConfig
from .loop import AdapterMismatchError, LoopConfig, LoopLayer, check_adapter_fits
from .loop.config import ADAPTER_FORMAT_VERSION

logger = logging.getLogger(__name__)


class AdapterLoadError(OSError):
    """An adapter folder is missing files, holds a foreign PEFT method or a damaged weights file."""


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
    supports_gradient_checkpointing = True  # GWM's own non-reentrant scheme, see `_set_gradient_checkpointing`
    _no_split_modules = ["LoopLayer"]

    def __init__(self, config: GWMConfig, frozen_base: FrozenBase | None = None, device: str | None = None):
        super().__init__(config)
        config._name_or_path = config.base_model_name_or_path  # PEFT records it as the adapter's base_model
        frozen_dtype = resolve_frozen_dtype(config.frozen_dtype, device)
        if frozen_base is None:
            frozen_base = build_frozen_base(config, dtype=frozen_dtype)  # read straight in its dtype
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
            device: where to put the model; the frozen blocks go to bf16 on CUDA when `frozen_dtype="auto"`.
            config / config_overrides: a `GWMConfig` or fields of one, for a model without adapter.

        Returns:
            a `peft.PeftModel` wrapping the `GWMModel` when an adapter is given (every `GWMModel` method is reachable
            through it), else the bare `GWMModel`.
        """
        for key in _AUTO_PLUMBING:
            config_overrides.pop(key, None)
        hub_options = {key: config_overrides.pop(key) for key in _HUB_OPTIONS if key in config_overrides}
        if adapter is None and base is not None and os.path.isfile(os.path.join(base, "adapter_config.json")):
            base, adapter = None, base
        if adapter is None and base is not None:
            saved_config = _saved_model_file(base, "config.json", subfolder, revision, token, hub_options)
            if saved_config is not None:
                return cls._from_saved(base, config or GWMConfig.from_json_file(saved_config), subfolder, revision,
                                       token, hub_options, device, config_overrides)
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
        _check_adapter_weights(os.path.join(adapter, subfolder or ""), loop_config, model.adapter_architecture(),
                               expected=_expected_adapter_shapes(model, loop_config, str(adapter)))
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

    @classmethod
    def _from_saved(cls, location, config, subfolder, revision, token, hub_options, device, overrides):
        """A model written by `save_pretrained`: config.json names the base, model.safetensors holds the rest."""
        if overrides:  # e.g. frozen_dtype, or base_model_name_or_path when the base folder moved
            config = GWMConfig.from_dict({**config.to_dict(), **overrides})
        model = cls(config, device=device)
        weights = _saved_model_file(location, "model.safetensors", subfolder, revision, token, hub_options)
        if weights is None:
            raise ModelLoadError(f"No model.safetensors next to the GWM config.json in {location}: the saved model "
                                 "has no weights.")
        model._load_saved_weights(weights)
        return model

    def _load_saved_weights(self, path: str) -> None:
        """Load the trained (non-frozen) weights, refusing a file that does not hold exactly those."""
        from safetensors.torch import load_file

        try:
            state = load_file(path)
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

    def predict_df(self, df, **kwargs):
        """Quantile forecasts of every item of a long-format frame, batched; see `modeling_gwm.predict_df`."""
        from .predict_df import predict_df

        return predict_df(self, df, **kwargs)


def build_frozen_base(config: GWMConfig, architecture: dict | None = None,
                      dtype: torch.dtype = torch.float32) -> FrozenBase:
    """The frozen blocks a config asks for, in `dtype`; `backbone="cogvideox"` falls back to scratch without
    diffusers."""
    backbone = config.backbone
    if backbone == "cogvideox":
        try:
            import diffusers  # noqa: F401
        except ImportError:
            logger.warning("diffusers is not installed: falling back to the scratch backbone (pip install diffusers).")
            config.backbone = backbone = "scratch"
    if backbone == "cogvideox":
        return load_cogvideox_base(config.base_model_name_or_path, config.block_timestep, architecture=architecture,
                                   dtype=dtype)
    return build_scratch_base(config.scratch_num_layers, config.scratch_num_attention_heads,
                              config.scratch_attention_head_dim, config.scratch_time_embed_dim, seed=config.seed,
                              dtype=dtype)


def _saved_model_file(location, filename: str, subfolder: str | None, revision: str | None, token,
                      hub_options: dict) -> str | None:
    """Path of `filename` of a model saved by `GWMModel.save_pretrained` (local folder or Hub repo), else None.
    For config.json, a config of another model type (or a CogVideoX checkpoint, which has none) is not ours."""
    local = os.path.join(str(location), subfolder or "", filename)
    if os.path.isdir(str(location)):
        path = local if os.path.isfile(local) else None
    else:
        from transformers.utils.hub import cached_file

        try:
            path = cached_file(str(location), filename, subfolder=subfolder or "", revision=revision, token=token,
                               _raise_exceptions_for_missing_entries=False,
                               _raise_exceptions_for_connection_errors=False, **hub_options)
        except (OSError, ValueError):  # not a repo id, gated, unreachable: not a saved GWM model
            return None
    if path is None or filename != "config.json":
        return path
    try:
        with open(path, encoding="utf-8") as handle:
            return path if json.load(handle).get("model_type") == GWMConfig.model_type else None
    except (OSError, ValueError):
        return None


def _expected_adapter_shapes(model: GWMModel, loop_config: LoopConfig, where: str) -> dict[str, tuple[int, ...]]:
    """The tensors (names as PEFT saves them, shapes) an adapter of `loop_config` holds for `model`.

    Derived from the built model, not hard-coded: the modules to save are read off the model, the looped blocks'
    tensors off a `LoopLayer` made for the config, so a change of the codec or the loop layer follows by itself.
    Also refuses `target_modules` / `modules_to_save` that select anything but the frozen blocks / GWM modules.
    """
    from peft.tuners.tuners_utils import check_target_module_exists

    config_file = os.path.join(where, "adapter_config.json")
    prefix = "base_model.model."
    block_names = {f"transformer_blocks.{i}" for i in range(len(model.transformer_blocks))}
    for name, _ in model.named_modules():
        if name and name not in block_names and check_target_module_exists(loop_config, name):
            raise AdapterLoadError(f"{config_file}: target_modules {loop_config.target_modules!r} selects module "
                                   f"{name!r}; the loop adapter wraps whole transformer blocks only "
                                   "(transformer_blocks.<i>)")
    top = {name for name, _ in model.named_children()} - {"transformer_blocks"}
    saved = loop_config.modules_to_save or []
    unknown = [m for m in saved if m not in top]
    if unknown:
        raise AdapterLoadError(f"{config_file}: modules_to_save names {unknown}, which are not GWM modules "
                               f"(valid: {sorted(top)})")
    shapes = {f"{prefix}{m}.{k}": tuple(v.shape) for m in saved for k, v in getattr(model, m).state_dict().items()}
    probe = LoopLayer(nn.Linear(1, 1), "probe", replace(loop_config, train_blocks=False), inner_dim=model.inner_dim)
    layer_shapes = {k.replace(".probe", ""): tuple(v.shape) for k, v in probe.named_parameters()
                    if not k.startswith("base_layer.")}  # loop_emb, loop_emb_enc, loop_gate
    for i, block in enumerate(model.transformer_blocks):
        if not check_target_module_exists(loop_config, f"transformer_blocks.{i}"):
            continue
        shapes |= {f"{prefix}transformer_blocks.{i}.{k}": v for k, v in layer_shapes.items()}
        if loop_config.train_blocks:
            shapes |= {f"{prefix}transformer_blocks.{i}.loop_block.{k}": tuple(v.shape)
                       for k, v in block.state_dict().items()}
    return shapes


def _check_adapter_weights(folder: str, loop_config: LoopConfig, arch: dict[str, int],
                           expected: dict[str, tuple[int, ...]] | None = None) -> None:
    """Check the weights file against the model from its header alone: a config edited by hand cannot hide a
    different n_loops, width, block count or canvas width, and a damaged file is named before PEFT reads it.

    With `expected` (`_expected_adapter_shapes`), every tensor must be there with its shape and nothing else may be:
    PEFT would stop on a missing key or a wrong shape with a traceback, and load unknown tensors silently."""
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
    loop_shape = (loop_config.n_loops, arch["inner_dim"])
    for shape in sorted(set(loop_shapes.values()) - {loop_shape}):
        wrong.append(f"loop embeddings of shape {shape} (n_loops {loop_config.n_loops} and inner_dim "
                     f"{arch['inner_dim']} expect {loop_shape})")
    proj_in = shapes.get(prefix + "proj_in.weight")
    if proj_in is not None and proj_in != (arch["inner_dim"], arch["d_model"]):
        wrong.append(f"proj_in of shape {proj_in} (model expects {(arch['inner_dim'], arch['d_model'])})")
    if wrong:
        raise AdapterMismatchError(f"Adapter weights {path} do not fit this model: " + "; ".join(wrong) + ".")
    if expected is None:
        return
    missing = sorted(set(expected) - set(shapes))
    extra = sorted(set(shapes) - set(expected))
    misshapen = sorted(k for k in set(expected) & set(shapes) if shapes[k] != expected[k])

    def some(keys: list[str]) -> str:
        return ", ".join(k.removeprefix(prefix) for k in keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3
                                                                      else "")

    if extra:
        wrong.append(f"{len(extra)} unknown tensor(s) {some(extra)}")
    if missing:
        wrong.append(f"{len(missing)} missing tensor(s) {some(missing)}")
    for key in misshapen[:3]:
        wrong.append(f"{key.removeprefix(prefix)} of shape {shapes[key]} (model expects {expected[key]})")
    if wrong:
        raise AdapterMismatchError(f"Adapter weights {path} do not fit this model: " + "; ".join(wrong) + ".")


def load_adapter_config(adapter: str | os.PathLike, subfolder: str | None = None, revision: str | None = None,
                        token: str | bool | None = None) -> LoopConfig:
    """Read an adapter's `adapter_config.json`, refusing anything that is not a GWM loop adapter."""
    from peft import PeftConfig

    location = f"{adapter}" + (f" (subfolder {subfolder})" if subfolder else "")
    local = os.path.isdir(adapter)
    config_file = os.path.join(adapter, subfolder or "", "adapter_config.json")
    if local and not os.path.isfile(config_file):
        raise AdapterLoadError(f"No adapter_config.json in {location}: not a GWM adapter folder.")
    if local:
        _check_raw_adapter_config(config_file)
    try:
        peft_config = PeftConfig.from_pretrained(str(adapter), subfolder=subfolder, revision=revision, token=token)
    except ValueError as err:
        raise AdapterLoadError(f"{location}/adapter_config.json is not a valid PEFT adapter config: {err}") from None
    except OSError as err:
        raise AdapterLoadError(f"Could not fetch the adapter {location}: {str(err).splitlines()[0]}") from None
    except (TypeError, KeyError, AttributeError) as err:  # a hand-edited file PEFT's reader trips over
        raise AdapterLoadError(f"{location}/adapter_config.json is not a valid PEFT adapter config: "
                               f"{type(err).__name__}: {err}") from None
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
    _check_loop_config(peft_config, config_file if local else f"{location}/adapter_config.json")
    return peft_config


# What a hand-edited adapter_config.json may ask the model to allocate: far above any real model, far below RAM.
ADAPTER_CONFIG_LIMITS = {"max_fields": 65_536, "d_model": 65_536, "n_loops": 1_024, "context_len": 1_000_000,
                         "max_time_steps": 1_000_000}


def _check_raw_adapter_config(path: str) -> None:
    """The JSON must be an object with a known string peft_type (PEFT's reader raises TypeError/KeyError else)."""
    import json

    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    try:
        with open(path, encoding="utf-8") as handle:
            raw = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterLoadError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(raw, dict):
        raise AdapterLoadError(f"{path} must hold a JSON object, not {type(raw).__name__}")
    peft_type = raw.get("peft_type")
    if not isinstance(peft_type, str) or peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
        raise AdapterLoadError(f"{path}: peft_type {peft_type!r} is not a PEFT method; a GWM adapter has peft_type "
                               "GWM_LOOP")


def _check_loop_config(config: LoopConfig, path: str) -> None:
    """Every value a loop adapter's config feeds to the model, checked with one line naming the file and key."""
    from .data import FieldStats
    from .tabular import DataError

    def bad(key: str, why: str) -> AdapterLoadError:
        return AdapterLoadError(f"{path}: {key} {why}")

    if not isinstance(config.fields, list):
        raise bad("fields", f"must be a list of {{name, mean, std, transform}} objects, got {config.fields!r:.60}")
    names = []
    for i, entry in enumerate(config.fields):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
            raise bad(f"fields[{i}]", f"must be an object with a 'name' string, got {entry!r:.60}")
        try:
            FieldStats.from_dict(entry)
        except (DataError, TypeError, ValueError) as err:
            raise bad(f"fields[{i}]", str(err)) from None
        names.append(entry["name"])
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise bad("fields", f"names {repeated} more than once")
    target = config.target_modules
    if not (isinstance(target, str) or (isinstance(target, (list, set)) and all(isinstance(t, str) for t in target))):
        raise bad("target_modules", f"must be a regex or a list of module names, got {target!r:.60}")
    if config.modules_to_save is not None and not (isinstance(config.modules_to_save, list) and all(
            isinstance(m, str) for m in config.modules_to_save)):
        raise bad("modules_to_save", f"must be a list of module names, got {config.modules_to_save!r:.60}")
    if not isinstance(config.gwm_config, dict):
        raise bad("gwm_config", f"must be an object (the model's GWMConfig), got {config.gwm_config!r:.60}")
    limits = {"n_loops": config.n_loops, **{k: config.gwm_config[k] for k in ADAPTER_CONFIG_LIMITS
                                            if k in config.gwm_config}}
    for key, value in limits.items():
        where = key if key == "n_loops" else f"gwm_config.{key}"
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= ADAPTER_CONFIG_LIMITS[key]:
            raise bad(where, f"must be an integer in 1..{ADAPTER_CONFIG_LIMITS[key]}, got {value!r}")
    try:
        gwm_config = GWMConfig(**config.gwm_config)
    except (TypeError, ValueError) as err:
        raise bad("gwm_config", str(err)) from None
    if len(names) > gwm_config.max_fields:
        raise bad("fields", f"has {len(names)} entries, more than gwm_config.max_fields={gwm_config.max_fields}")


AutoModel.register(GWMConfig, GWMModel, exist_ok=True)  # here, not in __init__: the package imports lazily


__all__ = ["ADAPTER_FORMAT_VERSION", "AdapterLoadError", "AdapterMismatchError", "GWMModel", "GWMOutput",
           "ModelLoadError", "build_frozen_base"]
