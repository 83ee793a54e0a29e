"""From files (or Hub datasets) to canvas windows: sources, transforms, normalisation, alignment, windows.

Every source is read through `datasets.load_dataset`, transformed per field, and placed on one regular time grid at
the finest frequency of the node's sources. A field that has no observation at a grid step is *absent* there
(presence 0): no imputation, no input, no loss. Statistics come from the training part of each series only; the last
`val_fraction` of every series' observations is validation and never reaches the statistics or training windows.

    sources = load_sources("configuration/data/sources.yaml")
    data = build_node_data(list(sources.values()), fields=None, context_len=24)
    batch = collate_canvas([data.train[i] for i in range(16)])  # {"values": (16, 24, F), "presence": (16, 24, F)}
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

logger = logging.getLogger(__name__)

TRANSFORMS = ("none", "log", "diff", "pct_change", "log_return")
CHANGE_TRANSFORMS = ("diff", "pct_change", "log_return")  # taken between consecutive observations; need the last raw
FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".json": "json", ".jsonl": "json"}
MAX_GRID_STEPS = 5_000_000  # a node's aligned grid longer than this is almost surely a frequency mistake


class DataError(ValueError):
    """Bad data or a bad source declaration; the message names the source and the column."""


# ---------------------------------------------------------------------------------------------------- declarations
@dataclass(frozen=True)
class FieldSpec:
    """Where a field comes from in its source, and how it is transformed before normalisation."""

    column: str
    transform: str = "none"
    unit: str | None = None


@dataclass(frozen=True)
class FieldStats:
    """Normalisation of one field (computed on its training part, after the transform); travels with the adapter.

    `to_dict()` gives plain JSON types: {"name", "mean", "std", "transform", "unit"}; `from_dict` reads it back.
    """

    name: str
    mean: float
    std: float
    transform: str = "none"
    unit: str | None = None

    def __post_init__(self):
        if self.transform not in TRANSFORMS:
            raise DataError(f"field {self.name!r}: unknown transform {self.transform!r}; valid transforms are "
                            f"{', '.join(TRANSFORMS)}")
        if not (math.isfinite(self.mean) and math.isfinite(self.std) and self.std > 0):
            raise DataError(f"field {self.name!r}: mean and std must be finite and std > 0, got mean={self.mean!r}, "
                            f"std={self.std!r}")

    def to_dict(self) -> dict:
        return {"name": self.name, "mean": float(self.mean), "std": float(self.std), "transform": self.transform,
                "unit": self.unit}

    @classmethod
    def from_dict(cls, d: dict) -> FieldStats:
        std = float(d.get("std", 1.0))
        return cls(name=str(d["name"]), mean=float(d.get("mean", 0.0)), std=std if std != 0 else 1.0,
                   transform=d.get("transform") or "none", unit=d.get("unit"))


@dataclass(frozen=True)
class DataSource:
    """One table of time series: a local file or a Hub dataset, its time column and its fields.

    Args:
        name: the source's name in the curriculum (named in every error).
        fields: field name (dotted path, e.g. `macro.us.real_gdp`) -> `FieldSpec` (or a bare column name).
        path: a local CSV / Parquet / JSON / JSONL file; the format comes from the extension unless `format` is set.
        dataset / config / split: a Hub dataset id instead of `path`, loaded with `datasets.load_dataset`.
        time_column: the column holding the dates (ISO strings, timestamps or whole years).
        frequency: a pandas offset alias (`D`, `W`, `MS`, `QS`, `YS`, ...). Observations are snapped to the start of
            their period (several in one period are averaged); a node's grid is the finest frequency of its sources.
            Without it the frequency is inferred from the dates, which needs a gap-free series.
    """

    name: str
    fields: dict[str, FieldSpec]
    path: str | None = None
    dataset: str | None = None
    config: str | None = None
    split: str = "train"
    format: str | None = None
    time_column: str = "date"
    frequency: str | None = None

    def __post_init__(self):
        where = f"source {self.name!r}"
        if bool(self.path) == bool(self.dataset):
            raise DataError(f"{where}: give exactly one of 'path' (a local file) or 'dataset' (a Hub id)")
        if not isinstance(self.fields, dict) or not self.fields:
            raise DataError(f"{where}: 'fields' must map field names to columns")
        specs = {}
        for field_name, spec in self.fields.items():
            spec = FieldSpec(spec) if isinstance(spec, str) else spec
            if not isinstance(spec, FieldSpec) or not isinstance(spec.column, str) or not spec.column:
                raise DataError(f"{where}, field {field_name!r}: give a column name or {{column: ...}}")
            if spec.transform not in TRANSFORMS:
                raise DataError(f"{where}, column {spec.column!r}: unknown transform {spec.transform!r} for field "
                                f"{field_name!r}; valid transforms are {', '.join(TRANSFORMS)}")
            specs[str(field_name)] = spec
        object.__setattr__(self, "fields", specs)
        if self.format is not None and self.format not in ("csv", "parquet", "json"):
            raise DataError(f"{where}: unknown format {self.format!r}; valid formats are csv, parquet, json")
        if self.frequency is not None:
            try:
                pd.tseries.frequencies.to_offset(self.frequency)
            except ValueError:
                raise DataError(f"{where}: unknown frequency {self.frequency!r} (a pandas offset alias such as 'D', "
                                "'W', 'MS', 'QS', 'YS')") from None

    @classmethod
    def from_dict(cls, name: str, mapping: dict, base_dir: str | os.PathLike | None = None) -> DataSource:
        """A source from its YAML form (a curriculum's or `sources.yaml`'s `sources:` entry).

        A relative `path` is looked up first against `base_dir` (the YAML file's folder), then against the current
        working directory; the first that exists wins. If neither exists the `base_dir` one is kept, so the
        file-not-found error names the place the YAML points at. The stored path is absolute either way.
        """
        if not isinstance(mapping, dict):
            raise DataError(f"source {name!r}: expected a mapping with path/dataset, time_column and fields")
        known = {"path", "dataset", "config", "split", "format", "time_column", "frequency", "fields"}
        unknown = sorted(set(mapping) - known)
        if unknown:
            raise DataError(f"source {name!r}: unknown key(s) {unknown}; valid keys are {sorted(known)}")
        raw_fields = mapping.get("fields")
        if not isinstance(raw_fields, dict) or not raw_fields:
            raise DataError(f"source {name!r}: 'fields' must map field names to columns")
        fields = {}
        for field_name, spec in raw_fields.items():
            if isinstance(spec, str):
                spec = {"column": spec}
            if not isinstance(spec, dict) or not isinstance(spec.get("column"), str):
                raise DataError(f"source {name!r}, field {field_name!r}: give a column name or {{column: ...}}")
            extra = sorted(set(spec) - {"column", "transform", "unit"})
            if extra:
                raise DataError(f"source {name!r}, column {spec['column']!r}: unknown key(s) {extra} for field "
                                f"{field_name!r}; valid keys are column, transform, unit")
            unit = spec.get("unit")
            fields[str(field_name)] = FieldSpec(spec["column"], spec.get("transform") or "none",
                                                None if unit is None else str(unit))
        path = mapping.get("path")
        if path:
            path = resolve_path(str(path), base_dir)
        return cls(name=name, fields=fields, path=path, dataset=mapping.get("dataset"), config=mapping.get("config"),
                   split=mapping.get("split") or "train", format=mapping.get("format"),
                   time_column=mapping.get("time_column") or "date", frequency=mapping.get("frequency"))

    def to_dict(self) -> dict:
        """The YAML form (without the name), as `from_dict` reads it."""
        out = {"path": self.path} if self.path else {"dataset": self.dataset, "config": self.config,
                                                      "split": self.split}
        out |= {"format": self.format, "time_column": self.time_column, "frequency": self.frequency}
        out = {k: v for k, v in out.items() if v is not None}
        out["fields"] = {name: {k: v for k, v in asdict(spec).items() if v is not None}
                         for name, spec in self.fields.items()}
        return out

    # ------------------------------------------------------------------ reading
    def read(self) -> pd.DataFrame:
        """The source's fields, transformed, indexed by time: one column per field name, NaN where missing.

        NaN and ±inf in a column are treated as missing: counted and reported in one warning per read.
        """
        table = self.load_table()
        where = f"source {self.name!r}"
        if self.time_column not in table.columns:
            raise DataError(f"{where}, column {self.time_column!r}: no such time column; "
                            f"available columns are {list(table.columns)}")
        times = parse_times(table[self.time_column], f"{where}, column {self.time_column!r}")
        columns, missing = {}, {}
        for field_name, spec in self.fields.items():
            here = f"{where}, column {spec.column!r}"
            if spec.column not in table.columns:
                raise DataError(f"{here}: no such column (for field {field_name!r}); "
                                f"available columns are {list(table.columns)}")
            values = numeric_values(table[spec.column], here)  # (rows,) float64, NaN where missing
            if np.isnan(values).all():
                raise DataError(f"{here}: field {field_name!r} is all NaN (no numeric value in {len(values)} rows)")
            if np.isnan(values).any():
                missing[spec.column] = int(np.isnan(values).sum())
            columns[field_name] = values
        if missing:
            logger.warning("source %r: %d NaN/inf value(s) treated as missing (%s)", self.name,
                           sum(missing.values()), ", ".join(f"{c}: {n}" for c, n in missing.items()))
        frame = pd.DataFrame(columns, index=pd.DatetimeIndex(times, name="time")).sort_index(kind="stable")
        if self.frequency is not None:
            grid = regular_grid(frame.index.min(), frame.index.max(), self.frequency, where)
            frame.index = grid[snap(frame.index, grid)]  # each row to the start of its period
        if frame.index.has_duplicates:
            rows = len(frame)
            frame = frame.groupby(level=0).mean()
            logger.warning("source %r, column %r: %d rows share a time step; they were averaged into %d periods "
                           "(%d rows fewer)", self.name, self.time_column, rows, len(frame), rows - len(frame))
        for field_name, spec in self.fields.items():
            frame[field_name] = apply_transform(frame[field_name], spec.transform, f"{where}, column {spec.column!r}")
        return frame

    def load_table(self) -> pd.DataFrame:
        """The raw table, through `datasets.load_dataset` (a packaged csv/parquet/json builder or a Hub id)."""
        import datasets

        if self.dataset:
            try:
                table = datasets.load_dataset(self.dataset, self.config, split=self.split)
            except Exception as err:  # the Hub, offline, a bad id: say which source
                raise DataError(f"source {self.name!r}: cannot load dataset {self.dataset!r}: "
                                f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
            return table.to_pandas()
        if not os.path.isfile(self.path):
            raise DataError(f"source {self.name!r}: file not found: {self.path}")
        fmt = self.format or FORMATS.get(Path(self.path).suffix.lower())
        if fmt is None:
            raise DataError(f"source {self.name!r}: cannot tell the format of {self.path} from its extension; "
                            "set format: csv|parquet|json")
        if os.path.getsize(self.path) == 0:
            raise DataError(f"source {self.name!r}: file is empty: {self.path}")
        try:
            table = datasets.load_dataset(fmt, data_files=self.path, split="train")
        except Exception as err:
            raise DataError(f"source {self.name!r}: cannot read {self.path} as {fmt}: "
                            f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
        return table.to_pandas()


def resolve_path(path: str, base_dir: str | os.PathLike | None) -> str:
    """An absolute path: `path` itself, else under `base_dir` if that exists, else under the cwd if that exists."""
    if os.path.isabs(path):
        return os.path.normpath(path)
    candidates = ([os.path.join(base_dir, path)] if base_dir is not None else []) + [path]
    found = next((c for c in candidates if os.path.exists(c)), candidates[0])
    return os.path.abspath(found)


def check_duplicate_fields(text: str, where: str = "<yaml>") -> None:
    """Refuse a field named twice in one source's `fields:` (YAML loaders silently keep only the last one)."""
    root = yaml.compose(text)
    if not isinstance(root, yaml.MappingNode):
        return
    sources = next((v for k, v in root.value if k.value == "sources"), None)
    if not isinstance(sources, yaml.MappingNode):
        return
    for source_key, source in sources.value:
        if not isinstance(source, yaml.MappingNode):
            continue
        fields = next((v for k, v in source.value if k.value == "fields"), None)
        if not isinstance(fields, yaml.MappingNode):
            continue
        seen: dict[str, str] = {}
        for key, spec in fields.value:
            column = spec.value if isinstance(spec, yaml.ScalarNode) else next(
                (v.value for k, v in getattr(spec, "value", []) if getattr(k, "value", None) == "column"), "?")
            if key.value in seen:
                raise DataError(f"{where}: source {source_key.value!r}: columns {seen[key.value]!r} and {column!r} "
                                f"are both mapped to field {key.value!r} (line {key.start_mark.line + 1})")
            seen[key.value] = column


def load_sources(path: str | os.PathLike) -> dict[str, DataSource]:
    """Every source of a YAML file's `sources:` block (a `sources.yaml` or a curriculum), paths resolved."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"sources file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        check_duplicate_fields(text, str(path))
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise DataError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("sources"), dict):
        raise DataError(f"{path}: expected a top-level 'sources:' mapping of source names to declarations")
    return {name: DataSource.from_dict(name, spec, path.parent) for name, spec in raw["sources"].items()}


# ---------------------------------------------------------------------------------------------------- parsing
def parse_times(column: pd.Series, where: str) -> pd.Series:
    """A time column -> naive datetimes in the data's own local time. Whole numbers in 1..9999 are read as years.

    Time stamps with a UTC offset (`2020-03-01T00:00:00+05:00`) or a time zone keep their wall-clock time: the
    offset is dropped, not converted, so a month start stays in its month and snaps to its own period. Offsets that
    differ between rows (or rows with and without one) are refused: no single local clock is left to keep.
    Training (`DataSource.read`) and forecasting (`forecasting.to_frame`) both read time through here.
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
        times = pd.to_datetime(pd.Series(numbers.astype(int)).astype(str).str.zfill(4), format="%Y")
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


def numeric_values(column: pd.Series, where: str) -> np.ndarray:
    """A column -> float64 values with NaN for missing and non-finite entries; text that is not a number raises."""
    numbers = pd.to_numeric(column, errors="coerce")
    if not pd.api.types.is_numeric_dtype(column):
        text = column.astype("string").str.strip().str.lower()
        blank = column.isna() | text.isin(["", "nan", "na", "n/a", "null", "none", "inf", "-inf", "+inf"])
        non_numeric = numbers.isna() & ~blank.fillna(True).astype(bool)
        if non_numeric.any():
            raise DataError(f"{where}: not numeric ({int(non_numeric.sum())} value(s) such as "
                            f"{column[non_numeric].iloc[0]!r})")
    values = numbers.to_numpy(dtype=np.float64, na_value=np.nan)
    return np.where(np.isfinite(values), values, np.nan)


# ---------------------------------------------------------------------------------------------------- transforms
def apply_transform(series: pd.Series, transform: str, where: str = "") -> pd.Series:
    """Raw values -> modelled values.

    diff / pct_change / log_return act between consecutive *observations* of the series (gaps are skipped, not grid
    steps), so they are NaN at the first observation.
    """
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
    """Modelled values of consecutive future observations (axis 0) -> raw values.

    `log` and `none` are pointwise. `diff`, `pct_change` and `log_return` are accumulated from `last_raw`, the last
    observed raw value before the first step (for a field on a coarser grid than the node's: its previous
    observation, not the previous grid step).
    """
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


def denormalize(values: np.ndarray, stats: FieldStats) -> np.ndarray:
    """The model's units -> transformed values (still logs / changes where a transform applies)."""
    return np.asarray(values, dtype=np.float64) * stats.std + stats.mean


def to_data_units(values: np.ndarray, stats: FieldStats, last_raw: float | None = None) -> np.ndarray:
    """Normalised predictions of consecutive observations -> the data's own units (see `invert_transform`)."""
    return invert_transform(denormalize(values, stats), stats.transform, last_raw)


# ---------------------------------------------------------------------------------------------------- alignment
def _mean_step(freq: str) -> pd.Timedelta:
    """Average length of one step of a frequency (12 steps from a fixed date, so W, B and MS compare fairly)."""
    start = pd.Timestamp("2000-01-01")
    return ((start + 12 * pd.tseries.frequencies.to_offset(freq)) - start) / 12


def regular_grid(first: pd.Timestamp, last: pd.Timestamp, freq: str, where: str = "the time grid"
                 ) -> pd.DatetimeIndex:
    """Every step of `freq` from the start of the period holding `first` through `last`.

    Refuses (naming `where`) a grid of more than MAX_GRID_STEPS steps before allocating it: `frequency: ns` on
    monthly data would be about 10**17 steps.
    """
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


def align(frames: dict[str, pd.DataFrame], frequencies: dict[str, str | None]) -> tuple[pd.DataFrame, str]:
    """Put every source on one regular grid at the finest declared (or inferred) frequency; NaN where absent."""
    freqs = {}
    for name, frame in frames.items():
        freq = frequencies.get(name)
        if not freq:
            freq = pd.infer_freq(frame.index) if len(frame.index) >= 3 else None
            if freq is None:
                raise DataError(f"source {name!r}: cannot infer the frequency of its time column (gaps or irregular "
                                "dates); declare 'frequency' (e.g. D, W, MS, QS, YS)")
        freqs[name] = freq
    grid_freq = min(freqs.values(), key=_mean_step)
    first = min(f.index.min() for f in frames.values())
    last = max(f.index.max() for f in frames.values())
    grid = regular_grid(first, last, grid_freq, f"sources {list(frames)}")
    placed = []
    for frame in frames.values():
        steps = snap(frame.index, grid)  # (rows,) grid positions
        placed.append(frame.groupby(steps).mean().reindex(range(len(grid))))
    aligned = pd.concat(placed, axis=1)
    aligned.index = grid.rename("time")
    return aligned, grid_freq


# ---------------------------------------------------------------------------------------------------- windows
class CanvasDataset(torch.utils.data.Dataset):
    """Windows of `context_len` steps over a node's fields, precomputed once; `__getitem__` is a slice.

    Items: "values" (T, F) float32 normalised with 0.0 where absent, "presence" (T, F) bool, and for validation
    "holdout" (T, F) bool, the positions that belong to the held-out tail (the only ones a validation loss scores).
    """

    def __init__(self, values: np.ndarray, presence: np.ndarray, starts: np.ndarray, context_len: int,
                 field_names: list[str], stats: dict[str, FieldStats], holdout: np.ndarray | None = None,
                 index: pd.DatetimeIndex | None = None):
        self.values = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))  # (L, F) normalised, 0 absent
        self.presence = torch.from_numpy(np.ascontiguousarray(presence, dtype=bool))  # (L, F)
        self.holdout = None if holdout is None else torch.from_numpy(np.ascontiguousarray(holdout, dtype=bool))
        self.starts = np.asarray(starts, dtype=np.int64)  # (windows,) first grid step of each window
        self.context_len = context_len
        self.field_names = field_names
        self.stats = stats
        self.index = index  # (L,) grid times, to date a window: index[starts[i]]

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        s = int(self.starts[i])
        item = {"values": self.values[s:s + self.context_len], "presence": self.presence[s:s + self.context_len]}
        if self.holdout is not None:
            item["holdout"] = self.holdout[s:s + self.context_len]
        return item


def collate_canvas(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack windows: every key becomes (B, T, F)."""
    return {key: torch.stack([it[key] for it in items]) for key in items[0]}


@dataclass
class NodeData:
    """Everything a node trains and validates on."""

    train: CanvasDataset
    val: CanvasDataset
    field_names: list[str]
    stats: dict[str, FieldStats]
    frequency: str  # the grid's pandas frequency
    date_range: dict[str, tuple[str, str]] = field(default_factory=dict)  # field -> (first, last) observed date
    index: pd.DatetimeIndex | None = None  # (L,) the aligned grid


def mean_std(values: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation of finite float64 values, computed on values scaled by their largest magnitude.

    Squares of values near 1e-300 underflow to 0 (and of values near 1e300 overflow to inf), so a plain `np.std`
    would call such a field constant (or infinite); scaled to at most 1 first, the spread survives.
    """
    scale = float(np.max(np.abs(values))) if len(values) else 0.0
    if scale == 0.0:
        return 0.0, 0.0
    scaled = values / scale
    return float(np.mean(scaled)) * scale, float(np.std(scaled)) * scale


def _window_starts(length: int, context_len: int, stride: int) -> np.ndarray:
    """Starts every `stride` steps, plus the last full window so the newest data are always used."""
    starts = np.arange(0, length - context_len + 1, stride)
    if len(starts) and starts[-1] != length - context_len:
        starts = np.append(starts, length - context_len)
    return starts


def _windows_with(mask: np.ndarray, starts: np.ndarray, context_len: int) -> np.ndarray:
    """The starts whose window holds at least one True of `mask` (L, F)."""
    counts = np.concatenate([[0], np.cumsum(mask.any(axis=1))])  # (L + 1,) running count of steps with a True
    return starts[counts[starts + context_len] - counts[starts] > 0]


def build_node_data(sources: list[DataSource], fields: list[str] | None = None, context_len: int = 24,
                    val_fraction: float = 0.2, stride: int = 1) -> NodeData:
    """Read, transform, align, split, normalise and window a node's sources.

    Args:
        sources: the node's sources; every field name must come from exactly one of them.
        fields: the node's fields in canvas order; None takes every field of the sources.
        context_len: T, steps per window on the aligned grid.
        val_fraction: the last fraction of every field's observations held out for validation (statistics and
            training windows never see it).
        stride: steps between window starts (the last full window is always included).
    """
    if not sources:
        raise DataError("a node needs at least one data source")
    if isinstance(context_len, bool) or not isinstance(context_len, int) or context_len < 1:
        raise DataError(f"context_len must be a positive integer, got {context_len!r}")
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise DataError(f"stride must be a positive integer, got {stride!r}")
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    names = [s.name for s in sources]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataError(f"source(s) {repeated} given twice to one node (sources: {names})")
    owner: dict[str, DataSource] = {}
    for source in sources:
        for name, spec in source.fields.items():
            if name in owner:
                first = owner[name]
                raise DataError(f"field {name!r} is declared twice: source {first.name!r} (column "
                                f"{first.fields[name].column!r}) and source {source.name!r} (column {spec.column!r})")
            owner[name] = source
    field_names = list(owner) if fields is None else list(fields)
    unknown = [f for f in field_names if f not in owner]
    if unknown or len(set(field_names)) != len(field_names):
        raise DataError(f"fields {unknown or field_names} are unknown or repeated (sources: "
                        f"{[s.name for s in sources]} declare {list(owner)})")

    frames, frequencies = {}, {}
    for source in sources:
        wanted = [f for f in source.fields if f in field_names]
        if not wanted:
            continue
        frame = source.read()[wanted]
        for name in wanted:
            observations = int(frame[name].notna().sum())
            if observations < max(context_len, 2):
                raise DataError(f"source {source.name!r}, column {source.fields[name].column!r}: field {name!r} has "
                                f"{observations} observation(s) after its transform; one window needs at least "
                                f"{max(context_len, 2)} (context_len={context_len})")
        frames[source.name], frequencies[source.name] = frame, source.frequency
    grid, frequency = align(frames, frequencies)
    grid = grid[field_names]
    raw = grid.to_numpy(dtype=np.float64)  # (L, F) transformed, NaN where absent
    observed = ~np.isnan(raw)  # (L, F)

    is_val = np.zeros_like(observed)  # (L, F) the last val_fraction of every field's own observations
    stats, date_range = {}, {}
    for j, name in enumerate(field_names):
        spec = owner[name].fields[name]
        rows = np.flatnonzero(observed[:, j])
        n_val = min(len(rows) - 1, max(1, round(len(rows) * val_fraction)))
        is_val[rows[-n_val:], j] = True
        mean, std = mean_std(raw[rows[:-n_val], j])
        stats[name] = FieldStats(name, mean, std if std > 0 else 1.0, spec.transform, spec.unit)
        date_range[name] = (str(grid.index[rows[0]].date()), str(grid.index[rows[-1]].date()))
    means = np.array([stats[n].mean for n in field_names])  # (F,)
    stds = np.array([stats[n].std for n in field_names])  # (F,)
    normalised = np.where(observed, (raw - means) / stds, 0.0)  # (L, F)
    train_presence = observed & ~is_val  # (L, F)

    starts = _window_starts(len(grid), context_len, stride)
    if len(starts) == 0:
        raise DataError(f"sources {list(frames)}: the aligned series has {len(grid)} steps at frequency "
                        f"{frequency!r}; one window needs context_len={context_len}")
    train = CanvasDataset(np.where(train_presence, normalised, 0.0), train_presence,
                          _windows_with(train_presence, starts, context_len), context_len, field_names, stats,
                          index=grid.index)
    val = CanvasDataset(normalised, observed, _windows_with(is_val, starts, context_len), context_len, field_names,
                        stats, holdout=is_val, index=grid.index)
    return NodeData(train=train, val=val, field_names=field_names, stats=stats, frequency=frequency,
                    date_range=date_range, index=grid.index)
