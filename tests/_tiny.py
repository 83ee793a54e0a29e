"""A tiny curriculum over the shipped data and base, for tests that train (seconds, not minutes)."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "configuration" / "data"
TINY_BASE = REPO / "configuration" / "tiny-cogvideox"
DAG_TRAIN = REPO / "training" / "dag_train.py"

SOURCES = {
    "us_macro": {"path": str(DATA / "us_macro_quarterly.csv"), "frequency": "QS",
                 "fields": {"macro.us.unemployment": "unemp", "macro.us.inflation": "infl"}},
    "co2": {"path": str(DATA / "co2_mauna_loa_monthly.csv"), "frequency": "MS",
            "fields": {"climate.co2.mauna_loa": {"column": "co2", "unit": "ppm"}}},
    "enso": {"path": str(DATA / "elnino_nino12_monthly.csv"), "frequency": "MS",
             "fields": {"climate.enso.nino12_sst": "sst"}},
}


def tiny_curriculum(steps: int = 8, checkpoint_every: int = 3, **node_overrides) -> dict:
    """Two roots, a join, a fork after it: the demo's shape at a fraction of its cost."""
    return {
        "model": {"base": str(TINY_BASE), "d_model": 16, "seed": 0},
        "defaults": {"steps": steps, "batch_size": 4, "context_len": 12, "horizon": 2, "n_loops": 2,
                     "learning_rate": 0.005, "eval_windows": 8, "checkpoint_every": checkpoint_every},
        "sources": SOURCES,
        "nodes": [
            {"name": "macro", "sources": ["us_macro"]},
            {"name": "climate", "sources": ["co2"]},
            {"name": "world", "parents": ["macro", "climate"], "sources": ["us_macro", "co2"],
             "merge": {"method": "linear", "weights": [0.6, 0.4]}},
            {"name": "ocean", "parents": ["world"], "sources": ["enso"], **node_overrides},
        ],
    }


def write_curriculum(folder: os.PathLike, spec: dict | None = None, name: str = "tiny.yaml") -> Path:
    path = Path(folder) / name
    path.write_text(yaml.safe_dump(spec or tiny_curriculum(), sort_keys=False))
    return path
