"""From declared sources to a node's canvas windows: sources, their statistics, the train/validation split, windows.

Sources are read, transformed per field and put on one regular grid at the node's finest frequency (`tabular`). A
field with no observation at a grid step is *absent* there (presence 0): no imputation, no input, no loss. Statistics
come from each series' training part; its last `val_fraction` of observations is validation, never seen by either.

    sources = load_sources("configuration/data/sources.yaml")
    data = build_node_data(list(sources.values()), fields=None, context_len=24)
    batch = collate_canvas([data.train[i] for i in range(16)])  # {"values": (16, 24, F), "presence": (16, 24, F)}
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from ..io_utils import read_yaml
from ..tabular import (
    TRANSFORMS,
    DataError,
    align,
    apply_transform,
    mean_std,
    numeric_columns,
    parse_times,
    read_table,
    resolve_path,
    to_periods,
)

logger = logging.getLogger(__name__)


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


def check_frequency(frequency, where: str) -> None:
    """A pandas offset alias of a positive step ('D', 'W', 'MS', '3MS'); '0D', '-1MS' or 5 are a DataError."""
    try:
        offset = pd.tseries.frequencies.to_offset(frequency) if isinstance(frequency, str) else None
    except ValueError:
        offset = None
    if offset is None or offset.n < 1:
        raise DataError(f"{where}: frequency {frequency!r:.40} is not a pandas offset alias of a positive step (such "
                        "as 'D', 'W', 'MS', 'QS', 'YS')")


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
        for key in ("path", "dataset", "config", "time_column"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not value):
                raise DataError(f"{where}: {key} must be a string, got {value!r:.80}")
        if self.frequency is not None:
            check_frequency(self.frequency, where)

    @classmethod
    def from_dict(cls, name: str, mapping: dict, base_dir: str | os.PathLike | None = None) -> DataSource:
        """A source from its YAML form (a curriculum's or `sources.yaml`'s `sources:` entry).

        A relative `path` is looked up against `base_dir` (the YAML file's folder), then the working directory; if
        neither exists the `base_dir` one is kept, so the error names where the YAML points. It is stored absolute.
        """
        if not isinstance(mapping, dict):
            raise DataError(f"source {name!r}: expected a mapping with path/dataset, time_column and fields")
        known = {"path", "dataset", "config", "split", "format", "time_column", "frequency", "fields"}
        unknown = sorted(set(mapping) - known)
        if unknown:
            raise DataError(f"source {name!r}: unknown key(s) {unknown}; valid keys are {sorted(known)}")
        raw_fields = mapping.get("fields")
        fields = {}  # a bare column name, a bad spec or no fields at all: checked by __post_init__
        for field_name, spec in raw_fields.items() if isinstance(raw_fields, dict) else []:
            if isinstance(spec, dict) and isinstance(spec.get("column"), str):
                extra = sorted(set(spec) - {"column", "transform", "unit"})
                if extra:
                    raise DataError(f"source {name!r}, column {spec['column']!r}: unknown key(s) {extra} for field "
                                    f"{field_name!r}; valid keys are column, transform, unit")
                unit = spec.get("unit")
                spec = FieldSpec(spec["column"], spec.get("transform") or "none", None if unit is None else str(unit))
            fields[str(field_name)] = spec
        path = resolve_path(str(mapping["path"]), base_dir) if mapping.get("path") else mapping.get("path")
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
    @cached_property
    def _reported(self) -> set[str]:
        """Warnings this source has given (a run reads a source once per node that uses it, and more)."""
        return set()

    def read(self) -> pd.DataFrame:
        """The source's fields, transformed, indexed by time: one column per field name, NaN where missing (NaN and
        ±inf cells too: counted and reported in one warning per source object, i.e. once per run)."""
        table = self.load_table()
        where = f"source {self.name!r}"
        if self.time_column not in table.columns:
            raise DataError(f"{where}, column {self.time_column!r}: no such time column; "
                            f"available columns are {list(table.columns)}")
        times = parse_times(table[self.time_column], f"{where}, column {self.time_column!r}")
        columns = numeric_columns(table, {name: spec.column for name, spec in self.fields.items()}, where)
        missing = {self.fields[name].column: int(np.isnan(values).sum()) for name, values in columns.items()
                   if np.isnan(values).any()}
        message = f"source {self.name!r}: {sum(missing.values())} NaN/inf value(s) treated as missing (" + ", ".join(
            f"{c}: {n}" for c, n in missing.items()) + ")"
        if missing and message not in self._reported:  # once per source and run, not once per node that reads it
            self._reported.add(message)
            logger.warning(message)
        frame = pd.DataFrame(columns, index=pd.DatetimeIndex(times, name="time")).sort_index(kind="stable")
        rows = len(frame)
        frame = to_periods(frame, self.frequency, where)
        if len(frame) < rows:
            logger.warning("source %r, column %r: %d rows share a time step; they were averaged into %d periods "
                           "(%d rows fewer)", self.name, self.time_column, rows, len(frame), rows - len(frame))
        for field_name, spec in self.fields.items():
            frame[field_name] = apply_transform(frame[field_name], spec.transform, f"{where}, column {spec.column!r}")
        return frame

    def load_table(self) -> pd.DataFrame:
        """The raw table: the local file (`tabular.read_table`) or the Hub dataset (`datasets.load_dataset`)."""
        if self.path:
            return read_table(self.path, self.format, f"source {self.name!r}")
        import datasets

        try:
            table = datasets.load_dataset(self.dataset, self.config, split=self.split)
        except Exception as err:  # the Hub, offline, a bad id: say which source
            raise DataError(f"source {self.name!r}: cannot load dataset {self.dataset!r}: "
                            f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
        return table.to_pandas()


def check_duplicate_fields(text: str | yaml.Node, where: str = "<yaml>") -> None:
    """Refuse a field named twice in one source's `fields:` (YAML loaders silently keep only the last one); `text`
    is the YAML text or its composed document."""
    def child(node, key: str):  # the value under `key` of a mapping node, else None
        return next((v for k, v in node.value if k.value == key), None) if isinstance(node, yaml.MappingNode) else None

    sources = child(yaml.compose(text) if isinstance(text, str) else text, "sources")
    for source_key, source in sources.value if isinstance(sources, yaml.MappingNode) else []:
        fields = child(source, "fields")
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
    try:
        raw = read_yaml(path, check_node=lambda root: check_duplicate_fields(root, str(path))) or {}
    except yaml.YAMLError as err:
        raise DataError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("sources"), dict):
        raise DataError(f"{path}: expected a top-level 'sources:' mapping of source names to declarations")
    return {name: DataSource.from_dict(name, spec, path.parent) for name, spec in raw["sources"].items()}


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
    field_frequencies: dict[str, str] = field(default_factory=dict)  # field -> its source's own frequency
    date_range: dict[str, tuple[str, str]] = field(default_factory=dict)  # field -> (first, last) observed date
    index: pd.DatetimeIndex | None = None  # (L,) the aligned grid


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


def _read_node_sources(sources: list[DataSource], fields: list[str] | None, context_len: int) -> tuple[
        dict[str, DataSource], list[str], dict[str, pd.DataFrame], dict[str, str | None]]:
    """{field: its source}, the node's fields in canvas order (all if None), and each source's wanted fields read
    and transformed, with its declared frequency; a field declared twice or with too few observations raises."""
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
    return owner, field_names, frames, frequencies


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
    for name, value in (("context_len", context_len), ("stride", stride)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DataError(f"{name} must be a positive integer, got {value!r}")
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    owner, field_names, frames, frequencies = _read_node_sources(sources, fields, context_len)
    grid, frequency, source_frequencies = align(frames, frequencies)
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
                    field_frequencies={name: source_frequencies[owner[name].name] for name in field_names},
                    date_range=date_range, index=grid.index)
