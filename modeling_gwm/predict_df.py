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
from collections.abc import Hashable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .forecasting import AdapterSpec, grid_frequency, predict_windows, widen_rolled_band
from .tabular import (
    DataError,
    check_model_units,
    denormalize,
    infer_frequency,
    normalize,
    numeric_frame,
    own_dates_after,
    own_spacing,
    period_starts,
    regular_grid,
    snap,
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


def _modelled(items: _Items, spec: AdapterSpec, fields: list[str]) -> np.ndarray:
    """(sum L_i, S) raw -> transformed and normalised, as `forecasting._modelled` on each item alone: change
    transforms act between consecutive observations of one item, never across two items."""
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
            raise DataError(f"item {_item(items.ids[item_of[rows[k]]])}, field {name!r}: transform {stats.transform!r} "
                            f"needs positive values, found {float(observed[k])!r}")
        if stats.transform == "pct_change" and (pairs & (observed[:-1] == 0)).any():
            k = int(np.argmax(pairs & (observed[:-1] == 0)))
            raise DataError(f"item {_item(items.ids[item_of[rows[k]]])}, field {name!r}: transform 'pct_change' "
                            "divides by the previous value, found 0; use diff")
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
    items = _gridded(df, id_column, timestamp_column, columns, spec, grid_frequency(spec, freq, fields))
    valued = np.add.reduceat((~np.isnan(items.values)).any(axis=1), items.offsets[:-1]) > 0  # (N,)
    if not valued.any():
        raise DataError(f"no item has a value in the target column(s) {columns}")
    if not valued.all():  # as documented: such an item gets no rows
        logger.warning("item(s) %s have no value at all: no forecast rows for them",
                       ", ".join(_item(i) for i in items.ids[~valued][:5]) + (" ..." if (~valued).sum() > 5 else ""))
    short = np.flatnonzero((items.lengths < spec.min_history()) & valued)
    if len(short):
        i = int(short[0])
        raise DataError(f"item {_item(items.ids[i])} has {items.lengths[i]} steps on the {items.freq!r} grid; this "
                        f"adapter needs at least {spec.min_history()} (context_len {spec.context_len} - horizon "
                        f"{spec.horizon})" + (f"; {len(short) - 1} other item(s) are too short too" if len(short) > 1
                                              else ""))
    calendars = _calendars(items, spec, fields, horizon)
    width = max([horizon] * any(c is None for c in calendars) + [c.grid_steps for c in calendars if c is not None])
    rolled = _rollout(model, spec, items, fields, width, batch_size, calendars)
    return _long_frame(items, spec, fields, columns, rolled, horizon, levels, id_column, timestamp_column, calendars)


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
    its last context_len steps), as `forecasting.forecast_on_calendar` has them."""
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


def _schedule(items: _Items, context: int, history: int, width: int, calendars: list[_Calendar | None]
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where each (item, field) is predicted: (N, S) present, (N, S) row of its last observation (-1 when absent)
    and (N, W, S) due on the right-aligned canvas after its last observation, for fields observed in the item's last
    `context` steps (the others are stale: logged, not forecast): at the grid steps holding its period starts for a
    field with its own calendar (`forecasting._schedule`), else its own spacing continued."""
    starts, lengths, n = items.offsets[:-1], items.lengths, len(items.ids)
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
    if (present & ~fresh).any():
        logger.warning("%d (item, field) pairs have no observation in the last %d steps of their item: not forecast "
                       "(NaN)", int((present & ~fresh).sum()), context)
    # schedule, right-aligned: local row r of item i is column r - L_i + history
    column = np.arange(width)[None, :, None]
    last_column = (last - lengths[:, None] + history)[:, None, :]  # (N, 1, S)
    due = fresh[:, None, :] & (column > last_column) & ((column - last_column) % spacing[:, None, :] == 0)
    grid = pd.date_range(items.grid[0], periods=len(items.grid) + width - history, freq=items.freq)
    position = (items.first + lengths - history)[:, None] + np.arange(width)[None, :]  # (N, W) global grid step
    for j, calendar in enumerate(calendars):
        if calendar is not None:
            starts_here = period_starts(grid, items.freq, calendar.freq)[np.maximum(position, 0)]  # (N, W)
            due[:, :, j] = fresh[:, None, j] & (column[..., 0] > last_column[..., j]) & starts_here
    return present, last, due


def _rollout(model, spec: AdapterSpec, items: _Items, fields: list[str], horizon: int, batch_size: int,
             calendars: list[_Calendar | None]) -> _Rollout:
    """Roll every item out, batched: the windows of all items at one chunk round go through shared forward passes.

    Mirrors `forecasting.forecast_quantile_frame` item by item: a chunk of `spec.horizon` steps from the item's
    first due step, in a window of up to `context_len` steps ending with it, the medians fed back where a field is
    due, each chunk's band widened by the one before (`forecasting.widen_rolled_band`).
    A batch holds items with the same present fields and the same window length (shorter only for items
    shorter than context_len).
    """
    context, n, n_fields = spec.context_len, len(items.ids), len(fields)
    history = 2 * context
    width = history + horizon
    starts, lengths = items.offsets[:-1], items.lengths
    present, last, due = _schedule(items, context, history, width, calendars)  # (N, S), (N, S), (N, W, S)
    any_due = due.any(axis=2)  # (N, W)
    idle = np.flatnonzero(~any_due.any(axis=1) & present.any(axis=1))  # an item with no value: no rows, no error
    if len(idle):
        raise DataError(f"item {_item(items.ids[idle[0]])}: no field is observed in its last {context} steps (the "
                        f"adapter's context_len): nothing to forecast from")
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
    widened = spec.widened_fields(fields)  # (S,) the band is carried across chunks as in forecast_quantiles
    carry = np.zeros((n, n_fields, len(spec.quantile_levels)))  # (N, S, Q)
    for round_ in range(int(np.max(-(-(width - first_due) // spec.horizon)))):
        done = first_due + round_ * spec.horizon  # (N,)
        end = np.minimum(done + spec.horizon, width)
        live = (done < width) & (cumulative[np.arange(n), end] > cumulative[np.arange(n), np.minimum(done, width)])
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
    or, for a field with its own calendar, its next `horizon` period starts.

    Change transforms accumulate each level's path from the item's last raw value, as `forecast_quantiles` does.
    """
    future = pd.date_range(items.grid[0], periods=len(items.grid) + horizon, freq=items.freq)
    picks = [spec.median_index, *(spec.quantile_levels.index(q) for q in levels)]
    item_index, field_index, stamps, blocks = [], [], [], []
    for j, name in enumerate(fields):
        stats, members = spec.fields[name], np.flatnonzero(rolled.present[:, j])
        due = rolled.due[members, :, j][..., None]  # (M, W, 1)
        modelled = denormalize(rolled.quantiles[members, :, j][..., picks], stats)  # (M, W, 1 + levels)
        if stats.transform == "none":
            raw = modelled
        elif stats.transform == "log":
            raw = np.exp(modelled)
        else:  # accumulated over the field's due steps only, from its last observed raw value
            last_raw = items.values[items.offsets[members] + rolled.last[members, j], j][:, None, None]  # (M, 1, 1)
            if stats.transform == "diff":
                raw = last_raw + np.cumsum(np.where(due, modelled, 0.0), axis=1)
            elif stats.transform == "pct_change":
                raw = last_raw * np.cumprod(np.where(due, 1.0 + modelled, 1.0), axis=1)
            else:  # log_return
                raw = last_raw * np.exp(np.cumsum(np.where(due, modelled, 0.0), axis=1))
        raw = np.where(due, raw, np.nan)  # (M, W, 1 + levels)
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


__all__ = ["predict_df"]
