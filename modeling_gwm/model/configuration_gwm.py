"""Configuration of a GWM world model: which frozen base it grafts onto and the shape of its canvas."""

from __future__ import annotations

import inspect
import os

from transformers import AutoConfig, PretrainedConfig

DEFAULT_BASE = "THUDM/CogVideoX-2b"
BACKBONES = ("cogvideox", "scratch")
CHECKPOINTING_GRANULARITIES = ("loop", "application")
FROZEN_DTYPES = ("auto", "float32", "bfloat16", "float16")
WINDOW_SCALINGS = ("last_value", "instance", "mean_abs", "none")
# canvas.context_baseline's schemes
RESIDUAL_BASELINES = ("none", "last_value", "seasonal_naive", "seasonal_drift", "seasonal_damped_drift")
DEFAULT_QUANTILE_LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
# Upper bounds of the integer settings: far above any real model, far below what would exhaust memory or time when a
# typo (d_model: 1e9, scratch_num_layers: 1e7) builds a model. Checked by GWMConfig, so a curriculum's model block, an
# adapter's gwm_config and `gwm params` meet the same limits; products of two widths are bounded too (MODEL_PRODUCTS).
MODEL_LIMITS = {"d_model": 16_384, "n_loops": 1_024, "max_fields": 65_536, "context_len": 1_000_000,
                "max_time_steps": 1_000_000, "scratch_num_layers": 256, "scratch_num_attention_heads": 1_024,
                "scratch_attention_head_dim": 4_096, "scratch_time_embed_dim": 65_536}
MODEL_PRODUCTS = {("max_time_steps", "d_model"): 2**28, ("max_fields", "d_model"): 2**28,
                  ("scratch_num_attention_heads", "scratch_attention_head_dim"): 65_536}
SEED_MAX = 2**32 - 1  # numpy's seeds (accelerate's set_seed seeds numpy too)
BLOCK_TIMESTEP_MAX = 100_000  # diffusion schedules have about 1,000 steps


def check_quantile_levels(levels, where: str = "GWMConfig: quantile_levels") -> list[float]:
    """Sorted, unique levels strictly inside (0, 1) that include the median (the point forecast)."""
    if isinstance(levels, (str, bytes)) or not hasattr(levels, "__iter__"):
        raise ValueError(f"{where} must be a list of numbers in (0, 1), got {levels!r}")
    levels = list(levels)
    if not levels or not all(isinstance(q, (int, float)) and not isinstance(q, bool) for q in levels):
        raise ValueError(f"{where} must be a non-empty list of numbers in (0, 1), got {levels!r}")
    levels = [float(q) for q in levels]
    if any(not 0.0 < q < 1.0 for q in levels):
        raise ValueError(f"{where} must lie strictly between 0 and 1, got {levels}")
    if levels != sorted(set(levels)):
        raise ValueError(f"{where} must be sorted and unique, got {levels}")
    if 0.5 not in levels:
        raise ValueError(f"{where} must include 0.5 (the median is the point forecast), got {levels}")
    return levels


def _checked_values(*, backbone, frozen_dtype, granularity, sizes: dict, seed, block_timestep, context_len, horizon,
                    window_scaling, window_stats_input, quantile_levels, seasonal_lag_input,
                    season_period, compile_blocks, residual_baseline,
                    residual_penalty) -> list[float]:
    """`GWMConfig`'s arguments checked in one place, each error naming its field; returns the checked levels."""
    if backbone not in BACKBONES:
        raise ValueError(f"GWMConfig: backbone must be one of {BACKBONES}, got {backbone!r}")
    if frozen_dtype not in FROZEN_DTYPES:
        raise ValueError(f"GWMConfig: frozen_dtype must be one of {FROZEN_DTYPES}, got {frozen_dtype!r}")
    if granularity not in CHECKPOINTING_GRANULARITIES:
        raise ValueError(f"GWMConfig: gradient_checkpointing_granularity must be one of "
                         f"{CHECKPOINTING_GRANULARITIES}, got {granularity!r}")
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"GWMConfig: {name} must be a positive integer, got {value!r:.60}")
        if value > MODEL_LIMITS[name]:
            raise ValueError(f"GWMConfig: {name} {value} is over the limit of {MODEL_LIMITS[name]:,} "
                             "(configuration_gwm.MODEL_LIMITS)")
    for (a, b), limit in MODEL_PRODUCTS.items():
        if sizes[a] * sizes[b] > limit:
            raise ValueError(f"GWMConfig: {a} × {b} = {sizes[a]} × {sizes[b]} is over the limit of {limit:,} "
                             "(configuration_gwm.MODEL_PRODUCTS)")
    for name, value, high in (("seed", seed, SEED_MAX), ("block_timestep", block_timestep, BLOCK_TIMESTEP_MAX)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
            raise ValueError(f"GWMConfig: {name} must be an integer in [0, {high:,}], got {value!r:.60}")
    if not isinstance(horizon, int) or not 0 <= horizon < context_len:
        raise ValueError(f"GWMConfig: horizon must be an integer in [0, context_len={context_len}), "
                         f"got {horizon!r}")
    if window_scaling not in WINDOW_SCALINGS:
        raise ValueError(f"GWMConfig: window_scaling must be one of {WINDOW_SCALINGS}, got {window_scaling!r}")
    if not isinstance(window_stats_input, bool):
        raise ValueError(f"GWMConfig: window_stats_input must be true or false, got {window_stats_input!r}")
    levels = check_quantile_levels(quantile_levels)
    if not isinstance(seasonal_lag_input, bool):
        raise ValueError(f"GWMConfig: seasonal_lag_input must be true or false, got {seasonal_lag_input!r}")
    if isinstance(season_period, bool) or not isinstance(season_period, int) or season_period < 0:
        raise ValueError(f"GWMConfig: season_period must be a non-negative integer, got {season_period!r}")
    if not isinstance(compile_blocks, bool):
        raise ValueError(f"GWMConfig: compile_blocks must be true or false, got {compile_blocks!r}")
    if residual_baseline not in RESIDUAL_BASELINES:
        raise ValueError(f"GWMConfig: residual_baseline must be one of {RESIDUAL_BASELINES}, got {residual_baseline!r}")
    if isinstance(residual_penalty, bool) or not isinstance(residual_penalty, (int, float)) or \
            not 0 <= residual_penalty < float("inf"):
        raise ValueError(f"GWMConfig: residual_penalty must be a non-negative number, got {residual_penalty!r}")
    return levels


class GWMConfig(PretrainedConfig):
    r"""
    Configuration of a [`GWMModel`]. It holds every hyper-parameter of the model; the model reads nothing else.

    Args:
        base_model_name_or_path (`str`, defaults to `"THUDM/CogVideoX-2b"`):
            Hub id or local folder of a CogVideoX checkpoint in the diffusers layout (a `transformer/` subfolder).
            Its transformer blocks are loaded once and kept frozen.
        backbone (`str`, defaults to `"cogvideox"`):
            `"cogvideox"` grafts onto the pretrained blocks; `"scratch"` builds randomly initialised blocks of the
            same interface (no diffusers needed) whose weights are trained as part of the adapter.
        d_model (`int`, defaults to 128):
            Width of the canvas (the codec's embedding size); projected to and from the base's `inner_dim`.
        n_loops (`int`, defaults to 3):
            Default number of times each block runs per forward pass (an adapter may choose its own).
        block_timestep (`int`, defaults to 0):
            Diffusion timestep at which the base's time embedding is computed once and fed to every block.
            0 is the clean-signal end of the schedule: the blocks see their inputs as finished frames.
        frozen_dtype (`str`, defaults to `"auto"`):
            dtype of the frozen blocks: `"auto"` is bfloat16 on CUDA and float32 elsewhere (bf16 is slow on CPU).
            Trainable parameters are always float32; activations are cast at the block boundary.
        gradient_checkpointing (`bool`, defaults to `False`):
            Recompute the frozen blocks in the backward pass instead of keeping their activations (also switched by
            `model.gradient_checkpointing_enable()` / `gradient_checkpointing_disable()`).
        gradient_checkpointing_granularity (`str`, defaults to `"loop"`):
            `"loop"`: checkpoint each block's whole loop, and each application inside its recomputation, so
            activation memory stays flat in `n_loops` (each application's forward runs three times). `"application"`:
            checkpoint each application only (its forward runs twice: cheaper in time, memory grows with `n_loops`).
        compile_blocks (`bool`, defaults to `False`):
            Compile each frozen block with `torch.compile` (regional compilation: the identical blocks share one
            graph), once per process for every node and adapter on the base. Worth it on a GPU with large canvases;
            a torch without a working compiler falls back to the plain blocks with one warning. How the model runs,
            not what it computes: adapters do not record it.
        max_fields (`int`, defaults to 64):
            Number of field-embedding slots of the codec. An adapter maps its field names to slots; adapters with
            different field sets merge by name.
        context_len (`int`, defaults to 24):
            Number of time steps in one canvas window.
        horizon (`int`, defaults to 4):
            Number of final steps of a window that are forecast.
        max_time_steps (`int`, defaults to 4096):
            Longest window the sinusoidal time encoding is defined for.
        scratch_num_layers / scratch_num_attention_heads / scratch_attention_head_dim / scratch_time_embed_dim:
            Architecture of the `"scratch"` backbone (ignored for `"cogvideox"`).
        seed (`int`, defaults to 0):
            Seed of the adapter's initialisation (every DAG root starts from the same one).
        quantile_levels (`list[float]`, defaults to `[0.1, 0.2, ..., 0.9]`):
            Levels the value head predicts, trained with the pinball loss; sorted, unique, in (0, 1), with 0.5 (the
            median is the point forecast).
        window_scaling (`str`, defaults to `"last_value"`):
            How each field of each window is made scale-free before the codec, from its visible context only:
            `"last_value"` (location = last visible value, scale = std of the visible context), `"instance"`
            (mean and std, RevIN), `"mean_abs"` (location 0, scale = mean absolute value, Chronos) or `"none"`.
            Predictions are mapped back with the same statistics. Chosen by measurement (README, "Scale-free windows").
        window_stats_input (`bool`, defaults to `False`):
            Feed each field's window statistics to the codec, scale-free and bounded (`canvas.window_statistics`:
            the log of the window's scale in training stds and its context mean in the window's scaled units, both
            clipped): never a location in global units, which would re-introduce the level the scaling removes.
        residual_baseline (`str`, defaults to `"seasonal_damped_drift"`):
            The forecast the value head adds its residual to, computed from each window's visible context only
            (`canvas.context_baseline`): `"none"`, `"last_value"`, `"seasonal_naive"`, `"seasonal_drift"` or
            `"seasonal_damped_drift"` (the drift damped beyond the context, as ETS's damped trend). With a
            baseline the head is zero-initialised, so an untrained adapter forecasts exactly that baseline.
        residual_penalty (`float`, defaults to 0.1):
            Weight of the squared median residual (scaled units) added to every scored position's loss: the
            learned correction is pulled toward the baseline.
        seasonal_lag_input (`bool`, defaults to `False`):
            Feed every canvas position the most recent visible value of its field one (or two, three...) seasons
            earlier, in the window's scaled units (the lag inputs of DeepAR): a forecast position then sees what
            seasonal-naive would predict for it and needs no attention path to find it.
        season_period (`int`, defaults to 0):
            The season in grid steps for `seasonal_lag_input` (12 on a monthly grid, 4 quarterly, 7 daily; 0: none).
            The trainer sets it from each node's grid frequency and records it in the adapter.
    """

    model_type = "gwm"

    def __init__(
        self,
        base_model_name_or_path: str = DEFAULT_BASE,
        backbone: str = "cogvideox",
        d_model: int = 128,
        n_loops: int = 3,
        block_timestep: int = 0,
        frozen_dtype: str = "auto",
        gradient_checkpointing: bool = False,
        gradient_checkpointing_granularity: str = "loop",
        max_fields: int = 64,
        context_len: int = 24,
        horizon: int = 4,
        max_time_steps: int = 4096,
        scratch_num_layers: int = 4,
        scratch_num_attention_heads: int = 4,
        scratch_attention_head_dim: int = 32,
        scratch_time_embed_dim: int = 64,
        seed: int = 0,
        quantile_levels: list[float] | tuple[float, ...] = DEFAULT_QUANTILE_LEVELS,
        window_scaling: str = "last_value",
        window_stats_input: bool = False,
        seasonal_lag_input: bool = False,
        season_period: int = 0,
        compile_blocks: bool = False,
        residual_baseline: str = "seasonal_damped_drift",
        residual_penalty: float = 0.1,
        **kwargs,
    ):
        self.quantile_levels = _checked_values(
            backbone=backbone, frozen_dtype=frozen_dtype, granularity=gradient_checkpointing_granularity,
            sizes={"d_model": d_model, "n_loops": n_loops, "max_fields": max_fields, "context_len": context_len,
                   "max_time_steps": max_time_steps, "scratch_num_layers": scratch_num_layers,
                   "scratch_num_attention_heads": scratch_num_attention_heads,
                   "scratch_attention_head_dim": scratch_attention_head_dim,
                   "scratch_time_embed_dim": scratch_time_embed_dim},
            seed=seed, block_timestep=block_timestep, context_len=context_len, horizon=horizon,
            window_scaling=window_scaling,
            window_stats_input=window_stats_input, quantile_levels=quantile_levels,
            seasonal_lag_input=seasonal_lag_input, season_period=season_period, compile_blocks=compile_blocks,
            residual_baseline=residual_baseline, residual_penalty=residual_penalty)
        self.residual_baseline = residual_baseline
        self.residual_penalty = float(residual_penalty)
        self.window_scaling = window_scaling
        self.window_stats_input = window_stats_input
        self.seasonal_lag_input = seasonal_lag_input
        self.season_period = season_period
        self.base_model_name_or_path = local_or_hub_id(base_model_name_or_path)
        self.backbone = backbone
        self.d_model = d_model
        self.n_loops = n_loops
        self.block_timestep = block_timestep
        self.frozen_dtype = frozen_dtype
        self.gradient_checkpointing = gradient_checkpointing
        self.gradient_checkpointing_granularity = gradient_checkpointing_granularity
        self.compile_blocks = compile_blocks
        self.max_fields = max_fields
        self.context_len = context_len
        self.horizon = horizon
        self.max_time_steps = max_time_steps
        self.scratch_num_layers = scratch_num_layers
        self.scratch_num_attention_heads = scratch_num_attention_heads
        self.scratch_attention_head_dim = scratch_attention_head_dim
        self.scratch_time_embed_dim = scratch_time_embed_dim
        self.seed = seed
        super().__init__(**kwargs)


# Every model setting, declared once: GWMConfig's signature. The key sets below are derived from it.
MODEL_SETTINGS = tuple(name for name in inspect.signature(GWMConfig.__init__).parameters
                       if name not in ("self", "kwargs"))
# A node's own (curriculum node keys: n_loops, context_len, horizon), set by the trainer from the node's grid
# (season_period), or left at its default (max_time_steps): not in a curriculum's `model:` block
NODE_SETTINGS = ("n_loops", "context_len", "horizon", "season_period", "max_time_steps")
# The keys of a curriculum's `model:` block: every other setting, the base given as `base`
CURRICULUM_MODEL_KEYS = frozenset({"base", *MODEL_SETTINGS} - {"base_model_name_or_path", *NODE_SETTINGS})
# How the model runs, not what it learns: left out of a node's settings record, so changing them never blocks --resume
RUNTIME_MODEL_KEYS = ("gradient_checkpointing", "compile_blocks")
# What forecasting reads from an adapter's gwm_config without building the model: recorded even at their defaults
# (PretrainedConfig.to_diff_dict leaves defaults out)
FORECAST_SETTINGS = ("quantile_levels", "window_scaling", "window_stats_input", "residual_baseline", "residual_penalty",
                     "season_period")


def local_or_hub_id(name_or_path: str | os.PathLike) -> str:
    """A base as saved configs record it: an existing local folder as an absolute path (so a saved model or adapter
    loads from any working directory), anything else (a Hub id) as given."""
    name = os.fspath(name_or_path) if name_or_path is not None else name_or_path
    return os.path.abspath(name) if isinstance(name, str) and os.path.isdir(name) else name


AutoConfig.register("gwm", GWMConfig, exist_ok=True)  # here, not in __init__: the package itself imports lazily
