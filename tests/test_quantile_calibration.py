"""Quantiles calibrated on the node's validation windows (`calibrate_quantiles`): the fit on its own, then a real tiny
DAG trained with it: the band changes, its pinball loss on the validation targets falls and their coverage moves
toward the nominal levels,
the median stays bit for bit, a join and a fork fit their own (or none), adapters without calibration forecast as
before, and bad values are one line (exit 2 for the curriculum).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from _tiny import DATA, TINY_BASE, tiny_curriculum, write_curriculum

from modeling_gwm import GWMModel
from modeling_gwm.forecasting.pipeline import (
    QUANTILE_SCALE_BOUNDS,
    AdapterSpec,
    coverage_error,
    fit_quantile_scales,
    forecast_quantiles,
    mean_pinball,
    predict_df,
    predict_windows,
    scale_quantiles,
)
from modeling_gwm.hub.cards import render_node_card
from modeling_gwm.model.adapter_files import AdapterLoadError
from modeling_gwm.model.data import collate_canvas
from modeling_gwm.training.curriculum import CurriculumError, load_curriculum
from modeling_gwm.training.train_cli import main as train_main
from modeling_gwm.training.trainer import DAGCurriculumTrainer

LEVELS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
Z = np.array([-1.2816, -0.8416, -0.5244, -0.2533, 0.0, 0.2533, 0.5244, 0.8416, 1.2816])  # N(0, 1) quantiles


# ---------------------------------------------------------------------------------------------------- the fit
def test_a_band_half_too_narrow_is_widened_twofold():
    rng = np.random.default_rng(0)
    centre = rng.normal(size=4000)
    actual = centre + rng.normal(size=4000)  # N(centre, 1)
    quantiles = centre[:, None] + 0.5 * Z[None, :]  # the band of N(centre, 0.25): too narrow by half
    scales = fit_quantile_scales(actual, quantiles, LEVELS)
    assert scales[4] == 1.0 and len(set(scales[:4] + scales[5:])) == 1  # one factor per field
    assert abs(scales[0] - 2.0) < 0.1
    calibrated = scale_quantiles(quantiles[:, None], np.asarray(scales)[None], 4)[:, 0]
    assert coverage_error(actual, calibrated, LEVELS) < 0.02 < coverage_error(actual, quantiles, LEVELS)
    assert mean_pinball(actual, calibrated, LEVELS) < 0.95 * mean_pinball(actual, quantiles, LEVELS)
    assert np.array_equal(calibrated[:, 4], quantiles[:, 4])  # the median bit for bit
    assert (np.diff(calibrated, axis=1) >= 0).all()


def test_a_right_band_keeps_a_factor_near_one_and_no_fit_is_worse_than_none():
    rng = np.random.default_rng(3)
    centre = rng.normal(size=3000)
    actual = centre + rng.normal(size=3000)
    assert abs(fit_quantile_scales(actual, centre[:, None] + Z[None, :], LEVELS)[0] - 1.0) < 0.1
    for _ in range(20):  # whatever the band, the fitted one scores no worse on the targets it was fitted on
        n = int(rng.integers(20, 60))
        y, q = rng.standard_t(2, size=n), np.sort(rng.normal(size=(n, 9)), axis=1) * rng.uniform(0.01, 10)
        scales = fit_quantile_scales(y, q, LEVELS)
        assert mean_pinball(y, scale_quantiles(q, np.asarray(scales), 4), LEVELS) <= mean_pinball(y, q, LEVELS)


def test_factors_are_bounded_and_need_enough_targets():
    rng = np.random.default_rng(1)
    actual = 100 * rng.normal(size=500)
    quantiles = np.zeros((500, 1)) + 0.01 * Z[None, :]  # absurdly narrow: the factor stops at the upper bound
    assert fit_quantile_scales(actual, quantiles, LEVELS) == [QUANTILE_SCALE_BOUNDS[1]] * 4 + [1.0] + [
        QUANTILE_SCALE_BOUNDS[1]] * 4
    assert fit_quantile_scales(actual[:5], quantiles[:5], LEVELS) is None  # too few validation targets


def test_scaling_keeps_the_median_and_the_order_of_crossing_factors():
    quantiles = np.sort(np.random.default_rng(2).normal(size=(50, 3, 9)), axis=-1)
    scales = np.tile([[0.3, 3.0, 0.3, 3.0, 1.0, 3.0, 0.3, 3.0, 0.3]], (3, 1))  # would cross without the sort
    out = scale_quantiles(quantiles, scales, 4)
    assert np.array_equal(out[..., 4], quantiles[..., 4])
    assert (np.diff(out, axis=-1) >= 0).all()


# ---------------------------------------------------------------------------------------------------- a real run
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The tiny DAG, every node calibrated but the fork `ocean` (whose fields partly come from its parents)."""
    tmp = tmp_path_factory.mktemp("calibrated")
    spec = tiny_curriculum(steps=8, checkpoint_every=100, calibrate_quantiles=False)
    spec["defaults"].update(calibrate_quantiles=True, eval_every=4, lr_scheduler_type="constant")
    trainer = DAGCurriculumTrainer(curriculum=load_curriculum(write_curriculum(tmp, spec)),
                                   output_dir=str(tmp / "out"), device="cpu", write_cards=False)
    trainer.run()
    return trainer, tmp


def _fields(folder) -> dict[str, dict]:
    return {f["name"]: f for f in json.loads((folder / "adapter_config.json").read_text())["fields"]}


def _uncalibrated_copy(folder, into):
    """The same adapter without its calibration: what an adapter made before it (or trained without it) holds."""
    shutil.copytree(folder, into)
    config = json.loads((into / "adapter_config.json").read_text())
    for entry in config["fields"]:
        entry.pop("quantile_scale")
    (into / "adapter_config.json").write_text(json.dumps(config))
    return into


def _validation_windows(trainer, node: str):
    """The node's validation windows as forecasting sees them: (values with NaN where absent, target, scored)."""
    data, spec = trainer.plan.node_data(node), trainer.curriculum.node(node)
    batch = collate_canvas([data.val[i] for i in range(len(data.val))])
    values = batch["values"].numpy().astype(np.float64)
    presence, holdout = batch["presence"].numpy(), batch["holdout"].numpy()
    values[~presence] = np.nan
    target = np.zeros_like(presence)
    target[:, -spec.horizon:] = True
    return data.field_names, values, target, target & presence & holdout


def test_a_calibrated_node_moves_its_validation_coverage_toward_nominal(run, tmp_path):
    trainer, _ = run
    folder = trainer.run_folder.node_dir("climate")
    scale = _fields(folder)["climate.co2.mauna_loa"]["quantile_scale"]
    assert len(scale) == 9 and scale[4] == 1.0 and abs(scale[0] - 1.0) > 0.05
    metrics = json.loads((folder / "metrics.json").read_text())["quantile_calibration"]
    assert metrics["scales"]["climate.co2.mauna_loa"] == scale
    assert metrics["pinball_after"] < metrics["pinball_before"]
    assert metrics["coverage_error_after"] < metrics["coverage_error_before"]

    # the same through forecasting's own path: the written adapter against its uncalibrated copy
    calibrated = GWMModel.from_pretrained(TINY_BASE, folder, device="cpu")
    plain = GWMModel.from_pretrained(TINY_BASE, _uncalibrated_copy(folder, tmp_path / "plain"), device="cpu")
    names, values, target, scored = _validation_windows(trainer, "climate")
    slots = AdapterSpec.from_model(calibrated).slots(names)
    before = predict_windows(plain, values, slots, target)
    after = predict_windows(calibrated, values, slots, target)
    assert np.array_equal(after[..., 4], before[..., 4])  # the median bit for bit
    assert not np.allclose(after, before)
    actual = values[scored]
    assert mean_pinball(actual, after[scored], LEVELS) < mean_pinball(actual, before[scored], LEVELS)
    assert coverage_error(actual, after[scored], LEVELS) < coverage_error(actual, before[scored], LEVELS)


def test_forecast_quantiles_and_predict_df_carry_the_calibrated_band(run, tmp_path):
    trainer, _ = run
    folder = trainer.run_folder.node_dir("climate")
    calibrated = GWMModel.from_pretrained(TINY_BASE, folder, device="cpu")
    plain = GWMModel.from_pretrained(TINY_BASE, _uncalibrated_copy(folder, tmp_path / "plain"), device="cpu")
    history = pd.read_csv(DATA / "co2_mauna_loa_monthly.csv").rename(columns={"co2": "climate.co2.mauna_loa"})
    history = history[["date", "climate.co2.mauna_loa"]].iloc[-60:]
    cal, old = (forecast_quantiles(m, history, 6) for m in (calibrated, plain))
    assert np.array_equal(cal.xs(0.5, axis=1, level="level").to_numpy(), old.xs(0.5, axis=1, level="level").to_numpy())
    assert not np.allclose(cal.to_numpy(), old.to_numpy())
    long = history.rename(columns={"date": "timestamp", "climate.co2.mauna_loa": "target"}).assign(item_id="co2")
    long["timestamp"] = pd.to_datetime(long["timestamp"])
    frames = [predict_df(m, long, target={"target": "climate.co2.mauna_loa"}, prediction_length=6)
              for m in (calibrated, plain)]
    assert np.array_equal(frames[0]["0.5"].to_numpy(), frames[1]["0.5"].to_numpy())
    assert np.allclose(frames[0]["0.9"].to_numpy(), cal["climate.co2.mauna_loa", 0.9].to_numpy())
    assert not np.allclose(frames[0]["0.9"].to_numpy(), frames[1]["0.9"].to_numpy())


def test_a_join_fits_its_own_calibration_and_an_uncalibrated_fork_carries_none(run):
    trainer, _ = run
    macro, climate = (_fields(trainer.run_folder.node_dir(n)) for n in ("macro", "climate"))
    world = _fields(trainer.run_folder.node_dir("world"))
    assert set(world) == set(macro) | set(climate)
    assert all("quantile_scale" in entry for entry in world.values())  # every field trains in the join
    assert world["climate.co2.mauna_loa"]["quantile_scale"] != climate["climate.co2.mauna_loa"]["quantile_scale"]
    ocean = _fields(trainer.run_folder.node_dir("ocean"))
    assert not any("quantile_scale" in entry for entry in ocean.values())  # its parents' factors are not inherited
    assert "quantile_calibration" not in json.loads((trainer.run_folder.node_dir("ocean") / "metrics.json")
                                                    .read_text())


# ---------------------------------------------------------------------------------------------------- bad input
def test_a_calibrate_quantiles_that_is_no_boolean_is_one_line_exit_2(tmp_path, capsys):
    spec = tiny_curriculum()
    spec["nodes"][1]["calibrate_quantiles"] = "yes"
    path = write_curriculum(tmp_path, spec)
    with pytest.raises(CurriculumError, match=r"tiny.yaml: node 'climate': calibrate_quantiles must be true or false"):
        load_curriculum(path)
    assert train_main(["--config", str(path), "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "node 'climate': calibrate_quantiles" in err[0]


@pytest.mark.parametrize("scale", [[1.0] * 3, [1.0] * 4 + [-1.0] + [1.0] * 4, "wide"])
def test_a_damaged_quantile_scale_is_refused_naming_the_file_and_field(run, tmp_path, scale):
    trainer, _ = run
    folder = tmp_path / "damaged"
    shutil.copytree(trainer.run_folder.node_dir("climate"), folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["fields"][0]["quantile_scale"] = scale
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterLoadError, match=r"adapter_config.json: fields\[0\].quantile_scale must be a list of 9"):
        GWMModel.from_pretrained(TINY_BASE, folder, device="cpu")


def test_the_calibration_is_recorded_as_plain_json(run):
    trainer, _ = run
    for node in ("macro", "climate", "world"):
        for entry in _fields(trainer.run_folder.node_dir(node)).values():
            assert all(type(v) is float and QUANTILE_SCALE_BOUNDS[0] <= v <= QUANTILE_SCALE_BOUNDS[1]
                       for v in entry["quantile_scale"])


def test_add_weighted_adapter_carries_no_parent_calibration(run):
    """The factors were fitted for a parent's weights: a merge of calibrated adapters forecasts uncalibrated."""
    trainer, _ = run
    model = GWMModel.from_pretrained(TINY_BASE, trainer.run_folder.node_dir("macro"), adapter_name="macro",
                                     device="cpu")
    model.load_adapter(str(trainer.run_folder.node_dir("climate")), adapter_name="climate")
    assert all("quantile_scale" in entry for entry in model.peft_config["macro"].fields)
    model.add_weighted_adapter(["macro", "climate"], [0.5, 0.5], "merged")
    assert not any("quantile_scale" in entry for entry in model.peft_config["merged"].fields)
    assert all("quantile_scale" in entry for entry in model.peft_config["macro"].fields)  # the parents keep theirs


def test_the_card_reports_the_band_the_adapter_forecasts_with(run):
    """The card's coverage row is the calibrated band's (before -> after), not the uncalibrated last evaluation's."""
    trainer, _ = run
    folder = trainer.run_folder.node_dir("climate")
    calibration = json.loads((folder / "metrics.json").read_text())["quantile_calibration"]
    assert 0.0 <= calibration["coverage_10_90_before"] <= 1.0 and 0.0 <= calibration["coverage_10_90_after"] <= 1.0
    card = str(render_node_card(trainer.output_dir, "climate"))
    assert "10–90 % band of this adapter (before → after its calibration" in card
    assert f"{calibration['coverage_10_90_after']:.4f}" in card
