"""Tables of time series, shared by training (`data`) and forecasting: reading tables, parsing times and numbers
(one set of blank tokens), the per-field transforms and normalisation, and putting rows on a regular time grid.
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from .model.data import FieldStats

logger = logging.getLogger(__name__)

TRANSFORMS = ("none", "log", "diff", "pct_change", "log_return")
CHANGE_TRANSFORMS = ("diff", "pct_change", "log_return")  # taken between consecutive observations; need the last raw
FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".json": "json", ".jsonl": "json"}
MAX_GRID_STEPS = 5_000_000  # a node's aligned grid longer than this is almost surely a frequency mistake
# Text cells that mean "no value" (compared stripped and lower-cased); any other text that is not a number is an error.
BLANK_TOKENS = ("", "nan", "na", "n/a", "null", "none", "inf", "-inf", "+inf")


class DataError(ValueError):
    """Bad data or a bad source declaration; the message names the source and the column."""


# ---------------------------------------------------------------------------------------------------- reading
def read_table(path: str, fmt: str | None, where: str) -> pd.DataFrame:
    """A local CSV / Parquet / JSON(L) file as a DataFrame; `fmt` (csv, parquet, json) defaults to the extension's.
    Every error is a DataError that starts with `where` (e.g. "source 'co2'") and names the file."""
    if not os.path.isfile(path):
        raise DataError(f"{where}: file not found: {path}")
    fmt = fmt or FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise DataError(f"{where}: cannot tell the format of {path} from its extension; set format: csv|parquet|json")
    if os.path.getsize(path) == 0:
        raise DataError(f"{where}: file is empty: {path}")
    try:
        table = _read_parquet(path) if fmt == "parquet" else _read_json(path) if fmt == "json" else pd.read_csv(path)
    except Exception as err:  # pandas' and pyarrow's parser errors have many types
        raise DataError(f"{where}: cannot read {path} as {fmt}: "
                        f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    if table.empty:
        raise DataError(f"{where}: cannot read {path} as {fmt}: no data rows")
    if fmt == "csv":  # pandas renames a repeated header name (value, value.1): which one is meant is unknowable
        header = Counter(str(c) for c in pd.read_csv(path, nrows=1, header=None, dtype=str).iloc[0])
        twice = sorted(c for c, n in header.items() if n > 1)
        if twice:
            raise DataError(f"{where}: {path}: column name(s) {twice} appear more than once in the header; rename "
                            "them so each column has its own name")
    return table


def resolve_path(path: str, base_dir: str | os.PathLike | None) -> str:
    """An absolute path: `path` itself, else under `base_dir` if that exists, else under the cwd if that exists."""
    if os.path.isabs(path):
        return os.path.normpath(path)
    candidates = ([os.path.join(base_dir, path)] if base_dir is not None else []) + [path]
    found = next((c for c in candidates if os.path.exists(c)), candidates[0])
    return os.path.abspath(found)


def _read_parquet(path: str) -> pd.DataFrame:
    """A Parquet file, a named index saved with it (`df.set_index("date").to_parquet`) back as a column."""
    table = pd.read_parquet(path)
    return table.reset_index(drop=all(name is None for name in table.index.names))


def _read_json(path: str) -> pd.DataFrame:
    """JSON records (a list, or one per line) or columns; floats exact, dates left as text for `parse_times`."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        return pd.DataFrame(json.loads(text))
    except json.JSONDecodeError:  # JSON lines: one record per line
        return pd.DataFrame([json.loads(line) for line in text.splitlines() if line.strip()])


def to_frame(data, time_column: str | None = None) -> pd.DataFrame:
    """A DataFrame, a dict of arrays or a `datasets.Dataset` -> a DataFrame indexed by time (or by step)."""
    if isinstance(data, pd.DataFrame):
        frame = data.copy()
    elif isinstance(data, dict):
        lengths = {k: len(np.atleast_1d(v)) for k, v in data.items()}
        if len(set(lengths.values())) > 1:
            raise DataError(f"the columns have different lengths: {lengths}")
        frame = pd.DataFrame({k: np.atleast_1d(v) for k, v in data.items()})
    elif hasattr(data, "to_pandas") and hasattr(data, "column_names"):  # datasets.Dataset
        frame = data.to_pandas()
    else:
        raise DataError(f"expected a pandas DataFrame, a dict of arrays or a datasets.Dataset (a forecast's history "
                        f"may also be one field's numpy array, pd.Series or tensor), got {type(data).__name__}")
    if time_column is None and not isinstance(frame.index, pd.DatetimeIndex):
        time_column = next((c for c in ("date", "time", "timestamp") if c in frame.columns), None)
    if time_column is not None:
        if time_column not in frame.columns:
            raise DataError(f"no time column {time_column!r}; columns are {list(frame.columns)}")
        times = parse_times(frame[time_column], f"column {time_column!r}")  # offsets kept as local time
        frame = frame.drop(columns=[time_column])
        frame.index = pd.DatetimeIndex(times, name=time_column)
    elif isinstance(frame.index, pd.DatetimeIndex) and frame.index.tz is not None:
        frame.index = pd.DatetimeIndex(parse_times(frame.index.to_series(), "the time index"), name=frame.index.name)
    return frame


# ---------------------------------------------------------------------------------------------------- parsing
def parse_times(column: pd.Series, where: str) -> pd.Series:
    """A time column -> naive datetimes in the data's own local time. Whole numbers in 1..9999 are read as years.

    Time stamps with a UTC offset (`2020-03-01T00:00:00+05:00`) or a time zone keep their wall-clock time: the
    offset is dropped, not converted, so a month start stays in its month and snaps to its own period. Offsets that
    differ between rows (or rows with and without one) are refused: no single local clock is left to keep.
    """
    if pd.api.types.is_bool_dtype(column):
        raise DataError(f"{where}: time values are booleans, not dates")
    if pd.api.types.is_datetime64_any_dtype(column):
        times = column.dt.tz_localize(None) if column.dt.tz is not None else column
    elif pd.api.types.is_numeric_dtype(column):
        numbers = column.to_numpy(dtype=np.float64)
        not_years = ~np.isfinite(numbers) | (numbers != np.round(numbers)) | (numbers < 1) | (numbers > 9999)
        if not_years.any():
            example = column.tolist()[int(np.argmax(not_years))]
            raise DataError(f"{where}: numeric time values (e.g. {example!r}) are not dates; use ISO dates "
                            "(YYYY-MM-DD) or whole years")
        try:
            times = pd.to_datetime(pd.Series(numbers.astype(int)).astype(str).str.zfill(4), format="%Y")
        except (ValueError, OverflowError):  # pandas' OutOfBoundsDatetime: before 1678 or after 2261
            raise DataError(f"{where}: years {int(numbers.min())}-{int(numbers.max())} reach outside the dates pandas "
                            f"can hold ({pd.Timestamp.min.year + 1}-{pd.Timestamp.max.year - 1})") from None
    else:
        try:
            times = pd.to_datetime(column, format="mixed")
        except (ValueError, TypeError, OverflowError) as err:
            if "mixed time" in str(err).lower() or "tz-aware" in str(err).lower():
                raise DataError(f"{where}: {_mixed_offsets(column)}; give every time stamp the same UTC offset "
                                "(it is kept as local time) or none") from None
            raise DataError(f"{where}: time values are not parseable dates ({str(err).splitlines()[0]})") from None
        if not pd.api.types.is_datetime64_any_dtype(times):  # object dtype: offsets pandas would not unify
            raise DataError(f"{where}: {_mixed_offsets(column)}; give every time stamp the same UTC offset or none")
        if times.dt.tz is not None:
            times = times.dt.tz_localize(None)  # one offset for all rows: keep the wall-clock time
    if times.isna().any():
        raise DataError(f"{where}: {int(times.isna().sum())} time value(s) are empty")
    return times.reset_index(drop=True)


def _mixed_offsets(column: pd.Series) -> str:
    """Two rows of a time column whose UTC offsets differ, for the error message."""
    seen: dict[str, str] = {}
    for value in column.dropna().astype(str).unique()[:100_000]:
        try:
            stamp = pd.Timestamp(value)
        except (ValueError, TypeError):
            continue
        offset = "no offset" if stamp.tzinfo is None else f"UTC{stamp.strftime('%z')}"
        seen.setdefault(offset, value)
        if len(seen) == 2:
            (a, first), (b, second) = seen.items()
            return f"time stamps with different UTC offsets ({first!r}: {a}, {second!r}: {b})"
    return "time stamps with different UTC offsets"


def parse_numbers(column: pd.Series) -> tuple[np.ndarray, pd.Series]:
    """A column -> (float64 values, NaN where missing (NaN/None cells, `BLANK_TOKENS` text) or non-finite; the mask
    of text that is not a number, for the caller's error)."""
    numbers = pd.to_numeric(column, errors="coerce")
    non_numeric = pd.Series(False, index=column.index)
    if not pd.api.types.is_numeric_dtype(column):
        blank = column.isna() | column.astype("string").str.strip().str.lower().isin(BLANK_TOKENS)
        non_numeric = numbers.isna() & ~blank.fillna(True).astype(bool)
    values = numbers.to_numpy(dtype=np.float64, na_value=np.nan)
    return np.where(np.isfinite(values), values, np.nan), non_numeric


def numeric_columns(table: pd.DataFrame, columns: dict[str, str], where: str) -> dict[str, np.ndarray]:
    """{field: column of `table`} -> {field: (rows,) float64, NaN where missing}; a column that is not there, holds
    text that is not a number or holds no number at all is a DataError naming `where` and the column."""
    out = {}
    for field_name, column in columns.items():
        here = f"{where}, column {column!r}"
        if column not in table.columns:
            raise DataError(f"{here}: no such column (for field {field_name!r}); "
                            f"available columns are {list(table.columns)}")
        values, non_numeric = parse_numbers(table[column])  # (rows,) float64, NaN where missing
        if non_numeric.any():
            raise DataError(f"{here}: not numeric ({int(non_numeric.sum())} value(s) such as "
                            f"{table[column][non_numeric].iloc[0]!r})")
        if np.isnan(values).all():
            raise DataError(f"{here}: field {field_name!r} is all NaN (no numeric value in {len(values)} rows)")
        out[field_name] = values
    return out


def numeric_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """Every column as float64; NaN/inf/blank cells are missing; any other text is an error naming the column."""
    out = {}
    for column in frame.columns:
        values, non_numeric = parse_numbers(frame[column])
        if non_numeric.any():
            raise DataError(f"column {column!r} is not numeric (e.g. {frame[column][non_numeric].iloc[0]!r})")
        out[column] = values
    return pd.DataFrame(out, index=frame.index)


# ---------------------------------------------------------------------------------------------------- transforms
def apply_transform(series: pd.Series, transform: str, where: str = "") -> pd.Series:
    """Raw values -> modelled values. diff / pct_change / log_return act between consecutive *observations* of the
    series (gaps are skipped, not grid steps), so they are NaN at the first observation."""
    if transform not in TRANSFORMS:
        raise DataError(f"{where}: unknown transform {transform!r}; valid transforms are {', '.join(TRANSFORMS)}")
    observed = series.dropna()
    if transform in ("log", "log_return") and (observed <= 0).any():
        raise DataError(f"{where}: transform {transform!r} needs positive values, found {float(observed.min())!r} "
                        f"at {observed.idxmin()}")
    if transform == "pct_change" and (observed.iloc[:-1] == 0).any():
        raise DataError(f"{where}: transform 'pct_change' divides by the previous value, found 0 at "
                        f"{observed.iloc[:-1].eq(0).idxmax()}; use diff")
    if transform == "none":
        return series
    if transform == "log":
        return np.log(series)
    if transform == "diff":
        changed = observed.diff()
    elif transform == "pct_change":
        changed = observed.pct_change()
    else:  # log_return
        changed = np.log(observed).diff()
    return changed.reindex(series.index)


def invert_transform(values: np.ndarray, transform: str, last_raw: float | None = None) -> np.ndarray:
    """Modelled values of consecutive future observations (axis 0) -> raw values. `log` and `none` are pointwise;
    `diff`, `pct_change` and `log_return` accumulate from `last_raw`, the last observed raw value before the first
    step (for a field on a coarser grid than the node's: its previous observation, not the previous grid step)."""
    values = np.asarray(values, dtype=np.float64)
    if transform == "none":
        return values
    if transform == "log":
        return np.exp(values)
    if transform not in CHANGE_TRANSFORMS:
        raise ValueError(f"unknown transform {transform!r}; valid transforms are {', '.join(TRANSFORMS)}")
    if last_raw is None or not math.isfinite(last_raw):
        raise ValueError(f"transform {transform!r} needs the last observed raw value (last_raw) to invert")
    if transform == "diff":
        return last_raw + np.cumsum(values, axis=0)
    if transform == "pct_change":
        return last_raw * np.cumprod(1.0 + values, axis=0)
    return last_raw * np.exp(np.cumsum(values, axis=0))  # log_return


def normalize(values: np.ndarray, stats: FieldStats) -> np.ndarray:
    """Transformed values -> the model's units."""
    return (np.asarray(values, dtype=np.float64) - stats.mean) / stats.std


MAX_MODEL_UNITS = 1e12  # |value - mean| / std of a history value; past it the model's float32 arithmetic overflows


def check_model_units(normalized: np.ndarray, raw: np.ndarray, where: str) -> None:
    """Refuse a history value too far from the adapter's training statistics to compute with (e.g. 1e300 in a
    series whose std is 1), naming it: the forecast would be inf, which looks like damaged weights."""
    with np.errstate(invalid="ignore"):
        far = np.abs(normalized) > MAX_MODEL_UNITS
    if far.any():
        k = int(np.argmax(far))
        raise DataError(f"{where}: value {float(np.ravel(raw)[k])!r} lies {float(np.abs(normalized).ravel()[k]):.3g} "
                        f"standard deviations from the adapter's training mean (limit {MAX_MODEL_UNITS:.0e}, "
                        "tabular.MAX_MODEL_UNITS); check the data's units")


def denormalize(values: np.ndarray, stats: FieldStats) -> np.ndarray:
    """The model's units -> transformed values (still logs / changes where a transform applies)."""
    return np.asarray(values, dtype=np.float64) * stats.std + stats.mean


def mean_std(values: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation of finite float64 values, computed on values scaled by their largest magnitude:
    squares of values near 1e-300 underflow to 0 (near 1e300 overflow to inf), so a plain `np.std` would call such a
    field constant (or infinite); scaled to at most 1 first, the spread survives."""
    scale = float(np.max(np.abs(values))) if len(values) else 0.0
    if scale == 0.0:
        return 0.0, 0.0
    scaled = values / scale
    return float(np.mean(scaled)) * scale, float(np.std(scaled)) * scale


# ---------------------------------------------------------------------------------------------------- alignment
def _mean_step(freq: str) -> pd.Timedelta:
    """Average length of one step of a frequency (12 steps from a fixed date, so W, B and MS compare fairly)."""
    start = pd.Timestamp("2000-01-01")
    return ((start + 12 * pd.tseries.frequencies.to_offset(freq)) - start) / 12


def regular_grid(first: pd.Timestamp, last: pd.Timestamp, freq: str, where: str = "the time grid"
                 ) -> pd.DatetimeIndex:
    """Every step of `freq` from the start of the period holding `first` through `last`. Refuses (naming `where`) a
    grid of more than MAX_GRID_STEPS steps before allocating it: `frequency: ns` on monthly data is ~10**17 steps."""
    # in seconds of Python datetimes: pandas 2's nanosecond Timedelta overflows past 292 years (sunspots: 1700-2008)
    span = (last.to_pydatetime(warn=False) - first.to_pydatetime(warn=False)).total_seconds()
    steps = span / (_mean_step(freq) / pd.Timedelta(seconds=1))
    if steps > MAX_GRID_STEPS:
        raise DataError(f"{where}: {first} to {last} at frequency {freq!r} is {steps:.3g} steps, over the limit of "
                        f"{MAX_GRID_STEPS}; check 'frequency' (e.g. D, W, MS, QS, YS)")
    offset = pd.tseries.frequencies.to_offset(freq)
    if isinstance(offset, pd.offsets.Tick):  # hours, minutes, ...: a fixed lattice
        start = first.floor(offset)
    else:  # calendar frequencies: the period start at or before the first day
        start = offset.rollback(first.normalize())
    return pd.date_range(start, last, freq=offset)


def snap(times: pd.DatetimeIndex, grid: pd.DatetimeIndex) -> np.ndarray:
    """Position on `grid` of each time: the last grid step at or before it."""
    return grid.searchsorted(times, side="right") - 1


def place_on_grid(frame: pd.DataFrame, grid: pd.DatetimeIndex) -> pd.DataFrame:
    """(rows, S) by time -> (len(grid), S): each row at its period's step, a period's rows averaged, else NaN."""
    steps = snap(frame.index, grid)  # (rows,) grid positions
    placed = frame.groupby(steps).mean().reindex(range(len(grid)))
    placed.index = grid
    return placed


def on_grid(frame: pd.DataFrame, freq: str | None) -> tuple[pd.DataFrame, str | None]:
    """Sort by time and snap the rows onto a regular grid at `freq` (inferred when None), as training does: missing
    steps become NaN rows, rows of one period are averaged. A frame without dates is numbered by step instead."""
    if not isinstance(frame.index, pd.DatetimeIndex):
        return frame.reset_index(drop=True), None
    frame = frame.sort_index()
    if freq is None:
        freq = infer_frequency(frame.index.unique())
    if freq is None:
        raise DataError("cannot infer the frequency of the time column; pass freq (e.g. 'MS', 'QS', 'D')")
    grid = regular_grid(frame.index[0], frame.index[-1], freq, f"time column {frame.index.name!r}").rename(
        frame.index.name)
    periods = len(np.unique(snap(frame.index, grid)))  # each row goes to the start of its period
    if periods < len(frame):
        logger.warning("time column %r: %d rows share a step of the %r grid; they were averaged into %d periods "
                       "(%d rows fewer)", frame.index.name, len(frame), freq, periods, len(frame) - periods)
    return place_on_grid(frame, grid), freq


def to_periods(frame: pd.DataFrame, freq: str | None, where: str) -> pd.DataFrame:
    """A time-sorted frame, rows moved to their `freq` period's start (if given) and averaged per step (no NaN rows)."""
    if freq is not None:
        grid = regular_grid(frame.index.min(), frame.index.max(), freq, where)
        frame.index = grid[snap(frame.index, grid)]  # each row to the start of its period
    return frame.groupby(level=0).mean() if frame.index.has_duplicates else frame


def _infer_freq(index: pd.DatetimeIndex) -> str | None:
    """`pd.infer_freq` as a string, whether this pandas returns a string or (pandas 4) an offset."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        freq = pd.infer_freq(index)
    return getattr(freq, "freqstr", freq)


def infer_frequency(index: pd.DatetimeIndex) -> str | None:
    """The grid's frequency: `pd.infer_freq`'s, or with gaps in the series (where it gives None) the most common
    frequency of three consecutive steps (at most ~200 windows). Neither pandas nor utilsforecast / statsforecast
    (which take `freq` as given) infer one across gaps."""
    if len(index) < 3:
        return None
    freq = _infer_freq(index)
    if freq is not None:
        return freq
    votes = Counter(_infer_freq(index[i:i + 3]) for i in range(0, len(index) - 2, max(1, (len(index) - 2) // 200)))
    votes.pop(None, None)
    return votes.most_common(1)[0][0] if votes else None


def source_frequency(name: str, index: pd.DatetimeIndex, declared: str | None) -> str:
    """A source's own frequency: the declared one, else inferred from its (gap-free) dates; a DataError names it."""
    if declared:
        return declared
    freq = _infer_freq(index) if len(index) >= 3 else None
    if freq is None:
        raise DataError(f"source {name!r}: cannot infer the frequency of its time column (gaps or irregular "
                        "dates); declare 'frequency' (e.g. D, W, MS, QS, YS)")
    return freq


def finest_frequency(freqs) -> str:
    """The grid of sources at `freqs` (pandas aliases): the one of the shortest step, as `align` chooses it."""
    return min(freqs, key=_mean_step)


def is_coarser(freq: str | None, grid_freq: str | None) -> bool:
    """Whether `freq` (a field's own frequency) steps further than the grid `grid_freq` (QS on W-SAT: True)."""
    if not freq or not grid_freq:
        return False
    return _mean_step(freq) > _mean_step(grid_freq)


def describe_grid(grid_freq: str, own: dict[str, str | None]) -> str:
    """A grid for people: "W-SAT", or "W-SAT (finest of: co2 W-SAT, gdp QS)" when some of `own` ({source or field:
    its own frequency}, None where unknown) are coarser, so a user sees which series sit on it at their own steps."""
    if not any(is_coarser(freq, grid_freq) or freq is None for freq in own.values()):
        return grid_freq
    return f"{grid_freq} (finest of: " + ", ".join(f"{name} {freq or '(inferred when training)'}"
                                                   for name, freq in own.items()) + ")"


def align(frames: dict[str, pd.DataFrame], frequencies: dict[str, str | None]
          ) -> tuple[pd.DataFrame, str, dict[str, str]]:
    """Put every source on one regular grid at the finest declared (or inferred) frequency; NaN where absent.

    Returns the aligned frame, the grid's frequency and each source's own frequency (a coarser source keeps it: its
    rows sit at the grid steps holding its periods, NaN between)."""
    freqs = {name: source_frequency(name, frame.index, frequencies.get(name)) for name, frame in frames.items()}
    grid_freq = finest_frequency(freqs.values())
    first = min(f.index.min() for f in frames.values())
    last = max(f.index.max() for f in frames.values())
    grid = regular_grid(first, last, grid_freq, f"sources {list(frames)}")
    placed = [place_on_grid(frame, grid) for frame in frames.values()]
    aligned = pd.concat(placed, axis=1)
    aligned.index = grid.rename("time")
    return aligned, grid_freq, freqs


def parse_frequency(freq: str) -> pd.DateOffset:
    """A pandas offset alias -> its offset; an unknown alias is a DataError naming it."""
    try:
        return pd.tseries.frequencies.to_offset(freq)
    except ValueError:
        raise DataError(f"unknown frequency {freq!r} (a pandas offset alias such as 'D', 'W', 'MS', 'QS')") from None


def same_frequency(a: str, b: str) -> bool:
    """Whether two pandas aliases step through the same dates: QS and QS-OCT (both quarter starts), W and W-SUN."""
    first, second = parse_frequency(a), parse_frequency(b)
    start = pd.Timestamp("2000-01-01")
    return first == second or pd.date_range(start, periods=12, freq=first).equals(
        pd.date_range(start, periods=12, freq=second))


def future_index(index: pd.Index, freq: str | None, steps: int) -> pd.Index:
    """The `steps` grid steps after `index`: continuing the dates at `freq`, else continuing the step numbers."""
    if isinstance(index, pd.DatetimeIndex) and freq is not None:
        offset = pd.tseries.frequencies.to_offset(freq)
        return pd.date_range(index[-1] + offset, periods=steps, freq=freq, name=index.name)
    return pd.RangeIndex(len(index), len(index) + steps, name=index.name or "step")


def _first_start_at_or_after(stamp: pd.Timestamp, offset: pd.DateOffset) -> pd.Timestamp:
    """The first start of an `offset` period at or after `stamp`."""
    if isinstance(offset, pd.offsets.Tick):
        return stamp.ceil(offset)
    return offset.rollforward(stamp)


def period_starts(grid: pd.DatetimeIndex, grid_freq: str, freq: str) -> np.ndarray:
    """(len(grid),) bool: the steps of a `grid_freq` grid that hold the start of a `freq` period.

    A coarser field's observation is placed at the grid step holding its date (`place_on_grid`); training reads its
    periods' starts (`to_periods`), so these are the steps where a field of own frequency `freq` is observed, and
    the steps it is forecast at (a quarter starting 2009-10-01 sits on the W-SAT step 2009-09-26)."""
    out = np.zeros(len(grid), dtype=bool)
    out[own_periods(grid, grid_freq, freq)[1]] = True
    return out


def own_periods(grid: pd.DatetimeIndex, grid_freq: str, freq: str) -> tuple[pd.DatetimeIndex, np.ndarray]:
    """The starts of the `freq` periods that begin on a `grid_freq` grid, and the grid step holding each (`snap`):
    a coarser field's own calendar and where it sits on the grid (the quarter 2009-10-01 on the W-SAT step
    2009-09-26)."""
    if not len(grid):
        return pd.DatetimeIndex([], name=grid.name), np.zeros(0, dtype=int)
    offset, step = pd.tseries.frequencies.to_offset(freq), pd.tseries.frequencies.to_offset(grid_freq)
    starts = pd.date_range(_first_start_at_or_after(grid[0], offset), grid[-1] + step, freq=offset, inclusive="left",
                           name=grid.name)
    return starts, snap(starts, grid)


def own_dates_after(last: pd.Timestamp, grid_freq: str, freq: str, steps: int) -> tuple[pd.DatetimeIndex, int]:
    """The `steps` period starts of `freq` after the `grid_freq` grid step `last`, and how many grid steps after
    `last` reach the last of them (the grid horizon that covers them): 8 quarters after a W-SAT step -> (8 quarter
    starts, about 104 weeks)."""
    step = pd.tseries.frequencies.to_offset(grid_freq)
    dates = pd.date_range(_first_start_at_or_after(last + step, pd.tseries.frequencies.to_offset(freq)),
                          periods=steps, freq=freq)
    return dates, len(pd.date_range(last, dates[-1], freq=step)) - 1


def own_spacing(rows: np.ndarray) -> int:
    """A field's own step on the grid: the median gap between its observed rows (1 with fewer than two)."""
    return max(1, round(float(np.median(np.diff(rows))))) if len(rows) > 1 else 1
