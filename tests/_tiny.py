"""A tiny curriculum over the shipped data and base, for tests that train (seconds, not minutes)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
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


def canvas_batch(seed: int = 0):
    """A small random canvas batch (B=2, T=6, F=3): values, presence, and a target mask on the last two steps."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(2, 6, 3, generator=g)  # (B, T, F)
    presence = torch.rand(2, 6, 3, generator=g) > 0.1
    target = torch.zeros_like(presence)
    target[:, -2:] = True
    return values, presence, target


def train_steps(peft_model, steps: int = 3, seed: int = 0) -> None:
    """Real optimizer steps on the active adapter, so it differs from its initialisation."""
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=0.05)
    values, presence, target = canvas_batch(seed)
    for _ in range(steps):
        optimizer.zero_grad()
        peft_model(values, presence, target_mask=target).loss.backward()
        optimizer.step()
