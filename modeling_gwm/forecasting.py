"""Forecast and impute with a trained GWM adapter, in the data's own units (scores against baselines: `evaluation`;
the forecast plot: `plots`; reading, transforming and gridding a history: `tabular`).

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
median, `forecast_quantiles` every level; `predict_windows` is the batched step both (and `predict_df`) are built on.
An adapter trained with `calibrate_quantiles` records, per field, factors on each level's offset from the median,
fitted on its node's validation windows (`fit_quantile_scales`); `predict_windows` applies them (`scale_quantiles`),
so every band a user sees is the calibrated one. The median is never changed.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from .configuration_gwm import DEFAULT_QUANTILE_LEVELS
from .data import FieldStats
from .loop.config import QUANTILE_SCALE_KEY
from .tabular import (
    CHANGE_TRANSFORMS,
    DataError,
    apply_transform,
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
        from .loop import LoopLayer

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


def _modelled(frame: pd.DataFrame, spec: AdapterSpec) -> np.ndarray:
    """(L, S) raw -> (L, S) transformed and normalised, NaN where missing."""
    columns = []
    for name in frame.columns:
        stats = spec.fields[name]
        transformed = apply_transform(frame[name], stats.transform, f"field {name!r}")
        columns.append(normalize(transformed.to_numpy(dtype=np.float64), stats))
        check_model_units(columns[-1], frame[name].to_numpy(dtype=np.float64), f"field {name!r}")
    return np.stack(columns, axis=1)


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


# ---------------------------------------------------------------------------------------------------- forecast
def forecast(model, history, prediction_length: int | None = None, *, time_column: str | None = None,
             freq: str | None = None, field: str | None = None, horizon: int | None = None) -> pd.DataFrame:
    """Predict the `prediction_length` steps after `history`, in the data's own units (the median).

    The steps are those of the adapter's grid (the finest frequency of the sources it trained on), or, when every
    field forecast has the same coarser own frequency (a single series of a quarterly field, `field=` of a table,
    or a table holding only quarterly fields of a weekly-grid adapter), that field's own steps: `prediction_length`
    quarters, indexed by the quarter starts, whatever grid steps that takes.

    Args:
        model: a `PeftModel` from `GWMModel.from_pretrained(base, adapter)` (or the `GWMModel` inside it).
        history: DataFrame / dict of arrays / `datasets.Dataset`, columns named by field (any subset of the adapter's
            fields), a time column (`time_column`, else a DatetimeIndex or a column named date/time/timestamp) or
            none; or a single series (numpy array, `pd.Series`, torch tensor) of `field`'s values.
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
        >>> model = GWMModel.from_pretrained(base, "runs/demo/final")
        >>> model.forecast(history, prediction_length=12)  # history: a DataFrame with a date column
    """
    quantiles = forecast_quantiles(model, history, prediction_length, quantile_levels=[0.5], time_column=time_column,
                                   freq=freq, field=field, horizon=horizon)
    predictions = quantiles.xs(0.5, axis=1, level="level").rename_axis(columns=None)  # (steps, S)
    predictions.attrs["units"] = quantiles.attrs["units"]
    return predictions


def forecast_quantiles(model, history, prediction_length: int | None = None, *, quantile_levels=None,
                       time_column: str | None = None, freq: str | None = None, field: str | None = None,
                       horizon: int | None = None) -> pd.DataFrame:
    """Quantile forecast of the `prediction_length` grid steps after `history`, in the data's own units.

    Args:
        model, history, prediction_length, time_column, freq, field, horizon: as in `forecast`.
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
    spec = AdapterSpec.from_model(model)
    steps = prediction_length_of(prediction_length, horizon, spec)
    levels = spec.check_levels(quantile_levels)
    frame, freq = read_history(history, spec, time_column, freq, field)
    names = [field] if field is not None and not _is_single_series(history) else list(frame.columns)
    quantiles, due = forecast_on_calendar(model, spec, frame, freq, steps, levels, names)
    check_finite(quantiles.to_numpy(), np.repeat(due, len(levels), axis=1), list(quantiles.columns), spec)
    return quantiles


def prediction_length_of(prediction_length, horizon, spec: AdapterSpec) -> int:
    """`prediction_length`, or the deprecated `horizon=` alias (a FutureWarning), or the adapter's horizon."""
    if horizon is not None:
        if prediction_length is not None:
            raise ValueError("pass prediction_length only (horizon= is its deprecated alias), not both")
        warnings.warn("horizon= is deprecated: use prediction_length=", FutureWarning, stacklevel=3)
        prediction_length = horizon
    return spec.horizon if prediction_length is None else prediction_length


def _schedule(frame: pd.DataFrame, spec: AdapterSpec, horizon: int, freq: str | None) -> np.ndarray:
    """(L + horizon, S) bool: where each field is predicted after its last observation: at the grid steps holding
    the starts of its own periods (`tabular.period_starts`) when the adapter records a coarser own frequency and the
    history has dates; else every grid step, or its own spacing continued (a gappy field of an older adapter).

    A field with no observation in the last `context_len` rows has nothing to forecast from: it gets no step.
    """
    length, names = len(frame), list(frame.columns)
    schedule = np.zeros((length + horizon, len(names)), dtype=bool)
    dated = isinstance(frame.index, pd.DatetimeIndex) and freq is not None
    grid = frame.index.append(future_index(frame.index, freq, horizon)) if dated else None  # (L + horizon,)
    stale = []
    for j, name in enumerate(names):
        rows = np.flatnonzero(frame[name].notna().to_numpy())
        if len(rows) == 0 or rows[-1] < length - spec.context_len:
            stale.append(name)
            continue
        own = spec.own_frequency(name) if dated else None
        if own is not None:
            schedule[rows[-1] + 1:, j] = period_starts(grid, freq, own)[rows[-1] + 1:]
        else:
            schedule[rows[-1] + own_spacing(rows)::own_spacing(rows), j] = True
    if len(stale) == len(names):
        raise DataError(f"no field is observed in the last {spec.context_len} steps of the history (the adapter's "
                        f"context_len): nothing to forecast from")
    if stale:
        logger.warning("field(s) %s have no observation in the last %d steps of the history: not forecast (NaN)",
                       stale, spec.context_len)
    return schedule


def forecast_on_calendar(model, spec: AdapterSpec, frame: pd.DataFrame, freq: str | None, steps: int,
                         levels: list[float], names: list[str]) -> tuple[pd.DataFrame, np.ndarray]:
    """The quantile forecast (steps, S_out x levels) of the fields `names` of a gridded (L, S) history, and its
    (steps, S_out) bool schedule. When `names` share a coarser own frequency (`AdapterSpec.calendar`) and the history
    has dates, the steps are theirs: the `steps` period starts after the fields' last observation (a quarter not
    yet published when the table's other fields end comes first), forecast on the grid as far as the last of them
    and indexed by the starts (8 quarter starts, not ~104 Saturdays with NaN between). Otherwise the `steps` grid
    steps after the history, as `forecast_quantile_frame` gives them."""
    check_steps("prediction_length", steps)
    own = spec.calendar(names) if isinstance(frame.index, pd.DatetimeIndex) and freq is not None else None
    if own is None:
        quantiles, due = forecast_quantile_frame(model, spec, frame, freq, steps, levels)
        keep = [list(frame.columns).index(n) for n in names]
    else:
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
        quantiles, due = forecast_quantile_frame(model, spec, frame, freq, horizon, levels, start=start)
        rows = positions - start
        units = quantiles.attrs["units"]
        quantiles = quantiles.iloc[rows].set_axis(dates.rename(frame.index.name), axis=0)
        quantiles.attrs["units"] = units
        due, keep = due[rows], [list(frame.columns).index(n) for n in names]
    if len(names) < frame.shape[1]:
        units = quantiles.attrs["units"]
        quantiles = quantiles.loc[:, names]
        quantiles.attrs["units"] = {n: units[n] for n in names}
    return quantiles, due[:, keep]


def forecast_quantile_frame(model, spec: AdapterSpec, frame: pd.DataFrame, freq: str | None, horizon: int,
                             levels: list[float], *, start: int | None = None) -> tuple[pd.DataFrame, np.ndarray]:
    """The quantile forecast (horizon, S x levels) of a gridded (L, S) history and its (horizon, S) schedule; from
    row `start` of the history instead (L - start + horizon rows), to keep the steps due inside it too."""
    check_forecast_request(len(frame), horizon, spec)
    names, length = list(frame.columns), len(frame)
    first_row = length if start is None else start
    schedule = _schedule(frame, spec, horizon, freq)  # (L + horizon, S)
    canvas = np.concatenate([_modelled(frame, spec), np.full((horizon, len(names)), np.nan)])  # (L + horizon, S)
    quantiles = np.full(canvas.shape + (len(spec.quantile_levels),), np.nan)  # (L + horizon, S, Q)
    # a field whose next observation is due inside the history (e.g. the last quarter not yet published) is
    # predicted there first, so its forecast continues from it
    first = int(np.flatnonzero(schedule.any(axis=1))[0])
    widened = spec.widened_fields(names)  # (S,) fields whose band is carried across chunks
    carry = np.zeros((1, len(names), len(spec.quantile_levels)))  # (1, S, Q) offsets reached by the last chunk
    for done in range(first, length + horizon, spec.horizon):
        end = min(done + spec.horizon, length + horizon)
        due = schedule[done:end]  # (steps, S)
        if not due.any():
            continue
        start = max(0, end - spec.context_len)
        values = canvas[start:end][None].copy()  # (1, T, S)
        target = np.zeros(values.shape, dtype=bool)
        target[0, done - start:] = due
        predicted = predict_windows(model, values, spec.slots(names), target, spec)[:, done - start:]  # (1, T', S, Q)
        predicted, carry = widen_rolled_band(predicted, target[:, done - start:] & widened, carry, spec)
        predicted = predicted[0]  # (steps, S, Q)
        quantiles[done:end][due] = predicted[due]
        canvas[done:end][due] = predicted[due][:, spec.median_index]  # the median is fed back where due
    picks = [spec.quantile_levels.index(q) for q in levels]
    future = np.full((length + horizon - first_row, len(names), len(levels)), np.nan)  # (rows, S, levels)
    for j, name in enumerate(names):
        stats, due = spec.fields[name], schedule[:, j]
        if not due.any():
            continue
        observed = frame[name].dropna()
        last_raw = float(observed.iloc[-1]) if stats.transform in CHANGE_TRANSFORMS else None
        for k, pick in enumerate(picks):
            raw = np.full(length + horizon, np.nan)
            # change transforms accumulate over the field's own consecutive observations, from its last raw value
            raw[due] = invert_transform(denormalize(quantiles[due, j, pick], stats), stats.transform, last_raw)
            future[:, j, k] = raw[first_row:]
    columns = pd.MultiIndex.from_product([names, levels], names=["field", "level"])
    result = pd.DataFrame(future.reshape(len(future), -1), columns=columns,
                          index=frame.index[first_row:].append(future_index(frame.index, freq, horizon)))
    result.attrs["units"] = {name: spec.fields[name].unit for name in names}
    return result, schedule[first_row:]


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
                         f"(forecasting.MAX_FORECAST_STEPS); ask for fewer steps")
    if grid_steps is not None and grid_steps > MAX_FORECAST_STEPS:
        raise ValueError(f"{name} {steps} takes {grid_steps} steps of the adapter's {grid!r} grid, over the limit of "
                         f"{MAX_FORECAST_STEPS} grid steps (forecasting.MAX_FORECAST_STEPS); ask for fewer steps")


def check_forecast_request(history_len: int, prediction_length, spec: AdapterSpec) -> None:
    """The one-line errors for a prediction_length that is not a positive integer or a history too short for one
    window."""
    check_steps("prediction_length", prediction_length)
    if history_len < spec.min_history():
        raise DataError(f"the history has {history_len} steps; this adapter needs at least {spec.min_history()} "
                        f"(context_len {spec.context_len} - horizon {spec.horizon})")


# ---------------------------------------------------------------------------------------------------- impute
def impute(model, frame, *, time_column: str | None = None, freq: str | None = None, field: str | None = None
           ) -> pd.DataFrame:
    """Fill the missing values (NaN, or steps absent from a gappy time grid) of the known fields of `frame`.

    Each field is filled only at the grid steps where it would be observed: those holding its own periods' starts
    when the adapter records a coarser own frequency (a quarterly field on a weekly grid: the weeks holding quarter
    starts), else by its own spacing continued from its first observation; the steps in between stay NaN. Windows of the
    adapter's `context_len` tile the series; in each, those positions are hidden and predicted (the median) from
    everything observed around them (past and future). Fields with a change transform (diff, pct_change,
    log_return) are filled by accumulating predicted changes from the last observed value before each gap, and stay
    NaN before their first observation. Returns the frame on its regular grid with observed values unchanged.

    `frame`, `time_column`, `freq` and `field` are read as `forecast` reads its history (a single series included;
    `field` with a table: the one field to fill, the others are its context).
    """
    spec = AdapterSpec.from_model(model)
    raw, freq = read_history(frame, spec, time_column, freq, field)
    names = list(raw.columns)
    normalised = _modelled(raw, spec)  # (L, S)
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
    predictions = predict_windows(model, values, spec.slots(names), target, spec)[..., spec.median_index]  # (B, T, S)
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


__all__ = ["MAX_FORECAST_STEPS", "AdapterSpec", "NonFiniteForecastError", "check_finite", "coverage_error",
           "fit_quantile_scales", "forecast", "forecast_quantiles", "grid_frequency", "impute", "mean_pinball",
           "predict_windows", "prediction_length_of", "read_history", "scale_quantiles", "widen_rolled_band"]
