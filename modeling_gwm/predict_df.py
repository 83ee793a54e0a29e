"""Forecast many series at once from a long-format DataFrame, batching their windows into shared forward passes.

The input is what Chronos, TimesFM and statsforecast users have: one row per (item, time), an id column, a timestamp
column and one column per target, named by the adapter's dotted field names (or mapped onto them with
`target={"column": "field"}`). Each item is put on the adapter's grid exactly as `forecast` puts one history on it
(`modeling_gwm.forecasting.read_history`), but for all items at once with numpy: the frame is parsed, sorted and
snapped once, not once per item. The windows of all items are then stacked into (B, T, S) batches of at most
`batch_size`, so 1,000 series cost a few forward passes, not 1,000.

Items are independent: the result for an item is the result of `forecast_quantiles` on that item's rows alone (up
to float summation order in batched matmuls; each window is scaled by its own context inside the model, so items of
very different levels batch together). Rollout beyond the adapter's horizon feeds back the median, batched across
items, so later quantiles are those given the median path (see `forecast_quantiles`).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .data import DataError, FieldStats, denormalize, invert_transform, normalize, regular_grid, snap
from .forecasting import (
    CHANGE_TRANSFORMS,
    AdapterSpec,
    _numeric,
    _offset,
    _spacing,
    infer_frequency,
    predict_windows,
)

logger = logging.getLogger(__name__)


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
    parsed = _numeric(frame[[c for c in columns if c not in numeric]]) if len(numeric) < len(columns) else None
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


@dataclass
class _Items:
    """All items on the adapter's grid, as one flat (sum L_i, S) array cut by `offsets`."""

    ids: np.ndarray  # (N,) the item ids, in order of first appearance
    grid: pd.DatetimeIndex  # the global grid from the earliest to the latest period of any item
    first: np.ndarray  # (N,) grid position of each item's first period
    lengths: np.ndarray  # (N,) grid steps of each item, L_i
    offsets: np.ndarray  # (N + 1,) start of each item in `values`
    values: np.ndarray  # (sum L_i, S) raw values, NaN where missing (periods averaged like forecast does)
    freq: str


def _gridded(df: pd.DataFrame, id_column: str, timestamp_column: str, columns: list[str], spec: AdapterSpec,
             freq: str | None) -> _Items:
    """Sort, check, snap and average every item's rows onto the adapter's grid in a handful of numpy calls."""
    codes, ids = pd.factorize(df[id_column], sort=False)  # (rows,), (N,)
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
                        f"{ids[codes[at]]!r} at {times[at]}: give each item one row per time")
    starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])  # (N,) first row of each item
    if spec.frequency and freq and _offset(freq) != _offset(spec.frequency):
        raise DataError(f"freq {freq!r} differs from the {spec.frequency!r} grid this adapter was trained on; leave "
                        "freq out")
    freq = spec.frequency or freq
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
    observed = ~np.isnan(values)
    sums = np.zeros((offsets[-1], len(columns)))
    counts = np.zeros((offsets[-1], len(columns)))
    np.add.at(sums, flat, np.where(observed, values, 0.0))
    np.add.at(counts, flat, observed)
    with np.errstate(invalid="ignore", divide="ignore"):
        gridded = sums / counts  # (sum L_i, S) mean of the rows in each period, NaN where none
    if len(np.unique(flat)) < len(flat):
        logger.warning("%d rows averaged into %d periods of the %r grid", len(flat), len(np.unique(flat)), freq)
    return _Items(np.asarray(ids), grid, first, lengths, offsets, gridded, freq)


def _modelled_column(raw: np.ndarray, stats: FieldStats, where: str) -> np.ndarray:
    """(L,) raw -> (L,) transformed and normalised, as `forecasting._modelled` (changes between observations)."""
    transform, rows = stats.transform, np.flatnonzero(~np.isnan(raw))
    observed = raw[rows]
    if transform in ("log", "log_return") and (observed <= 0).any():
        raise DataError(f"{where}: transform {transform!r} needs positive values, found {float(observed.min())!r}")
    if transform == "pct_change" and (observed[:-1] == 0).any():
        raise DataError(f"{where}: transform 'pct_change' divides by the previous value, found 0; use diff")
    if transform == "none":
        modelled = raw
    elif transform == "log":
        modelled = np.log(raw)
    else:
        modelled = np.full_like(raw, np.nan)
        if transform == "diff":
            modelled[rows[1:]] = np.diff(observed)
        elif transform == "pct_change":
            modelled[rows[1:]] = observed[1:] / observed[:-1] - 1.0
        else:  # log_return
            modelled[rows[1:]] = np.diff(np.log(observed))
    return normalize(modelled, stats)


# ---------------------------------------------------------------------------------------------------- predict_df
def predict_df(model, df: pd.DataFrame, *, id_column: str = "item_id", timestamp_column: str = "timestamp",
               target: str | list[str] | dict[str, str] | None = None, prediction_length: int | None = None,
               quantile_levels: list[float] | None = None, batch_size: int = 256, freq: str | None = None
               ) -> pd.DataFrame:
    """Quantile forecasts of every item of a long-format frame, their windows batched into shared forward passes.

    Args:
        model: a `PeftModel` from `GWMModel.from_pretrained(base, adapter)` (or the `GWMModel` inside it).
        df: one row per (item, time): `id_column`, `timestamp_column` and the target column(s). Items may have
            different lengths and end dates; each needs at least `context_len - horizon` grid steps.
        target: the column(s) to forecast, each named by one of the adapter's fields; a {column: field} mapping
            when the columns have other names; None (default): every column but the id and the timestamp.
        prediction_length: grid steps to predict after each item's last period (default: the adapter's horizon);
            beyond the horizon the forecast is rolled out chunk by chunk, feeding back the median.
        quantile_levels: levels to report, among those the adapter was trained on (default: all of them).
        batch_size: windows per forward pass (bounds memory; the results do not depend on it).
        freq: the grid's pandas alias when the adapter records none and the timestamps do not say.

    Returns:
        a long-format DataFrame, one row per (item, target, future step): `id_column`, `timestamp_column`,
        `target_name` (the input column), `predictions` (the median, the point forecast) and one column per quantile
        level named like "0.1", in the data's own units. NaN at the steps where a field is not due by its own
        spacing, and for a field not observed in an item's last `context_len` steps; no rows for an item's field
        that has no value at all.
    """
    spec = AdapterSpec.from_model(model)
    if not isinstance(df, pd.DataFrame):
        raise DataError(f"predict_df expects a pandas DataFrame in long format, got {type(df).__name__}")
    for role, column in (("id_column", id_column), ("timestamp_column", timestamp_column)):
        if column not in df.columns:
            raise DataError(f"no {role} {column!r} in the frame; columns are {list(df.columns)}")
    horizon = spec.horizon if prediction_length is None else prediction_length
    if isinstance(horizon, bool) or not isinstance(horizon, (int, np.integer)) or horizon <= 0:
        raise ValueError(f"prediction_length must be a positive number of steps, got {prediction_length!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive number of windows, got {batch_size!r}")
    levels = spec.check_levels(quantile_levels)  # sorted, each one of the adapter's trained levels
    if len(df) == 0:
        raise DataError("the frame has no rows")
    mapping = _targets(df, id_column, timestamp_column, target, spec)
    columns, fields = list(mapping), list(mapping.values())
    items = _gridded(df, id_column, timestamp_column, columns, spec, freq)
    short = np.flatnonzero(items.lengths < spec.min_history())
    if len(short):
        i = int(short[0])
        raise DataError(f"item {items.ids[i]!r} has {items.lengths[i]} steps on the {items.freq!r} grid; this adapter "
                        f"needs at least {spec.min_history()} (context_len {spec.context_len} - horizon "
                        f"{spec.horizon})" + (f"; {len(short) - 1} other item(s) are too short too" if len(short) > 1
                                              else ""))
    states = _rollout(model, spec, items, fields, horizon, batch_size)
    return _long_frame(items, spec, fields, columns, states, horizon, levels, id_column, timestamp_column)


def _rollout(model, spec: AdapterSpec, items: _Items, fields: list[str], horizon: int, batch_size: int) -> list:
    """Per item: its present fields, schedule (L_i + horizon, S_i), fed-back canvas and quantiles (.., Q).

    Mirrors `forecasting._forecast_quantile_frame` item by item: a chunk of `spec.horizon` steps from the item's
    first due step, in a window of up to `context_len` steps ending with it, the medians fed back where a field is
    due. Items of one chunk round are stacked with the others that share their present fields and window length.
    """
    states = []  # per item: (present field indices, schedule (L+H, S_i), canvas (L+H, S_i), quantiles (L+H, S_i, Q))
    for i in range(len(items.ids)):
        length = int(items.lengths[i])
        raw = items.values[items.offsets[i]:items.offsets[i + 1]]  # (L, S) view
        present, columns, due = [], [], []
        for j, name in enumerate(fields):
            rows = np.flatnonzero(~np.isnan(raw[:, j]))
            if len(rows) == 0:
                continue  # absent from this item, as a column with no value is for forecast
            present.append(j)
            columns.append(_modelled_column(raw[:, j], spec.fields[name], f"item {items.ids[i]!r}, field {name!r}"))
            schedule = np.zeros(length + horizon, dtype=bool)
            if rows[-1] >= length - spec.context_len:  # else stale: nothing to forecast from
                step = _spacing(rows)
                schedule[rows[-1] + step::step] = True
            due.append(schedule)
        schedule = np.stack(due, axis=1)  # (L + H, S_i)
        if not schedule.any():
            raise DataError(f"item {items.ids[i]!r}: no field is observed in its last {spec.context_len} steps (the "
                            "adapter's context_len): nothing to forecast from")
        canvas = np.concatenate([np.stack(columns, axis=1), np.full((horizon, len(present)), np.nan)])
        first = int(np.flatnonzero(schedule.any(axis=1))[0])
        quantiles = np.full(canvas.shape + (len(spec.quantile_levels),), np.nan)  # (L + H, S_i, Q)
        states.append((tuple(present), schedule, canvas, quantiles, first))
    for round_ in range(max((s[2].shape[0] - s[4] + spec.horizon - 1) // spec.horizon for s in states)):
        groups = defaultdict(list)  # (present fields, window length) -> [(item, start, done, end)]
        for i, (present, schedule, canvas, _, first) in enumerate(states):
            done = first + round_ * spec.horizon
            if done >= canvas.shape[0]:
                continue
            end = min(done + spec.horizon, canvas.shape[0])
            if not schedule[done:end].any():
                continue
            start = max(0, end - spec.context_len)
            groups[present, end - start].append((i, start, done, end))
        for (present, _), members in groups.items():
            slots = spec.slots([fields[j] for j in present])
            for b in range(0, len(members), batch_size):
                chunk = members[b:b + batch_size]
                values = np.stack([states[i][2][start:end] for i, start, _, end in chunk])  # (B, T, S_i)
                target = np.zeros(values.shape, dtype=bool)
                for k, (i, start, done, end) in enumerate(chunk):
                    target[k, done - start:] = states[i][1][done:end]
                predicted = predict_windows(model, values, slots, target)  # (B, T, S_i, Q)
                for k, (i, start, done, end) in enumerate(chunk):
                    due = states[i][1][done:end]  # (steps, S_i)
                    states[i][3][done:end][due] = predicted[k, done - start:][due]
                    states[i][2][done:end][due] = predicted[k, done - start:][due][:, spec.median_index]  # fed back
    return states


def _long_frame(items: _Items, spec: AdapterSpec, fields: list[str], columns: list[str], states: list,
                horizon: int, levels: list[float], id_column: str, timestamp_column: str) -> pd.DataFrame:
    """(item, target, step) rows in the data's own units, items in order of first appearance."""
    future = pd.date_range(items.grid[0], periods=len(items.grid) + horizon, freq=items.freq)
    ids, times, names, blocks = [], [], [], []
    picks = [spec.median_index, *(spec.quantile_levels.index(q) for q in levels)]
    for i, (present, schedule, _, quantiles, _) in enumerate(states):
        length = int(items.lengths[i])
        raw = items.values[items.offsets[i]:items.offsets[i + 1]]
        last_position = int(items.first[i]) + length - 1
        for k, j in enumerate(present):
            stats, due = spec.fields[fields[j]], schedule[:, k]
            out = np.full((length + horizon, len(picks)), np.nan)
            if due.any():
                last_raw = None
                if stats.transform in CHANGE_TRANSFORMS:
                    last_raw = float(raw[np.flatnonzero(~np.isnan(raw[:, j]))[-1], j])
                # change transforms accumulate each level's path from the last raw value, as forecast_quantiles does
                for c, q in enumerate(picks):
                    out[due, c] = invert_transform(denormalize(quantiles[due, k, q], stats), stats.transform,
                                                   last_raw)
            blocks.append(out[length:])
            ids.append(np.repeat(items.ids[i:i + 1], horizon))
            times.append(np.arange(last_position + 1, last_position + 1 + horizon))
            names.append(np.full(horizon, columns[j], dtype=object))
    values = np.concatenate(blocks)  # (rows, 1 + levels)
    frame = pd.DataFrame({id_column: np.concatenate(ids), timestamp_column: future[np.concatenate(times)],
                          "target_name": np.concatenate(names), "predictions": values[:, 0]})
    for c, q in enumerate(levels):
        frame[str(q)] = values[:, c + 1]
    return frame


__all__ = ["predict_df"]
