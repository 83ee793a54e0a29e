"""GWMPipeline: forecast, impute and predict_df with a trained GWM adapter, in the data's own units, on one batched
core (scores against baselines: `evaluation`; the forecast plot: `plots`; reading, transforming and gridding tables:
`tabular`).

As in chronos-forecasting's `BaseChronosPipeline`: `GWMPipeline.from_pretrained(base, adapter)` wraps the model
`GWMModel.from_pretrained` returns, `predict_quantiles(contexts, prediction_length, quantile_levels)` forecasts a
batch of histories and `predict_df(df, id_column, timestamp_column, target, prediction_length, quantile_levels)` the
items of a long-format frame. Both run the one rollout below (`_rollout`): every history on the adapter's grid, its
values transformed and normalised, the steps each field is due scheduled, the windows of all histories stacked into
shared forward passes (`predict_windows`, which applies the adapter's quantile calibration). `forecast`,
`forecast_quantiles` and `predict_df` (methods here, functions of a model below, and `GWMModel`'s convenience methods)
and `evaluation.evaluate` are thin layers over it. `impute` rolls nothing out: it hides the missing positions inside
windows that tile the history and fills them through the same `predict_windows`.

A history is a table of time steps by fields: a pandas DataFrame, a dict of arrays or a `datasets.Dataset`, with
columns named by the adapter's dotted field names (any subset of them; a field that is not there is simply absent
from the canvas); or a single series (numpy array, `pd.Series`, torch tensor) of one field. Values go through the
adapter's own transform and normalisation (stored in its `adapter_config.json`), the model fills the hidden canvas
positions, and the predictions come back through the inverse transform, so every number a user sees is in the units
of their data.

The history is put on the grid the adapter was trained on (the `frequency` recorded in its fields; inferred from the
dates for adapters without one). Each field keeps its own spacing on that grid (a quarterly field on a monthly grid
every 3 steps): it is predicted only at the steps continuing that spacing from its last observation. Forecasts longer
than the adapter's horizon are rolled out autoregressively: each chunk of `horizon` grid steps is fed back as observed
input for the next chunk (its MEDIAN), on a window of the adapter's `context_len` steps; each later chunk's band is
widened by the spread reached before it (`widen_rolled_band`), so the band grows with the lead time.

The model predicts quantiles (the adapter's `quantile_levels`, 0.1 ... 0.9 by default): `forecast` returns the
median, `forecast_quantiles` every level. An adapter trained with `calibrate_quantiles` records, per field, factors
on each level's offset from the median, fitted on its node's validation windows (`fit_quantile_scales`);
`predict_windows` applies them (`scale_quantiles`), so every band a user sees is the calibrated one. The median is
never changed.

Histories are independent: a history's forecast in a batch is its forecast alone (up to float summation order in
batched matmuls; each window is scaled by its own context inside the model, so histories of very different levels
batch together).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Hashable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from ..model.configuration_gwm import DEFAULT_QUANTILE_LEVELS
from ..model.data import FieldStats
from ..model.loop.config import QUANTILE_SCALE_KEY
from ..tabular import (
    CHANGE_TRANSFORMS,
    DataError,
    check_model_units,
    denormalize,
    future_index,
    infer_frequency,
    invert_transform,
    is_coarser,
    normalize,
    numeric_frame,
    on_grid,
    own_dates_after,
    own_spacing,
    period_starts,
    regular_grid,
    same_frequency,
    snap,
    to_frame,
)

logger = logging.getLogger(__name__)

# Longest forecast (and hold-out) in grid steps: one model call per adapter horizon of steps, so 10,000 steps is 2,500
# calls at horizon 4; a longer request is almost surely a typo, refused up front instead of running for hours.
MAX_FORECAST_STEPS = 10_000
# Quantile calibration (`fit_quantile_scales`; the factors are in an adapter's fields under `QUANTILE_SCALE_KEY`):
# the range a factor is searched in, and the fewest validation targets of a field it is fitted from.
QUANTILE_SCALE_BOUNDS = (0.25, 4.0)
MIN_CALIBRATION_POINTS = 20


# ---------------------------------------------------------------------------------------------------- the adapter
@dataclass(frozen=True)
class AdapterSpec:
    """What forecasting needs to know about an adapter: its fields (codec-slot order) and its window."""

    fields: dict[str, FieldStats]
    context_len: int
    horizon: int
    adapter_name: str | None = None
    frequency: str | None = None  # the pandas alias of the grid it was trained on; None for older adapters
    quantile_levels: tuple[float, ...] = DEFAULT_QUANTILE_LEVELS  # what the value head predicts, sorted
    spans: dict[str, tuple[str, str]] = field(default_factory=dict)  # field -> (first, last) date it trained on
    # field -> its source's own frequency (QS for a quarterly field on a W-SAT grid); empty for older adapters
    own_frequencies: dict[str, str] = field(default_factory=dict)
    quantile_scales: dict[str, tuple[float, ...]] = field(default_factory=dict)  # field -> factor per level (fitted)

    @classmethod
    def from_config(cls, loop_config, adapter_name: str | None = None) -> AdapterSpec:
        """From a `LoopConfig` (e.g. `load_adapter_config(folder)`), without loading any weights."""
        gwm_config = loop_config.gwm_config or {}
        fields = {f["name"]: FieldStats.from_dict(f) for f in loop_config.fields}
        if not fields:
            raise DataError(f"adapter {adapter_name or ''!s} declares no fields: it was not trained on data")
        frequency = next((f["frequency"] for f in loop_config.fields if f.get("frequency")), None)
        levels = tuple(float(q) for q in gwm_config.get("quantile_levels", DEFAULT_QUANTILE_LEVELS))
        return cls(fields, int(gwm_config.get("context_len", 24)), int(gwm_config.get("horizon", 4)), adapter_name,
                   frequency, levels, {f["name"]: (str(f["span"][0]), str(f["span"][-1])) for f in loop_config.fields
                                       if isinstance(f.get("span"), (list, tuple)) and len(f["span"]) == 2},
                   {f["name"]: f["own_frequency"] for f in loop_config.fields if f.get("own_frequency")},
                   {f["name"]: tuple(float(x) for x in f[QUANTILE_SCALE_KEY]) for f in loop_config.fields
                    if f.get(QUANTILE_SCALE_KEY)})

    @classmethod
    def from_model(cls, model) -> AdapterSpec:
        """From a loaded model: a `PeftModel` or the `GWMModel` inside it, with its active adapter."""
        from ..model.loop import LoopLayer

        configs = getattr(model, "peft_config", None)
        if not configs:
            raise ValueError("this model has no GWM adapter: load one with GWMModel.from_pretrained(base, adapter)")
        name = getattr(model, "active_adapter", None) if hasattr(model, "get_base_model") else None
        if name is None:
            layer = next((m for m in model.modules() if isinstance(m, LoopLayer)), None)
            name = layer.active_adapters[0] if layer is not None and layer.active_adapters else next(iter(configs))
        return cls.from_config(configs[name], adapter_name=name)

    def own_frequency(self, name: str) -> str | None:
        """The field's own frequency where it is coarser than the grid (QS on W-SAT), else None (it is on the grid,
        or the adapter is older than the record)."""
        own = self.own_frequencies.get(name)
        return own if is_coarser(own, self.frequency) else None

    def calendar(self, names: list[str]) -> str | None:
        """The one coarser own frequency every field of `names` shares, else None: a forecast of those fields alone
        comes out on that calendar (quarter starts), counted in its steps."""
        owns = [self.own_frequency(n) for n in names]
        if not owns or None in owns or not all(same_frequency(f, owns[0]) for f in owns):
            return None
        return owns[0]

    def slots(self, names: list[str]) -> list[int]:
        return [list(self.fields).index(n) for n in names]

    @property
    def median_index(self) -> int:  # position of the 0.5 level (the point forecast) among `quantile_levels`
        return self.quantile_levels.index(0.5)

    def check_levels(self, levels) -> list[float]:
        """The requested quantile levels (None: every trained level), sorted; a level the adapter does not predict
        is a DataError naming the ones it does."""
        if levels is None:
            return list(self.quantile_levels)
        levels = [levels] if isinstance(levels, (int, float)) else list(levels)
        try:
            wanted = sorted({float(q) for q in levels})
        except (TypeError, ValueError):
            raise DataError(f"quantile levels must be numbers, got {levels!r}") from None
        unknown = [q for q in wanted if not any(math.isclose(q, k, abs_tol=1e-9) for k in self.quantile_levels)]
        if unknown or not wanted:
            raise DataError(f"unknown quantile level(s) {unknown or levels}: this adapter predicts "
                            f"{list(self.quantile_levels)}")
        return [min(self.quantile_levels, key=lambda k: abs(k - q)) for q in wanted]

    def widened_fields(self, names: list[str]) -> np.ndarray:
        """(S,) bool: the fields whose rolled-out band is widened chunk by chunk (`widen_rolled_band`); change
        transforms are left out, their band already grows as each level's changes are accumulated."""
        return np.array([self.fields[n].transform not in CHANGE_TRANSFORMS for n in names], dtype=bool)

    def scale_rows(self, slots: list[int]) -> np.ndarray | None:
        """(S, Q) the calibration factors of the fields at `slots` (1 for a field without), or None when the adapter
        has no calibration at all (its quantiles are used as the model predicts them)."""
        if not self.quantile_scales:
            return None
        names, ones = list(self.fields), (1.0,) * len(self.quantile_levels)
        return np.array([self.quantile_scales.get(names[s], ones) for s in slots], dtype=np.float64)

    def min_history(self) -> int:
        """Rows a forecast needs: one window of context_len steps minus the horizon it predicts."""
        return max(1, self.context_len - self.horizon)


# ---------------------------------------------------------------------------------------------------- input tables
def read_history(data, spec: AdapterSpec, time_column: str | None = None, freq: str | None = None,
                 field: str | None = None) -> tuple[pd.DataFrame, str | None]:
    """The user's table as (L, S) raw values of known fields on the adapter's grid, and the grid's frequency.

    The grid is the adapter's recorded training frequency, else `freq`, else inferred from the dates. A given `freq`
    must name that grid or the own frequency of the fields forecast (`field`, else every column) when they share a
    coarser one (`AdapterSpec.calendar`): QS for a quarterly field of a W-SAT adapter. A column with no value at all
    is an absent field, like a column that is not there. A single series (numpy array, `pd.Series`, tensor) is the
    values of `field` (default: the adapter's only one); with a table, `field` names the one column to forecast.
    """
    frame = to_frame(_one_field_table(data, spec, field), time_column)
    unknown = [str(c) for c in frame.columns if c not in spec.fields]
    if unknown:
        hint = "" if time_column is not None or isinstance(frame.index, pd.DatetimeIndex) else (
            f"; if {unknown[0]!r} holds the times, pass time_column={unknown[0]!r} (default: a column named "
            "date, time or timestamp)")
        raise DataError(f"unknown field(s) {unknown}: this adapter knows {list(spec.fields)}{hint}")
    if frame.shape[1] == 0:
        raise DataError(f"no field columns: this adapter knows {list(spec.fields)}")
    if field is not None and field not in frame.columns:  # a table and the field to forecast
        if field not in spec.fields:
            raise DataError(f"unknown field {field!r}: this adapter knows {list(spec.fields)}")
        raise DataError(f"field {field!r} is not a column of the history; its columns are {list(frame.columns)}")
    grid_freq = grid_frequency(spec, freq, [field] if field is not None else list(frame.columns))
    frame = numeric_frame(frame)
    empty = [str(c) for c in frame.columns if frame[c].isna().all()]
    if len(empty) == frame.shape[1]:
        raise DataError(f"field(s) {empty} have no value in the history")
    if field in empty:
        raise DataError(f"field {field!r} has no value in the history: nothing to forecast from")
    if empty:
        logger.warning("field(s) %s have no value in the history: treated as absent", empty)
        frame = frame.drop(columns=empty)
    freq = grid_freq
    if (isinstance(frame.index, pd.DatetimeIndex) and freq is None and len(frame) < spec.min_history()
            and infer_frequency(frame.sort_index().index.unique()) is None):  # too short to say anything else
        raise DataError(f"the history has {len(frame)} steps; this adapter needs at least {spec.min_history()} "
                        f"(context_len {spec.context_len} - horizon {spec.horizon})")
    return on_grid(frame, freq)


def grid_frequency(spec: AdapterSpec, freq: str | None, names: list[str]) -> str | None:
    """The grid a history goes on: the adapter's recorded one, else `freq`. A `freq` that names neither that grid nor
    the own frequency the forecast fields `names` share (`AdapterSpec.calendar`) is a one-line DataError."""
    if not (spec.frequency and freq):
        return spec.frequency or freq
    if same_frequency(freq, spec.frequency):
        return spec.frequency
    own = spec.calendar(names)
    if own is not None and same_frequency(freq, own):
        return spec.frequency
    owns = sorted({f for f in (spec.own_frequency(n) for n in names) if f})
    also = f" and from the own frequency {', '.join(map(repr, owns))} of the field(s) forecast" if owns else ""
    raise DataError(f"freq {freq!r} differs from the {spec.frequency!r} grid this adapter was trained on{also}; leave "
                    "freq out (a coarser field is placed on that grid and forecast on its own calendar)")


def _is_single_series(data) -> bool:
    """A numpy array, `pd.Series` or torch tensor: the values of one field (`field=`), not a table of fields."""
    return isinstance(data, (np.ndarray, pd.Series, torch.Tensor))


def _one_field_table(data, spec: AdapterSpec, field: str | None):
    """A single series (numpy array, `pd.Series`, torch tensor) -> a one-column DataFrame named by its field; any
    other history (DataFrame, dict, `datasets.Dataset`) is returned as it is."""
    if isinstance(data, torch.Tensor):
        data = data.detach().cpu().numpy()
    if not isinstance(data, (np.ndarray, pd.Series)):
        return data
    if field is None and isinstance(data, pd.Series) and data.name in spec.fields:
        field = data.name
    if field is None:
        if len(spec.fields) != 1:
            raise DataError(f"a single series needs field= (one of {list(spec.fields)}): this adapter has "
                            f"{len(spec.fields)} fields; or pass a table with one column per field")
        field = next(iter(spec.fields))
    if field not in spec.fields:
        raise DataError(f"unknown field {field!r}: this adapter knows {list(spec.fields)}")
    if isinstance(data, pd.Series):
        return data.rename(field).to_frame()
    values = np.asarray(data)
    if values.ndim == 2 and values.shape[1] == 1:
        values = values[:, 0]
    if values.ndim != 1:
        raise DataError(f"a single series must be 1-D (time steps), got an array of shape {values.shape}; pass a "
                        "table with one column per field for several fields")
    return pd.DataFrame({field: values})



# ---------------------------------------------------------------------------------------------------- calibration
def fit_quantile_scales(actual: np.ndarray, quantiles: np.ndarray, levels) -> list[float] | None:
    """One factor on every level's offset from the median, the one whose calibrated band
    `median + factor * (q - median)` has the lowest mean pinball loss (the quantity WQL weighs) on these targets.

    The factor is searched on a log-spaced grid over `QUANTILE_SCALE_BOUNDS` that includes 1, so the calibrated band
    never scores worse than the model's own on the targets it was fitted on. One factor per field, not one per level:
    on bench_forecast's tuning series per-level factors (each matching its level's coverage) made the hold-out WQL
    worse, the single factor better (benchmarks/README.md section 6). A field with fewer than
    `MIN_CALIBRATION_POINTS` targets gets no factor.

    Args:
        actual: (N,) observed values of one field.
        quantiles: (N, Q) the model's quantiles for them at the sorted `levels`, in the same units.
        levels: (Q,) the quantile levels, with 0.5.

    Returns:
        Q plain floats, one per level (1.0 at the median, the fitted factor at every other level), or None.
    """
    actual, quantiles = np.asarray(actual, dtype=np.float64), np.asarray(quantiles, dtype=np.float64)
    keep = np.isfinite(actual) & np.isfinite(quantiles).all(axis=1)
    actual, quantiles = actual[keep], quantiles[keep]
    if len(actual) < MIN_CALIBRATION_POINTS:
        return None
    levels = np.asarray([float(q) for q in levels])
    median_index = int(np.flatnonzero(levels == 0.5)[0])
    low, high = QUANTILE_SCALE_BOUNDS
    grid = np.concatenate([[1.0], np.geomspace(low, high, 161)])
    losses = [mean_pinball(actual, scale_quantiles(quantiles, np.where(levels == 0.5, 1.0, g), median_index), levels)
              for g in grid]
    factor = float(grid[int(np.argmin(losses))])  # the first of equal losses: 1 unless another is strictly better
    return [1.0 if level == 0.5 else factor for level in levels]


def mean_pinball(actual: np.ndarray, quantiles: np.ndarray, levels) -> float:
    """The pinball (quantile) loss of (N, Q) `quantiles` at `levels` for (N,) `actual`, averaged over both."""
    error = np.asarray(actual, dtype=np.float64)[:, None] - np.asarray(quantiles, dtype=np.float64)
    levels = np.asarray(levels, dtype=np.float64)
    return float(np.mean(np.maximum(levels * error, (levels - 1.0) * error)))


def scale_quantiles(quantiles: np.ndarray, scales: np.ndarray, median_index: int) -> np.ndarray:
    """Calibrated quantiles: each level's offset from the median times its factor, sorted again (no crossing).

    Args:
        quantiles: (..., S, Q) sorted quantiles.
        scales: (S, Q) positive factors per field and level (`AdapterSpec.scale_rows`).
        median_index: the position of the 0.5 level.

    Returns:
        (..., S, Q); the median is the input's, bit for bit (every offset keeps its side of it).
    """
    median = quantiles[..., median_index:median_index + 1]
    out = np.sort(median + scales * (quantiles - median), axis=-1)
    out[..., median_index] = quantiles[..., median_index]
    return out


def coverage_error(actual: np.ndarray, quantiles: np.ndarray, levels) -> float:
    """Mean over levels of |share of `actual` (N,) at or below the level's quantile (N, Q) - the level|: 0 when
    every level covers its nominal share."""
    below = (np.asarray(actual)[:, None] <= np.asarray(quantiles)).mean(axis=0)
    return float(np.mean(np.abs(below - np.asarray(levels, dtype=np.float64))))


@torch.no_grad()
def predict_windows(model, values: np.ndarray, slots: list[int], target: np.ndarray,
                    spec: AdapterSpec | None = None) -> np.ndarray:
    """The batched forecasting step: many windows in one forward pass, in the adapter's normalised units.

    Args:
        model: a `PeftModel` (or the `GWMModel` in it) with the adapter to use active.
        values: (B, T, S) float, transformed and normalised by the adapter's field statistics, NaN where missing.
        slots: (S,) codec slot of each column (`AdapterSpec.slots(names)`).
        target: (B, T, S) bool, the positions to predict (hidden from the input even when observed).
        spec: the active adapter's `AdapterSpec` (read from `model` when not given).

    Returns:
        (B, T, S, Q) float array of the quantiles at the adapter's `quantile_levels` (sorted), normalised units, at
        every position (meaningful where `target` holds), calibrated with the adapter's recorded factors when it has
        them (`scale_quantiles`; the median as the model predicts it). Each window is scaled by its own visible
        context inside the model, so windows of very different levels batch together.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    values_t = torch.as_tensor(np.nan_to_num(values), dtype=torch.float32, device=device)
    presence = torch.as_tensor(~np.isnan(values), device=device)
    target_t = torch.as_tensor(target, device=device)
    field_ids = torch.as_tensor(slots, device=device)
    out = model(values=values_t, presence=presence, field_ids=field_ids, target_mask=target_t).quantiles
    model.train(was_training)
    out = out.float().cpu().numpy()
    if spec is None and getattr(model, "peft_config", None):
        spec = AdapterSpec.from_model(model)
    scales = spec.scale_rows(slots) if spec is not None else None
    return out if scales is None else scale_quantiles(out, scales, spec.median_index)


def widen_rolled_band(predicted: np.ndarray, target: np.ndarray, carry: np.ndarray, spec: AdapterSpec
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Widen one rolled-out chunk's band by the spread reached at the end of the chunks before it.

    Each chunk is predicted given the fed-back median of the chunks before, so the model's own band for it starts
    narrow again. As an approximation that treats the chunks' errors as independent, each level's offset from the
    median is combined with the offset carried from the previous chunk's last due step: `sqrt(own**2 + carried**2)`
    on the level's side of the median. The median is unchanged; the first chunk (carry 0) is the model's own band.

    Args:
        predicted: (B, T, S, Q) the chunk's quantiles (normalised units, sorted levels).
        target: (B, T, S) bool, the positions predicted in this chunk (and whose band is carried).
        carry: (B, S, Q) signed offsets from the median at each field's previous due step (zeros at the start).

    Returns:
        the widened (B, T, S, Q) quantiles and the new (B, S, Q) carry (unchanged where a field had no step).
    """
    median = predicted[..., spec.median_index:spec.median_index + 1]  # (B, T, S, 1)
    side = np.sign(np.asarray(spec.quantile_levels) - 0.5)  # (Q,) -1 below the median, +1 above, 0 at it
    offset = side * np.sqrt((predicted - median) ** 2 + carry[:, None] ** 2)  # (B, T, S, Q)
    widened = np.where(target[..., None], median + offset, predicted)
    has_step = target.any(axis=1)  # (B, S)
    last = target.shape[1] - 1 - np.argmax(target[:, ::-1], axis=1)  # (B, S) each field's last due step
    reached = np.take_along_axis(offset, last[:, None, :, None], axis=1)[:, 0]  # (B, S, Q)
    return widened, np.where(has_step[..., None], reached, carry)


class NonFiniteForecastError(ValueError):
    """The model predicted NaN or inf: the adapter's weights (or the base's) are damaged, e.g. a diverged run."""


def check_finite(values: np.ndarray, due: np.ndarray, names: list[str], spec: AdapterSpec) -> None:
    """Refuse a forecast with NaN/inf where a value was due: values and due (T, S), S = len(names) fields.

    NaN where nothing was due (a quarterly field between its quarters) is the documented gap, not an error.
    """
    bad = due & ~np.isfinite(values)
    if bad.any():
        fields = [name for j, name in enumerate(names) if bad[:, j].any()]
        raise NonFiniteForecastError(
            f"adapter {spec.adapter_name!r} predicted non-finite values (NaN/inf) for field(s) {fields} at "
            f"{int(bad.sum())} of {int(due.sum())} steps: its weights are damaged (e.g. a diverged training run); "
            "use an earlier checkpoint or retrain it")


def check_steps(name: str, steps, *, grid_steps: int | None = None, grid: str | None = None) -> None:
    """A forecast length (horizon, hold-out) is a positive integer of at most MAX_FORECAST_STEPS grid steps.

    `grid_steps`: the steps of the `grid` that `steps` of a coarser own calendar take (8 quarters: ~104 weeks); the
    limit counts those, and the error quotes both."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps <= 0:
        raise ValueError(f"{name} must be a positive number of steps, got {steps!r}")
    if steps > MAX_FORECAST_STEPS:
        raise ValueError(f"{name} {steps} is over the limit of {MAX_FORECAST_STEPS} steps "
                         f"(pipeline.MAX_FORECAST_STEPS); ask for fewer steps")
    if grid_steps is not None and grid_steps > MAX_FORECAST_STEPS:
        raise ValueError(f"{name} {steps} takes {grid_steps} steps of the adapter's {grid!r} grid, over the limit of "
                         f"{MAX_FORECAST_STEPS} grid steps (pipeline.MAX_FORECAST_STEPS); ask for fewer steps")


def check_forecast_request(history_len: int, prediction_length, spec: AdapterSpec) -> None:
    """The one-line errors for a prediction_length that is not a positive integer or a history too short for one
    window."""
    check_steps("prediction_length", prediction_length)
    if history_len < spec.min_history():
        raise DataError(f"the history has {history_len} steps; this adapter needs at least {spec.min_history()} "
                        f"(context_len {spec.context_len} - horizon {spec.horizon})")


def prediction_length_of(prediction_length, horizon, spec: AdapterSpec) -> int:
    """`prediction_length`, or the deprecated `horizon=` alias (a FutureWarning), or the adapter's horizon."""
    if horizon is not None:
        if prediction_length is not None:
            raise ValueError("pass prediction_length only (horizon= is its deprecated alias), not both")
        warnings.warn("horizon= is deprecated: use prediction_length=", FutureWarning, stacklevel=3)
        prediction_length = horizon
    return spec.horizon if prediction_length is None else prediction_length




# ---------------------------------------------------------------------------------------------------- long format
# ---------------------------------------------------------------------------------------------------- the input
def _targets(frame: pd.DataFrame, id_column: str, timestamp_column: str, target, spec: AdapterSpec
             ) -> dict[str, str]:
    """{column: field}: `target` as a column name, a list of them, a {column: field} mapping, or None (every column
    other than the id and timestamp)."""
    if target is None:
        target = [c for c in frame.columns if c not in (id_column, timestamp_column)]
    if isinstance(target, str):
        target = [target]
    mapping = dict(target) if isinstance(target, dict) else {c: c for c in target}
    if not mapping:
        raise DataError(f"no target column: the frame has only {list(frame.columns)}")
    absent = [c for c in mapping if c not in frame.columns]
    if absent:
        raise DataError(f"target column(s) {absent} are not in the frame; columns are {list(frame.columns)}")
    unknown = [f for f in mapping.values() if f not in spec.fields]
    if unknown:
        raise DataError(f"unknown field(s) {unknown}: this adapter knows {list(spec.fields)} (map a column onto a "
                        "field with target={'column': 'field'})")
    if len(set(mapping.values())) < len(mapping):
        raise DataError(f"two target columns map onto the same field: {mapping}")
    return mapping


def _float_columns(frame: pd.DataFrame, columns: list[str]) -> np.ndarray:
    """(rows, S) float64, NaN where missing; text that is not a number is a one-line error naming the column."""
    numeric = [c for c in columns if pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_bool_dtype(
        frame[c])]
    parsed = numeric_frame(frame[[c for c in columns if c not in numeric]]) if len(numeric) < len(columns) else None
    out = np.stack([frame[c].to_numpy(dtype=np.float64) if c in numeric else parsed[c].to_numpy() for c in columns],
                   axis=1)
    return np.where(np.isfinite(out), out, np.nan)


def _timestamps(column: pd.Series, name: str) -> pd.DatetimeIndex:
    if pd.api.types.is_datetime64_any_dtype(column):
        times = pd.DatetimeIndex(column)
    else:
        try:
            times = pd.DatetimeIndex(pd.to_datetime(column, format="mixed"))
        except (ValueError, TypeError) as err:
            raise DataError(f"column {name!r}: timestamps are not dates ({str(err).splitlines()[0]})") from None
    if times.isna().any():
        raise DataError(f"column {name!r}: {int(times.isna().sum())} timestamp(s) are empty")
    return times


def _item(value) -> str:
    """An item id as the user wrote it: 8, not np.int64(8)."""
    return repr(value.item() if isinstance(value, np.generic) else value)



# ---------------------------------------------------------------------------------------------------- the core
@dataclass
class _Items:
    """Histories on the adapter's grid, as one flat (sum L_i, S) array cut by `offsets`: the items of a long-format
    frame (`_gridded`) or the histories of a batch (`_stacked`)."""

    ids: np.ndarray  # (N,) the item ids in order of first appearance; a batch's positions of its histories
    grid: pd.DatetimeIndex | None  # a long frame's global grid, earliest to latest period of any item; None: a batch
    first: np.ndarray  # (N,) grid position of each item's first period (zeros in a batch: each has its own index)
    lengths: np.ndarray  # (N,) grid steps of each item, L_i
    offsets: np.ndarray  # (N + 1,) start of each item in `values`
    values: np.ndarray  # (sum L_i, S) raw values, NaN where missing (periods averaged like forecast does)
    freq: str | None
    what: str = "item"  # how an error names one: "item" ("item 'a'"), "context" ("context 2"), "" (one history)

    def label(self, i: int) -> str:
        if self.what == "item":
            return f"item {_item(self.ids[i])}"
        return f"context {self.ids[i]}" if self.what else ""


def _gridded(df: pd.DataFrame, id_column: str, timestamp_column: str, columns: list[str], spec: AdapterSpec,
             freq: str | None) -> _Items:
    """Sort, check, snap and average every item's rows onto the adapter's grid (`freq`: `grid_frequency`'s) in a
    handful of numpy calls."""
    try:
        codes, ids = pd.factorize(df[id_column], sort=False)  # (rows,), (N,)
    except TypeError:  # lists, dicts: unhashable
        odd = next((v for v in df[id_column] if not isinstance(v, Hashable)), None)
        raise DataError(f"column {id_column!r}: ids must be strings or numbers, got {type(odd).__name__} "
                        f"{odd!r:.40}") from None
    if (codes < 0).any():
        raise DataError(f"column {id_column!r}: {int((codes < 0).sum())} row(s) have no id")
    times = _timestamps(df[timestamp_column], timestamp_column)
    values = _float_columns(df, columns)  # (rows, S)
    order = np.lexsort((times.asi8, codes))  # by item, then time
    codes, times, values = codes[order], times[order], values[order]
    stamps = times.asi8
    repeated = (codes[1:] == codes[:-1]) & (stamps[1:] == stamps[:-1])
    if repeated.any():
        at = int(np.flatnonzero(repeated)[0])
        raise DataError(f"{int(repeated.sum())} duplicate ({id_column}, {timestamp_column}) row(s), e.g. item "
                        f"{_item(ids[codes[at]])} at {times[at]}: give each item one row per time")
    starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])  # (N,) first row of each item
    if freq is None:  # the longest item says it best
        counts = np.diff(np.r_[starts, len(codes)])
        longest = int(np.argmax(counts))
        freq = infer_frequency(times[starts[longest]:starts[longest] + counts[longest]])
        if freq is None:
            raise DataError("cannot infer the frequency of the timestamps; pass freq (e.g. 'MS', 'QS', 'D')")
    grid = regular_grid(times.min(), times.max(), freq)
    position = snap(times, grid)  # (rows,) global grid position of each row
    first = position[starts]  # (N,) positions ascend within an item
    last = position[np.r_[starts[1:], len(codes)] - 1]
    lengths = last - first + 1
    offsets = np.r_[0, np.cumsum(lengths)]
    flat = offsets[codes] + position - first[codes]  # (rows,) row of each observation in the flat array
    gridded = np.full((offsets[-1], len(columns)), np.nan)  # (sum L_i, S)
    merged = int((np.diff(flat) == 0).sum())  # flat rows ascend: rows of one period are neighbours
    if not merged:
        gridded[flat] = values
    else:  # the mean of the rows in each period, NaN where none
        logger.warning("%d rows averaged into %d periods of the %r grid", len(flat), len(flat) - merged, freq)
        observed = ~np.isnan(values)
        for j in range(len(columns)):
            sums = np.bincount(flat, np.where(observed[:, j], values[:, j], 0.0), minlength=offsets[-1])
            counts = np.bincount(flat, observed[:, j], minlength=offsets[-1])
            with np.errstate(invalid="ignore", divide="ignore"):
                gridded[:, j] = sums / counts
    return _Items(np.asarray(ids), grid, first, lengths, offsets, gridded, freq)



def _stacked(frames: list[pd.DataFrame], freq: str | None, ids: list[int], what: str) -> tuple[_Items, list[str]]:
    """Histories already on the grid (`read_history`), as one `_Items` over the union of their fields (in order of
    first appearance), and that field list."""
    fields = list(dict.fromkeys(name for frame in frames for name in frame.columns))
    lengths = np.array([len(frame) for frame in frames], dtype=np.int64)
    values = np.concatenate([frame.reindex(columns=fields).to_numpy(dtype=np.float64) for frame in frames])
    values = np.ascontiguousarray(values)  # row-major like a long frame's: windows sliced from it reach torch as such
    return _Items(np.asarray(ids), None, np.zeros(len(frames), dtype=np.int64), lengths, np.r_[0, np.cumsum(lengths)],
                  values, freq, what), fields


def _modelled(items: _Items, spec: AdapterSpec, fields: list[str]) -> np.ndarray:
    """(sum L_i, S) raw -> transformed and normalised: change transforms act between consecutive observations of one
    item, never across two items."""
    item_of = np.repeat(np.arange(len(items.ids)), items.lengths)  # (sum L_i,)
    out = np.full_like(items.values, np.nan)
    for j, name in enumerate(fields):
        stats, raw = spec.fields[name], items.values[:, j]
        rows = np.flatnonzero(~np.isnan(raw))
        observed = raw[rows]
        pairs = item_of[rows[1:]] == item_of[rows[:-1]]  # (obs - 1,) consecutive observations of one item
        bad = observed <= 0 if stats.transform in ("log", "log_return") else np.zeros(len(rows), dtype=bool)
        if bad.any():
            k = int(np.argmax(bad))
            raise DataError(f"{_where(items, item_of[rows[k]], name)}: transform {stats.transform!r} needs positive "
                            f"values, found {float(observed[k])!r}")
        if stats.transform == "pct_change" and (pairs & (observed[:-1] == 0)).any():
            k = int(np.argmax(pairs & (observed[:-1] == 0)))
            raise DataError(f"{_where(items, item_of[rows[k]], name)}: transform 'pct_change' divides by the previous "
                            "value, found 0; use diff")
        if stats.transform == "none":
            modelled = raw
        elif stats.transform == "log":
            modelled = np.log(raw)
        else:
            previous, current = observed[:-1][pairs], observed[1:][pairs]
            modelled = np.full_like(raw, np.nan)
            if stats.transform == "diff":
                modelled[rows[1:][pairs]] = current - previous
            elif stats.transform == "pct_change":
                modelled[rows[1:][pairs]] = current / previous - 1.0
            else:  # log_return
                modelled[rows[1:][pairs]] = np.log(current) - np.log(previous)
        out[:, j] = normalize(modelled, stats)
        check_model_units(out[:, j], raw, f"field {name!r}")
    return out


def _where(items: _Items, i: int, name: str) -> str:
    """'item 'a', field 'x'' in a long frame, 'context 2, field 'x'' in a batch, 'field 'x'' for one history."""
    return ", ".join(filter(None, (items.label(i), f"field {name!r}")))


def _in_units(quantiles: np.ndarray, due: np.ndarray, stats: FieldStats, last_raw=None) -> np.ndarray:
    """(M, W, K) normalised quantile paths of one field -> the data's own units where `due` (M, W, 1), NaN elsewhere.
    A change transform accumulates each path over the due steps only, from `last_raw` (the field's last observed
    value, (M, 1, 1) or a number)."""
    modelled = denormalize(quantiles, stats)
    if stats.transform == "none":
        raw = modelled
    elif stats.transform == "log":
        raw = np.exp(modelled)
    elif stats.transform == "diff":
        raw = last_raw + np.cumsum(np.where(due, modelled, 0.0), axis=1)
    elif stats.transform == "pct_change":
        raw = last_raw * np.cumprod(np.where(due, 1.0 + modelled, 1.0), axis=1)
    else:  # log_return
        raw = last_raw * np.exp(np.cumsum(np.where(due, modelled, 0.0), axis=1))
    return np.where(due, raw, np.nan)


@dataclass
class _Calendar:
    """A target field's own calendar, coarser than the grid (a quarterly field of a W-SAT adapter): it is forecast
    at the grid steps holding its period starts, and its rows are the next `prediction_length` of them."""

    freq: str  # the field's own frequency
    dates: np.ndarray  # (N, prediction_length) datetime64: each item's next period starts after its last observation
    positions: np.ndarray  # (N, prediction_length) their steps on the global grid
    grid_steps: int  # grid steps after an item's end that reach its last period start, the most over the items


def _calendars(items: _Items, spec: AdapterSpec, fields: list[str], steps: int) -> list[_Calendar | None]:
    """Per target field, its own calendar when the adapter records a coarser own frequency for it, else None: the
    `steps` period starts after the item's last observation of the field (after the item's end when it has none in
    its last context_len steps), as `_request` has them for one history."""
    starts, lengths = items.offsets[:-1], items.lengths
    ends = items.first + lengths - 1  # (N,) each item's last step on the global grid
    row = np.arange(items.offsets[-1]) - np.repeat(starts, lengths)  # (sum L_i,) row within its item
    out: list[_Calendar | None] = []
    for j, name in enumerate(fields):
        own = spec.own_frequency(name)
        if own is None:
            out.append(None)
            continue
        last = np.maximum.reduceat(np.where(np.isnan(items.values[:, j]), -1, row), starts)  # (N,) -1: none
        fresh = last >= lengths - spec.context_len
        after_step = np.where(fresh, items.first + last, ends)  # (N,) the grid step its period starts follow
        unique, which = np.unique(after_step, return_inverse=True)  # items sharing that step share their dates
        dates, after = [], []  # per unique step: (steps,) period starts, (steps,) grid steps after it
        for step in unique:
            own_dates, _ = own_dates_after(items.grid[step], items.freq, own, steps)
            dates.append(own_dates.to_numpy())
            after.append(snap(own_dates, pd.date_range(items.grid[step], own_dates[-1], freq=items.freq)))
        positions = after_step[:, None] + np.stack(after)[which.ravel()]  # (N, steps) global grid steps
        out.append(_Calendar(own, np.stack(dates)[which.ravel()], positions,
                             max(1, int(np.max(positions[:, -1] - ends)))))
    return out




def _grid_period_starts(items: _Items, history: int, width: int, owns: list[str | None]) -> dict[int, np.ndarray]:
    """{field: (N, W) bool} for each field with a coarser own frequency (`owns`): the right-aligned canvas columns
    (column `history` is each item's first future step) whose global grid step holds one of its period starts."""
    if all(own is None for own in owns):
        return {}
    grid = pd.date_range(items.grid[0], periods=len(items.grid) + width - history, freq=items.freq)
    position = (items.first + items.lengths - history)[:, None] + np.arange(width)[None, :]  # (N, W) global step
    return {j: period_starts(grid, items.freq, own)[np.maximum(position, 0)] for j, own in enumerate(owns)
            if own is not None}


def _own_period_starts(frames: list[pd.DataFrame], freq: str | None, owns: list[str | None], history: int,
                       width: int) -> dict[int, np.ndarray]:
    """As `_grid_period_starts`, for the histories of a batch, each on its own dates continued at `freq`."""
    out = {}
    for j, own in enumerate(owns):
        if own is None:
            continue
        columns = np.zeros((len(frames), width), dtype=bool)
        for i, frame in enumerate(frames):
            grid = frame.index.append(future_index(frame.index, freq, width - history))  # rows 0 .. L + W - history
            low = max(0, len(frame) - history)  # row r is column r - L + history
            columns[i, low - len(frame) + history:] = period_starts(grid, freq, own)[low:]
        out[j] = columns
    return out


@dataclass
class _Rollout:
    """Every item's last 2 * context_len grid steps and its future, right-aligned: column `2 * context_len` is each
    item's first future step. Windows never reach further back: an item's first due step follows the last
    observation of a field seen in its last context_len steps, and a window is context_len steps ending after it."""

    history: int  # 2 * context_len: columns of history kept
    present: np.ndarray  # (N, S) bool: the field has a value in the item (else: absent, no output rows)
    last: np.ndarray  # (N, S) the item's row of the field's last observation (-1 when absent)
    due: np.ndarray  # (N, W, S) bool: predicted there (the field's own spacing continued from its last observation)
    quantiles: np.ndarray  # (N, W, S, Q) normalised, where due


def _schedule(items: _Items, context: int, history: int, stop: np.ndarray, starts_at: dict[int, np.ndarray]
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Where each (item, field) is predicted: (N, S) present, (N, S) fresh (observed in the item's last `context`
    steps; the others have nothing to forecast from), (N, S) row of its last observation (-1 when absent) and
    (N, W, S) due on the right-aligned canvas after its last observation, before the item's `stop` (N,) column, for
    fresh fields: at the columns holding its period starts (`starts_at`) for a field with its own calendar, else its
    own spacing continued."""
    starts, lengths, n = items.offsets[:-1], items.lengths, len(items.ids)
    width = int(stop.max())
    # per (item, field): observations, first and last observed row, the field's own spacing
    observed = ~np.isnan(items.values)  # (sum L_i, S)
    row = np.arange(items.offsets[-1]) - np.repeat(starts, lengths)  # (sum L_i,) row within its item
    counts = np.add.reduceat(observed.astype(np.int64), starts, axis=0)  # (N, S)
    last = np.maximum.reduceat(np.where(observed, row[:, None], -1), starts, axis=0)  # (N, S)
    first = np.minimum.reduceat(np.where(observed, row[:, None], np.iinfo(np.int64).max), starts, axis=0)
    spacing = np.ones((n, observed.shape[1]), dtype=np.int64)
    for i, j in zip(*np.nonzero((counts > 1) & (last - first + 1 != counts))):  # gappy: the median gap
        spacing[i, j] = own_spacing(np.flatnonzero(observed[starts[i]:starts[i] + lengths[i], j]))
    present = counts > 0
    fresh = present & (last >= lengths[:, None] - context)  # else stale: nothing to forecast from
    # schedule, right-aligned: local row r of item i is column r - L_i + history
    column = np.arange(width)[None, :, None]
    last_column = (last - lengths[:, None] + history)[:, None, :]  # (N, 1, S)
    after = (column > last_column) & (column < stop[:, None, None])  # (N, W, S)
    due = fresh[:, None, :] & after & ((column - last_column) % spacing[:, None, :] == 0)
    for j, starts_here in starts_at.items():
        due[:, :, j] = fresh[:, None, j] & after[:, :, j] & starts_here
    return present, fresh, last, due


def _check_recent(items: _Items, present: np.ndarray, fresh: np.ndarray, due: np.ndarray, fields: list[str],
                  context: int) -> None:
    """Log the stale (item, field) pairs (not forecast: NaN); an item with nothing recent is a DataError naming it."""
    stale = present & ~fresh
    if items.what == "item":
        if stale.any():
            logger.warning("%d (item, field) pairs have no observation in the last %d steps of their item: not "
                           "forecast (NaN)", int(stale.sum()), context)
        idle = np.flatnonzero(~due.any(axis=(1, 2)) & present.any(axis=1))  # an item with no value: no rows
        if len(idle):
            raise DataError(f"{items.label(idle[0])}: no field is observed in its last {context} steps (the "
                            f"adapter's context_len): nothing to forecast from")
        return
    for i in range(len(items.ids)):
        prefix = f"{items.label(i)}: " if items.what else ""
        if present[i].any() and not fresh[i].any():
            raise DataError(f"{prefix}no field is observed in the last {context} steps of the history (the adapter's "
                            "context_len): nothing to forecast from")
        if stale[i].any():
            logger.warning("%sfield(s) %s have no observation in the last %d steps of the history: not forecast "
                           "(NaN)", prefix, [fields[j] for j in np.flatnonzero(stale[i])], context)


def _rollout(model, spec: AdapterSpec, items: _Items, fields: list[str], stop: np.ndarray, batch_size: int,
             starts_at: dict[int, np.ndarray]) -> _Rollout:
    """Roll every item out, batched: the windows of all items at one chunk round go through shared forward passes.

    Each item from its first due step, chunk by chunk of `spec.horizon` steps (the last one cut at the item's `stop`
    column), in a window of up to `context_len` steps ending with the chunk; the medians are fed back where a field
    is due, each chunk's band widened by the one before (`widen_rolled_band`). A batch holds items with the same
    present fields and the same window length (shorter only for items shorter than context_len).
    """
    context, n, n_fields = spec.context_len, len(items.ids), len(fields)
    history = 2 * context
    width = int(stop.max())
    starts, lengths = items.offsets[:-1], items.lengths
    present, fresh, last, due = _schedule(items, context, history, stop, starts_at)  # (N, S) x 3, (N, W, S)
    _check_recent(items, present, fresh, due, fields, context)
    any_due = due.any(axis=2)  # (N, W)
    # the canvas: the last `history` rows of every item (NaN before an item's first row), then the future
    flat_rows = starts[:, None] + lengths[:, None] - history + np.arange(history)  # (N, history)
    inside = flat_rows >= starts[:, None]
    canvas = np.full((n, width, n_fields), np.nan)
    canvas[:, :history][inside] = _modelled(items, spec, fields)[flat_rows[inside]]
    quantiles = np.full(canvas.shape + (len(spec.quantile_levels),), np.nan)  # (N, W, S, Q)
    signatures, group = np.unique(present, axis=0, return_inverse=True)
    group = group.ravel()  # (N,) which present-field signature
    first_due = np.argmax(any_due, axis=1)  # (N,)
    row_zero = np.maximum(0, history - lengths)  # (N,) column of each item's first row
    cumulative = np.concatenate([np.zeros((n, 1), dtype=np.int64), np.cumsum(any_due, axis=1)], axis=1)
    widened = spec.widened_fields(fields)  # (S,) the fields whose band is carried across chunks
    carry = np.zeros((n, n_fields, len(spec.quantile_levels)))  # (N, S, Q)
    for round_ in range(int(np.max(-(-(stop - first_due) // spec.horizon)))):
        done = first_due + round_ * spec.horizon  # (N,)
        end = np.minimum(done + spec.horizon, stop)
        live = (done < stop) & (cumulative[np.arange(n), end] > cumulative[np.arange(n), np.minimum(done, stop)])
        begin = np.maximum(row_zero, end - context)
        key = group * (context + 1) + (end - begin)  # same fields and same window length batch together
        for value in np.unique(key[live]):
            members = np.flatnonzero(live & (key == value))
            fields_in = np.flatnonzero(signatures[group[members[0]]])  # (S_g,)
            slots = spec.slots([fields[j] for j in fields_in])
            steps = int(end[members[0]] - begin[members[0]])
            for b in range(0, len(members), batch_size):
                chunk = members[b:b + batch_size]  # (B,)
                cells = (chunk[:, None, None], begin[chunk, None, None] + np.arange(steps)[None, :, None],
                         fields_in[None, None, :])  # index (B, T, S_g) of the windows in the canvas
                values = canvas[cells]  # (B, T, S_g)
                target = due[cells] & (cells[1] >= done[chunk, None, None])
                predicted = predict_windows(model, values, slots, target, spec)  # (B, T, S_g, Q)
                predicted, carried = widen_rolled_band(predicted, target & widened[fields_in], carry[chunk][
                    :, fields_in], spec)
                carry[chunk[:, None], fields_in[None, :]] = carried
                canvas[cells] = np.where(target, predicted[..., spec.median_index], values)  # median fed back
                quantiles[cells] = np.where(target[..., None], predicted, quantiles[cells])
    return _Rollout(history, present, last, due, quantiles)


def _long_frame(items: _Items, spec: AdapterSpec, fields: list[str], columns: list[str], rolled: _Rollout,
                horizon: int, levels: list[float], id_column: str, timestamp_column: str,
                calendars: list[_Calendar | None]) -> pd.DataFrame:
    """(item, target, step) rows in the data's own units, items in order of first appearance: `horizon` grid steps,
    or, for a field with its own calendar, its next `horizon` period starts."""
    future = pd.date_range(items.grid[0], periods=len(items.grid) + horizon, freq=items.freq)
    picks = [spec.median_index, *(spec.quantile_levels.index(q) for q in levels)]
    item_index, field_index, stamps, blocks = [], [], [], []
    for j, name in enumerate(fields):
        stats, members = spec.fields[name], np.flatnonzero(rolled.present[:, j])
        due = rolled.due[members, :, j][..., None]  # (M, W, 1)
        last_raw = items.values[items.offsets[members] + rolled.last[members, j], j][:, None, None]  # (M, 1, 1)
        raw = _in_units(rolled.quantiles[members, :, j][..., picks], due, stats, last_raw)  # (M, W, 1 + levels)
        calendar = calendars[j]
        if calendar is None:  # the next `horizon` grid steps
            blocks.append(raw[:, rolled.history:rolled.history + horizon].reshape(-1, len(picks)))  # (M * horizon, ..)
            stamps.append(future[(items.first[members, None] + items.lengths[members, None] + np.arange(horizon)
                                  ).ravel()])
        else:  # the canvas columns of the item's next `horizon` period starts
            ends = (items.first + items.lengths - 1)[members, None]  # (M, 1)
            taken = calendar.positions[members] - ends - 1 + rolled.history  # (M, horizon)
            blocks.append(np.take_along_axis(raw, taken[..., None], axis=1).reshape(-1, len(picks)))
            stamps.append(pd.DatetimeIndex(calendar.dates[members].ravel()))
        item_index.append(np.repeat(members, horizon))
        field_index.append(np.full(len(members) * horizon, j))
    item_index, field_index = np.concatenate(item_index), np.concatenate(field_index)
    step = np.tile(np.arange(horizon), len(item_index) // horizon)  # blocks are (item, step) row-major
    order = np.lexsort((step, field_index, item_index))
    values = np.concatenate(blocks)[order]  # (rows, 1 + levels)
    frame = pd.DataFrame({id_column: items.ids[item_index[order]],
                          timestamp_column: stamps[0].append(stamps[1:])[order],
                          "target_name": np.asarray(columns, dtype=object)[field_index[order]],
                          "predictions": values[:, 0]})
    for c, q in enumerate(levels):
        frame[str(q)] = values[:, c + 1]
    return frame


@dataclass
class _Request:
    """One history of a batch: the fields forecast and which of its rolled-out rows the forecast shows."""

    frame: pd.DataFrame  # (L, S) on the grid (`read_history`)
    names: list[str]  # the fields forecast; the frame's other columns are their context
    horizon: int  # grid steps rolled out after the history
    start: int  # the first row shown: L, or a row inside the history where an own-calendar step is due
    rows: np.ndarray | None = None  # on the fields' own calendar: the rows (from `start`) of its period starts
    dates: pd.DatetimeIndex | None = None  # ... and those period starts


def _request(spec: AdapterSpec, frame: pd.DataFrame, freq: str | None, steps: int, names: list[str]) -> _Request:
    """The grid steps a forecast of `steps` steps of `names` takes. When `names` share a coarser own frequency
    (`AdapterSpec.calendar`) and the history has dates, the steps are theirs: the `steps` period starts after the
    fields' last observation (a quarter not yet published when the table's other fields end comes first), forecast
    on the grid as far as the last of them and shown at the starts (8 quarter starts, not ~104 Saturdays with NaN
    between). Otherwise the `steps` grid steps after the history."""
    check_steps("prediction_length", steps)
    own = spec.calendar(names) if isinstance(frame.index, pd.DatetimeIndex) and freq is not None else None
    if own is None:
        check_forecast_request(len(frame), steps, spec)
        return _Request(frame, names, steps, len(frame))
    seen = frame[names].notna().to_numpy().any(axis=1)  # (L,) rows where one of the fields is observed
    last = int(np.flatnonzero(seen)[-1])
    if last < len(frame) - spec.context_len:  # stale (NaN, logged): its rows are dated after the history instead
        last = len(frame) - 1
    try:
        dates, after = own_dates_after(frame.index[last], freq, own, steps)  # after: grid steps past `last`
    except pd.errors.OutOfBoundsDatetime:
        raise ValueError(f"prediction_length {steps} ({own} steps) runs past the last date pandas can hold "
                         f"({pd.Timestamp.max.date()}); ask for fewer steps") from None
    horizon = max(1, last + after - (len(frame) - 1))  # grid steps past the history that reach the last date
    check_steps("prediction_length", steps, grid_steps=horizon, grid=freq)
    positions = snap(dates, frame.index.append(future_index(frame.index, freq, horizon)))  # (steps,) grid rows
    start = min(int(positions[0]), len(frame))
    check_forecast_request(len(frame), horizon, spec)
    return _Request(frame, names, horizon, start, positions - start, dates.rename(frame.index.name))


def _wide_frame(items: _Items, i: int, request: _Request, rolled: _Rollout, fields: list[str], spec: AdapterSpec,
                levels: list[float], freq: str | None) -> tuple[pd.DataFrame, np.ndarray]:
    """History `i` of a batch as `forecast_quantiles` shows it: (steps, names x levels) in the data's own units, and
    its (steps, names) bool schedule (where a value was due)."""
    frame, history = request.frame, rolled.history
    shown = slice(history - len(frame) + request.start, history + request.horizon)  # canvas columns shown
    picks = [spec.quantile_levels.index(q) for q in levels]
    slots = [fields.index(name) for name in request.names]
    future = np.full((shown.stop - shown.start, len(slots), len(levels)), np.nan)  # (rows, S, levels)
    for k, j in enumerate(slots):
        due = rolled.due[i, :, j]  # (W,)
        if not due.any():
            continue
        stats = spec.fields[fields[j]]
        last_raw = items.values[items.offsets[i] + rolled.last[i, j], j] if stats.transform in CHANGE_TRANSFORMS \
            else None
        future[:, k] = _in_units(rolled.quantiles[i, :, j][None][..., picks], due[None, :, None], stats,
                                 last_raw)[0, shown]
    due = rolled.due[i, shown][:, slots]  # (rows, S)
    index = frame.index[request.start:].append(future_index(frame.index, freq, request.horizon))
    if request.rows is not None:
        future, due, index = future[request.rows], due[request.rows], request.dates
    columns = pd.MultiIndex.from_product([request.names, levels], names=["field", "level"])
    result = pd.DataFrame(future.reshape(len(future), -1), columns=columns, index=index)
    result.attrs["units"] = {name: spec.fields[name].unit for name in request.names}
    return result, due


# ---------------------------------------------------------------------------------------------------- the pipeline
class GWMPipeline:
    """Forecasting with one GWM model and its active adapter, every entry point on one batched core.

    Example:
        >>> pipeline = GWMPipeline.from_pretrained(base, "runs/demo/final")
        >>> quantiles = pipeline.predict_quantiles([history_a, history_b], prediction_length=12)
        >>> preds = pipeline.predict_df(df, prediction_length=24)  # long format: item_id, timestamp, target(s)
    """

    def __init__(self, model):
        """`model`: a `PeftModel` from `GWMModel.from_pretrained(base, adapter)` (or the `GWMModel` inside it)."""
        self.model = model

    @classmethod
    def from_pretrained(cls, base=None, adapter=None, **kwargs) -> GWMPipeline:
        """The pipeline of `GWMModel.from_pretrained(base, adapter, **kwargs)` (same arguments: a base folder or Hub
        id, an adapter folder or Hub id, device, frozen_dtype, ...)."""
        from ..model.modeling_gwm import GWMModel  # the model's module imports this one's functions lazily, as here

        return cls(GWMModel.from_pretrained(base, adapter, **kwargs))

    @property
    def spec(self) -> AdapterSpec:
        """The active adapter's fields, window, grid and levels."""
        return AdapterSpec.from_model(self.model)

    def predict_quantiles(self, contexts, prediction_length: int | None = None, quantile_levels=None, *,
                          time_column: str | None = None, freq: str | None = None, field: str | None = None,
                          batch_size: int = 256) -> list[pd.DataFrame]:
        """Quantile forecasts of a batch of histories, their windows rolled out together in shared forward passes.

        Args:
            contexts: a list of histories, each as `forecast_quantiles` reads one (a table of fields, or a single
                series of `field`; lengths and end dates may differ), or a 2-D array / tensor holding one single
                series per row.
            prediction_length, quantile_levels, time_column, freq, field: as in `forecast_quantiles`, for every
                history.
            batch_size: windows per forward pass (bounds memory).

        Returns:
            one frame per history, each what `forecast_quantiles` returns for it alone (up to float summation order
            in batched matmuls).
        """
        spec = self.spec
        if isinstance(contexts, (np.ndarray, torch.Tensor)) and contexts.ndim == 2:
            contexts = list(contexts)
        if not isinstance(contexts, (list, tuple)) or not contexts:
            raise DataError("contexts must be a non-empty list of histories (or a 2-D array, one series per row), "
                            f"got {type(contexts).__name__}")
        steps = spec.horizon if prediction_length is None else prediction_length
        levels = spec.check_levels(quantile_levels)
        histories, names = [], []
        for i, context in enumerate(contexts):
            try:
                frame, grid = read_history(context, spec, time_column, freq, field)
            except DataError as err:
                if len(contexts) == 1:
                    raise
                raise DataError(f"context {i}: {err}") from None
            histories.append((frame, grid))
            names.append([field] if field is not None and not _is_single_series(context) else list(frame.columns))
        out = []
        for quantiles, due in self.predict_on_grid(histories, steps, levels, names, batch_size=batch_size):
            check_finite(quantiles.to_numpy(), np.repeat(due, len(levels), axis=1), list(quantiles.columns), spec)
            out.append(quantiles)
        return out

    def predict_on_grid(self, histories: list[tuple[pd.DataFrame, str | None]], prediction_length: int,
                        levels: list[float], names: list[list[str]], *, batch_size: int = 256
                        ) -> list[tuple[pd.DataFrame, np.ndarray]]:
        """`predict_quantiles` on histories already on the grid: (frame, grid frequency) pairs as `read_history`
        returns them, the sorted trained `levels`, and per history the fields forecast (`names`; its other columns
        are their context). Returns per history its quantile frame and its (steps, names) bool schedule, where a
        value was due (NaN elsewhere is the documented gap, not a failure); nothing is checked for finiteness."""
        spec = self.spec
        requests = [_request(spec, frame, grid, prediction_length, fields)
                    for (frame, grid), fields in zip(histories, names)]
        groups: dict[str | None, list[int]] = {}  # histories with dates on one grid frequency roll out together
        for i, (frame, grid) in enumerate(histories):
            groups.setdefault(grid if isinstance(frame.index, pd.DatetimeIndex) else None, []).append(i)
        out: list = [None] * len(requests)
        history = 2 * spec.context_len
        for grid, members in groups.items():
            frames = [requests[i].frame for i in members]
            items, fields = _stacked(frames, grid, members, "context" if len(requests) > 1 else "")
            owns = [spec.own_frequency(name) if grid is not None else None for name in fields]
            stop = history + np.array([requests[i].horizon for i in members])
            rolled = _rollout(self.model, spec, items, fields, stop, batch_size,
                              _own_period_starts(frames, grid, owns, history, int(stop.max())))
            for k, i in enumerate(members):
                out[i] = _wide_frame(items, k, requests[i], rolled, fields, spec, levels, grid)
        return out

    def forecast(self, history, prediction_length: int | None = None, *, time_column: str | None = None,
                 freq: str | None = None, field: str | None = None, horizon: int | None = None) -> pd.DataFrame:
        """Predict the `prediction_length` steps after `history`, in the data's own units (the median).

        The steps are those of the adapter's grid (the finest frequency of the sources it trained on), or, when every
        field forecast has the same coarser own frequency (a single series of a quarterly field, `field=` of a table,
        or a table holding only quarterly fields of a weekly-grid adapter), that field's own steps: `prediction_length`
        quarters, indexed by the quarter starts, whatever grid steps that takes.

        Args:
            history: DataFrame / dict of arrays / `datasets.Dataset`, columns named by field (any subset of the
                adapter's fields), a time column (`time_column`, else a DatetimeIndex or a column named
                date/time/timestamp) or none; or a single series (numpy array, `pd.Series`, torch tensor) of
                `field`'s values.
            prediction_length: steps to predict (default: the adapter's horizon), of the grid or of the fields' own
                calendar (above); beyond the adapter's horizon the forecast is rolled out chunk by chunk.
            time_column: the column holding the times when it is not named date, time or timestamp.
            freq: the series' pandas frequency when the adapter records none and it cannot be inferred from the dates;
                with an adapter that records its grid, it may only name that grid or the forecast fields' own frequency.
            field: the field a single series holds (default: the adapter's only field); with a table, the one field to
                forecast (the table's other fields are its context).
            horizon: deprecated alias of `prediction_length`.

        Returns:
            a DataFrame (prediction_length, S) indexed by the future times (continuing the grid or the fields' own
            calendar; steps 0, 1, ... after the last row without times), one column per field forecast. A table mixing
            fields of different own frequencies stays on the grid: NaN at the steps where a coarser field starts no
            period of its own (a quarterly field on a monthly grid: two steps in three). NaN everywhere for a field not
            observed in the last `context_len` steps (logged). `.attrs["units"]` maps fields to units.

        Example:
            >>> pipeline = GWMPipeline.from_pretrained(base, "runs/demo/final")
            >>> pipeline.forecast(history, prediction_length=12)  # history: a DataFrame with a date column
        """
        quantiles = self.forecast_quantiles(history, prediction_length, quantile_levels=[0.5], time_column=time_column,
                                            freq=freq, field=field, horizon=horizon)
        predictions = quantiles.xs(0.5, axis=1, level="level").rename_axis(columns=None)  # (steps, S)
        predictions.attrs["units"] = quantiles.attrs["units"]
        return predictions

    def forecast_quantiles(self, history, prediction_length: int | None = None, *, quantile_levels=None,
                           time_column: str | None = None, freq: str | None = None, field: str | None = None,
                           horizon: int | None = None) -> pd.DataFrame:
        """Quantile forecast of the `prediction_length` grid steps after `history`, in the data's own units.

        Args:
            history, prediction_length, time_column, freq, field, horizon: as in `forecast`.
            quantile_levels: a subset of the adapter's trained levels (default: all of them; anything else is a
                DataError).

        Returns:
            like `forecast` (same steps, index and NaN rules), one column per (field, level): `result["co2", 0.9]`;
            `result.xs(0.5, axis=1, level="level")` is `forecast`'s frame.

        Beyond the adapter's horizon the rollout feeds back the MEDIAN of each chunk, and the model's band for a chunk
        is that of the model given the median path. To keep the band widening with the lead time, each later chunk's
        offsets from the median are combined with the offsets reached at the end of the chunk before
        (`sqrt(own**2 + carried**2)`, as if the chunks' errors were independent): an approximation, not the joint
        distribution; the median path is unchanged. Transforms are inverted on each quantile path: for change
        transforms (diff, pct_change, log_return) each level's changes are accumulated from the last raw value (the
        band widens by that accumulation, no carry is added), which only approximates the quantiles of the accumulated
        sum (too narrow when changes are independent, exact when they move together).
        """
        steps = prediction_length_of(prediction_length, horizon, self.spec)
        return self.predict_quantiles([history], steps, quantile_levels, time_column=time_column, freq=freq,
                                      field=field)[0]

    def predict_df(self, df: pd.DataFrame, *, id_column: str = "item_id", timestamp_column: str = "timestamp",
                   target: str | list[str] | dict[str, str] | None = None, prediction_length: int | None = None,
                   quantile_levels: list[float] | None = None, batch_size: int = 256, freq: str | None = None
                   ) -> pd.DataFrame:
        """Quantile forecasts of every item of a long-format frame, their windows batched into shared forward passes.

        Args:
            df: one row per (item, time): `id_column`, `timestamp_column` and the target column(s). Items may have
                different lengths and end dates; each needs at least `context_len - horizon` grid steps.
            target: the column(s) to forecast, each named by one of the adapter's fields; a {column: field} mapping
                when the columns have other names; None (default): every column but the id and the timestamp.
            prediction_length: steps to predict after each item's last period (default: the adapter's horizon), of the
                grid, or, for a field coarser than the grid, of its own calendar (its next period starts after its last
                observation); beyond the horizon the forecast is rolled out chunk by chunk, feeding back the median.
            quantile_levels: levels to report, among those the adapter was trained on (default: all of them).
            batch_size: windows per forward pass (bounds memory; results agree across sizes up to float rounding).
            freq: the grid's pandas alias when the adapter records none and the timestamps do not say.

        Returns:
            a long-format DataFrame, one row per (item, target, future step): `id_column`, `timestamp_column`,
            `target_name` (the input column), `predictions` (the median, the point forecast) and one column per quantile
            level named like "0.1", in the data's own units; each row's timestamp on its field's own calendar (quarter
            starts for a quarterly field of a weekly-grid adapter). NaN for a field not observed in an item's last
            `context_len` steps (and, for adapters saved without own frequencies, at the steps where a coarser field is
            not due by its own spacing); no rows for an item's field that has no value at all.
        """
        spec = self.spec
        if not isinstance(df, pd.DataFrame):
            raise DataError(f"predict_df expects a pandas DataFrame in long format, got {type(df).__name__}")
        for role, column in (("id_column", id_column), ("timestamp_column", timestamp_column)):
            if column not in df.columns:
                raise DataError(f"no {role} {column!r} in the frame; columns are {list(df.columns)}")
        horizon = spec.horizon if prediction_length is None else prediction_length
        check_steps("prediction_length", horizon)
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive number of windows, got {batch_size!r}")
        levels = spec.check_levels(quantile_levels)  # sorted, each one of the adapter's trained levels
        if len(df) == 0:
            raise DataError("the frame has no rows")
        mapping = _targets(df, id_column, timestamp_column, target, spec)
        columns, fields = list(mapping), list(mapping.values())
        items = _gridded(df, id_column, timestamp_column, columns, spec, grid_frequency(spec, freq, fields))
        valued = np.add.reduceat((~np.isnan(items.values)).any(axis=1), items.offsets[:-1]) > 0  # (N,)
        if not valued.any():
            raise DataError(f"no item has a value in the target column(s) {columns}")
        if not valued.all():  # as documented: such an item gets no rows
            logger.warning("item(s) %s have no value at all: no forecast rows for them",
                           ", ".join(_item(i) for i in items.ids[~valued][:5])
                           + (" ..." if (~valued).sum() > 5 else ""))
        short = np.flatnonzero((items.lengths < spec.min_history()) & valued)
        if len(short):
            i = int(short[0])
            raise DataError(f"item {_item(items.ids[i])} has {items.lengths[i]} steps on the {items.freq!r} grid; "
                            f"this adapter needs at least {spec.min_history()} (context_len {spec.context_len} - "
                            f"horizon {spec.horizon})"
                            + (f"; {len(short) - 1} other item(s) are too short too" if len(short) > 1 else ""))
        calendars = _calendars(items, spec, fields, horizon)
        width = max([horizon] * any(c is None for c in calendars) + [c.grid_steps for c in calendars if c is not None])
        history, owns = 2 * spec.context_len, [c.freq if c is not None else None for c in calendars]
        stop = np.full(len(items.ids), history + width)
        rolled = _rollout(self.model, spec, items, fields, stop, batch_size,
                          _grid_period_starts(items, history, history + width, owns))
        return _long_frame(items, spec, fields, columns, rolled, horizon, levels, id_column, timestamp_column,
                           calendars)

    def impute(self, frame, *, time_column: str | None = None, freq: str | None = None, field: str | None = None
               ) -> pd.DataFrame:
        """Fill the missing values (NaN, or steps absent from a gappy time grid) of the known fields of `frame`.

        Each field is filled only at the grid steps where it would be observed: those holding its own periods' starts
        when the adapter records a coarser own frequency (a quarterly field on a weekly grid: the weeks holding
        quarter starts), else by its own spacing continued from its first observation; the steps in between stay
        NaN. Windows of the adapter's `context_len` tile the series; in each, those positions are hidden and predicted
        (the median) from everything observed around them (past and future). Fields with a change transform (diff,
        pct_change, log_return) are filled by accumulating predicted changes from the last observed value before each
        gap, and stay NaN before their first observation. Returns the frame on its regular grid with observed values
        unchanged.

        `frame`, `time_column`, `freq` and `field` are read as `forecast` reads its history (a single series
        included; `field` with a table: the one field to fill, the others are its context).
        """
        spec = self.spec
        raw, freq = read_history(frame, spec, time_column, freq, field)
        names = list(raw.columns)
        normalised = _modelled(_stacked([raw], freq, [0], "")[0], spec, names)  # (L, S)
        missing = raw.isna().to_numpy()  # (L, S)
        own_steps = np.zeros_like(missing)  # (L, S) where each field would be observed: its period starts, or spacing
        dated = isinstance(raw.index, pd.DatetimeIndex) and freq is not None
        for j, name in enumerate(names):
            rows = np.flatnonzero(~missing[:, j])
            own = spec.own_frequency(name) if dated else None
            if own is not None:
                own_steps[:, j] = period_starts(raw.index, freq, own)
            else:
                own_steps[rows[0] % own_spacing(rows)::own_spacing(rows), j] = True
        missing = missing & own_steps
        if field is not None and not _is_single_series(frame):  # a table and the one field to fill: the rest is context
            missing[:, [n != field for n in names]] = False
        if not missing.any():
            return raw
        length, window = len(raw), min(spec.context_len, len(raw))
        starts = sorted({*range(0, length - window + 1, window), length - window})
        starts = [s for s in starts if missing[s:s + window].any()]
        values = np.stack([normalised[s:s + window] for s in starts])  # (B, T, S)
        target = np.stack([missing[s:s + window] for s in starts])  # (B, T, S)
        predictions = predict_windows(self.model, values, spec.slots(names), target, spec)[..., spec.median_index]
        check_finite(predictions.reshape(-1, len(names)), target.reshape(-1, len(names)), names, spec)
        filled = normalised.copy()
        for b, s in enumerate(starts):
            part = filled[s:s + window]
            part[target[b]] = predictions[b][target[b]]
        out = raw.copy()
        for j, name in enumerate(names):
            stats = spec.fields[name]
            modelled = denormalize(filled[:, j], stats)
            column = raw[name].to_numpy(dtype=np.float64).copy()
            if stats.transform not in CHANGE_TRANSFORMS:
                column[missing[:, j]] = invert_transform(modelled[missing[:, j]], stats.transform)
            else:
                steps = np.flatnonzero(own_steps[:, j])  # the field's own steps
                for t in np.flatnonzero(missing[:, j]):  # the change since the field's own previous step
                    before = steps[np.searchsorted(steps, t) - 1] if steps[0] < t else None
                    if before is not None and not np.isnan(column[before]):
                        column[t] = invert_transform(modelled[t:t + 1], stats.transform, column[before])[0]
            out[name] = column
        return out


# ---------------------------------------------------------------------------------------------------- a model's
def forecast(model, history, prediction_length: int | None = None, *, time_column: str | None = None,
             freq: str | None = None, field: str | None = None, horizon: int | None = None) -> pd.DataFrame:
    """`GWMPipeline(model).forecast(...)`: the median forecast of `history`, in the data's own units."""
    return GWMPipeline(model).forecast(history, prediction_length, time_column=time_column, freq=freq, field=field,
                                       horizon=horizon)


def forecast_quantiles(model, history, prediction_length: int | None = None, *, quantile_levels=None,
                       time_column: str | None = None, freq: str | None = None, field: str | None = None,
                       horizon: int | None = None) -> pd.DataFrame:
    """`GWMPipeline(model).forecast_quantiles(...)`: the quantile forecast of `history`, in the data's own units."""
    return GWMPipeline(model).forecast_quantiles(history, prediction_length, quantile_levels=quantile_levels,
                                                 time_column=time_column, freq=freq, field=field, horizon=horizon)


def impute(model, frame, *, time_column: str | None = None, freq: str | None = None, field: str | None = None
           ) -> pd.DataFrame:
    """`GWMPipeline(model).impute(...)`: `frame` with its missing values filled."""
    return GWMPipeline(model).impute(frame, time_column=time_column, freq=freq, field=field)


def predict_df(model, df: pd.DataFrame, *, id_column: str = "item_id", timestamp_column: str = "timestamp",
               target: str | list[str] | dict[str, str] | None = None, prediction_length: int | None = None,
               quantile_levels: list[float] | None = None, batch_size: int = 256, freq: str | None = None
               ) -> pd.DataFrame:
    """`GWMPipeline(model).predict_df(...)`: the quantile forecasts of every item of a long-format frame."""
    return GWMPipeline(model).predict_df(df, id_column=id_column, timestamp_column=timestamp_column, target=target,
                                         prediction_length=prediction_length, quantile_levels=quantile_levels,
                                         batch_size=batch_size, freq=freq)


__all__ = ["MAX_FORECAST_STEPS", "AdapterSpec", "GWMPipeline", "NonFiniteForecastError", "check_finite",
           "check_forecast_request", "check_steps", "coverage_error", "fit_quantile_scales", "forecast",
           "forecast_quantiles", "grid_frequency", "impute", "mean_pinball", "predict_df", "predict_windows",
           "prediction_length_of", "read_history", "scale_quantiles", "widen_rolled_band"]
