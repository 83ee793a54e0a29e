"""Configuration of the loop adapter, the PEFT method that makes every frozen block run several times."""

from __future__ import annotations

from dataclasses import dataclass, field

from peft.config import PeftConfig

PEFT_TYPE = "GWM_LOOP"
DEFAULT_TARGET_MODULES = r".*transformer_blocks\.\d+"
DEFAULT_MODULES_TO_SAVE = ["codec", "proj_in", "proj_out", "encoder_token", "norm_out"]
# What an adapter's weights mean, recorded as `format_version` in adapter_config.json. 2: scale-free windows and a
# quantile value head; adapters without it predate both and are refused on load (they need retraining). 3: window
# statistics scale-free (no global location) and the value head a residual over a context baseline.
ADAPTER_FORMAT_VERSION = 3
# The key of a field's quantile calibration in `fields` (optional, one factor per quantile level, 1 at the median):
# written by a node trained with `calibrate_quantiles`, applied by `pipeline.predict_windows`.
QUANTILE_SCALE_KEY = "quantile_scale"


def without_calibration(entry: dict) -> dict:
    """A field entry without its quantile calibration: the factors hold for the weights they were fitted on, so an
    adapter made from others (a fork or join node, `add_weighted_adapter`) fits its own or has none."""
    return {k: v for k, v in entry.items() if k != QUANTILE_SCALE_KEY}


@dataclass
class LoopConfig(PeftConfig):
    """
    Configuration of a [`LoopModel`]: per-block loop embeddings and sigmoid loop gates around frozen transformer
    blocks, plus the GWM modules trained with them (codec, projections, encoder token, output norm).

    The architecture fields (`inner_dim`, `num_blocks`, `d_model`) are filled in when the adapter is created and are
    checked when it is loaded, so that an adapter never silently lands on a base it was not trained for.
    """

    n_loops: int = field(default=3, metadata={"help": "How many times each targeted block runs per forward pass."})
    target_modules: list[str] | str | None = field(
        default=DEFAULT_TARGET_MODULES,
        metadata={"help": "Regex (full match) or list of names of the blocks to loop; the default takes every block."},
    )
    modules_to_save: list[str] | None = field(
        default_factory=lambda: list(DEFAULT_MODULES_TO_SAVE),
        metadata={"help": "GWM modules trained and saved with the adapter (one copy per adapter)."},
    )
    train_blocks: bool = field(
        default=False,
        metadata={"help": "Also train a per-adapter copy of every block (the 'scratch' backbone, which has no prior)."},
    )
    fields: list[dict] = field(
        default_factory=list,
        metadata={"help": "The adapter's fields in codec-slot order: name, mean, std, transform, unit, frequency, span "
                          "and, when calibrated, quantile_scale."},
    )
    inner_dim: int | None = field(default=None, metadata={"help": "Width of the base's blocks (set at creation)."})
    num_blocks: int | None = field(default=None, metadata={"help": "Number of looped blocks (set at creation)."})
    d_model: int | None = field(default=None, metadata={"help": "Canvas width of the GWM model (set at creation)."})
    gwm_config: dict = field(
        default_factory=dict,
        metadata={"help": "The GWMConfig of the model the adapter was made on (set at creation), to rebuild it."},
    )
    base_weights: list[float] | None = field(
        default=None,
        metadata={"help": "A sample of the frozen base's weights (set at creation): a base of the same shapes but "
                          "other weights is warned about on load."},
    )
    format_version: int | None = field(
        default=None,
        metadata={"help": "What the weights mean (set at creation); adapters without it predate scale-free windows "
                          "and quantile heads and are refused on load."},
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        if not isinstance(self.n_loops, int) or self.n_loops < 1:
            raise ValueError(f"LoopConfig: n_loops must be a positive integer, got {self.n_loops!r}")

    def to_dict(self) -> dict:
        """As PEFT writes it to adapter_config.json, with the top-level `base_model_name_or_path` filled from
        `gwm_config` (the base the adapter was made on: an absolute local path or a Hub id), so that PEFT's own loaders
        (`AutoPeftModel`) find it."""
        config = super().to_dict()
        if not config.get("base_model_name_or_path"):
            config["base_model_name_or_path"] = (self.gwm_config or {}).get("base_model_name_or_path")
        return config

    @property
    def field_names(self) -> list[str]:
        return [f["name"] for f in self.fields]
