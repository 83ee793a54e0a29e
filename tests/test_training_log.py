"""What a run prints and records: one warning per source, a join's retention only with its rows, the validation
windows' 10-90 % coverage."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import peft
import torch
from accelerate import Accelerator

from modeling_gwm import GWMModel, LoopConfig
from modeling_gwm.model.base import TINY_BASE_PATH
from modeling_gwm.model.data import DataSource, build_node_data, collate_canvas
from modeling_gwm.training.trainer import summary, validation_scores


def _source(tmp_path) -> DataSource:
    values = np.sin(np.arange(60) / 4.0) + 2.0
    values[[3, 10, 20]] = np.nan
    values[30] = np.inf
    path = tmp_path / "co2.csv"
    pd.DataFrame({"date": pd.date_range("2000-01-01", periods=60, freq="MS"), "co2": values}).to_csv(path, index=False)
    return DataSource(name="co2", fields={"climate.co2": "co2"}, path=str(path), frequency="MS")


def test_missing_values_of_a_source_are_reported_once_per_run(tmp_path, caplog):
    source = _source(tmp_path)
    with caplog.at_level(logging.WARNING, logger="modeling_gwm.model.data"):
        for _ in range(3):  # preflight, the node, a join's retention: each reads the source
            build_node_data([source], context_len=12)
    lines = [r.getMessage() for r in caplog.records if "treated as missing" in r.getMessage()]
    assert lines == ["source 'co2': 4 NaN/inf value(s) treated as missing (co2: 4)"]


def _dag(retention) -> dict:
    return {"order": ["a", "b", "j"], "nodes": {
        "a": {"status": "done", "val_loss_start": 1.0, "val_loss_end": 0.5, "val_loss_best": 0.5, "best_step": 2},
        "b": {"status": "done", "val_loss_start": 1.0, "val_loss_end": 0.6, "val_loss_best": 0.6, "best_step": 2},
        "j": {"status": "done", "val_loss_start": 0.9, "val_loss_end": 0.7, "val_loss_best": 0.7, "best_step": 2,
              "retention": retention}}}


def test_summary_prints_a_joins_retention_only_with_its_rows():
    recorded = {"a": {"parent_val_loss": 0.5, "merged_val_loss": 0.55, "retention": 0.91},
                "b": {"parent_val_loss": 0.6, "merged_val_loss": None, "retention": None}}
    text = summary(_dag(recorded), "out")
    assert "join j: merged adapter" in text
    assert "a            parent 0.5000  merged 0.5500" in text and "b            parent 0.6000  merged -" in text
    for empty in (None, {}, {"a": None, "b": {"parent_val_loss": None, "merged_val_loss": None}}):
        assert "join j" not in summary(_dag(empty), "out")


def test_validation_coverage_is_the_share_of_targets_inside_the_10_90_band(tmp_path):
    torch.manual_seed(0)
    data = build_node_data([_source(tmp_path)], context_len=12)
    model = GWMModel.from_pretrained(TINY_BASE_PATH, d_model=32, context_len=12, horizon=3)
    model = peft.get_peft_model(model, LoopConfig(n_loops=1, fields=[{"name": "climate.co2"}]), adapter_name="n")
    acc = Accelerator(cpu=True)
    ids = torch.tensor([0])
    scores = validation_scores(acc, model, data.val, ids, 3, 8)
    # by hand: the same windows, the band's hits counted over the scored positions
    picks = torch.linspace(0, len(data.val) - 1, min(len(data.val), 8)).round().long().unique()
    batch = collate_canvas([data.val[int(i)] for i in picks])
    values, presence = batch["values"], batch["presence"]
    target = torch.zeros_like(presence)
    target[:, -3:] = True
    with torch.no_grad():
        quantiles = model.eval()(values, presence, field_ids=ids, target_mask=target).quantiles
    levels = list(model.get_base_model().config.quantile_levels)
    low, high = quantiles[..., levels.index(0.1)], quantiles[..., levels.index(0.9)]
    scored = target & presence & batch.get("holdout", presence)
    inside = scored & (values >= low) & (values <= high)
    assert scores["val_coverage_10_90"] == float(inside.sum()) / float(scored.sum())
    assert 0.0 <= scores["val_coverage_10_90"] <= 1.0
