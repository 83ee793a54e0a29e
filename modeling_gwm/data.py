"""From files (or Hub datasets) to canvas windows: sources, transforms, normalisation, alignment, windows.

Every source is read through `datasets.load_dataset`, transformed per field, and placed on one regular time grid at
the finest frequency of the node's sources. A field that has no observation at a grid step is *absent* there
(presence 0): no imputation, no input, no loss. Statistics come from the training part of each series only; the last
`val_fraction` of every series' observations is validation and never reaches the statistics or training windows.
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

logger = logging.getLogger(__name__)

TRANSFORMS = ("none", "log", "diff", "pct_change", "log_return")
_FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".json": "json", ".jsonl": "json"}


class DataError(ValueError):
    """Bad data or a bad source declaration; the message names the source and the column."""


@dataclass(frozen=True)
class FieldSpec:
    """Where a field comes from in its source, and how it is transformed before normalisation."""

    column: str
    transform: str = "none"
    unit: str | None = None


@dataclass(frozen=True)
class FieldStats:
    """Normalisation of one field (computed on its training part, after the transform); travels with the adapter."""

    name: str
    mean: float
    std: float
    transform: str = "none"
    unit: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> FieldStats:
        return cls(name=d["name"], mean=float(d.get("mean", 0.0)), std=float(d.get("std", 1.0)) or 1.0,
                   transform=d.get("transform", "none") or "none", unit=d.get("unit"))


@dataclass(frozen=True)
class DataSource:
    """One table of time series: a local file or a Hub dataset, its time column and its fields.

    Relative paths are resolved against `base_dir` (the curriculum file's folder) when given.
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

    @classmethod
    def from_dict(cls, name: str, mapping: dict, base_dir: str | os.PathLike | None = None) -> DataSource:
        if not isinstance(mapping, dict):
            raise DataError(f"source {name!r}: expected a mapping with path/dataset, time_column and fields")
        known = {"path", "dataset", "config", "split", "format", "time_column", "frequency", "fields"}
        unknown = sorted(set(mapping) - known)
        if unknown:
            raise DataError(f"source {name!r}: unknown key(s) {unknown}; valid keys are {sorted(known)}")
        if bool(mapping.get("path")) == bool(mapping.get("dataset")):
            raise DataError(f"source {name!r}: give exactly one of 'path' (a local file) or 'dataset' (a Hub id)")
        raw_fields = mapping.get("fields")
        if not isinstance(raw_fields, dict) or not raw_fields:
            raise DataError(f"source {name!r}: 'fields' must map field names to columns")
        fields = {}
        for field_name, spec in raw_fields.items():
            if isinstance(spec, str):
                spec = {"column": spec}
            if not isinstance(spec, dict) or "column" not in spec:
                raise DataError(f"source {name!r}, field {field_name!r}: give a column name or {{column: ...}}")
            extra = sorted(set(spec) - {"column", "transform", "unit"})
            if extra:
                raise DataError(f"source {name!r}, field {field_name!r}: unknown key(s) {extra}")
            fields[str(field_name)] = FieldSpec(str(spec["column"]), spec.get("transform", "none") or "none",
                                                spec.get("unit"))
        path = mapping.get("path")
        if path and base_dir is not None and not os.path.isabs(path):
            path = os.path.normpath(os.path.join(base_dir, path))
        source = cls(name=name, fields=fields, path=path, dataset=mapping.get("dataset"), config=mapping.get("config"),
                     split=mapping.get("split", "train"), format=mapping.get("format"),
                     time_column=mapping.get("time_column", "date"), frequency=mapping.get("frequency"))
        source.validate()
        return source

    def to_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if v is not None and k not in ("name", "fields")}
        out["fields"] = {k: {kk: vv for kk, vv in asdict(v).items() if vv is not None} for k, v in self.fields.items()}
        return out

    def validate(self) -> None:
        for spec in self.fields.values():
            if spec.transform not in TRANSFORMS:
                raise DataError(f"source {self.name!r}, column {spec.column!r}: unknown transform {spec.transform!r};"
                                f" valid transforms are {', '.join(TRANSFORMS)}")
        if self.frequency is not None:
            try:
                pd.tseries.frequencies.to_offset(self.frequency)
            except ValueError:
                raise DataError(f"source {self.name!r}: unknown frequency {self.frequency!r} (a pandas offset alias "
                                "such as 'D', 'MS', 'QS', 'YS')") from None

    # ------------------------------------------------------------------ reading
    def read(self) -> pd.DataFrame:
        """The source's fields, transformed, indexed by time: one column per field name, NaN where missing."""
        table = self._load_table()
        if self.time_column not in table.columns:
            raise DataError(f"source {self.name!r}: no time column {self.time_column!r}; "
                            f"columns are {list(table.columns)}")
        try:
            times = pd.to_datetime(table[self.time_column], format="mixed")
        except (ValueError, TypeError) as err:
            raise DataError(f"source {self.name!r}, column {self.time_column!r}: time values are not dates "
                            f"({str(err).splitlines()[0]})") from None
        if times.isna().any():
            raise DataError(f"source {self.name!r}, column {self.time_column!r}: "
                            f"{int(times.isna().sum())} time value(s) are empty")
        frame = pd.DataFrame(index=pd.DatetimeIndex(times, name="time"))
        bad_values = 0
        for field_name, spec in self.fields.items():
            if spec.column not in table.columns:
                raise DataError(f"source {self.name!r}: no column {spec.column!r} (for field {field_name!r}); "
                                f"columns are {list(table.columns)}")
            column = table[spec.column]
            numeric = pd.to_numeric(column, errors="coerce")
            blank = column.astype(str).str.strip().str.lower().isin(["", "nan", "na", "null", "none"])
            non_numeric = numeric.isna() & column.notna() & ~blank
            if non_numeric.any():
                example = column[non_numeric].iloc[0]
                raise DataError(f"source {self.name!r}, column {spec.column!r}: not numeric (e.g. {example!r})")
            values = numeric.to_numpy(dtype=np.float64)
            not_finite = ~np.isfinite(values) & ~np.isnan(values)
            bad_values += int(not_finite.sum()) + int(np.isnan(values).sum())
            values = np.where(np.isfinite(values), values, np.nan)
            if np.isnan(values).all():
                raise DataError(f"source {self.name!r}, column {spec.column!r}: field {field_name!r} is all NaN")
            frame[field_name] = values
        frame = frame.sort_index()
        if frame.index.has_duplicates:
            frame = frame.groupby(level=0).mean()
        if bad_values:
            logger.warning("source %r: %d NaN/inf value(s) treated as missing", self.name, bad_values)
        for field_name, spec in self.fields.items():
            frame[field_name] = apply_transform(frame[field_name], spec.transform, f"source {self.name!r}, "
                                                f"column {spec.column!r}")
        return frame

    def _load_table(self) -> pd.DataFrame:
        import datasets

        if self.dataset:
            try:
                table = datasets.load_dataset(self.dataset, self.config, split=self.split)
            except Exception as err:  # the Hub, offline, a bad id: say which source
                raise DataError(f"source {self.name!r}: cannot load dataset {self.dataset!r}: "
                                f"{str(err).splitlines()[0]}") from None
            return table.to_pandas()
        if not os.path.isfile(self.path):
            raise DataError(f"source {self.name!r}: file not found: {self.path}")
        fmt = self.format or _FORMATS.get(Path(self.path).suffix.lower())
        if fmt not in ("csv", "parquet", "json"):
            raise DataError(f"source {self.name!r}: cannot tell the format of {self.path}; "
                            "set format: csv|parquet|json")
        if os.path.getsize(self.path) == 0:
            raise DataError(f"source {self.name!r}: file is empty: {self.path}")
        try:
            table = datasets.load_dataset(fmt, data_files=self.path, split="train")
        except Exception as err:
            raise DataError(f"source {self.name!r}: cannot read {self.path} as {fmt}: {str(err).splitlines()[0]}") \
                from None
        return table.to_pandas()


# ---------------------------------------------------------------------------------------------------- transforms
def apply_transform(series: pd.Series, transform: str, where: str = "") -> pd.Series:
    """Raw values -> modelled values. diff/pct_change/log_return are NaN at a series' first observation."""
    observed = series.dropna()
    if transform in ("log", "log_return") and (observed <= 0).any():
        raise DataError(f"{where}: transform {transform!r} needs positive values, found {observed.min()!r}")
    if transform == "none":
        return series
    if transform == "log":
        return np.log(series)
    # change transforms act between consecutive observations of the series, not grid steps
    if transform == "diff":
        changed = observed.diff()
    elif transform == "pct_change":
        changed = observed.pct_change()
    elif transform == "log_return":
        changed = np.log(observed).diff()
    else:
        raise DataError(f"{where}: unknown transform {transform!r}; valid transforms are {', '.join(TRANSFORMS)}")
    return changed.reindex(series.index)


def invert_transform(values: np.ndarray, transform: str, last_raw: float | None = None) -> np.ndarray:
    """Modelled values of consecutive future steps -> raw values.

    `diff`, `pct_change` and `log_return` need `last_raw`, the last observed raw value before the first step; they
    are accumulated from it.
    """
    values = np.asarray(values, dtype=np.float64)
    if transform == "none":
        return values
    if transform == "log":
        return np.exp(values)
    if last_raw is None or not math.isfinite(last_raw):
        raise ValueError(f"transform {transform!r} needs the last observed raw value to invert")
    if transform == "diff":
        return last_raw + np.cumsum(values)
    if transform == "pct_change":
        return last_raw * np.cumprod(1.0 + values)
    if transform == "log_return":
        return last_raw * np.exp(np.cumsum(values))
    raise ValueError(f"unknown transform {transform!r}")


def normalize(values: np.ndarray, stats: FieldStats) -> np.ndarray:
    return (np.asarray(values, dtype=np.float64) - stats.mean) / stats.std


def denormalize(values: np.ndarray, stats: FieldStats) -> np.ndarray:
    return np.asarray(values, dtype=np.float64) * stats.std + stats.mean


# ---------------------------------------------------------------------------------------------------- windows
def _offset_length(freq: str) -> pd.Timedelta:
    start = pd.Timestamp("2000-01-01")
    return (start + pd.tseries.frequencies.to_offset(freq)) - start


def align(frames: dict[str, pd.DataFrame], frequencies: dict[str, str | None]) -> tuple[pd.DataFrame, str]:
    """Put every source on one regular grid at the finest declared frequency (or the inferred one)."""
    freqs = [f for f in frequencies.values() if f]
    for name, frame in frames.items():
        if not frequencies.get(name):
            inferred = pd.infer_freq(frame.index) if len(frame.index) >= 3 else None
            if inferred is None:
                raise DataError(f"source {name!r}: cannot infer the frequency of its time column; declare "
                                "'frequency' (e.g. D, MS, QS, YS)")
            freqs.append(inferred)
    grid_freq = min(freqs, key=_offset_length)
    period = pd.tseries.frequencies.to_offset(grid_freq)
    placed = []
    for frame in frames.values():
        snapped = frame.copy()
        snapped.index = pd.DatetimeIndex([period.rollback(t) for t in snapped.index.normalize()])  # period start
        placed.append(snapped.groupby(level=0).mean())
    start = min(f.index.min() for f in placed)
    end = max(f.index.max() for f in placed)
    grid = pd.date_range(start, end, freq=grid_freq)
    return pd.concat([f.reindex(grid) for f in placed], axis=1), grid_freq


class CanvasDataset(torch.utils.data.Dataset):
    """Windows of `context_len` steps over a node's fields, precomputed once; `__getitem__` is a slice."""

    def __init__(self, values: np.ndarray, presence: np.ndarray, starts: np.ndarray, context_len: int,
                 field_names: list[str], stats: dict[str, FieldStats], holdout: np.ndarray | None = None):
        self.values = torch.from_numpy(values.astype(np.float32))  # (L, F) normalised, 0 where absent
        self.presence = torch.from_numpy(presence)  # (L, F) bool
        self.holdout = None if holdout is None else torch.from_numpy(holdout)  # (L, F) bool: validation positions
        self.starts = starts
        self.context_len = context_len
        self.field_names = field_names
        self.stats = stats

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
    frequency: str
    date_range: dict[str, tuple[str, str]] = field(default_factory=dict)


def build_node_data(sources: list[DataSource], fields: list[str] | None, context_len: int, val_fraction: float = 0.2,
                    stride: int = 1) -> NodeData:
    """Read, transform, align, split, normalise and window a node's sources."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    owner: dict[str, str] = {}
    for source in sources:
        for name in source.fields:
            if name in owner:
                raise DataError(f"field {name!r} is mapped twice: in source {owner[name]!r} and in {source.name!r}")
            owner[name] = source.name
    field_names = list(owner) if fields is None else list(fields)
    unknown = [f for f in field_names if f not in owner]
    if unknown:
        raise DataError(f"field(s) {unknown} are in no source of this node (sources: {[s.name for s in sources]})")
    frames, frequencies = {}, {}
    for source in sources:
        wanted = [f for f in source.fields if f in field_names]
        if not wanted:
            continue
        frame = source.read()[wanted]
        if len(frame) < context_len:
            raise DataError(f"source {source.name!r}: {len(frame)} rows, shorter than one window of "
                            f"context_len={context_len}")
        frames[source.name], frequencies[source.name] = frame, source.frequency
    grid, frequency = align(frames, frequencies)
    grid = grid[field_names]
    raw = grid.to_numpy(dtype=np.float64)  # (L, F) transformed, NaN where absent
    observed = ~np.isnan(raw)
    # the last val_fraction of every field's observations is validation
    is_val = np.zeros_like(observed)
    stats, date_range = {}, {}
    spec = {name: s.fields[name] for s in sources for name in s.fields}
    for j, name in enumerate(field_names):
        rows = np.flatnonzero(observed[:, j])
        if len(rows) < 2:
            raise DataError(f"source {owner[name]!r}, column {spec[name].column!r}: field {name!r} has fewer than 2 "
                            "observations after its transform")
        n_val = max(1, int(round(len(rows) * val_fraction)))
        is_val[rows[-n_val:], j] = True
        train_values = raw[rows[:-n_val], j]
        std = float(np.std(train_values)) if len(train_values) > 1 else 1.0
        stats[name] = FieldStats(name, float(np.mean(train_values)), std if std > 0 else 1.0, spec[name].transform,
                                 spec[name].unit)
        date_range[name] = (str(grid.index[rows[0]].date()), str(grid.index[rows[-1]].date()))
    means = np.array([stats[n].mean for n in field_names])
    stds = np.array([stats[n].std for n in field_names])
    normalised = np.where(observed, (raw - means) / stds, 0.0)
    train_presence = observed & ~is_val
    starts_all = np.arange(0, len(grid) - context_len + 1, stride)
    if len(starts_all) == 0:
        raise DataError(f"the aligned series has {len(grid)} steps, shorter than one window of "
                        f"context_len={context_len} (sources: {[s.name for s in sources]})")
    counts = np.concatenate([np.zeros((1, len(field_names)), int), np.cumsum(train_presence, axis=0)])
    train_starts = starts_all[(counts[starts_all + context_len] - counts[starts_all]).sum(axis=1) > 0]
    val_counts = np.concatenate([np.zeros((1, len(field_names)), int), np.cumsum(is_val, axis=0)])
    val_starts = starts_all[(val_counts[starts_all + context_len] - val_counts[starts_all]).sum(axis=1) > 0]
    train = CanvasDataset(np.where(train_presence, normalised, 0.0), train_presence, train_starts, context_len,
                          field_names, stats)
    val = CanvasDataset(normalised, observed, val_starts, context_len, field_names, stats, holdout=is_val)
    if len(train) == 0:
        raise DataError(f"no training window with data for fields {field_names}")
    return NodeData(train=train, val=val, field_names=field_names, stats=stats, frequency=frequency,
                    date_range=date_range)
